"""Settings of every step as dataclasses that validate themselves and round-trip through JSON.

Field names match CLI flags (`emulator_layers` is `--emulator-layers`), so an
error can name the flag the user has to change. A field made with `option()`
is also a CLI flag: its default and help text are written here once, and the
`offsite` command builds its flags from them (see `offsite.cli`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub.serialization._base import parse_size_to_int  # the shard planner's own reading of sizes

from offsite.constants import DEFAULT_SHARD_SIZE
from offsite.errors import ConfigError, check


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
           **cli: Any) -> Any:
    """A dataclass field that is also a CLI flag.

    `cli` may hold `flags` (the option strings, default `--field-name`), `positional`,
    `choices`, `metavar`, `nargs` and `exclusive` (a name shared by flags of which at most
    one may be given).
    """
    return field(default=default, default_factory=default_factory, metadata={"help": help, **cli})


def shard_size_problems(size: str) -> list[str]:
    """A size as huggingface_hub's shard planner reads it (a number and KB, MB, GB or TB)."""
    try:
        if parse_size_to_int(str(size)) > 0:
            return []
    except ValueError:
        pass
    return [f"--max-shard-size={size} is not a size; use a number with KB, MB, GB or TB (e.g. 500MB, 2GB)"]


def non_negative(problems: list[str], **values: float | int | None) -> None:
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            problems.append(f"{flag(name)}={value} must be a finite number")
        elif value is not None and value < 0:
            problems.append(f"{flag(name)}={value} is negative; use 0 or more")


def positive(problems: list[str], **values: float | int | None) -> None:
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            problems.append(f"{flag(name)}={value} must be a finite number")
        elif value is not None and not value > 0:
            problems.append(f"{flag(name)}={value} must be greater than 0")


class JsonConfig:
    """JSON round-trip shared by every config dataclass."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """The config a JSON object describes; wrong field names and value types are refused, all at once."""
        if not isinstance(data, dict):
            raise ConfigError([f"{cls.__name__} must be a JSON object, got {type(data).__name__}"])
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        hints = typing.get_type_hints(cls)
        problems = [f"unknown {cls.__name__} field {k!r}; known fields: {sorted(known)}" for k in sorted(set(data) - known)]
        problems += [f"{cls.__name__} field {k!r} must be {_type_name(hints[k])}, got {type(v).__name__}"
                     for k, v in data.items() if k in known and not _matches(v, hints[k])]
        check(problems)
        return cls(**data)


def _matches(value: Any, kind: Any) -> bool:
    """Whether a JSON value fits a field's annotation (a nested config may be given as its JSON object)."""
    if kind is Any:
        return True
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(_matches(v, typing.get_args(kind)[0]) for v in value)
    if typing.get_origin(kind) is dict or kind is dict:
        return isinstance(value, dict)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(kind, type) and issubclass(kind, JsonConfig):
        return isinstance(value, (dict, kind))
    return isinstance(value, kind) if isinstance(kind, type) else True


def _type_name(kind: Any) -> str:
    return str(kind).replace("typing.", "").replace("offsite.config.", "")


SELECTIONS = ("uniform", "similarity", "gradient")
COMPRESSIONS = ("lowrank", "int8")  # at most one: both rewrite the same weights
METHOD_PARTS = SELECTIONS + ("share",) + COMPRESSIONS


# The split when none is asked for: keep 30% of the middle block, the 2-8-2 split of the built-in model that
# measured best (docs/results/2026-11-26-split-study.md); the paper keeps 8 of 20 (OPT-1.3B) and 16 of 44 (GPT2-XL).
DEFAULT_DROP_RATIO = 0.7


@dataclass
class SplitConfig(JsonConfig):
    """How the full model's layers are divided between adapter and emulator.

    Exactly one of `emulator_layers` (K, how many middle layers the emulator
    keeps) and `drop_ratio` (fraction of middle layers dropped) may be set; with
    neither, `DEFAULT_DROP_RATIO` applies, so a bundle never carries the whole middle
    block unless asked to (K equal to the middle's size, or a drop ratio of 0). Whether the numbers fit
    a given model is checked by `offsite.emulator.split.plan_split`, which knows its depth.
    """

    bottom: int = option(2, "adapter layers at the bottom")
    top: int = option(2, "adapter layers at the top")
    emulator_layers: int | None = option(None, "middle layers the emulator keeps (K; default: set by "
                                         f"--drop-ratio {DEFAULT_DROP_RATIO}, 8 of 26 on smollm2-135m)",
                                         exclusive="size")
    drop_ratio: float | None = option(None, f"fraction of middle layers to drop (default {DEFAULT_DROP_RATIO})",
                                      exclusive="size")
    # How the emulator is made: a selection (uniform | similarity | gradient), optionally joined with '+' to
    # share (kept layers also run in place of the dropped ones) and one of lowrank | int8.
    method: str = option("uniform", "how the emulator is made: uniform, similarity or gradient, optionally +share "
                         "and +lowrank or +int8 (e.g. similarity+share)", flags=("--method", "--emulator-method"))
    rank_fraction: float = option(0.5, "lowrank: share of each emulator weight's parameters the factors keep")
    calibration: str | None = option(None, "similarity, gradient: text the layer similarities or the adapter's "
                                     "gradients are measured on "
                                     "(default: the --distill corpus)", metavar="CORPUS")

    def __post_init__(self) -> None:
        problems: list[str] = []
        non_negative(problems, bottom=self.bottom, top=self.top)
        if self.bottom == 0 and self.top == 0:
            problems.append("--bottom and --top are both 0: the adapter would be empty; use --bottom 2 --top 2")
        if self.emulator_layers is not None and self.drop_ratio is not None:
            problems.append("--emulator-layers and --drop-ratio both given; pass only one")
        if self.emulator_layers is not None and self.emulator_layers < 1:
            problems.append(f"--emulator-layers={self.emulator_layers} must be at least 1")
        if self.drop_ratio is not None and not 0 <= self.drop_ratio < 1:
            problems.append(f"--drop-ratio={self.drop_ratio} must be in [0, 1)")
        parts = self.method.split("+")
        unknown = [p for p in parts if p not in METHOD_PARTS]
        if unknown or len(set(parts)) != len(parts):
            problems.append(f"--method={self.method!r} is not known; join with '+' at most one selection "
                            f"(uniform, similarity, gradient) and any of share, lowrank or int8, e.g. "
                            "'similarity+share'")
        elif len([p for p in parts if p in SELECTIONS]) > 1 or set(COMPRESSIONS) <= set(parts):
            problems.append(f"--method={self.method!r} combines alternatives: pick one of uniform/similarity/gradient "
                            "and at most one of lowrank/int8")
        if not 0 < self.rank_fraction < 1:
            problems.append(f"--rank-fraction={self.rank_fraction} must be between 0 and 1 (exclusive)")
        check(problems)

    def identity(self) -> dict[str, Any]:
        """The fields that change the emulator: a method's parameters only when that method is used."""
        fields = self.to_dict()
        if self.compression != "lowrank":
            del fields["rank_fraction"]
        if self.selection == "uniform":
            del fields["calibration"]
        return fields

    @property
    def selection(self) -> str:
        return next((p for p in self.method.split("+") if p in SELECTIONS), "uniform")

    @property
    def shares(self) -> bool:
        return "share" in self.method.split("+")

    @property
    def compression(self) -> str | None:
        return next((p for p in self.method.split("+") if p in COMPRESSIONS), None)

    def kept_middle_count(self, middle: int) -> int:
        """K for a middle block of `middle` layers."""
        if self.emulator_layers is not None:
            return self.emulator_layers
        drop = DEFAULT_DROP_RATIO if self.drop_ratio is None else self.drop_ratio
        return max(1, math.ceil(middle * (1 - drop) - 1e-9))


@dataclass
class DistillConfig(JsonConfig):
    """Model owner: train the emulator layers to reproduce the full middle block.

    Loss = kd_weight * MSE(emulator output, full middle block output) / mean square of the
    latter (the paper's normalisation) + kl_weight * KL(full model's next-token distribution ||
    compressed model's) + lm_weight * language-modelling loss of the compressed model.
    `align="per-layer"` also matches every kept layer's output with the full stack's at the
    position it stands for.
    """

    corpus: str = option(help="text corpus: .txt/.jsonl file or built-in name (austen)", flags=("--distill",),
                         metavar="CORPUS")
    steps: int = option(200, "optimizer steps", flags=("--distill-steps",))
    lr: float = option(1e-4, "learning rate", flags=("--distill-lr",))
    batch_size: int = option(4, "sequences per step", flags=("--distill-batch-size",))
    seq_len: int = option(256, "tokens per sequence", flags=("--distill-seq-len",))
    kd_weight: float = option(1.0, "weight of the normalised MSE to the full block")
    # The defaults, kd 1 + KL 1 and no LM loss, measured best of three recipes on the built-in model
    # (docs/results/2026-12-02-fidelity-study.md).
    lm_weight: float = option(0.0, "weight of the compressed model's language-modelling loss on the corpus")
    kl_weight: float = option(1.0, "weight of the KL divergence from the full model's next-token distribution "
                              "to the compressed model's (both models then run to the head)")
    align: str = option("final", "match only the emulator's output, or every kept layer's",
                        choices=("final", "per-layer"))
    kd_normalise: str = option("global", "the MSE over the mean square of all targets (the paper's), or "
                               "each token's squared error over its own squared norm", choices=("global", "token"))
    select: str = option("standin", "checkpoint kept: the best held-out stand-in error for the middle block, "
                         "or the compressed model's best held-out perplexity", flags=("--distill-select",),
                         choices=("standin", "perplexity"))
    eval_every: int = option(50, "steps between held-out checks and checkpoints", flags=("--distill-eval-every",))
    # A file corpus (e.g. text sampled from the model) has no held-out split of its own; the model owner's
    # public text then still picks the checkpoint.
    heldout: str | None = option(None, "held-out text that scores the checkpoints: a built-in corpus (its "
                                 "validation split) or a .txt/.jsonl file (default: the validation split of a "
                                 "built-in --distill corpus; none for a file, which keeps the last checkpoint)",
                                 flags=("--distill-heldout",), metavar="CORPUS")
    eval_windows: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        problems: list[str] = []
        positive(problems, distill_steps=self.steps, distill_lr=self.lr, distill_batch_size=self.batch_size,
                  distill_seq_len=self.seq_len, distill_eval_every=self.eval_every,
                  distill_eval_windows=self.eval_windows)
        non_negative(problems, kd_weight=self.kd_weight, lm_weight=self.lm_weight, kl_weight=self.kl_weight)
        if self.kd_weight == 0 and self.lm_weight == 0 and self.kl_weight == 0:
            problems.append("--kd-weight, --lm-weight and --kl-weight are all 0: nothing to train; set one above 0")
        if self.align not in ("final", "per-layer"):
            problems.append(f"--align={self.align!r} is not known; use 'final' or 'per-layer'")
        if self.kd_normalise not in ("token", "global"):
            problems.append(f"--kd-normalise={self.kd_normalise!r} is not known; use 'token' or 'global'")
        if self.select not in ("standin", "perplexity"):
            problems.append(f"--distill-select={self.select!r} is not known; use 'standin' or 'perplexity'")
        check(problems)


    def identity(self) -> dict[str, Any]:
        """The fields that change the emulator: a loss term switched off (weight 0) adds nothing.

        So results keyed before the term existed stay valid (the demo's stage cache).
        """
        fields = self.to_dict()
        if self.kl_weight == 0:
            del fields["kl_weight"]
        if self.heldout is None:
            del fields["heldout"]
        return fields

# Kept here as names (offsite.device maps them to torch): building the flags must not import torch.
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class DeviceConfig(JsonConfig):
    """Where models run and in what precision (see offsite.device)."""

    device: str = option("auto", "where models run: auto (the first GPU found, else the CPU), cpu, cuda, cuda:N "
                         "or mps")
    dtype: str = option("auto", "compute dtype: auto (bfloat16 on a GPU that supports it, else float32); "
                        "trained weights stay float32", choices=DTYPE_NAMES)

    def __post_init__(self) -> None:
        problems = []
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            problems.append(f"--device {self.device!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
        if self.dtype not in DTYPE_NAMES:
            problems.append(f"--dtype {self.dtype!r} is not a dtype; use one of {', '.join(DTYPE_NAMES)}")
        check(problems)


@dataclass
class EmulateConfig(JsonConfig):
    """Model owner: build a bundle (adapter + emulator + frozen rest) from a full model."""

    model: str = option(help="full model: local directory, hub id or built-in alias", positional=True)
    output: str = option(help="bundle directory to write", flags=("-o", "--output"))
    split: SplitConfig = field(default_factory=SplitConfig)
    distill: DistillConfig | None = None
    overwrite: bool = option(False, "replace an existing output directory")
    sign: str | None = option(None, "sign the bundle with this private key (from `offsite keygen`)", metavar="KEY")
    runtime: DeviceConfig = field(default_factory=DeviceConfig)  # where distillation runs
    num_processes: int = option(1, "distil data-parallel in N processes, started by accelerate's launcher "
                                "(--distill-batch-size is per process)", metavar="N")
    shard_full_model: bool = option(False, "with --num-processes N: each process holds 1/N of the full model's "
                                    "blocks (FSDP), gathered one block at a time, for a full model larger than "
                                    "one device (see docs/scale.md)")
    stream: bool = option(True, "load the whole full model first, instead of reading its files tensor by tensor "
                          "(which keeps memory to about one shard; see docs/scale.md)", flags=("--no-stream",))
    max_shard_size: str = option(DEFAULT_SHARD_SIZE, "cut the written weights into files of at most this size "
                                 "(e.g. 500MB, 5GB)", metavar="SIZE")

    def __post_init__(self) -> None:
        problems = shard_size_problems(self.max_shard_size)
        positive(problems, num_processes=self.num_processes)
        check(problems)
        if isinstance(self.split, dict):
            self.split = SplitConfig.from_dict(self.split)
        if isinstance(self.distill, dict):
            self.distill = DistillConfig.from_dict(self.distill)
        if isinstance(self.runtime, dict):
            self.runtime = DeviceConfig.from_dict(self.runtime)


@dataclass
class TrainConfig(JsonConfig):
    """How the trainable layers are trained: optimizer, schedule, batches, LoRA."""

    lora_rank: int | None = option(None, "train LoRA of this rank in the adapter layers (merged on export)")
    lora_alpha: float | None = option(None, "LoRA alpha (default 2 x rank)")
    epochs: float | None = option(None, "passes over the data (default 1)", exclusive="steps")
    max_steps: int | None = option(None, "optimizer steps", exclusive="steps")
    lr: float = option(1e-4, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    # The paper's vision recipe trains the new linear classifier at 10x the adapter's lr.
    head_lr_scale: float = option(10.0, "a classifier's head trains at this multiple of --lr (language models "
                                  "have no trained head)")
    warmup_ratio: float = option(0.06, "share of steps spent warming up")
    batch_size: int = option(8, "sequences per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    seq_len: int = option(256, "maximum tokens per sequence")
    eval_every: int | None = option(None, "validate every N steps (default: 5 times per run)")
    # Early stopping, as a user would train: the step count becomes a cap, and the run ends once
    # validation has stopped improving (the best checkpoint is kept either way).
    patience: int | None = option(None, "stop when the validation metric has not improved for N validations in a "
                                  "row (needs --eval-data; default: run every step)")
    seed: int = option(0, "seed of the shuffling and of torch")
    # Top-only adapters (bundles made with --bottom 0): run the emulator once per training sequence
    # and reuse its output in every later step (offsite.training.emulator_cache). Off by default: the
    # cache costs seq_len x hidden values per sequence.
    cache_emulator: bool = option(False, "top-only adapter (bundle made with --bottom 0): run the emulator once "
                                  "per sequence and reuse its output in later epochs")
    # Recompute the activations of the frozen blocks between adapter blocks in the backward
    # pass instead of keeping them (offsite.training.checkpointing): less memory, one more forward.
    checkpoint_emulator: bool = option(False, "recompute the emulator's activations in the backward pass instead "
                                       "of keeping them: less memory, about one more emulator forward per step")
    # FedProx (Li et al., 2020): a data owner's local steps in a federation are pulled back towards
    # the adapter the round started from, so owners with different data drift apart less.
    proximal_mu: float = option(0.0, "add mu/2 x the squared distance of the trained weights from where they "
                                "started to the loss (FedProx's proximal term; 0: off)", metavar="MU")

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.epochs is not None and self.max_steps is not None:
            problems.append("--epochs and --max-steps both given; pass only one")
        positive(problems, lr=self.lr, batch_size=self.batch_size, grad_accum=self.grad_accum,
                  seq_len=self.seq_len, epochs=self.epochs, max_steps=self.max_steps,
                  lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, eval_every=self.eval_every,
                  patience=self.patience, head_lr_scale=self.head_lr_scale)
        if self.lora_alpha is not None and self.lora_rank is None:
            problems.append("--lora-alpha needs --lora-rank")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"--warmup-ratio={self.warmup_ratio} must be in [0, 1)")
        non_negative(problems, weight_decay=self.weight_decay, proximal_mu=self.proximal_mu)
        check(problems)

    def total_steps(self, num_sequences: int) -> int:
        """Optimizer steps: --max-steps, else --epochs (default 1) over `num_sequences`."""
        if self.max_steps is not None:
            return self.max_steps
        epochs = 1.0 if self.epochs is None else self.epochs
        return max(1, math.ceil(epochs * num_sequences / (self.batch_size * self.grad_accum)))


@dataclass
class TuneConfig(JsonConfig):
    """Data owner: train the adapter of a bundle on private data."""

    bundle: str = option(help="bundle directory from `offsite emulate`", positional=True)
    data: str = option(help="training data (.txt or .jsonl)")
    output: str = option(help="adapter directory to write", flags=("-o", "--output"))
    eval_data: str | None = option(None, "validation data; the best checkpoint by its metric is kept")
    train: TrainConfig = field(default_factory=TrainConfig)
    overwrite: bool = option(False, "replace an existing output directory")
    # Kept out of TrainConfig: how often a run saves its state does not change what it trains.
    checkpoint_every: int | None = option(None, "save a checkpoint to resume from every N steps (default: at each "
                                          "validation, at most 100 steps apart); a rerun resumes from it")
    trust: str | None = option(None, "refuse the bundle unless it is signed with this public key (the model "
                               "owner's KEY.pub)", metavar="PUBKEY")
    sign: str | None = option(None, "sign the adapter file with this private key (from `offsite keygen`)",
                              metavar="KEY")
    init_adapter: str | None = option(None, "start from this adapter file instead of the bundle's layers (e.g. "
                                      "yours, after the model owner re-aligned the bundle with `offsite align`)",
                                      metavar="ADAPTER")
    runtime: DeviceConfig = field(default_factory=DeviceConfig)
    save_dtype: str = option("float32", "dtype of the exported adapter's weights (they train in float32)",
                             choices=DTYPE_NAMES[1:])
    num_processes: int = option(1, "train data-parallel in N processes, started by accelerate's launcher "
                                "(--batch-size is per process: the global batch is N times it)", metavar="N")

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        if isinstance(self.runtime, dict):
            self.runtime = DeviceConfig.from_dict(self.runtime)
        problems: list[str] = []
        positive(problems, checkpoint_every=self.checkpoint_every, num_processes=self.num_processes)
        if self.train.patience is not None and self.eval_data is None:
            problems.append("--patience needs --eval-data: early stopping watches the validation metric")
        check(problems)


@dataclass
class AlignConfig(JsonConfig):
    """Model owner: re-distil a bundle's emulator with a returned adapter plugged into both sides.

    The full model and the bundle both get the adapter; the emulator layers are trained so that
    the bundle with the adapter behaves like the full model with it (as FedBiOT re-aligns its
    emulator each round). The new bundle ships the original adapter layers, like the old one;
    the data owner continues from its adapter (`offsite tune --init-adapter`).
    """

    bundle: str = option(help="the bundle the adapter was trained on", positional=True)
    model: str = option(help="the full model the bundle was made from", metavar="MODEL")
    adapter: str = option(help="the adapter a data owner returned for this bundle", metavar="ADAPTER")
    output: str = option(help="the re-aligned bundle to write", flags=("-o", "--output"))
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(corpus="austen"))
    trust: str | None = option(None, "refuse the adapter unless it is signed with this public key (the data "
                               "owner's KEY.pub)", metavar="PUBKEY")
    sign: str | None = option(None, "sign the new bundle with this private key (from `offsite keygen`)",
                              metavar="KEY")
    overwrite: bool = option(False, "replace an existing output directory")
    runtime: DeviceConfig = field(default_factory=DeviceConfig)
    num_processes: int = option(1, "re-distil data-parallel in N processes, started by accelerate's launcher "
                                "(--distill-batch-size is per process)", metavar="N")
    shard_full_model: bool = option(False, "with --num-processes N: each process holds 1/N of the full model's "
                                    "blocks (FSDP), gathered one block at a time, for a full model larger than "
                                    "one device (see docs/scale.md)")

    def __post_init__(self) -> None:
        if isinstance(self.distill, dict):
            self.distill = DistillConfig.from_dict(self.distill)
        if isinstance(self.runtime, dict):
            self.runtime = DeviceConfig.from_dict(self.runtime)
        problems: list[str] = []
        positive(problems, num_processes=self.num_processes)
        check(problems)


STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")


@dataclass
class FederateConfig(JsonConfig):
    """Model owner and data owners: train one adapter over many owners' data through Flower.

    Every round the server sends the global adapter, each data owner trains it for `local_steps`
    through its own copy of the bundle (`offsite tune`'s trainer) and returns only the adapter's
    tensors and its example count, and the server aggregates them with `strategy`.
    """

    bundle: str = option(help="the bundle every data owner trains through", positional=True)
    output: str = option(help="the federated adapter to write (with rounds.jsonl)", flags=("-o", "--output"))
    client_data: list[str] = option(default_factory=list, help="one data file per data owner: the simulation "
                                    "runs one client for each (deployment: each SuperNode's --node-config)",
                                    nargs="+", metavar="FILE")
    rounds: int = option(3, "federated rounds")
    local_steps: int = option(10, "optimizer steps each data owner trains per round", metavar="E")
    strategy: str = option("fedavg", "how the server aggregates: fedavg (weighted by examples), fedprox (fedavg, "
                           "the owners' training pulled towards the round's adapter: give --proximal-mu), fedadam "
                           "or fedyogi (a server-side optimizer over the averaged update: --server-lr)",
                           choices=STRATEGIES)
    server_lr: float = option(1e-3, "fedadam/fedyogi: the server optimizer's learning rate")
    secagg: bool = option(False, "secure aggregation (Flower's SecAgg+): the server sees only the average of the "
                          "updates, never one owner's (needs 3 or more owners)")
    dp_noise: float | None = option(None, "central differential privacy (Flower's server-side fixed clipping): the "
                                    "noise multiplier; needs --dp-clip", metavar="S")
    dp_clip: float | None = option(None, "differential privacy: the L2 norm each owner's update is clipped to",
                                   metavar="C")
    dp_delta: float = option(1e-5, "differential privacy: the delta at which Flower's RDP accountant reports the "
                             "owner-level epsilon spent, after every round (fedavg and fedprox)", metavar="DELTA")
    eval_data: str | None = option(None, "the model owner's held-out data, scored after every round (rounds.jsonl)")
    model: str | None = option(None, "the full model: with --eval-data, score the plug-in of each round's adapter "
                               "(default: score it through the bundle)", metavar="MODEL")
    eval_limit: int | None = option(None, "score only the first N examples of --eval-data", metavar="N")
    min_clients: int | None = option(None, "deployment: wait for this many SuperNodes, and train with all of them "
                                     "(simulation: one per --client-data file)", metavar="N")
    client_cpus: float = option(1.0, "simulation: CPU cores each simulated data owner gets (owners run side by side "
                                "on the cores there are)", metavar="N")
    round_timeout: float = option(3600.0, "seconds the server waits for the owners' replies in a round",
                                  metavar="SECONDS")
    overwrite: bool = option(False, "replace an existing output directory")
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: DeviceConfig = field(default_factory=DeviceConfig)
    # FedBiOT's server step: after every round but the last, the emulator is re-distilled on this
    # corpus with the global adapter in both models, and sent with the next round's adapter.
    alignment: DistillConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        if isinstance(self.alignment, dict):
            self.alignment = DistillConfig.from_dict(self.alignment)
        if isinstance(self.runtime, dict):
            self.runtime = DeviceConfig.from_dict(self.runtime)
        problems: list[str] = []
        positive(problems, rounds=self.rounds, local_steps=self.local_steps, server_lr=self.server_lr,
                 dp_noise=self.dp_noise, dp_clip=self.dp_clip, eval_limit=self.eval_limit,
                 min_clients=self.min_clients, client_cpus=self.client_cpus, round_timeout=self.round_timeout)
        if not 0 < self.dp_delta < 1:
            problems.append(f"--dp-delta {self.dp_delta}: a probability between 0 and 1 (e.g. 1e-5)")
        if (self.dp_noise is None) != (self.dp_clip is None):
            problems.append("--dp-noise and --dp-clip go together: give both, or neither")
        if self.dp_noise is not None and self.secagg:
            problems.append("--dp-noise with --secagg: server-side clipping needs each owner's update, which secure "
                            "aggregation hides; choose one")
        if self.secagg and self.strategy != "fedavg":
            problems.append(f"--secagg averages the updates (fedavg); --strategy {self.strategy} is not available "
                            "with it")
        if self.train.proximal_mu and self.strategy != "fedprox":
            problems.append("--proximal-mu is FedProx's term: pass --strategy fedprox with it")
        if self.model is not None and self.eval_data is None and self.alignment is None:
            problems.append("--model is what --eval-data scores the plug-in on: give --eval-data too")
        if self.alignment is not None and self.model is None:
            problems.append("--distill (the per-round alignment) distils from the full model: give --model too")
        if self.alignment is not None and self.secagg:
            problems.append("--distill with --secagg: the re-aligned emulator travels in the round's message, which "
                            "Flower's SecAgg+ workflow does not carry; choose one")
        if self.train.patience is not None or self.train.epochs is not None or self.train.max_steps is not None:
            problems.append("each round trains --local-steps steps: --epochs, --max-steps and --patience do not apply")
        check(problems)

    @property
    def num_clients(self) -> int:
        return self.min_clients or len(self.client_data)


@dataclass
class PlugConfig(JsonConfig):
    """Model owner: put a returned adapter into the full model."""

    model: str = option(help="the full model the bundle was made from", positional=True)
    adapter: str = option(help="adapter directory from `offsite tune`", positional=True)
    output: str = option(help="plugged model directory to write", flags=("-o", "--output"))
    bundle: str | None = option(None, "the bundle you sent for this adapter: only its adapter layers may be "
                                "replaced (default: the record `offsite emulate` kept on this machine)")
    trust: str | None = option(None, "refuse the adapter unless it is signed with this public key (the data "
                               "owner's KEY.pub)", metavar="PUBKEY")
    overwrite: bool = option(False, "replace an existing output directory")
    stream: bool = option(True, "load the whole full model first, instead of reading its files tensor by tensor "
                          "(which keeps memory to about one shard; see docs/scale.md)", flags=("--no-stream",))
    max_shard_size: str = option(DEFAULT_SHARD_SIZE, "cut the written weights into files of at most this size "
                                 "(e.g. 500MB, 5GB)", metavar="SIZE")

    def __post_init__(self) -> None:
        check(shard_size_problems(self.max_shard_size))


@dataclass
class EvalConfig(JsonConfig):
    """Score a full model, bundle or plugged model (optionally with an adapter) on a data file."""

    model: str = option(help="full model, bundle or plugged model", positional=True)
    data: str | None = option(None, "evaluation data (.txt or .jsonl, or a built-in dataset)")
    adapter: str | None = option(None, "apply this adapter file in memory first")
    bundle: str | None = option(None, "with --adapter on a full model: the bundle issued for the adapter, whose "
                                "adapter layers are the only ones it may replace (default: the owner's record)")
    seq_len: int = option(512, "window length in tokens")
    batch_size: int = option(8, "sequences per forward pass")
    limit: int | None = option(None, "score only the first N examples (or documents)")
    runtime: DeviceConfig = field(default_factory=DeviceConfig)
    batch_tokens: int | None = option(None, "batch text by padded tokens instead of --batch-size sequences (memory "
                                      "follows tokens, not sequences)", metavar="N")
    device_map: str | None = option(None, "auto: spread a full or plugged model too large for one device over the "
                                    "GPUs, then CPU memory (accelerate's device_map)", choices=["auto"])
    max_memory: list[str] | None = option(None, "with --device-map auto: the most each device may hold, as "
                                          "DEVICE=SIZE (e.g. 0=20GiB 1=20GiB cpu=64GiB)", nargs="+",
                                          metavar="DEVICE=SIZE")
    lm_eval: list[str] | None = option(None, "also score with lm-eval on these tasks: a built-in dataset (bbc-news, "
                                       "wordnet, austen[:SPLIT]), a .txt/.jsonl data file, a task YAML file, or any "
                                       "lm-eval task (its data from a hub or lm-eval's cache); needs the lm-eval "
                                       "extra", nargs="+", metavar="TASK")
    lm_eval_output: str | None = option(None, "with --lm-eval: write lm-eval's whole JSON output (results, task "
                                        "configs, versions) to this file", metavar="FILE")

    def __post_init__(self) -> None:
        if isinstance(self.runtime, dict):
            self.runtime = DeviceConfig.from_dict(self.runtime)
        problems: list[str] = []
        if self.data is None and not self.lm_eval:
            problems.append("nothing to score: give --data FILE, --lm-eval TASK..., or both")
        if self.lm_eval_output is not None and not self.lm_eval:
            problems.append("--lm-eval-output needs --lm-eval TASK...")
        positive(problems, seq_len=self.seq_len, batch_size=self.batch_size, limit=self.limit,
                 batch_tokens=self.batch_tokens)
        if self.max_memory is not None and self.device_map is None:
            problems.append("--max-memory needs --device-map auto")
        for entry in self.max_memory or ():
            device, _, size = entry.partition("=")
            if not (re.fullmatch(r"[0-9]+|cpu|mps", device) and re.fullmatch(r"[0-9.]+\s*[KMGT]i?B", size)):
                problems.append(f"--max-memory {entry!r}: use DEVICE=SIZE, DEVICE a GPU index or cpu, SIZE like "
                                "20GiB or 500MB")
        check(problems)

    def memory_limits(self) -> dict[int | str, str] | None:
        """--max-memory as accelerate takes it: {0: "20GiB", "cpu": "64GiB"}."""
        if not self.max_memory:
            return None
        pairs = (entry.partition("=")[::2] for entry in self.max_memory)
        return {int(device) if device.isdigit() else device: size for device, size in pairs}


@dataclass
class ExportConfig(JsonConfig):
    """Write a built-in dataset as jsonl, to see exactly what is trained and scored on."""

    name: str = option(help="bbc-news, wordnet or austen, optionally with :train, :validation or :test",
                       positional=True)
    output: str = option(help="jsonl file to write (with --lm-eval: a folder)", flags=("-o", "--output"))
    overwrite: bool = option(False, "replace an existing output file")
    lm_eval: bool = option(False, "write an lm-eval task instead: the split as jsonl and a task YAML over it, "
                           "both in the --output folder (then `offsite eval MODEL --lm-eval FOLDER/TASK.yaml`)")


@dataclass
class SampleConfig(JsonConfig):
    """Model owner: text sampled from the full model, a distillation corpus in the model's own distribution.

    The model owner has no task data, but can draw as much text as it likes from the model itself.
    """

    model: str = option(help="full model: local directory, hub id or built-in alias", positional=True)
    output: str = option(help="jsonl file to write ({\"text\": ...} per line)", flags=("-o", "--output"))
    texts: int = option(256, "how many texts to sample")
    length: int = option(256, "tokens per text")
    batch_size: int = option(32, "texts sampled at once")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(0.95, "nucleus sampling: keep the most likely tokens up to this probability")
    seed: int = option(0, "random seed")
    overwrite: bool = option(False, "replace an existing output file")
    runtime: DeviceConfig = field(default_factory=DeviceConfig)

    def __post_init__(self) -> None:
        if isinstance(self.runtime, dict):
            self.runtime = DeviceConfig.from_dict(self.runtime)
        problems: list[str] = []
        positive(problems, texts=self.texts, length=self.length, batch_size=self.batch_size,
                 temperature=self.temperature)
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p={self.top_p} must be in (0, 1]")
        check(problems)


@dataclass
class KeygenConfig(JsonConfig):
    """Make a signing key pair: KEY (private, for --sign) and KEY.pub (public, for the other party's --trust)."""

    key: str = option(help="private key file to write; the public key goes to KEY.pub", positional=True)
    overwrite: bool = option(False, "replace existing key files")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig(JsonConfig):
    """The model owner's service: bundles out, adapters in, every customer's plugged model from one full model."""

    state: str = option(help="folder of the service's state: customers, adapters, audit log (SQLite)",
                        flags=("--state",))
    model: str | None = option(None, "full model: local directory, hub id or built-in alias (required to serve)",
                               flags=("--model",))
    bundles: str | None = option(None, "folder of bundles to hand out, each made by `offsite emulate` from --model "
                                 "(required to serve)", flags=("--bundles",))
    host: str = option("127.0.0.1", "address to listen on (another than this machine's loopback needs --public)")
    port: int = option(8000, "port to listen on")
    public: bool = option(False, "allow --host to be an address other machines reach (use TLS: --ssl-certfile)")
    ssl_certfile: str | None = option(None, "TLS certificate (PEM); with --ssl-keyfile the service speaks HTTPS",
                                      metavar="FILE")
    ssl_keyfile: str | None = option(None, "TLS private key (PEM)", metavar="FILE")
    max_upload_mb: float = option(512.0, "largest adapter upload taken, in MB")
    max_batch: int = option(16, "most sequences in one forward pass of the full model")
    batch_wait_ms: float = option(5.0, "how long the first waiting request waits for others to batch with")
    max_length: int = option(1024, "tokens of prompt (and continuation) kept, from the right")

    def __post_init__(self) -> None:
        problems: list[str] = [f"--{name} is required to serve" for name in ("model", "bundles")
                               if getattr(self, name) is None]
        positive(problems, port=self.port, max_upload_mb=self.max_upload_mb, max_batch=self.max_batch,
                 max_length=self.max_length)
        non_negative(problems, batch_wait_ms=self.batch_wait_ms)
        if self.host not in LOOPBACK and not self.public:
            problems.append(f"--host {self.host} lets other machines reach the service; add --public to mean it "
                            "(and --ssl-certfile/--ssl-keyfile for TLS)")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            problems.append("--ssl-certfile and --ssl-keyfile go together")
        check(problems)

    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

"""Settings of every step as dataclasses that validate themselves and round-trip through JSON.

Field names match CLI flags (`emulator_layers` is `--emulator-layers`), so an
error can name the flag the user has to change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from offsite.errors import check


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _non_negative(problems: list[str], **values: float | int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 0:
            problems.append(f"{flag(name)}={value} is negative; use 0 or more")


def _positive(problems: list[str], **values: float | int | None) -> None:
    for name, value in values.items():
        if value is not None and not value > 0:
            problems.append(f"{flag(name)}={value} must be greater than 0")
        elif value == math.inf:
            problems.append(f"{flag(name)}={value} must be a finite number")


class JsonConfig:
    """JSON round-trip shared by every config dataclass."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        check([f"unknown {cls.__name__} field '{k}'; known fields: {sorted(known)}" for k in unknown])
        return cls(**data)


SELECTIONS = ("uniform", "similarity")
COMPRESSIONS = ("lowrank", "int8")  # at most one: both rewrite the same weights
METHOD_PARTS = SELECTIONS + ("share",) + COMPRESSIONS


@dataclass
class SplitConfig(JsonConfig):
    """How the full model's layers are divided between adapter and emulator.

    Exactly one of `emulator_layers` (K, how many middle layers the emulator
    keeps) and `drop_ratio` (fraction of middle layers dropped) may be set; with
    neither, the emulator keeps the whole middle block. Whether the numbers fit
    a given model is checked by `offsite.split.plan_split`, which knows its depth.
    """

    bottom: int = 2
    top: int = 2
    emulator_layers: int | None = None
    drop_ratio: float | None = None
    # How the emulator is made: a selection (uniform | similarity), optionally joined with '+' to
    # share (kept layers also run in place of the dropped ones) and one of lowrank | int8.
    method: str = "uniform"
    rank_fraction: float = 0.5  # lowrank: share of each weight's parameters its factors keep
    calibration: str | None = None  # similarity: text corpus the layer similarities are measured on

    def __post_init__(self) -> None:
        problems: list[str] = []
        _non_negative(problems, bottom=self.bottom, top=self.top)
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
                            f"(uniform, similarity) and any of share, lowrank or int8, e.g. 'similarity+share'")
        elif len([p for p in parts if p in SELECTIONS]) > 1 or set(COMPRESSIONS) <= set(parts):
            problems.append(f"--method={self.method!r} combines alternatives: pick one of uniform/similarity "
                            "and at most one of lowrank/int8")
        if not 0 < self.rank_fraction < 1:
            problems.append(f"--rank-fraction={self.rank_fraction} must be between 0 and 1 (exclusive)")
        check(problems)

    def identity(self) -> dict[str, Any]:
        """The fields that change the emulator: a method's parameters only when that method is used."""
        fields = self.to_dict()
        if self.compression != "lowrank":
            del fields["rank_fraction"]
        if self.selection != "similarity":
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
        if self.drop_ratio is not None:
            return max(1, math.ceil(middle * (1 - self.drop_ratio) - 1e-9))
        return middle


@dataclass
class DistillConfig(JsonConfig):
    """Model owner: train the emulator layers to reproduce the full middle block.

    Loss = kd_weight * MSE(emulator output, full middle block output) / mean square of the
    latter (the paper's normalisation) + lm_weight * language-modelling loss of the
    compressed model. `align="per-layer"` also matches every kept layer's output with
    the full stack's at the position it stands for.
    """

    corpus: str
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 4
    seq_len: int = 256
    kd_weight: float = 1.0
    lm_weight: float = 1.0
    align: str = "final"
    eval_every: int = 50
    eval_windows: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        problems: list[str] = []
        _positive(problems, distill_steps=self.steps, distill_lr=self.lr, distill_batch_size=self.batch_size,
                  distill_seq_len=self.seq_len, distill_eval_every=self.eval_every,
                  distill_eval_windows=self.eval_windows)
        _non_negative(problems, kd_weight=self.kd_weight, lm_weight=self.lm_weight)
        if self.kd_weight == 0 and self.lm_weight == 0:
            problems.append("--kd-weight and --lm-weight are both 0: nothing to train; set one above 0")
        if self.align not in ("final", "per-layer"):
            problems.append(f"--align={self.align!r} is not known; use 'final' or 'per-layer'")
        check(problems)


@dataclass
class EmulateConfig(JsonConfig):
    """Model owner: build a bundle (adapter + emulator + frozen rest) from a full model."""

    model: str
    output: str
    split: SplitConfig = field(default_factory=SplitConfig)
    distill: DistillConfig | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.split, dict):
            self.split = SplitConfig.from_dict(self.split)
        if isinstance(self.distill, dict):
            self.distill = DistillConfig.from_dict(self.distill)


@dataclass
class TrainConfig(JsonConfig):
    """How the trainable layers are trained: optimizer, schedule, batches, LoRA."""

    lora_rank: int | None = None
    lora_alpha: float | None = None
    epochs: float | None = None
    max_steps: int | None = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    eval_every: int | None = None
    seed: int = 0
    # Top-only adapters (bundles made with --bottom 0): run the emulator once per training sequence
    # and reuse its output in every later step (offsite.emulator_cache). Off by default: the cache
    # costs seq_len x hidden values per sequence.
    cache_emulator: bool = False
    # Recompute the activations of the frozen blocks between adapter blocks in the backward
    # pass instead of keeping them (offsite.checkpointing): less memory, one more forward.
    checkpoint_emulator: bool = False

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.epochs is not None and self.max_steps is not None:
            problems.append("--epochs and --max-steps both given; pass only one")
        _positive(problems, lr=self.lr, batch_size=self.batch_size, grad_accum=self.grad_accum,
                  seq_len=self.seq_len, epochs=self.epochs, max_steps=self.max_steps,
                  lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, eval_every=self.eval_every)
        if self.lora_alpha is not None and self.lora_rank is None:
            problems.append("--lora-alpha needs --lora-rank")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"--warmup-ratio={self.warmup_ratio} must be in [0, 1)")
        _non_negative(problems, weight_decay=self.weight_decay)
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

    bundle: str
    data: str
    output: str
    eval_data: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)


@dataclass
class PlugConfig(JsonConfig):
    """Model owner: put a returned adapter into the full model."""

    model: str
    adapter: str
    output: str
    overwrite: bool = False


@dataclass
class EvalConfig(JsonConfig):
    """Score a full model, bundle or plugged model (optionally with an adapter) on a data file."""

    model: str
    data: str
    adapter: str | None = None
    seq_len: int = 512
    batch_size: int = 8
    limit: int | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        _positive(problems, seq_len=self.seq_len, batch_size=self.batch_size, limit=self.limit)
        check(problems)

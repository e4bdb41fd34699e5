"""What the studies run: the demo's and the ablation's settings, and the budgets of the built-in tasks.

Kept apart from the studies themselves, which load models, so that the `offsite` command can
build its flags from these dataclasses without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from offsite.config import DeviceConfig, DistillConfig, JsonConfig, SplitConfig, TrainConfig, option, positive
from offsite.data.builtin import BUILTIN
from offsite.errors import ConfigError, check


@dataclass(frozen=True)
class TaskBudget:
    """How much of a task is trained and scored."""

    train_examples: int  # choice examples, or LM training windows
    eval_examples: int  # choice examples, or LM test windows
    steps: int
    batch_size: int
    seq_len: int
    lr: float  # offsite-tuning (adapter only)
    full_lr: float  # full fine-tuning, tuned separately: it moves every block


BUDGETS: dict[str, dict[str, TaskBudget]] = {
    "quick": {
        "bbc-news": TaskBudget(160, 32, 20, 4, 160, 1e-4, 3e-5),
        "wordnet": TaskBudget(320, 60, 20, 8, 64, 1e-4, 3e-5),
        "austen": TaskBudget(20, 16, 10, 2, 256, 1e-4, 3e-5),
    },
    "default": {
        "bbc-news": TaskBudget(640, 150, 80, 8, 160, 1e-4, 3e-5),
        "wordnet": TaskBudget(1280, 300, 80, 16, 64, 1e-4, 3e-5),
        "austen": TaskBudget(160, 64, 80, 2, 256, 1e-4, 3e-5),
    },
}


# The demo's emulator is distilled (the paper's Table 1 emulators are); the quick budget distils briefly.
DISTILL_BUDGETS: dict[str, DistillConfig] = {
    "quick": DistillConfig(corpus="austen", steps=16, batch_size=4, seq_len=128, eval_every=8, eval_windows=8),
    "default": DistillConfig(corpus="austen"),
}


@dataclass(frozen=True)
class FairBudget(JsonConfig):
    """What each trained setting gets in the demo's fair comparison, as a user would train it.

    Every setting (full fine-tuning, the offsite adapter, the ceiling) tries each learning rate of
    its grid, validates `checks` times within a cap of `step_cap` × the budget's steps, stops after
    `patience` checks without improvement, and keeps its best checkpoint; the learning rate with
    the best validation is the one reported. The data owner validates through the emulator, since
    that is all it has.
    """

    adapter_lrs: tuple[float, ...] = (3e-5, 1e-4, 3e-4)
    full_lrs: tuple[float, ...] = (1e-5, 3e-5, 1e-4)  # full fine-tuning moves every block: a lower grid
    step_cap: float = 2.0
    checks: int = 8
    patience: int = 2
    validation_share: float = 0.5  # validation examples, as a share of the budget's test examples

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapter_lrs", tuple(self.adapter_lrs))  # JSON gives lists
        object.__setattr__(self, "full_lrs", tuple(self.full_lrs))
        problems = []
        positive(problems, step_cap=self.step_cap, checks=self.checks, patience=self.patience,
                 validation_share=self.validation_share)
        problems += [f"fair budget: learning rate {lr} must be greater than 0"
                     for lr in self.adapter_lrs + self.full_lrs if not lr > 0]
        problems += [f"fair budget: {name} is empty" for name in ("adapter_lrs", "full_lrs") if not getattr(self, name)]
        check(problems)

    def max_steps(self, budget: TaskBudget) -> int:
        return max(1, round(self.step_cap * budget.steps))

    def eval_every(self, budget: TaskBudget) -> int:
        return max(1, self.max_steps(budget) // self.checks)

    def validation_examples(self, budget: TaskBudget) -> int:
        return max(1, round(self.validation_share * budget.eval_examples))


@dataclass
class DemoConfig(JsonConfig):
    """What the demo runs: model, split, tasks and budget."""

    model: str = option("smollm2-135m", "full model (default: the built-in smollm2-135m)")
    output: str = option("offsite-demo", "report directory", flags=("--out",))
    split: SplitConfig = field(default_factory=lambda: SplitConfig(emulator_layers=8))
    tasks: list[str] = option(help="built-in tasks", nargs="+",
                              default_factory=lambda: ["bbc-news", "wordnet", "austen"])
    quick: bool = option(False, "small budget: the whole run in under 10 minutes")
    seed: int = option(0, "seed of every stage")
    distill: DistillConfig | str | None = "budget"  # "budget": the budget's distillation; None: none
    # TrainConfig fields that replace the budget's for the adapter (e.g. lr, lora_rank), for studies.
    adapter_training: dict[str, Any] = field(default_factory=dict)
    # With distillation, also measure the plain uniform emulator. Off by default: its rows (about 15 minutes at
    # the default budget) are not needed to judge the distilled emulator, and the demo must fit an hour.
    compare_uniform: bool = option(False, "with distillation, also measure the plain uniform emulator (its rows "
                                   "show what distillation changes)")
    # Also train the adapter on the full model (a bundle of every layer): the ceiling of any emulator
    # (default: not in the quick budget, to fit 10 min).
    ceiling: bool | None = None
    # Rounds of `offsite align` (the bundle re-distilled with the returned adapter in the loop) and
    # further tuning from that adapter; each round's alignment runs `align_steps` distillation steps.
    # `align_steps=0` is the control: the same rounds of tuning on, through the unchanged emulator.
    align_rounds: int = 0
    align_steps: int = 50
    fair_budget: bool = option(False, "also give each trained setting its own learning rate (chosen on validation "
                               "from a small grid) and early stopping within a step cap (each trained setting runs once "
                               "per learning rate)")
    fair: FairBudget = field(default_factory=FairBudget)  # what --fair-budget gives (studies may change it)
    # Studies only: an earlier report.json of the same model, budget, seed, data and offsite version, whose
    # full-model rows (zero-shot, full fine-tuning, the ceiling) are reused instead of recomputed
    # (benchmarks/demo_sweep.py --reference); the report names it.
    reference: str | None = None
    lm_eval: list[str] | None = option(None, "also score every setting on these lm-eval tasks: built-in datasets, "
                                       "task YAML files, or lm-eval's own tasks when their data is here (a hub or "
                                       "lm-eval's cache); needs the lm-eval extra", nargs="+", metavar="TASK")
    lm_eval_limit: int | None = option(None, "with --lm-eval: score only the first N examples of each task",
                                       metavar="N")
    isolate: bool = True  # train in a fresh process, so its peak memory is its own
    runtime: DeviceConfig = field(default_factory=DeviceConfig)  # where every stage runs

    def __post_init__(self) -> None:
        if isinstance(self.runtime, dict):
            self.runtime = DeviceConfig.from_dict(self.runtime)
        if isinstance(self.split, dict):
            self.split = SplitConfig.from_dict(self.split)
        if isinstance(self.distill, dict):
            self.distill = DistillConfig.from_dict(self.distill)
        if isinstance(self.fair, dict):
            self.fair = FairBudget.from_dict(self.fair)
        if self.ceiling is None:
            self.ceiling = not self.quick
        if self.distill == "budget":
            self.distill = DISTILL_BUDGETS[self.budget_name]
        check([] if self.distill is None or isinstance(self.distill, DistillConfig) else
              [f"distill={self.distill!r}: pass a DistillConfig, 'budget' or None"])
        TrainConfig(**self.adapter_training)  # validates the overrides before any work starts
        check(([f"align_rounds={self.align_rounds} must be 0 or more"] if self.align_rounds < 0 else [])
              + ([f"align_steps={self.align_steps} must be 0 (the control) or more"] if self.align_steps < 0 else []))
        check([f"--tasks: unknown task '{t}'; available: {', '.join(BUILTIN)}" for t in self.tasks if t not in BUILTIN])
        check((["--lm-eval-limit needs --lm-eval TASK..."] if self.lm_eval_limit is not None and not self.lm_eval
               else []) + ([f"--lm-eval-limit={self.lm_eval_limit} must be at least 1"]
                           if self.lm_eval_limit is not None and self.lm_eval_limit < 1 else [])
              + (["--lm-eval with a reference report: the reference has no lm-eval scores of its fine-tuned full "
                  "model; drop one of them"] if self.lm_eval and self.reference else []))

    @property
    def budget_name(self) -> str:
        return "quick" if self.quick else "default"


# The vision demo's task: five Fashion-MNIST classes the built-in ViT never saw (seq_len is unused by images).
VISION_BUDGETS: dict[str, TaskBudget] = {
    "quick": TaskBudget(500, 1000, 60, 32, 64, 1e-4, 1e-4),
    "default": TaskBudget(2000, 5000, 300, 32, 64, 1e-4, 1e-4),
}
# Pure hidden-state distillation on the pretraining images, checkpoint by held-out stand-in error (the
# paper's vision recipe; a classifier's distillation forces the KL and LM terms to 0).
VISION_DISTILL: dict[str, DistillConfig] = {
    "quick": DistillConfig(corpus="fashion-pretrain", heldout="fashion-pretrain:validation", steps=50,
                           batch_size=32, eval_every=25, kl_weight=0.0),
    "default": DistillConfig(corpus="fashion-pretrain", heldout="fashion-pretrain:validation", steps=200,
                             batch_size=32, eval_every=25, kl_weight=0.0),
}


@dataclass
class VisionDemoConfig(JsonConfig):
    """What `offsite demo-vision` runs: the vision Table 1 of a classifier on a labelled built-in task."""

    model: str = option("vit-fashion", "image classifier (default: the built-in vit-fashion, pretrained here by "
                        "`offsite setup-assets --vision`)")
    output: str = option("offsite-demo-vision", "report directory", flags=("--out",))
    split: SplitConfig = field(default_factory=lambda: SplitConfig(emulator_layers=3))
    task: str = option("fashion-transfer", "built-in labelled task (its train and test splits)")
    quick: bool = option(False, "small budget: the whole run in a few minutes")
    seed: int = option(0, "seed of every stage")
    distill: DistillConfig | str | None = "budget"  # "budget": the budget's distillation; None: none
    # TrainConfig fields that replace the budget's for the adapter (e.g. lr), for studies.
    adapter_training: dict[str, Any] = field(default_factory=dict)
    isolate: bool = True  # train in a fresh process, so its peak memory is its own
    runtime: DeviceConfig = field(default_factory=DeviceConfig)  # where every stage runs

    def __post_init__(self) -> None:
        if isinstance(self.runtime, dict):
            self.runtime = DeviceConfig.from_dict(self.runtime)
        if isinstance(self.split, dict):
            self.split = SplitConfig.from_dict(self.split)
        if isinstance(self.distill, dict):
            self.distill = DistillConfig.from_dict(self.distill)
        if self.distill == "budget":
            self.distill = VISION_DISTILL[self.budget_name]
        TrainConfig(**self.adapter_training)  # validates the overrides before any work starts
        check([] if self.distill is None or isinstance(self.distill, DistillConfig) else
              [f"distill={self.distill!r}: pass a DistillConfig, 'budget' or None"])
        check([f"--task: '{self.task}' is not a labelled built-in task; use fashion-transfer"]
              if self.task not in LABELLED_TASKS else [])

    @property
    def budget_name(self) -> str:
        return "quick" if self.quick else "default"

    @property
    def budget(self) -> TaskBudget:
        return VISION_BUDGETS[self.budget_name]


LABELLED_TASKS = ("fashion-transfer", "fashion-pretrain")


@dataclass
class AblateConfig(JsonConfig):
    """Which methods to compare, on which task, with which budget."""

    model: str = option("smollm2-135m", "full model (default: the built-in smollm2-135m)")
    task: str = option("wordnet", "built-in task")
    methods: list[str] = option(help="emulator methods as --method of emulate, '+distill' to distil with "
                                "--distill", nargs="+",
                                default_factory=lambda: ["uniform", "uniform+distill", "similarity", "share",
                                                         "lowrank", "int8"])
    output: str = option("offsite-ablate", "report directory", flags=("--out",))
    bottom: int = option(2, "adapter layers at the bottom")
    top: int = option(2, "adapter layers at the top")
    emulator_layers: int = option(8, "the byte budget: a uniform emulator with this many layers")
    rank_fraction: float = option(0.5, "lowrank: share of each emulator weight's parameters the factors keep")
    calibration: str = option("austen", "similarity: corpus")
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(corpus="austen"))
    quick: bool = option(False, "the demo's small budget")
    seed: int = option(0, "seed of every stage")
    isolate: bool = True  # train in a fresh process, as the demo does
    runtime: DeviceConfig = field(default_factory=DeviceConfig)  # where every stage runs, as in the demo

    def __post_init__(self) -> None:
        if isinstance(self.distill, dict):
            self.distill = DistillConfig.from_dict(self.distill)
        if isinstance(self.runtime, dict):
            self.runtime = DeviceConfig.from_dict(self.runtime)
        problems = []
        if self.task not in BUILTIN:
            problems.append(f"--task: unknown task '{self.task}'; available: {', '.join(BUILTIN)}")
        positive(problems, emulator_layers=self.emulator_layers)
        check(problems)
        for method in self.methods:
            try:
                self.split_for(method)  # validates each --methods entry
            except ConfigError as error:
                raise ConfigError([p.replace("--method=", "--methods ") for p in error.problems]) from None

    def split_for(self, method: str, emulator_layers: int = 1) -> SplitConfig:
        """The split of `method` (without '+distill') with `emulator_layers` kept middle layers."""
        return SplitConfig(bottom=self.bottom, top=self.top, emulator_layers=emulator_layers,
                           method=method.removesuffix("+distill"), rank_fraction=self.rank_fraction,
                           calibration=self.calibration)

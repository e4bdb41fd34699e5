"""What `offsite bench` measures: the settings, and one model (or random shape), split and batch shape.

Kept free of torch, so that the `offsite` command can build its flags from `BenchConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from offsite.config import DeviceConfig, JsonConfig, SplitConfig, non_negative, option, positive
from offsite.emulator.split import SplitPlan, plan_split
from offsite.errors import check

SETTINGS = ("full_ft", "full_ft_lora", "offsite", "offsite_lora", "offsite_top_cached")
# `offsite` with one optimisation undone (or one more made), to measure each optimisation before and
# after in one run. Run only when asked for (--settings):
# - offsite_emulator_grads: every frozen weight still gets a gradient (requires_grad left on; the
#   optimizer steps only the adapter);
# - offsite_all_logits: logits at every position, as plain transformers computes them;
# - offsite_checkpointed, offsite_lora_checkpointed: the emulator blocks recompute their activations in
#   the backward pass;
# - offsite_top: the top-only adapter of offsite_top_cached, trained without the emulator cache;
# - offsite_top_cached_lora: offsite_top_cached with LoRA on the top adapter blocks.
VARIANTS = ("offsite_emulator_grads", "offsite_all_logits", "offsite_checkpointed", "offsite_lora_checkpointed",
            "offsite_top", "offsite_top_cached_lora")
CHECKPOINTED = ("offsite_checkpointed", "offsite_lora_checkpointed")
ALL_SETTINGS = SETTINGS + VARIANTS
TOP_ONLY = ("offsite_top_cached", "offsite_top", "offsite_top_cached_lora")  # the same split with --bottom 0
CACHED = ("offsite_top_cached", "offsite_top_cached_lora")
TASKS = ("choice", "lm")
# A choice task scores the continuation only; the built-in bbc-news topics are one token each.
CHOICE_SCORED_TOKENS = 1
# Random-weight models built from a config (no download), to see how the ratios move with size.
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "gpt2-large": {"model_type": "gpt2", "n_layer": 36, "n_embd": 1280, "n_head": 20, "vocab_size": 50257,
                   "n_positions": 1024},
}


@dataclass
class BenchConfig(JsonConfig):
    """What `offsite bench` measures: one model (or random shape), one split, one batch shape."""

    model: str | None = option(None, "full model: local directory, hub id or built-in alias", positional=True,
                               nargs="?")
    random_shape: str | None = option(None, "instead of MODEL, a random-weight model of this shape: gpt2-large")
    task: str = option("choice", "choice (loss on the answer token) or lm (every token)")
    split: SplitConfig = field(default_factory=lambda: SplitConfig(emulator_layers=8))
    batch_size: int = option(8, "sequences per step")
    seq_len: int = option(160, "tokens per sequence")
    steps: int = option(10, "timed steps per setting (per epoch, for the cached setting)")
    warmup_steps: int = option(2, "untimed steps first")
    lora_rank: int = option(8, "rank of the LoRA settings")
    epochs: int = option(3, "epochs of offsite_top_cached: passes over the cached data")
    settings: list[str] = option(help="run only these settings (default: the five main ones); the variants "
                                 "offsite_emulator_grads, offsite_all_logits, offsite_checkpointed, "
                                 "offsite_lora_checkpointed, offsite_top and offsite_top_cached_lora each undo or "
                                 "add one optimisation, to measure it", nargs="+",
                                 default_factory=lambda: list(SETTINGS))
    eval_examples: int = option(20, "choice-scoring benchmark size; 0 skips it")
    threads: int | None = option(None, "torch threads per measuring process (default: torch's)")
    isolate: bool = option(True, "run every setting in this process (faster start; peak memory is then not per "
                           "setting)", flags=("--in-process",))
    seed: int = 0
    runtime: DeviceConfig = field(default_factory=DeviceConfig)

    def __post_init__(self) -> None:
        if isinstance(self.split, dict):
            self.split = SplitConfig.from_dict(self.split)
        if isinstance(self.runtime, dict):
            self.runtime = DeviceConfig.from_dict(self.runtime)
        problems: list[str] = []
        if (self.model is None) == (self.random_shape is None):
            problems.append("pass either MODEL or --random-shape (one of them)")
        if self.random_shape is not None and self.random_shape not in RANDOM_SHAPES:
            problems.append(f"--random-shape={self.random_shape!r} is not known; available: {', '.join(RANDOM_SHAPES)}")
        if self.random_shape is not None and self.split.method != "uniform":
            problems.append(f"--method={self.split.method!r}: --random-shape builds uniform emulators from the "
                            "config; pass a real MODEL to measure other emulator methods")
        if self.task not in TASKS:
            problems.append(f"--task={self.task!r} is not known; use 'choice' or 'lm'")
        positive(problems, batch_size=self.batch_size, seq_len=self.seq_len, steps=self.steps,
                  lora_rank=self.lora_rank, epochs=self.epochs, threads=self.threads)
        non_negative(problems, warmup_steps=self.warmup_steps, eval_examples=self.eval_examples)
        unknown = [s for s in self.settings if s not in ALL_SETTINGS]
        if unknown or not self.settings or len(set(self.settings)) != len(self.settings):
            problems.append(f"--settings {' '.join(self.settings)}: give each once, from {', '.join(ALL_SETTINGS)}")
        for name in TOP_ONLY:
            if name in self.settings and self.split.top == 0:
                problems.append(f"--top 0: {name} trains the top adapter layers; use --top 1 or more")
        check(problems)

    def plans(self, num_layers: int) -> dict[str, SplitPlan]:
        """The split of each setting: full fine-tuning trains everything; top-cached uses --bottom 0.

        Without top layers there is no top-only adapter, so that setting is left out.
        """
        everything = tuple(range(num_layers))
        full = SplitPlan(num_layers, everything, (), ())
        sandwich = plan_split(num_layers, self.split)
        plans = {"full_ft": full, "full_ft_lora": full, "offsite": sandwich, "offsite_lora": sandwich,
                 "offsite_emulator_grads": sandwich, "offsite_all_logits": sandwich, "offsite_checkpointed": sandwich,
                 "offsite_lora_checkpointed": sandwich}
        if self.split.top:
            top_only = plan_split(num_layers, replace(self.split, bottom=0))
            plans.update({name: top_only for name in TOP_ONLY})
        return plans

    @property
    def scored_tokens(self) -> int:
        return CHOICE_SCORED_TOKENS if self.task == "choice" else self.seq_len


def uses_lora(setting: str) -> bool:
    return "lora" in setting.split("_")

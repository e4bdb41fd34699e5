"""`offsite bench`: the data owner's training speed and memory, full fine-tuning against offsite-tuning.

Every setting trains on the same synthetic batch shape (B sequences of T tokens, random
ids: speed does not depend on the text) in its own freshly spawned process, so its peak
memory is its own:

- `full_ft`: every block of the full model trains, logits at every position (what a
  plain `model(input_ids, labels=...)` loop computes);
- `full_ft_lora`: peft LoRA on every block, logits at every position;
- `offsite`, `offsite_lora`: the adapter of a bundle trains through the emulator, with
  logits only at the scored positions (offsite's training loss);
- `offsite_top_cached`: a top-only adapter (the same split with `--bottom 0`) with the
  emulator's output cached (offsite.emulator_cache), timed over several epochs, cache
  building included.

Per setting: tokens/s (median step after warm-up, optimizer step included; for the cached
setting, all tokens over all epochs divided by the wall time including the cache), peak
resident memory (VmHWM), peak tensor memory (torch's MemTracker over one extra step, after
the timed ones, so optimizer state exists), trainable parameters. `offsite.flops` gives
the analytic limit of each ratio.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from offsite.config import JsonConfig, SplitConfig, _non_negative, _positive
from offsite.errors import OffsiteError, check
from offsite.flops import FORMULA, Plan, Shapes, plan_modes, read_shapes, token_cost
from offsite.split import SplitPlan, plan_split

log = logging.getLogger(__name__)

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

    model: str | None = None
    random_shape: str | None = None
    task: str = "choice"
    split: SplitConfig = field(default_factory=lambda: SplitConfig(emulator_layers=8))
    batch_size: int = 8
    seq_len: int = 160
    steps: int = 10  # timed steps (per epoch, for the cached setting)
    warmup_steps: int = 2
    lora_rank: int = 8
    epochs: int = 3  # passes over the cached data in offsite_top_cached
    settings: list[str] = field(default_factory=lambda: list(SETTINGS))
    eval_examples: int = 20  # choice-scoring benchmark; 0 skips it
    threads: int | None = None  # torch threads in each measuring process (default: torch's choice)
    isolate: bool = True  # every setting in a fresh process, so peak memory is its own
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.split, dict):
            self.split = SplitConfig.from_dict(self.split)
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
        _positive(problems, batch_size=self.batch_size, seq_len=self.seq_len, steps=self.steps,
                  lora_rank=self.lora_rank, epochs=self.epochs, threads=self.threads)
        _non_negative(problems, warmup_steps=self.warmup_steps, eval_examples=self.eval_examples)
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


def model_config(config: BenchConfig, num_layers: int | None = None) -> PretrainedConfig:
    """The full model's config (or the random shape's), optionally with fewer layers."""
    if config.random_shape is not None:
        fields = dict(RANDOM_SHAPES[config.random_shape])
        result = AutoConfig.for_model(fields.pop("model_type"), **fields)
    else:
        from offsite.loading import resolve
        try:
            result = AutoConfig.from_pretrained(resolve(config.model))
        except (OSError, ValueError) as error:
            raise OffsiteError(f"could not read the config of MODEL '{config.model}': {error}") from None
    if num_layers is not None:
        result.num_hidden_layers = num_layers
    return result


def model_shapes(config: BenchConfig) -> Shapes:
    """Layer shapes from a meta-device model: no weights are allocated."""
    with torch.device("meta"):
        return read_shapes(AutoModelForCausalLM.from_config(model_config(config)))


def flop_costs(config: BenchConfig, shapes: Shapes) -> dict[str, float]:
    """MACs per training token of every setting (see offsite.flops)."""
    costs = {}
    for name, plan in config.plans(shapes.num_layers).items():
        if name != "full_ft" and name not in config.settings:
            continue
        modes = plan_modes(shapes.num_layers, plan.kept, plan.adapter, lora=uses_lora(name))
        if name == "offsite_emulator_grads":
            modes = ["train" if mode == "pass" else mode for mode in modes]
        if name in CHECKPOINTED:
            modes = ["recompute" if mode == "pass" else mode for mode in modes]
        all_logits = name.startswith("full_ft") or name == "offsite_all_logits"
        scored = 1.0 if all_logits else config.scored_tokens / config.seq_len
        share = 1.0 / config.epochs if name in CACHED else 1.0
        costs[name] = token_cost(shapes, Plan(modes, scored, share), config.seq_len, config.lora_rank)
    return costs


def check_fits(config: BenchConfig, shapes: Shapes) -> None:
    """Refuse settings the model cannot run before any work starts."""
    config.plans(shapes.num_layers)  # plan_split names the split flag to change
    limit = getattr(model_config(config), "max_position_embeddings", None)
    if isinstance(limit, int) and config.seq_len > limit:
        raise OffsiteError(f"--seq-len={config.seq_len} is longer than this model's {limit} positions")


def bench(config: BenchConfig) -> dict[str, Any]:
    """Run every setting (each in a fresh process) and the evaluation benchmark; return one JSON-able dict."""
    from offsite.bench_run import prepare_bundles, run_evaluation, run_setting
    from offsite.processes import in_fresh_process
    shapes = model_shapes(config)
    check_fits(config, shapes)
    with _workspace() as work:
        bundles = prepare_bundles(config, work)
        rows = []
        for name in config.settings:
            log.info("bench: %s", name)
            rows.append(in_fresh_process(config.isolate, run_setting, config.to_dict(), name, bundles.get(name)))
        evaluation = None
        if config.eval_examples and config.model is not None:
            log.info("bench: choice evaluation")
            evaluation = in_fresh_process(config.isolate, run_evaluation, config.to_dict())
    return summarise(config, rows, evaluation, shapes)


@contextlib.contextmanager
def _workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="offsite-bench-") as tmp:
        yield Path(tmp)


def _ratios(rows: dict[str, dict[str, Any]], base: str, key: str, higher_is_better: bool) -> dict[str, float]:
    if base not in rows or not rows[base].get(key):
        return {}
    reference = rows[base][key]
    return {name: (row[key] / reference if higher_is_better else reference / row[key])
            for name, row in rows.items() if row.get(key)}


def _above_runtime(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Peak RSS less what the process held before loading its model (interpreter and libraries)."""
    return {name: {"peak_rss_mb": row["peak_rss_mb"] - row["runtime_rss_mb"]}
            for name, row in rows.items() if row.get("runtime_rss_mb")}


def summarise(config: BenchConfig, rows: list[dict[str, Any]], evaluation: dict[str, Any] | None,
              shapes: Shapes) -> dict[str, Any]:
    """Rows plus every ratio against full_ft, and the analytic limits."""
    from offsite.bench_run import machine
    by_name = {row["setting"]: row for row in rows}
    costs = flop_costs(config, shapes)
    return {
        "model": config.model or f"random:{config.random_shape}",
        "config": config.to_dict(),
        "machine": machine(),
        "rows": rows,
        "speedup": _ratios(by_name, "full_ft", "tokens_per_s", True),
        "speedup_vs_full_ft_lora": _ratios(by_name, "full_ft_lora", "tokens_per_s", True),
        "memory_reduction": _ratios(by_name, "full_ft", "peak_rss_mb", False),
        "memory_reduction_above_runtime": _ratios(_above_runtime(by_name), "full_ft", "peak_rss_mb", False),
        "tensor_memory_reduction": _ratios(by_name, "full_ft", "peak_tensor_mb", False),
        "flop_ratio_limit": {name: costs["full_ft"] / cost for name, cost in costs.items()},
        "flop_cost_per_token": costs,
        "flop_formula": FORMULA,
        "flop_note": _flop_note(config.split),
        "evaluation": evaluation,
    }


def _flop_note(split: SplitConfig) -> str | None:
    """The formula counts each kept emulator block once at the full model's shapes; some methods change that."""
    if split.shares or split.compression:
        return (f"--method={split.method}: the limit counts each kept emulator block once, at the full model's "
                "shapes; shared or compressed emulator blocks cost otherwise, so the limit is only indicative")
    return None


def format_bench(result: dict[str, Any]) -> str:
    """The result as a Markdown table with a few lines of context."""
    config, machine = result["config"], result["machine"]
    split = config["split"]
    threads = sorted({row["torch_threads"] for row in result["rows"]})  # the measuring processes', not ours
    allocators = sorted({row.get("allocator", "system") for row in result["rows"]})
    lines = [
        f"offsite bench {result['model']}: task {config['task']}, batch {config['batch_size']} x "
        f"{config['seq_len']} tokens, split {split['bottom']}-{split['emulator_layers'] or split['drop_ratio']}-"
        f"{split['top']} (top-cached: --bottom 0, {config['epochs']} epochs), median of {config['steps']} steps "
        f"after {config['warmup_steps']} warm-up; {machine['cpu']} ({machine['cpu_count']} cores), torch threads "
        f"{'/'.join(map(str, threads))}, {'/'.join(allocators)} allocator, {machine['date']}",
        "",
        "| setting | tokens/s | speed-up | FLOP limit | peak RSS MB | memory ratio | peak tensor MB | trainable params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        name = row["setting"]
        lines.append(
            f"| {name} | {row['tokens_per_s']:.0f} | {_times(result['speedup'].get(name))} | "
            f"{_times(result['flop_ratio_limit'].get(name))} | {row['peak_rss_mb']:.0f} | "
            f"{_times(result['memory_reduction'].get(name))} | {_mb(row['peak_tensor_mb'])} | "
            f"{row['trainable_params'] / 1e6:.2f}M |")
    runtime = [row["runtime_rss_mb"] for row in result["rows"] if row.get("runtime_rss_mb")]
    if runtime and result["memory_reduction_above_runtime"]:
        ratios = ", ".join(f"{name} {_times(value)}" for name, value in result["memory_reduction_above_runtime"].items()
                           if name != "full_ft")
        lines += ["", f"Peak RSS includes the runtime every process holds before it loads a model (Python, torch, "
                      f"transformers, peft: {min(runtime):.0f}-{max(runtime):.0f} MB). Above it, the memory ratios "
                      f"are: {ratios}."]
    lines += ["", f"FLOP limit: {result['flop_formula']}"]
    if result.get("flop_note"):
        lines.append(f"Note: {result['flop_note']}")
    evaluation = result["evaluation"]
    if evaluation:
        lines.append(
            f"choice scoring ({evaluation['examples']} examples, {evaluation['choices']} choices): offsite "
            f"{evaluation['offsite_examples_per_s']:.2f} examples/s; one forward per choice "
            f"{evaluation['naive_examples_per_s']:.2f} ({_times(evaluation['speedup'])}); all choices of an example "
            f"in one batch {evaluation['batched_examples_per_s']:.2f} ({_times(evaluation['speedup_vs_batched'])}); "
            f"largest log-likelihood difference {evaluation['max_abs_loglik_diff']:.2e}")
    return "\n".join(lines)


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


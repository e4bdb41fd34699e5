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
  emulator's output cached (offsite.training.emulator_cache), timed over several epochs, cache
  building included.

Per setting: tokens/s (median step after warm-up, optimizer step included; for the cached
setting, all tokens over all epochs divided by the wall time including the cache), peak
resident memory (VmHWM), peak tensor memory (torch's MemTracker over one extra step, after
the timed ones, so optimizer state exists), trainable parameters. `offsite.studies.bench.flops` gives
the analytic limit of each ratio.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator

from offsite.config import SplitConfig
from offsite.loading import check_window
from offsite.processes import in_fresh_process
from offsite.studies.bench.flops import FORMULA, Plan, Shapes, plan_modes, token_cost
from offsite.studies.bench.measure import (
    machine,
    model_config,
    model_shapes,
    prepare_bundles,
    run_evaluation,
    run_setting,
)
from offsite.studies.bench.settings import CACHED, CHECKPOINTED, BenchConfig, uses_lora

log = logging.getLogger(__name__)


def flop_costs(config: BenchConfig, shapes: Shapes) -> dict[str, float]:
    """MACs per training token of every setting (see offsite.studies.bench.flops)."""
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
    check_window(model_config(config), config.seq_len)


def bench(config: BenchConfig) -> dict[str, Any]:
    """Run every setting (each in a fresh process) and the evaluation benchmark; return one JSON-able dict."""
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
        "device_memory_reduction": _ratios(by_name, "full_ft", "device_peak_mb", False),  # a GPU's own peak
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

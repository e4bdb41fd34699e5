"""`offsite demo --lm-eval TASKS`: the demo's five settings scored on lm-eval tasks as well.

Each demo task trains its own adapter (and its own fully fine-tuned model), so every setting that
depends on training is scored once per demo task: the report's lm-eval table has one column per demo
task's model. The full model and the emulator zero-shot are the same in every column (one stage each).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from offsite.api import load_for_eval
from offsite.config import DeviceConfig, EvalConfig
from offsite.device import Placement, place_model
from offsite.lmeval.evaluate import require_lm_eval
from offsite.lmeval.run import check_tasks, metrics, resolve_tasks, run_lm_eval, task_manager

# The window lm-eval's requests are cut to, the same for every setting and demo task (offsite eval's default).
LM_EVAL_SEQ_LEN = EvalConfig.seq_len

# What a table cell shows of a task's metrics: the first the task reports of these, else its first.
PRIMARY = ("acc", "acc_norm", "exact_match", "word_perplexity", "perplexity")


def check_lm_eval_tasks(tasks: list[str], scratch: Path) -> None:
    """Before any stage runs: lm-eval installed, every task known and its data here (else one line)."""
    require_lm_eval("--lm-eval")
    resolved = resolve_tasks(tasks, scratch)
    check_tasks(resolved, task_manager(resolved))


def tasks_identity(tasks: list[str], limit: int | None) -> dict[str, Any]:
    """Stage inputs for the lm-eval scores: task names, and the content of the task files given by path."""
    files = {t: hashlib.sha256(Path(t).read_bytes()).hexdigest() for t in tasks if Path(t).is_file()}
    return {"lm_eval": tasks, "lm_eval_files": files, "lm_eval_limit": limit}


def lm_eval_stage(model: str, adapter: str | None, bundle: str | None, tasks: list[str], limit: int | None,
                  seq_len: int, runtime: DeviceConfig) -> dict[str, Any]:
    """One setting's model (a full model, bundle, either with an adapter) scored by lm-eval."""
    from offsite.lmeval.model import OffsiteLM  # noqa: PLC0415 - imports lm-eval, an optional extra

    placement = Placement.of(runtime.device, runtime.dtype)
    loaded, tokenizer = load_for_eval(model, adapter, bundle)
    place_model(loaded, placement)
    return score_loaded_model(OffsiteLM.of(loaded, tokenizer, seq_len), tasks, limit)


def score_loaded_model(lm, tasks: list[str], limit: int | None) -> dict[str, Any]:
    found = run_lm_eval(lm, tasks, limit)
    return {"metrics": metrics(found), "n_samples": found.get("n-samples", {}), "versions": found.get("versions", {})}


def primary_metric(values: dict[str, float]) -> tuple[str, float] | None:
    for name in PRIMARY:
        if name in values:
            return name, values[name]
    return next(((name, value) for name, value in values.items() if not name.endswith("_stderr")), None)


def lm_eval_markdown(found: dict[str, dict[str, dict[str, Any]]], labels: dict[str, str]) -> list[str]:
    """One table per lm-eval task: a row per setting, a column per demo task's model."""
    demo_tasks = list(found)
    lm_tasks = sorted({t for per_setting in found.values() for s in per_setting.values() for t in s["metrics"]})
    lines: list[str] = []
    for lm_task in lm_tasks:
        lines += ["", f"lm-eval task `{lm_task}` (each column: the models trained on that demo task):", "",
                  "| setting | " + " | ".join(demo_tasks) + " |", "|---|" + "---|" * len(demo_tasks)]
        for name, label in labels.items():
            cells = []
            for task in demo_tasks:
                values = found[task].get(name, {}).get("metrics", {}).get(lm_task)
                best = primary_metric(values) if values else None
                cells.append(f"{best[0]} {best[1]:.4g}" if best else "n/a")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines

"""The demo's fair comparison: each trained setting gets what a user would give it.

The equal-steps table gives every setting the budget's steps at one learning rate. Here each
setting (full fine-tuning, the offsite adapter, the ceiling) instead tries every learning rate of
a small grid, trains until its validation stops improving within a step cap, keeps its best
checkpoint, and the learning rate with the best validation is reported, with its steps and wall
time. Test data is never used to choose. The data owner validates through the emulator (all it
has); the full model and the ceiling validate on the full model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from offsite.constants import ADAPTER_WEIGHTS
from offsite.data.builtin import load_builtin
from offsite.data.read import write_jsonl
from offsite.data.types import ChoiceData, truncate_text
from offsite.files import sha256_file
from offsite.processes import in_fresh_process
from offsite.studies.settings import DemoConfig, FairBudget, TaskBudget
from offsite.studies.stages import (
    Emulator, StageCache, TaskRun, adapter_settings, evaluate_stage, full_finetune_stage, full_model_inputs,
    offsite_tune_stage, prepare_task, train_settings,
)

def validation_file(config: DemoConfig, task: str, budget: TaskBudget) -> Path:
    """The task's validation split, cut to the fair budget's share of the test size, as jsonl."""
    examples = config.fair.validation_examples(budget)
    data = load_builtin(task, "validation")
    data = (ChoiceData(data.examples[:examples], data.source) if isinstance(data, ChoiceData)
            else truncate_text(data, examples, budget.seq_len))
    path = Path(config.output) / "data" / f"{task}.validation.jsonl"
    write_jsonl(data, path)
    return path


def fair_settings(fair: FairBudget, budget: TaskBudget, base: dict[str, Any], lr: float) -> dict[str, Any]:
    """TrainConfig fields of one grid point: `base` with the lr, the step cap, the checks and patience."""
    return {**base, "lr": lr, "max_steps": fair.max_steps(budget), "eval_every": fair.eval_every(budget),
            "patience": fair.patience}


def validation_value(summary: dict[str, Any]) -> float:
    """The best validation of a run on one scale, higher is better (accuracy, or minus perplexity)."""
    best = summary["best_eval"]
    return best["accuracy"] if best["task"] == "choice" else -best["perplexity"]


def choose(grid: list[dict[str, Any]]) -> dict[str, Any]:
    """The grid point with the best validation (the first of equals: the grid is in increasing lr)."""
    return max(grid, key=lambda point: validation_value(point["summary"]))


def _record(lr: float, stage: dict[str, Any], scored: dict[str, dict[str, Any]]) -> dict[str, Any]:
    summary = stage["summary"]  # seconds: the whole run, validation included
    return {"lr": lr, "summary": summary, "steps": summary["steps"], "best_step": summary["best_step"],
            "stopped_early": summary["stopped_early"], "seconds": summary["seconds"], "test": scored}


def _grid(lrs: tuple[float, ...], run_one: Callable[[float], dict[str, Any]]) -> dict[str, Any]:
    grid = [run_one(lr) for lr in lrs]
    return {"grid": grid, "chosen": choose(grid), "grid_seconds": sum(point["seconds"] for point in grid)}


def fair_comparison(config: DemoConfig, cache: StageCache, task: str, emulator: Emulator,
                    ceiling: Emulator | None) -> dict[str, Any]:
    """Per trained setting: every grid point (validation, steps, seconds, test) and the chosen one."""
    run = prepare_task(config, task)
    fair, budget = config.fair, run.budget
    valid = validation_file(config, task, budget)
    # Each grid point's key holds its own lr, not the grids: a learning rate added to a grid reuses the others.
    rules = {k: v for k, v in dataclasses.asdict(fair).items() if k not in ("adapter_lrs", "full_lrs")}
    inputs = {**run.inputs, "fair": rules, "validation": sha256_file(valid)}
    found = {"full_finetune": _grid(fair.full_lrs, lambda lr: _full_point(config, cache, run, valid, inputs, lr)),
             "offsite": _grid(fair.adapter_lrs, lambda lr: _adapter_point(config, cache, task, run, valid, inputs,
                                                                          emulator, lr, through=True))}
    if ceiling is not None:
        found["ceiling"] = _grid(fair.adapter_lrs, lambda lr: _adapter_point(config, cache, task, run, valid, inputs,
                                                                             ceiling, lr, through=False))
    return found


def _full_point(config: DemoConfig, cache: StageCache, run: TaskRun, valid: Path, inputs: dict[str, Any],
                lr: float) -> dict[str, Any]:
    train_file, test_file = run.files
    base = dataclasses.asdict(train_settings(run.budget, run.budget.full_lr, config.seed))
    settings = fair_settings(config.fair, run.budget, base, lr)
    metrics = Path(config.output) / "data" / f"{train_file.stem}.fair-full-{lr:g}.metrics.jsonl"
    key = {**full_model_inputs(run), "fair": inputs["fair"], "validation": inputs["validation"]}
    stage = cache.run("fair_full_finetune", lambda: in_fresh_process(
        config.isolate, full_finetune_stage, config.model, str(train_file), str(test_file), settings, str(metrics),
        str(valid), config.runtime), lr=lr, **key)
    return _record(lr, stage, {"full_finetune": stage["result"]})


def _adapter_point(config: DemoConfig, cache: StageCache, task: str, run: TaskRun, valid: Path,
                   inputs: dict[str, Any], emulator: Emulator, lr: float, through: bool) -> dict[str, Any]:
    """One learning rate of the data owner's run on `emulator`, validated on that bundle, then scored."""
    train_file, test_file = run.files
    settings = fair_settings(config.fair, run.budget, adapter_settings(config, run.budget), lr)
    key = {**inputs, "emulator": emulator.key(), "adapter_training": config.adapter_training, "lr": lr}
    adapter = emulator.bundle.parent.parent / "adapters" / f"{task}-{emulator.bundle.name}-fair-{lr:g}"
    stage = cache.run("fair_offsite_tune", lambda: in_fresh_process(
        config.isolate, offsite_tune_stage, str(emulator.bundle), str(train_file), str(adapter), settings, None,
        str(valid), config.runtime), needs=adapter / ADAPTER_WEIGHTS, **key)
    scored = {"plug_in": cache.run("fair_plug_in", lambda: evaluate_stage(
        config.model, str(adapter), str(test_file), run.budget, str(emulator.bundle), config.runtime),
        adapter=stage["summary"], **key)}
    if through:
        scored["emulator_finetune"] = cache.run("fair_emulator_finetune", lambda: evaluate_stage(
            str(emulator.bundle), str(adapter), str(test_file), run.budget, runtime=config.runtime),
            adapter=stage["summary"], **key)
    return _record(lr, stage, scored)

"""`offsite demo`: the paper's Table 1 on a real model, offline, in one command.

For each task it measures the full model zero-shot, the emulator zero-shot,
full fine-tuning, offsite-tuning seen through the emulator, and the plug-in
(full model + returned adapter). Every stage's result is cached under
`output/stages/` by a hash of its inputs, so an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from offsite import __version__
from offsite.api import align, emulate
from offsite.arch import blocks_config
from offsite.assets import cache_dir
from offsite.config import AlignConfig, DistillConfig, EmulateConfig
from offsite.constants import ADAPTER_WEIGHTS, MANIFEST
from offsite.device import Placement
from offsite.exchange.bundle import Manifest, check_bundle, read_manifest
from offsite.data.builtin import split_definition
from offsite.errors import OffsiteError
from offsite.files import atomic_dir, read_json
from offsite.loading import is_classifier, load_config
from offsite.processes import in_fresh_process
from offsite.studies.demo_report import write_report
from offsite.studies.fair import fair_comparison
from offsite.studies.lm_eval_rows import LM_EVAL_SEQ_LEN, check_lm_eval_tasks, lm_eval_stage, tasks_identity
from offsite.studies.settings import DemoConfig, TaskBudget, VisionDemoConfig
from offsite.studies.stages import (
    Emulator, StageCache, TaskRun, adapter_settings, evaluate_stage, full_finetune_stage,
    full_model_inputs, make_emulator, offsite_tune_stage, prepare_task, train_settings,
)

log = logging.getLogger(__name__)


def emulators(config: DemoConfig) -> list[Emulator]:
    """The demo's emulator first; with distillation, the plain uniform one too, so its effect shows."""
    found = [make_emulator(config, config.split, config.distill)]
    if config.distill and config.compare_uniform:
        found.append(make_emulator(config, dataclasses.replace(config.split, method="uniform"), None))
    return found


def ceiling_emulator(config: DemoConfig | VisionDemoConfig) -> Emulator:
    """A bundle that keeps every middle layer: training on it is training on the full model."""
    middle = blocks_config(load_config(config.model)).num_hidden_layers - config.split.bottom - config.split.top
    split = dataclasses.replace(config.split, method="uniform", emulator_layers=middle, drop_ratio=None)
    return make_emulator(config, split, None)


def build_bundles(config: DemoConfig, cache: "StageCache", measured: list[Emulator]) -> None:
    for emulator in measured:
        shared = shared_emulators() / cache.key("bundle", emulator=emulator.key()) if emulator.distill else None
        cache.run("bundle", lambda: make_bundle(config, emulator, shared), needs=emulator.bundle / MANIFEST,
                  emulator=emulator.key())


def shared_emulators() -> Path:
    """Distilled demo bundles kept across runs (any --out), keyed by everything that determines them.

    Distillation is the demo's longest stage; it is built once, by the first demo that needs it.
    """
    return cache_dir() / "demo-emulators"


def adapter_inputs(config: DemoConfig, inputs: dict[str, Any]) -> dict[str, Any]:
    """Stage inputs of everything that depends on the adapter.

    Only overridden runs carry the overrides in their keys, so default runs keep their cache.
    """
    return {**inputs, "adapter_training": config.adapter_training} if config.adapter_training else inputs


def tune_adapter(config: DemoConfig | VisionDemoConfig, cache: StageCache, task: str, emulator: Emulator, train_file: Path,
                 budget: TaskBudget, inputs: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The data owner's run on `emulator`'s bundle: (adapter folder, the stage's result).

    `inputs` are the stage inputs with the adapter overrides already in (see `adapter_inputs`).
    """
    settings = adapter_settings(config, budget)
    name = f"{task}-{emulator.bundle.name}"
    if config.adapter_training:
        name += "-" + hashlib.sha256(json.dumps(config.adapter_training, sort_keys=True).encode()).hexdigest()[:8]
    adapter = emulator.bundle.parent.parent / "adapters" / name
    tuned = cache.run("offsite_tune", lambda: in_fresh_process(
        config.isolate, offsite_tune_stage, str(emulator.bundle), str(train_file), str(adapter), settings, None, None,
        config.runtime), needs=adapter / ADAPTER_WEIGHTS, **inputs)
    return adapter, tuned


def run_emulator(config: DemoConfig, cache: StageCache, task: str, emulator: Emulator,
                 files: tuple[Path, Path], budget: TaskBudget, task_inputs: dict[str, Any],
                 primary: bool = False) -> dict[str, Any]:
    """The three settings that depend on the emulator: zero-shot, fine-tuned through it, plug-in.

    For the `primary` emulator (the demo's own), also the alignment rounds (`config.align_rounds`) and
    the lm-eval scores (`config.lm_eval`).
    """
    train_file, test_file = files
    inputs = {**task_inputs, "emulator": emulator.key()}
    bundle = str(emulator.bundle)
    zero = cache.run("emulator_zero_shot", lambda: evaluate_stage(bundle, None, str(test_file), budget,
                                                                  runtime=config.runtime), **inputs)
    inputs = adapter_inputs(config, inputs)
    adapter, tuned = tune_adapter(config, cache, task, emulator, train_file, budget, inputs)
    emulated = cache.run("emulator_finetune", lambda: evaluate_stage(bundle, str(adapter), str(test_file), budget,
                                                                    runtime=config.runtime),
                         adapter=tuned["summary"], **inputs)
    plugged = cache.run("plug_in", lambda: evaluate_stage(config.model, str(adapter), str(test_file), budget, bundle,
                                                          config.runtime), adapter=tuned["summary"], **inputs)
    found = {"results": {"emulator_zero_shot": zero, "emulator_finetune": emulated, "plug_in": plugged},
             "timing": stage_timing(tuned)}
    if config.lm_eval and primary:
        found["lm_eval"] = {name: lm_eval_run(config, cache, model, adapter_arg, bundle_arg,
                                              {"setting": name, **setting_inputs})
                            for name, model, adapter_arg, bundle_arg, setting_inputs in (
                                ("emulator_zero_shot", bundle, None, None, {"emulator": emulator.key()}),
                                ("emulator_finetune", bundle, str(adapter), None, {**inputs, "adapter": tuned["summary"]}),
                                ("plug_in", config.model, str(adapter), bundle, {**inputs, "adapter": tuned["summary"]}))}
    if primary and config.align_rounds:
        found["rounds"] = alignment_rounds(config, cache, task, emulator, files, budget, inputs, adapter, tuned)
    return found


def align_settings(config: DemoConfig) -> DistillConfig:
    """The demo's alignment: its distillation's settings (or the default ones on austen), fewer steps."""
    base = config.distill if isinstance(config.distill, DistillConfig) else DistillConfig(corpus="austen")
    return dataclasses.replace(base, steps=config.align_steps)


def alignment_rounds(config: DemoConfig, cache: StageCache, task: str, emulator: Emulator, files: tuple[Path, Path],
                     budget: TaskBudget, inputs: dict[str, Any], adapter: Path,
                     tuned: dict[str, Any]) -> list[dict[str, Any]]:
    """R rounds of: the model owner re-aligns the bundle with the returned adapter, the data owner tunes on.

    Each round's tuning starts from the previous adapter and runs the budget's steps again; the
    plug-in and the emulator fine-tuned are scored after every round. With `align_steps=0` (the
    control) the bundle is never re-aligned: the same tuning, through the unchanged emulator.
    """
    train_file, test_file = files
    settings = adapter_settings(config, budget)
    bundle, found = emulator.bundle, []
    for number in range(1, config.align_rounds + 1):
        round_inputs = {**inputs, "round": number, "previous": tuned["summary"],
                        "align": align_settings(config).identity() if config.align_steps else "control"}
        if config.align_steps:
            aligned = emulator.bundle.parent / f"{adapter.name}-aligned{number}"  # one per adapter: per task and variant
            realigned = cache.run("align", lambda: _align_stage(config, bundle, adapter, aligned),
                                  needs=aligned / MANIFEST, **round_inputs)
        else:
            aligned, realigned = bundle, {"seconds": 0.0, "standin_error": None}
        next_adapter = adapter.parent / f"{adapter.name}-round{number}"
        tuned = cache.run("offsite_tune", lambda: in_fresh_process(
            config.isolate, offsite_tune_stage, str(aligned), str(train_file), str(next_adapter), settings,
            str(adapter), None, config.runtime), needs=next_adapter / ADAPTER_WEIGHTS, **round_inputs)
        scored = {name: cache.run(name, lambda model=model, bundle_arg=bundle_arg: evaluate_stage(
                      model, str(next_adapter), str(test_file), budget, bundle_arg, config.runtime),
                      adapter=tuned["summary"], **round_inputs)
                  for name, model, bundle_arg in (("emulator_finetune", str(aligned), None),
                                                  ("plug_in", config.model, str(aligned)))}
        found.append({"round": number, "aligned": bool(config.align_steps), **scored,
                      "adapter_steps": (number + 1) * tuned["summary"]["steps"],
                      "align_seconds": realigned["seconds"], "standin_error": realigned["standin_error"]})
        bundle, adapter = aligned, next_adapter
    return found


def _align_stage(config: DemoConfig, bundle: Path, adapter: Path, output: Path) -> dict[str, Any]:
    start = time.perf_counter()
    align(AlignConfig(bundle=str(bundle), model=config.model, adapter=str(adapter), output=str(output),
                      distill=align_settings(config), overwrite=True, runtime=config.runtime))
    summary = read_manifest(output).emulator["alignments"][-1]
    return {"seconds": time.perf_counter() - start,
            "standin_error": summary.get("heldout_standin_error_best"), "summary": summary}


def run_ceiling(config: DemoConfig, cache: StageCache, task: str, ceiling: Emulator,
                files: tuple[Path, Path], budget: TaskBudget, task_inputs: dict[str, Any]) -> dict[str, Any]:
    """The same adapter trained on the full model itself (a bundle of every layer), then plugged in.

    No emulator can do better for this adapter and budget, so it is the ceiling the demo's emulator
    is judged against. Only the model owner can run it: it needs the full model.
    """
    train_file, test_file = files
    inputs = adapter_inputs(config, {**task_inputs, "emulator": ceiling.key()})
    adapter, tuned = tune_adapter(config, cache, task, ceiling, train_file, budget, inputs)
    plugged = cache.run("plug_in", lambda: evaluate_stage(config.model, str(adapter), str(test_file), budget,
                                                     str(ceiling.bundle), config.runtime),
                        adapter=tuned["summary"], **inputs)
    return {"result": plugged, "timing": stage_timing(tuned)}


def zero_shot(config: DemoConfig, cache: StageCache, run: TaskRun) -> dict[str, Any]:
    return cache.run("zero_shot", lambda: evaluate_stage(config.model, None, str(run.files[1]), run.budget,
                                                         runtime=config.runtime), **full_model_inputs(run))


def read_reference(config: DemoConfig) -> dict[str, Any] | None:
    """The earlier report whose full-model rows this run reuses (`config.reference`), checked to have
    measured the same thing: model, budget, seed, adapter settings, data splits and offsite version."""
    if config.reference is None:
        return None
    report = read_json(Path(config.reference), "reference report")
    # Every split the reference recorded must be made as now (a dataset added since changes nothing).
    recorded = report.get("split_definition") or {}
    now = {"model": config.model, "budget": config.budget_name, "seed": config.seed,
           "adapter_training": config.adapter_training,
           "split_definition": {key: split_definition().get(key) for key in recorded} or None,
           "offsite": __version__}
    now = json.loads(json.dumps(now))  # as the report holds it (tuples become lists)
    then = {**{key: report.get(key) for key in now}, "offsite": report.get("versions", {}).get("offsite")}
    differ = [key for key in now if then[key] != now[key]]
    missing = [t for t in config.tasks if t not in report.get("settings", {}).get("full_finetune", {})]
    if differ or missing:
        raise OffsiteError(f"reference {config.reference} measured another run: "
                           + ", ".join([f"{key} {then[key]!r} (now {now[key]!r})" for key in differ]
                                       + [f"no task {t}" for t in missing]) + "; recompute its rows instead")
    return report


def reused(reference: dict[str, Any], task: str, run: TaskRun, name: str) -> tuple[Any, Any] | None:
    """(result, timing) of setting `name` for `task` from the reference, None when it has none;
    refused when that task's data or budget differ from this run's."""
    data = reference["data"][task]
    if data["sizes"] != run.sizes or data["budget"] != asdict(run.budget):
        raise OffsiteError(f"reference report: task {task} had other data or budget ({data}); recompute its rows")
    if task not in reference["settings"].get(name, {}):
        return None
    return reference["settings"][name][task], reference["timing"][task].get(name)


def run_task(config: DemoConfig, cache: StageCache, task: str, measured: list[Emulator],
             ceiling: Emulator | None = None, reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """All five settings of one task, for every emulator, and the ceiling when asked for.

    With a `reference` report, its full-model rows (zero-shot, full fine-tuning, the ceiling) are
    taken from it instead of being computed.
    """
    run = prepare_task(config, task)
    budget, inputs, (train_file, test_file), out = run.budget, run.inputs, run.files, Path(config.output)
    if reference is not None:
        zero, _ = reused(reference, task, run, "zero_shot")
        full_result, full_timing = reused(reference, task, run, "full_finetune")
    else:
        zero = zero_shot(config, cache, run)
        lm_eval = {"tasks": config.lm_eval, "limit": config.lm_eval_limit} if config.lm_eval else None
        full = cache.run("full_finetune", lambda: in_fresh_process(
            config.isolate, full_finetune_stage, config.model, str(train_file), str(test_file),
            asdict(train_settings(budget, budget.full_lr, config.seed)),
            str(out / "data" / f"{task}.full_finetune.metrics.jsonl"), None, config.runtime, lm_eval),
            **full_model_inputs(run), **(tasks_identity(config.lm_eval, config.lm_eval_limit) if lm_eval else {}))
        full_result, full_timing = full["result"], stage_timing(full)
    per_emulator = {e.name: run_emulator(config, cache, task, e, (train_file, test_file), budget, inputs,
                                         primary=e is measured[0]) for e in measured}
    primary = per_emulator[measured[0].name]
    results = {"zero_shot": zero, "full_finetune": full_result, **primary["results"]}
    timing = {"full_finetune": full_timing, "emulator_finetune": primary["timing"]}
    if reference is not None and config.ceiling:
        found = reused(reference, task, run, "ceiling")
        if found is not None:
            results["ceiling"], timing["ceiling"] = found
    elif ceiling is not None:
        found = run_ceiling(config, cache, task, ceiling, (train_file, test_file), budget, inputs)
        results["ceiling"], timing["ceiling"] = found["result"], found["timing"]
    found = {
        "results": results,
        "timing": timing,
        "other_emulators": {name: r for name, r in per_emulator.items() if name != measured[0].name},
        "rounds": primary.get("rounds", []),
        "budget": asdict(budget), "sizes": run.sizes,
    }
    if config.lm_eval:
        found["lm_eval"] = {"zero_shot": lm_eval_run(config, cache, config.model, None, None, {"setting": "zero_shot"}),
                            "full_finetune": full["lm_eval"], **primary["lm_eval"]}
    return found


def lm_eval_run(config: DemoConfig, cache: StageCache, model: str, adapter: str | None, bundle: str | None,
                inputs: dict[str, Any]) -> dict[str, Any]:
    """One setting's model scored by lm-eval (`--lm-eval`); `inputs` identify the model (adapter, emulator)."""
    return cache.run("lm_eval", lambda: lm_eval_stage(model, adapter, bundle, config.lm_eval, config.lm_eval_limit,
                                                      LM_EVAL_SEQ_LEN, config.runtime),
                     **inputs, **tasks_identity(config.lm_eval, config.lm_eval_limit))


def stage_timing(stage: dict[str, Any]) -> dict[str, Any]:
    summary = stage["summary"]
    return {"seconds_per_step": summary["seconds_per_step"], "peak_rss_mb": stage["peak_rss_mb"],
            "trainable_params": summary["trainable_params"], "steps": summary["steps"]}


def stage_cache(config: DemoConfig) -> StageCache:
    return StageCache(Path(config.output), {"model": config.model, "seed": config.seed, "offsite": __version__})


def demo(config: DemoConfig) -> Path:
    """Run every stage (skipping finished ones) and write report.md, report.json and report.png."""
    start = time.perf_counter()
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    if is_classifier(config.model):
        raise OffsiteError(f"--model {config.model} is a classifier; the demo's tasks are for language models "
                           "(for a vision run see docs/encoders.md)")
    cache = stage_cache(config)
    reference = read_reference(config)
    if reference is not None and config.fair_budget:
        raise OffsiteError("a reference report gives no fair-budget runs: drop the reference or the fair budget")
    if config.lm_eval:
        check_lm_eval_tasks(config.lm_eval, out / "lm-eval-tasks")  # one line now, not after an hour of stages
    measured = emulators(config)
    ceiling = ceiling_emulator(config) if config.ceiling and reference is None else None
    build_bundles(config, cache, measured + ([ceiling] if ceiling else []))
    per_task = {task: run_task(config, cache, task, measured, ceiling, reference) for task in config.tasks}
    if config.fair_budget:
        for task in config.tasks:
            per_task[task]["fair"] = fair_comparison(config, cache, task, measured[0], ceiling)
    manifests = {e.name: read_manifest(e.bundle) for e in measured}
    run = {"wall_seconds": time.perf_counter() - start, "stages_computed": cache.computed,
           "stages_reused": cache.reused, "full_model_rows_from": config.reference,
           "placement": Placement.of(config.runtime.device, config.runtime.dtype).describe()}
    return write_report(config, per_task, manifests, run)


def make_bundle(config: DemoConfig | VisionDemoConfig, emulator: Emulator, shared: Path | None = None) -> dict[str, Any]:
    """`offsite emulate`, or a copy of the same bundle from `shared`, where it is then kept for later runs."""
    if shared is not None and (shared / MANIFEST).is_file():
        check_bundle(shared)  # every file against the manifest's hashes
        if made_as(read_manifest(shared), emulator):
            _copy_bundle(shared, emulator.bundle)
            log.info("bundle: copied the distilled emulator built by an earlier demo (%s)", shared)
            return {"bundle": str(emulator.bundle), "emulator": read_manifest(emulator.bundle).emulator,
                    "from": str(shared)}
        log.warning("bundle: ignored the kept emulator %s: its manifest gives another split or distillation than "
                    "this run's; distilling anew, and replacing it", shared)
    emulate(EmulateConfig(model=config.model, output=str(emulator.bundle), split=emulator.split,
                          distill=emulator.distill, overwrite=True, runtime=config.runtime))
    if shared is not None:
        _copy_bundle(emulator.bundle, shared)
    return {"bundle": str(emulator.bundle), "emulator": read_manifest(emulator.bundle).emulator}


def made_as(manifest: Manifest, emulator: Emulator) -> bool:
    """Whether a kept bundle's manifest records `emulator`'s split and distillation.

    The kept bundles are keyed by a hash of both, but they live in the user's cache, where an entry
    may be stale or copied in by hand; one made otherwise must not stand in for this run's emulator.
    """
    settings = (manifest.emulator.get("distill") or {}).get("settings")
    if emulator.distill is None or not isinstance(settings, dict):
        return False
    try:
        distill = type(emulator.distill).from_dict(settings)
    except OffsiteError:  # a field this version does not know: made by another version
        return False
    return manifest.split.identity() == emulator.split.identity() and distill.identity() == emulator.distill.identity()


def _copy_bundle(source: Path, target: Path) -> None:
    with atomic_dir(target, overwrite=True) as tmp:  # a copy interrupted halfway leaves nothing behind
        shutil.copytree(source, tmp, dirs_exist_ok=True)

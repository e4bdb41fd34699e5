"""`offsite demo-vision`: the paper's vision Table 1 on an image classifier, offline, in one command.

A transfer task the classifier never saw (by default the built-in ViT, pretrained on five
Fashion-MNIST classes, on the other five) with a new head. The rows, as the paper's vision
experiments (its Table 3):
- linear probe of the full model (every block frozen, only the new head trained): the baseline a
  classifier has instead of zero-shot on labels it never saw;
- linear probe of the emulator: what the emulator's features alone give (the model owner's protection);
- full fine-tuning (every block and the head);
- offsite-tuning (adapter blocks and head trained on the bundle), scored through the emulator, and
  plugged into the full model;
- the ceiling: the same adapter trained on the full model itself (a bundle of every block).
Every stage is cached under `output/stages/` as the language demo's are, so an interrupted run resumes.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from offsite import __version__
from offsite.assets import VISION_ALIAS
from offsite.constants import MANIFEST
from offsite.data.builtin import load_builtin, split_definition
from offsite.data.read import write_jsonl
from offsite.data.types import LabelledData, limit
from offsite.device import Placement
from offsite.errors import OffsiteError
from offsite.exchange.bundle import read_manifest
from offsite.loading import is_classifier
from offsite.processes import in_fresh_process
from offsite.studies.demo import ceiling_emulator, make_bundle, stage_timing, tune_adapter
from offsite.studies.settings import VisionDemoConfig
from offsite.studies.stages import (
    Emulator, StageCache, evaluate_stage, full_finetune_stage, linear_probe_stage, make_emulator,
    train_settings,
)
from offsite.studies.vision_model import ensure_vision_model
from offsite.studies.vision_report import write_vision_report


def task_files(config: VisionDemoConfig) -> tuple[tuple[Path, Path], dict[str, Any]]:
    """The task's training and test images cut to the budget, written as jsonl + PNG files (the format a
    user would pass), and the stage inputs that identify them (the pixels' and labels' hash)."""
    budget, data_dir = config.budget, Path(config.output) / "data"
    found = []
    for split, count in (("train", budget.train_examples), ("test", budget.eval_examples)):
        data = limit(load_builtin(f"{config.task}:{split}", split), count)
        assert isinstance(data, LabelledData)
        found.append((write_jsonl(data, data_dir / f"{config.task}.{split}.jsonl"), data))
    (train_file, train), (test_file, test) = found
    inputs = {"task": config.task, "budget": asdict(budget), "data": [train.sha256(), test.sha256()]}
    sizes = {"train": len(train.examples), "test": len(test.examples), "labels": list(train.labels)}
    return (train_file, test_file), {"inputs": inputs, "sizes": sizes}


def vision_demo(config: VisionDemoConfig) -> Path:
    """Run every stage (skipping finished ones) and write report.md and report.json."""
    start = time.perf_counter()
    out = Path(config.output)
    if config.model == VISION_ALIAS:
        ensure_vision_model()  # pretrained here once (about 15 minutes on 2 cores), then cached
    if not is_classifier(config.model):
        raise OffsiteError(f"--model {config.model} is not an image classifier; `offsite demo` is the language "
                           "models' demo")
    out.mkdir(parents=True, exist_ok=True)
    cache = StageCache(out, {"model": config.model, "seed": config.seed, "offsite": __version__})
    (train_file, test_file), described = task_files(config)
    inputs, budget = described["inputs"], config.budget
    emulator = make_emulator(config, config.split, config.distill)
    ceiling = ceiling_emulator(config)
    for made in (emulator, ceiling):
        cache.run("bundle", lambda made=made: make_bundle(config, made), needs=made.bundle / MANIFEST,
                  emulator=made.key())
    files = (str(train_file), str(test_file))
    full_settings = asdict(train_settings(budget, budget.full_lr, config.seed))
    probe_settings = asdict(train_settings(budget, budget.lr, config.seed))  # the head at 10x, as the adapter's
    metrics = out / "data"
    results, timing = {}, {}
    for name, model in (("linear_probe", config.model), ("emulator_linear_probe", str(emulator.bundle))):
        stage_inputs = {**inputs, "emulator": emulator.key()} if model != config.model else inputs
        probed = cache.run(name, lambda model=model, name=name: in_fresh_process(
            config.isolate, linear_probe_stage, model, *files, probe_settings,
            str(metrics / f"{name}.metrics.jsonl"), config.runtime), **stage_inputs)
        results[name], timing[name] = probed["result"], stage_timing(probed)
    full = cache.run("full_finetune", lambda: in_fresh_process(
        config.isolate, full_finetune_stage, config.model, *files, full_settings,
        str(metrics / "full_finetune.metrics.jsonl"), None, config.runtime), **inputs)
    results["full_finetune"], timing["full_finetune"] = full["result"], stage_timing(full)
    results.update(offsite_rows(config, cache, emulator, (train_file, test_file), inputs))
    timing["emulator_finetune"] = results.pop("timing")
    ceiling_rows = offsite_rows(config, cache, ceiling, (train_file, test_file), inputs, through=False)
    results["ceiling"], timing["ceiling"] = ceiling_rows["plug_in"], ceiling_rows["timing"]
    run = {"wall_seconds": time.perf_counter() - start, "stages_computed": cache.computed,
           "stages_reused": cache.reused,
           "placement": Placement.of(config.runtime.device, config.runtime.dtype).describe()}
    return write_vision_report(config, results, timing, described["sizes"], read_manifest(emulator.bundle), run,
                               split_definition()["fashion"])


def offsite_rows(config: VisionDemoConfig, cache: StageCache, emulator: Emulator, files: tuple[Path, Path],
                 inputs: dict[str, Any], through: bool = True) -> dict[str, Any]:
    """The data owner tunes adapter and head on `emulator`'s bundle; scored plugged into the full model
    (and, with `through`, through the emulator it was trained on)."""
    train_file, test_file = files
    budget = config.budget
    inputs = {**inputs, "emulator": emulator.key()}
    if config.adapter_training:
        inputs["adapter_training"] = config.adapter_training
    adapter, tuned = tune_adapter(config, cache, config.task, emulator, train_file, budget, inputs)
    bundle = str(emulator.bundle)
    found = {"timing": stage_timing(tuned)}
    found["plug_in"] = cache.run("plug_in", lambda: evaluate_stage(
        config.model, str(adapter), str(test_file), budget, bundle, config.runtime), adapter=tuned["summary"], **inputs)
    if through:
        found["emulator_finetune"] = cache.run("emulator_finetune", lambda: evaluate_stage(
            bundle, str(adapter), str(test_file), budget, runtime=config.runtime), adapter=tuned["summary"], **inputs)
    return found

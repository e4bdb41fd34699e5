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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from offsite import __version__
from offsite.api import align, emulate, load_for_eval, tune
from offsite.arch import get_layers
from offsite.config import AlignConfig, DistillConfig, EmulateConfig, SplitConfig, TrainConfig, TuneConfig
from offsite.constants import ADAPTER_METADATA, ADAPTER_WEIGHTS, MANIFEST
from offsite.data.builtin import load_builtin
from offsite.data.read import read_data, write_jsonl
from offsite.data.types import ChoiceData, Data, truncate_text
from offsite.emulator.build import read_calibration
from offsite.emulator.distill import read_corpus
from offsite.exchange.bundle import read_manifest
from offsite.files import sha256_file, write_json
from offsite.loading import load_config, load_model, load_tokenizer
from offsite.processes import in_fresh_process, peak_rss_mb
from offsite.scoring import score
from offsite.studies.demo_report import write_report
from offsite.studies.settings import BUDGETS, DemoConfig, TaskBudget
from offsite.training.trainer import train_layers, training_sequences

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 8


def task_data(task: str, budget: TaskBudget) -> tuple[Data, Data]:
    """(training data, test data) of a built-in task, cut to the budget."""
    train, test = load_builtin(task, "train"), load_builtin(task, "test")
    if isinstance(train, ChoiceData) and isinstance(test, ChoiceData):
        return (ChoiceData(train.examples[: budget.train_examples], train.source),
                ChoiceData(test.examples[: budget.eval_examples], test.source))
    return truncate_text(train, budget.train_examples, budget.seq_len), truncate_text(test, budget.eval_examples, budget.seq_len)


class StageCache:
    """Results of finished stages, keyed by a hash of everything that determines them."""

    def __init__(self, root: Path, inputs: dict[str, Any]):
        self.root = root / "stages"
        self.root.mkdir(parents=True, exist_ok=True)
        self.inputs = inputs
        self.computed = self.reused = 0

    def key(self, name: str, **extra: Any) -> str:
        blob = json.dumps({"stage": name, **self.inputs, **extra}, sort_keys=True, default=str)
        return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def run(self, name: str, compute: Callable[[], dict[str, Any]], needs: Path | None = None,
            **extra: Any) -> dict[str, Any]:
        """The cached result of stage `name`, or compute it; `needs` is a file the stage leaves behind."""
        path = self.root / f"{self.key(name, **extra)}.json"
        if path.is_file() and (needs is None or needs.exists()):
            log.info("%s: cached (%s)", name, path.name)
            self.reused += 1
            return json.loads(path.read_text())
        log.info("%s: running", name)
        self.computed += 1
        result = compute()
        write_json(path, result)
        return result


def _train_settings(budget: TaskBudget, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(max_steps=budget.steps, lr=lr, batch_size=budget.batch_size, seq_len=budget.seq_len,
                       seed=seed)


def offsite_tune_stage(bundle: str, train_file: str, adapter: str, settings: dict[str, Any],
                       init_adapter: str | None = None, eval_file: str | None = None) -> dict[str, Any]:
    """Data owner's side, exactly as a user runs it: `offsite tune` on the bundle."""
    tune(TuneConfig(bundle=bundle, data=train_file, output=adapter, train=TrainConfig(**settings), overwrite=True,
                    init_adapter=init_adapter, eval_data=eval_file))
    summary = json.loads((Path(adapter) / ADAPTER_METADATA).read_text())["training"]["summary"]
    return {"summary": summary, "peak_rss_mb": peak_rss_mb()}


def full_finetune_stage(model_name: str, train_file: str, test_file: str, settings: dict[str, Any],
                        metrics: str, eval_file: str | None = None) -> dict[str, Any]:
    """Baseline: every transformer block of the full model trained on the same data and steps.

    `eval_file`: validation data, for the best checkpoint and early stopping (`settings["patience"]`).
    """
    train = TrainConfig(**settings)
    torch.manual_seed(train.seed)
    model, tokenizer = load_model(model_name), load_tokenizer(model_name)
    sequences = training_sequences(read_data(train_file), tokenizer, train.seq_len)
    Path(metrics).unlink(missing_ok=True)  # a rerun's records must not follow an interrupted run's
    model = train_layers(model, tokenizer, sequences, list(range(len(get_layers(model)))), train, Path(metrics),
                         read_data(eval_file) if eval_file else None)
    peak = peak_rss_mb()
    result = score(model, tokenizer, read_data(test_file), train.seq_len, EVAL_BATCH_SIZE)
    return {"result": result, "summary": model.offsite_training_summary, "peak_rss_mb": peak}


def _evaluate(model: str, adapter: str | None, test_file: str, budget: TaskBudget,
              bundle: str | None = None) -> dict[str, Any]:
    """`offsite eval`; `bundle`: the bundle an adapter on the full model was trained on."""
    loaded, tokenizer = load_for_eval(model, adapter, bundle)
    return score(loaded, tokenizer, read_data(test_file), budget.seq_len, EVAL_BATCH_SIZE)


@dataclass(frozen=True)
class Emulator:
    """One emulator the demo measures, and the bundle it lives in."""

    name: str
    split: SplitConfig
    distill: DistillConfig | None
    bundle: Path
    corpora: dict[str, str] = field(default_factory=dict)  # SHA-256 of the texts it is made from, by role

    def key(self) -> dict[str, Any]:
        key = {"split": self.split.identity(), "distill": self.distill.identity() if self.distill else None}
        if self.corpora:  # an edited corpus file must not reuse stages of the emulator made from the old one
            key["corpora"] = self.corpora
        return key


def corpus_hashes(split: SplitConfig, distill: DistillConfig | None) -> dict[str, str]:
    found = {}
    if distill:
        found["distill"] = read_corpus(distill).sha256()
    if split.selection == "similarity" and split.calibration:
        found["calibration"] = read_calibration(split.calibration).sha256()
    return found


def make_emulator(config: DemoConfig, split: SplitConfig, distill: DistillConfig | None) -> Emulator:
    """An emulator of `config.model`, its bundle folder named by everything that determines it."""
    name = f"{split.method}+distill" if distill else split.method
    blob = json.dumps({"model": config.model, "split": split.identity(),
                       "distill": distill.identity() if distill else None}, sort_keys=True)
    folder = f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"
    return Emulator(name, split, distill, Path(config.output) / "bundles" / folder, corpus_hashes(split, distill))


def emulators(config: DemoConfig) -> list[Emulator]:
    """The demo's emulator first; with distillation, the plain uniform one too, so its effect shows."""
    found = [make_emulator(config, config.split, config.distill)]
    if config.distill and config.compare_uniform:
        found.append(make_emulator(config, dataclasses.replace(config.split, method="uniform"), None))
    return found


def ceiling_emulator(config: DemoConfig) -> Emulator:
    """A bundle that keeps every middle layer: training on it is training on the full model."""
    middle = load_config(config.model).num_hidden_layers - config.split.bottom - config.split.top
    split = dataclasses.replace(config.split, method="uniform", emulator_layers=middle, drop_ratio=None)
    return make_emulator(config, split, None)


def build_bundles(config: DemoConfig, cache: "StageCache", measured: list[Emulator]) -> None:
    for emulator in measured:
        cache.run("bundle", lambda: _make_bundle(config, emulator), needs=emulator.bundle / MANIFEST,
                  emulator=emulator.key())


def adapter_settings(config: DemoConfig, budget: TaskBudget) -> dict[str, Any]:
    """The TrainConfig fields of the data owner's runs: the budget's, with the demo's overrides."""
    return {**asdict(_train_settings(budget, budget.lr, config.seed)), **config.adapter_training}


def adapter_inputs(config: DemoConfig, inputs: dict[str, Any]) -> dict[str, Any]:
    """Stage inputs of everything that depends on the adapter.

    Only overridden runs carry the overrides in their keys, so default runs keep their cache.
    """
    return {**inputs, "adapter_training": config.adapter_training} if config.adapter_training else inputs


def tune_adapter(config: DemoConfig, cache: StageCache, task: str, emulator: Emulator, train_file: Path,
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
        config.isolate, offsite_tune_stage, str(emulator.bundle), str(train_file), str(adapter), settings),
        needs=adapter / ADAPTER_WEIGHTS, **inputs)
    return adapter, tuned


def run_emulator(config: DemoConfig, cache: StageCache, task: str, emulator: Emulator,
                 files: tuple[Path, Path], budget: TaskBudget, task_inputs: dict[str, Any],
                 rounds: bool = False) -> dict[str, Any]:
    """The three settings that depend on the emulator: zero-shot, fine-tuned through it, plug-in.

    With `rounds`, also the demo's alignment rounds on this emulator (`config.align_rounds`).
    """
    train_file, test_file = files
    inputs = {**task_inputs, "emulator": emulator.key()}
    bundle = str(emulator.bundle)
    zero = cache.run("emulator_zero_shot", lambda: _evaluate(bundle, None, str(test_file), budget), **inputs)
    inputs = adapter_inputs(config, inputs)
    adapter, tuned = tune_adapter(config, cache, task, emulator, train_file, budget, inputs)
    emulated = cache.run("emulator_finetune", lambda: _evaluate(bundle, str(adapter), str(test_file), budget),
                         adapter=tuned["summary"], **inputs)
    plugged = cache.run("plug_in", lambda: _evaluate(config.model, str(adapter), str(test_file), budget, bundle),
                        adapter=tuned["summary"], **inputs)
    found = {"results": {"emulator_zero_shot": zero, "emulator_finetune": emulated, "plug_in": plugged},
             "timing": _timing(tuned)}
    if rounds and config.align_rounds:
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
    plug-in and the emulator fine-tuned are scored after every round.
    """
    train_file, test_file = files
    settings = adapter_settings(config, budget)
    bundle, found = emulator.bundle, []
    for number in range(1, config.align_rounds + 1):
        round_inputs = {**inputs, "round": number, "previous": tuned["summary"],
                        "align": align_settings(config).identity()}
        aligned = emulator.bundle.parent / f"{adapter.name}-aligned{number}"  # one per adapter: per task and variant
        realigned = cache.run("align", lambda: _align_stage(config, bundle, adapter, aligned), needs=aligned / MANIFEST,
                              **round_inputs)
        next_adapter = adapter.parent / f"{adapter.name}-round{number}"
        tuned = cache.run("offsite_tune", lambda: in_fresh_process(
            config.isolate, offsite_tune_stage, str(aligned), str(train_file), str(next_adapter), settings,
            str(adapter)), needs=next_adapter / ADAPTER_WEIGHTS, **round_inputs)
        scored = {name: cache.run(name, lambda model=model, bundle_arg=bundle_arg: _evaluate(
                      model, str(next_adapter), str(test_file), budget, bundle_arg), adapter=tuned["summary"],
                      **round_inputs)
                  for name, model, bundle_arg in (("emulator_finetune", str(aligned), None),
                                                  ("plug_in", config.model, str(aligned)))}
        found.append({"round": number, **scored, "adapter_steps": (number + 1) * tuned["summary"]["steps"],
                      "align_seconds": realigned["seconds"], "standin_error": realigned["standin_error"]})
        bundle, adapter = aligned, next_adapter
    return found


def _align_stage(config: DemoConfig, bundle: Path, adapter: Path, output: Path) -> dict[str, Any]:
    start = time.perf_counter()
    align(AlignConfig(bundle=str(bundle), model=config.model, adapter=str(adapter), output=str(output),
                      distill=align_settings(config), overwrite=True))
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
    plugged = cache.run("plug_in", lambda: _evaluate(config.model, str(adapter), str(test_file), budget,
                                                     str(ceiling.bundle)), adapter=tuned["summary"], **inputs)
    return {"result": plugged, "timing": _timing(tuned)}


@dataclass(frozen=True)
class TaskRun:
    """A task's data written out for the stages, and the inputs every one of its stage keys holds."""

    budget: TaskBudget
    files: tuple[Path, Path]  # (train, test) jsonl
    inputs: dict[str, Any]
    sizes: dict[str, int]


def prepare_task(config: DemoConfig, task: str) -> TaskRun:
    budget = BUDGETS[config.budget_name][task]
    out = Path(config.output)
    train_file, test_file = out / "data" / f"{task}.train.jsonl", out / "data" / f"{task}.test.jsonl"
    train, test = task_data(task, budget)
    write_jsonl(train, train_file)
    write_jsonl(test, test_file)
    # The data's hash is part of every key, so a changed dataset never reuses a stale result.
    inputs = {"task": task, "budget": asdict(budget), "data": [sha256_file(train_file), sha256_file(test_file)]}
    return TaskRun(budget, (train_file, test_file), inputs, {"train": _size(train), "test": _size(test)})


def full_model_inputs(run: TaskRun) -> dict[str, Any]:
    """Stage inputs of the settings without an adapter: the adapter's learning rate does not change them."""
    return {**run.inputs, "budget": {k: v for k, v in run.inputs["budget"].items() if k != "lr"}}


def zero_shot(config: DemoConfig, cache: StageCache, run: TaskRun) -> dict[str, Any]:
    return cache.run("zero_shot", lambda: _evaluate(config.model, None, str(run.files[1]), run.budget),
                     **full_model_inputs(run))


def run_task(config: DemoConfig, cache: StageCache, task: str, measured: list[Emulator],
             ceiling: Emulator | None = None) -> dict[str, Any]:
    """All five settings of one task, for every emulator, and the ceiling when asked for."""
    run = prepare_task(config, task)
    budget, inputs, (train_file, test_file), out = run.budget, run.inputs, run.files, Path(config.output)
    zero = zero_shot(config, cache, run)
    full = cache.run("full_finetune", lambda: in_fresh_process(
        config.isolate, full_finetune_stage, config.model, str(train_file), str(test_file),
        asdict(_train_settings(budget, budget.full_lr, config.seed)),
        str(out / "data" / f"{task}.full_finetune.metrics.jsonl")), **full_model_inputs(run))
    per_emulator = {e.name: run_emulator(config, cache, task, e, (train_file, test_file), budget, inputs,
                                         rounds=e is measured[0]) for e in measured}
    primary = per_emulator[measured[0].name]
    results = {"zero_shot": zero, "full_finetune": full["result"], **primary["results"]}
    timing = {"full_finetune": _timing(full), "emulator_finetune": primary["timing"]}
    if ceiling is not None:
        found = run_ceiling(config, cache, task, ceiling, (train_file, test_file), budget, inputs)
        results["ceiling"], timing["ceiling"] = found["result"], found["timing"]
    return {
        "results": results,
        "timing": timing,
        "other_emulators": {name: r for name, r in per_emulator.items() if name != measured[0].name},
        "rounds": primary.get("rounds", []),
        "budget": asdict(budget), "sizes": run.sizes,
    }


def _timing(stage: dict[str, Any]) -> dict[str, Any]:
    summary = stage["summary"]
    return {"seconds_per_step": summary["seconds_per_step"], "peak_rss_mb": stage["peak_rss_mb"],
            "trainable_params": summary["trainable_params"], "steps": summary["steps"]}


def _size(data: Data) -> int:
    return len(data.examples) if isinstance(data, ChoiceData) else sum(len(t) for t in data.texts)


def stage_cache(config: DemoConfig) -> StageCache:
    return StageCache(Path(config.output), {"model": config.model, "seed": config.seed, "offsite": __version__})


def demo(config: DemoConfig) -> Path:
    """Run every stage (skipping finished ones) and write report.md, report.json and report.png."""
    start = time.perf_counter()
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    cache = stage_cache(config)
    measured = emulators(config)
    ceiling = ceiling_emulator(config) if config.ceiling else None
    build_bundles(config, cache, measured + ([ceiling] if ceiling else []))
    per_task = {task: run_task(config, cache, task, measured, ceiling) for task in config.tasks}
    if config.fair_budget:
        # Here, not at the top: the fair comparison is built from this module's stages.
        from offsite.studies.fair import fair_comparison  # noqa: PLC0415
        for task in config.tasks:
            per_task[task]["fair"] = fair_comparison(config, cache, task, measured[0], ceiling)
    manifests = {e.name: read_manifest(e.bundle) for e in measured}
    run = {"wall_seconds": time.perf_counter() - start, "stages_computed": cache.computed,
           "stages_reused": cache.reused}
    return write_report(config, per_task, manifests, run)


def _make_bundle(config: DemoConfig, emulator: Emulator) -> dict[str, Any]:
    emulate(EmulateConfig(model=config.model, output=str(emulator.bundle), split=emulator.split,
                          distill=emulator.distill, overwrite=True))
    return {"bundle": str(emulator.bundle), "emulator": read_manifest(emulator.bundle).emulator}

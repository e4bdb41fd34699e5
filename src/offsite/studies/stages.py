"""The stages the studies are built from: the data owner's and the baseline's runs, scored, and cached.

Each stage's result is cached under `output/stages/` by a hash of everything that determines it,
so an interrupted study resumes and studies sharing an output directory share their stages
(the demo, its fair budgets, `offsite ablate`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from offsite.api import load_for_eval, tune
from offsite.arch import get_layers, layer_paths
from offsite.config import DeviceConfig, DistillConfig, SplitConfig, TrainConfig, TuneConfig
from offsite.constants import ADAPTER_METADATA
from offsite.data.builtin import load_builtin
from offsite.data.read import read_data, write_jsonl
from offsite.data.types import ChoiceData, Data, LabelledData, truncate_text
from offsite.device import CPU, Placement, place_model
from offsite.emulator.build import read_calibration
from offsite.emulator.distill import read_corpus
from offsite.files import sha256_file, write_json
from offsite.exchange.bundle import is_bundle, open_bundle
from offsite.heads import rehead
from offsite.loading import is_classifier, load_model, load_preprocessor
from offsite.processes import peak_rss_mb
from offsite.scoring import score
from offsite.studies.lm_eval_rows import LM_EVAL_SEQ_LEN, score_loaded_model
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


def train_settings(budget: TaskBudget, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(max_steps=budget.steps, lr=lr, batch_size=budget.batch_size, seq_len=budget.seq_len,
                       seed=seed)


def placement_inputs(runtime: DeviceConfig) -> dict[str, Any]:
    """What stage keys record of where the stages run: nothing on the CPU in float32, so the CPU's
    cached results stay valid; else the device type and dtype, which change the numbers."""
    placement = Placement.of(runtime.device, runtime.dtype)
    if placement == CPU:
        return {}
    return {"placement": {"device": placement.device.type, "dtype": str(placement.dtype).removeprefix("torch.")}}


def offsite_tune_stage(bundle: str, train_file: str, adapter: str, settings: dict[str, Any],
                       init_adapter: str | None = None, eval_file: str | None = None,
                       runtime: DeviceConfig | None = None) -> dict[str, Any]:
    """Data owner's side, exactly as a user runs it: `offsite tune` on the bundle."""
    tune(TuneConfig(bundle=bundle, data=train_file, output=adapter, train=TrainConfig(**settings), overwrite=True,
                    init_adapter=init_adapter, eval_data=eval_file, runtime=runtime or DeviceConfig()))
    summary = json.loads((Path(adapter) / ADAPTER_METADATA).read_text())["training"]["summary"]
    return {"summary": summary, "peak_rss_mb": peak_rss_mb()}


def full_finetune_stage(model_name: str, train_file: str, test_file: str, settings: dict[str, Any],
                        metrics: str, eval_file: str | None = None,
                        runtime: DeviceConfig | None = None, lm_eval: dict[str, Any] | None = None) -> dict[str, Any]:
    """Baseline: every transformer block of the full model (and a classifier's head) trained on the same
    data and steps.

    `eval_file`: validation data, for the best checkpoint and early stopping (`settings["patience"]`).
    `runtime`: where it trains, as `tune` would (every block float32, the rest in the compute dtype).
    `lm_eval`: {"tasks", "limit"}: also score the trained model with lm-eval (it is not kept afterwards).
    """
    return _train_and_score(model_name, train_file, test_file, settings, metrics, True, eval_file, runtime, lm_eval)


def linear_probe_stage(model_name: str, train_file: str, test_file: str, settings: dict[str, Any],
                       metrics: str, runtime: DeviceConfig | None = None) -> dict[str, Any]:
    """A classifier's baseline: every block frozen, only a new head trained on the data's labels.

    `model_name` may be a bundle: the probe then measures what the emulator's features alone give.
    """
    return _train_and_score(model_name, train_file, test_file, settings, metrics, False, None, runtime)


def _train_and_score(model_name: str, train_file: str, test_file: str, settings: dict[str, Any], metrics: str,
                     every_block: bool, eval_file: str | None, runtime: DeviceConfig | None,
                     lm_eval: dict[str, Any] | None = None) -> dict[str, Any]:
    train = TrainConfig(**settings)
    runtime = runtime or DeviceConfig()
    placement = Placement.of(runtime.device, runtime.dtype)
    torch.manual_seed(train.seed)
    if is_bundle(model_name):
        model, preprocessor, _ = open_bundle(model_name, in_memory=True)  # trained in place: not a mapped file
    else:
        model, preprocessor = load_model(model_name), load_preprocessor(model_name)
    data = read_data(train_file)
    if isinstance(data, LabelledData):
        rehead(model, data.labels, train.seed)  # as `tune` does: a new head for the data's labels
    blocks = list(range(len(get_layers(model)))) if every_block else []
    head = [model.get_submodule(path) for path in layer_paths(model).task_head]
    place_model(model, placement, keep_float32=[get_layers(model)[b] for b in blocks] + head)
    sequences = training_sequences(data, preprocessor, train.seq_len, model)
    Path(metrics).unlink(missing_ok=True)  # a rerun's records must not follow an interrupted run's
    model = train_layers(model, preprocessor, sequences, blocks, train, Path(metrics),
                         read_data(eval_file) if eval_file else None, placement=placement)
    peak = peak_rss_mb()
    with placement.autocast():
        result = score(model, preprocessor, read_data(test_file), train.seq_len, EVAL_BATCH_SIZE)
    found = {"result": result, "summary": model.offsite_training_summary, "peak_rss_mb": peak}
    if lm_eval:
        from offsite.lmeval.model import OffsiteLM  # noqa: PLC0415 - imports lm-eval, an optional extra
        found["lm_eval"] = score_loaded_model(OffsiteLM.of(model.eval(), preprocessor, LM_EVAL_SEQ_LEN),
                                              lm_eval["tasks"], lm_eval["limit"])
    return found


def evaluate_stage(model: str, adapter: str | None, test_file: str, budget: TaskBudget,
                   bundle: str | None = None, runtime: DeviceConfig | None = None) -> dict[str, Any]:
    """`offsite eval`; `bundle`: the bundle an adapter on the full model was trained on."""
    runtime = runtime or DeviceConfig()
    placement = Placement.of(runtime.device, runtime.dtype)
    loaded, tokenizer = load_for_eval(model, adapter, bundle)
    place_model(loaded, placement)
    with placement.autocast():
        return score(loaded, tokenizer, read_data(test_file), budget.seq_len, EVAL_BATCH_SIZE)


@dataclass(frozen=True)
class Emulator:
    """One emulator the demo measures, and the bundle it lives in."""

    name: str
    split: SplitConfig
    distill: DistillConfig | None
    bundle: Path
    corpora: dict[str, str] = field(default_factory=dict)  # SHA-256 of the texts it is made from, by role
    placement: dict[str, Any] = field(default_factory=dict)  # where it is distilled, off the CPU (placement_inputs)

    def key(self) -> dict[str, Any]:
        key = {"split": self.split.identity(), "distill": self.distill.identity() if self.distill else None}
        if self.placement and self.distill:  # only distillation runs a model to make the bundle
            key.update(self.placement)
        if self.corpora:  # an edited corpus file must not reuse stages of the emulator made from the old one
            key["corpora"] = self.corpora
        return key


def corpus_hashes(split: SplitConfig, distill: DistillConfig | None, classifier: bool = False) -> dict[str, str]:
    found = {}
    if distill:
        found["distill"] = read_corpus(distill, classifier).sha256()
    if split.selection != "uniform" and split.calibration:
        found["calibration"] = read_calibration(split.calibration).sha256()
    return found


def make_emulator(config: DemoConfig, split: SplitConfig, distill: DistillConfig | None) -> Emulator:
    """An emulator of `config.model`, its bundle folder named by everything that determines it."""
    name = f"{split.method}+distill" if distill else split.method
    blob = json.dumps({"model": config.model, "split": split.identity(),
                       "distill": distill.identity() if distill else None}, sort_keys=True)
    folder = f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"
    if distill and placement_inputs(config.runtime):
        folder += "-" + hashlib.sha256(json.dumps(placement_inputs(config.runtime)).encode()).hexdigest()[:6]
    return Emulator(name, split, distill, Path(config.output) / "bundles" / folder,
                    corpus_hashes(split, distill, is_classifier(config.model)),
                    placement_inputs(config.runtime))


def adapter_settings(config: DemoConfig, budget: TaskBudget) -> dict[str, Any]:
    """The TrainConfig fields of the data owner's runs: the budget's, with the demo's overrides."""
    return {**asdict(train_settings(budget, budget.lr, config.seed)), **config.adapter_training}


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
    inputs = {"task": task, "budget": asdict(budget), "data": [sha256_file(train_file), sha256_file(test_file)],
              **placement_inputs(config.runtime)}
    return TaskRun(budget, (train_file, test_file), inputs, {"train": data_size(train), "test": data_size(test)})


def full_model_inputs(run: TaskRun) -> dict[str, Any]:
    """Stage inputs of the settings without an adapter: the adapter's learning rate does not change them."""
    return {**run.inputs, "budget": {k: v for k, v in run.inputs["budget"].items() if k != "lr"}}


def data_size(data: Data) -> int:
    return len(data.examples) if isinstance(data, ChoiceData) else sum(len(t) for t in data.texts)

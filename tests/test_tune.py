"""Training the adapter through the emulator."""

import json
import warnings

import pytest
import torch
from conftest import input_batch
from test_bundle import make_bundle
from tiny_models import SAMPLE_TEXT
from transformers import AutoModelForCausalLM

from offsite import TrainConfig, TuneConfig, tune
from offsite.api import load_for_eval
from offsite.arch import get_layers, layer_paths
from offsite.data.types import TextData
from offsite.errors import ConfigError
from offsite.exchange.adapter import load_adapter
from offsite.exchange.bundle import bundle_index, load_bundle
from offsite.loading import load_tokenizer
from offsite.scoring import score
from offsite.training.loss import mean_loss
from offsite.training.trainer import Best, add_lora, freeze_all_but


def test_only_adapter_parameters_get_gradients(family, model_dirs, tmp_path):
    model, manifest = load_bundle(make_bundle(model_dirs[family], tmp_path / "b"))
    positions = bundle_index(manifest)
    adapter_positions = [positions[i] for i in manifest.plan.adapter]
    freeze_all_but(model, adapter_positions)
    model.train()
    ids = input_batch()
    mean_loss(model(input_ids=ids).logits[:, :-1], ids[:, 1:]).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    prefix = layer_paths(model).layers
    adapter_params = {f"{prefix}.{position}.{name}" for position in adapter_positions
                      for name, _ in get_layers(model)[position].named_parameters()}
    assert with_grad and with_grad == adapter_params
    assert all(model.get_parameter(name).grad.abs().sum() > 0 for name in with_grad)


def train_perplexity(bundle, adapter=None):
    model = load_for_eval(str(bundle), str(adapter) if adapter else None)[0]
    return score(model, load_tokenizer(str(bundle)), TextData([SAMPLE_TEXT], "sample"), 64, 8)["perplexity"]


def run_tune(bundle, data, out, eval_data=None, **settings):
    settings = {"max_steps": 8, "lr": 3e-3, "batch_size": 4, "seq_len": 64, "warmup_ratio": 0.0, **settings}
    return tune(TuneConfig(bundle=str(bundle), data=str(data), output=str(out), eval_data=eval_data,
                           train=TrainConfig(**settings)))


def test_a_few_steps_lower_the_training_loss(model_dirs, sample_text_file, tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    adapter = run_tune(bundle, sample_text_file, tmp_path / "a")
    assert train_perplexity(bundle, adapter) < 0.9 * train_perplexity(bundle)
    assert {p.name for p in adapter.iterdir()} == {"adapter.safetensors", "adapter.json", "metrics.jsonl"}
    records = [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    meta = json.loads((adapter / "adapter.json").read_text())
    assert meta["layers"] == [0, 1, 6, 7]
    assert meta["training"]["settings"]["train"]["lr"] == 3e-3
    assert meta["training"]["summary"]["steps"] == 8


def test_lora_exports_plain_merged_weights(model_dirs, sample_text_file, tmp_path):
    bundle = make_bundle(model_dirs["gpt2"], tmp_path / "b")
    adapter_dir = run_tune(bundle, sample_text_file, tmp_path / "a", lora_rank=4, lr=1e-2)
    adapter = load_adapter(adapter_dir)
    model, manifest = load_bundle(bundle)
    layers = model.transformer.h
    for original, position in ((0, 0), (7, 5)):
        original_weights = layers[position].state_dict()
        assert adapter.tensors[original].keys() == original_weights.keys()  # no lora_A/lora_B keys
        changed = [name for name, t in adapter.tensors[original].items() if not torch.equal(t, original_weights[name])]
        assert "attn.c_attn.weight" in changed and "ln_1.weight" not in changed  # LoRA touches only linears
    assert train_perplexity(bundle, adapter_dir) < train_perplexity(bundle)


def test_validation_keeps_the_best_checkpoint(model_dirs, sample_text_file, tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    adapter = run_tune(bundle, sample_text_file, tmp_path / "a", eval_data=str(sample_text_file), eval_every=2)
    records = [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval"]["perplexity"] for r in records if "eval" in r}
    assert sorted(evals) == [2, 4, 6, 8]
    best_step = min(evals, key=evals.get)
    assert json.loads((adapter / "adapter.json").read_text())["training"]["summary"]["best_step"] == best_step
    assert abs(train_perplexity(bundle, adapter) - evals[best_step]) < 1e-3 * evals[best_step]


def test_patience_stops_once_validation_stops_improving(model_dirs, sample_text_file, tmp_path, monkeypatch):
    # Scripted validation results: best at step 2, then two checks without improvement.
    perplexities = iter([5.0, 4.0, 6.0, 4.5, 3.0, 2.0])
    monkeypatch.setattr("offsite.training.trainer.score",
                        lambda *args: {"task": "lm", "perplexity": next(perplexities)})
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    adapter = run_tune(bundle, sample_text_file, tmp_path / "a", eval_data=str(sample_text_file), eval_every=1,
                       patience=2)
    records = [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" in r] == [1, 2, 3, 4]
    summary = json.loads((adapter / "adapter.json").read_text())["training"]["summary"]
    assert (summary["steps"], summary["max_steps"], summary["stopped_early"], summary["best_step"]) == (4, 8, True, 2)


def test_a_run_that_reaches_its_cap_did_not_stop_early(model_dirs, sample_text_file, tmp_path, monkeypatch):
    perplexities = iter([5.0, 6.0, 7.0, 8.0])  # no improvement after step 1: patience 3 runs out at the last step
    monkeypatch.setattr("offsite.training.trainer.score",
                        lambda *args: {"task": "lm", "perplexity": next(perplexities)})
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    adapter = run_tune(bundle, sample_text_file, tmp_path / "a", eval_data=str(sample_text_file), eval_every=1,
                       patience=3, max_steps=4)
    summary = json.loads((adapter / "adapter.json").read_text())["training"]["summary"]
    assert (summary["steps"], summary["stopped_early"], summary["best_step"]) == (4, False, 1)


def test_patience_needs_validation_data():
    with pytest.raises(ConfigError, match="--patience needs --eval-data"):
        TuneConfig(bundle="b", data="d", output="o", train=TrainConfig(patience=2))


def test_best_keeps_better_results_only():
    model = torch.nn.Linear(2, 2)
    best = Best()
    best.offer({"task": "choice", "accuracy": 0.5}, 1, model)
    kept = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1)
    best.offer({"task": "choice", "accuracy": 0.4}, 2, model)
    best.restore(model)
    assert best.step == 1 and torch.equal(model.weight, kept)


def test_adding_lora_warns_about_nothing_the_user_can_fix(model_dirs):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_lora(model, [0], rank=4, alpha=None)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []

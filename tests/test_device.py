"""--device and --dtype: resolution, mixed-precision training with float32 master weights, exports, eval.

No GPU here: the GPU paths are covered through the same code on the CPU (devices, dtypes,
autocast), with CUDA's presence patched where only the choice of device is tested.
"""

import json

import pytest
import torch
from safetensors import safe_open
from test_bundle import make_bundle
from test_tune import run_tune
from transformers import AutoModelForCausalLM

from offsite import DeviceConfig, EvalConfig, PlugConfig, TrainConfig, TuneConfig, evaluate, plug, tune
from offsite.api import distill_placement, training_placement
from offsite.arch import get_layers
from offsite.device import Placement, place_model, resolve_device, resolve_dtype
from offsite.errors import ConfigError, OffsiteError
from offsite.exchange.bundle import bundle_index, load_bundle
from offsite.exchange.fingerprint import model_fingerprint

def test_auto_is_the_cpu_in_float32_without_an_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert Placement.of() == Placement(torch.device("cpu"), torch.float32)


def test_auto_picks_the_gpu_and_bfloat16_where_it_is_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", torch.device("cuda:1")) == torch.float32
    with pytest.raises(OffsiteError, match="only 2 CUDA device"):
        resolve_device("cuda:2")


def test_a_missing_or_unknown_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OffsiteError, match="--device cuda: no CUDA GPU is visible"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="--device 'gpu' is not a device"):
        DeviceConfig(device="gpu")
    with pytest.raises(ConfigError, match="--dtype 'half' is not a dtype"):
        DeviceConfig(dtype="half")


def test_place_model_keeps_the_trained_blocks_float32(model_dirs, tmp_path):
    model, manifest = load_bundle(make_bundle(model_dirs["llama"], tmp_path / "b"))
    positions = bundle_index(manifest)
    layers = get_layers(model)
    trained = [layers[positions[i]] for i in manifest.plan.adapter]
    place_model(model, Placement(torch.device("cpu"), torch.bfloat16), keep_float32=trained)
    frozen = [layer for layer in layers if not any(layer is t for t in trained)]
    assert all(p.dtype == torch.float32 for layer in trained for p in layer.parameters())
    assert frozen and all(p.dtype == torch.bfloat16 for layer in frozen for p in layer.parameters())
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_bfloat16_training_on_the_cpu_exports_a_float32_adapter_that_plugs(model_dirs, sample_text_file, tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    losses = {}
    for dtype in ("float32", "bfloat16", "float16"):
        adapter = tune(TuneConfig(bundle=str(bundle), data=str(sample_text_file), output=str(tmp_path / dtype),
                                  train=TrainConfig(max_steps=8, lr=3e-3, batch_size=4, seq_len=64, warmup_ratio=0.0),
                                  runtime=DeviceConfig(device="cpu", dtype=dtype)))
        losses[dtype] = [r["loss"] for r in map(json.loads, (adapter / "metrics.jsonl").read_text().splitlines())]
    with safe_open(str(adapter / "adapter.safetensors"), framework="pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float32}
    assert losses["bfloat16"] != losses["float32"]  # it did run in bfloat16 ...
    assert losses["bfloat16"][-1] < losses["bfloat16"][0] - 0.05  # ... it learned ...
    assert abs(losses["bfloat16"][-1] - losses["float32"][-1]) < 0.05  # ... as float32 does
    assert losses["float16"] != losses["float32"]  # float16 with loss scaling learns as well
    assert abs(losses["float16"][-1] - losses["float32"][-1]) < 0.05
    plugged = plug(PlugConfig(model=str(model_dirs["llama"]), adapter=str(adapter), output=str(tmp_path / "p")))
    before = evaluate(EvalConfig(model=str(model_dirs["llama"]), data=str(sample_text_file), seq_len=64))
    after = evaluate(EvalConfig(model=str(plugged), data=str(sample_text_file), seq_len=64))
    assert after["perplexity"] < before["perplexity"]


def test_save_dtype_writes_the_adapter_in_that_dtype_and_plug_casts_it(model_dirs, sample_text_file, tmp_path):
    bundle = make_bundle(model_dirs["gpt2"], tmp_path / "b")
    adapter = tune(TuneConfig(bundle=str(bundle), data=str(sample_text_file), output=str(tmp_path / "a"),
                              train=TrainConfig(max_steps=2, batch_size=4, seq_len=32), save_dtype="bfloat16"))
    with safe_open(str(adapter / "adapter.safetensors"), framework="pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    plugged = plug(PlugConfig(model=str(model_dirs["gpt2"]), adapter=str(adapter), output=str(tmp_path / "p")))
    model = AutoModelForCausalLM.from_pretrained(plugged)
    assert model.dtype == torch.float32  # the full model's dtype, not the adapter file's


def test_float16_distillation_and_a_cached_emulator_off_the_cpu_are_refused(monkeypatch):
    with pytest.raises(OffsiteError, match="--dtype float16: distillation does no loss scaling"):
        distill_placement(DeviceConfig(device="cpu", dtype="float16"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    config = TuneConfig(bundle="b", data="d", output="o", runtime=DeviceConfig(device="cuda", dtype="float32"),
                        train=TrainConfig(cache_emulator=True))
    with pytest.raises(OffsiteError, match="--cache-emulator .* works with --device cpu only"):
        training_placement(config)


def test_eval_in_bfloat16_is_close_to_float32_and_checks_the_fingerprint_first(model_dirs, sample_text_file,
                                                                              tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    adapter = run_tune(bundle, sample_text_file, tmp_path / "a", max_steps=2)
    scores = {dtype: evaluate(EvalConfig(model=str(model_dirs["llama"]), adapter=str(adapter), bundle=str(bundle),
                                         data=str(sample_text_file), seq_len=64,
                                         runtime=DeviceConfig(device="cpu", dtype=dtype)))["perplexity"]
              for dtype in ("float32", "bfloat16")}
    assert scores["bfloat16"] != scores["float32"]  # it did run in bfloat16
    assert abs(scores["bfloat16"] / scores["float32"] - 1) < 0.05


def test_the_fingerprint_does_not_depend_on_the_dtype_a_checkpoint_is_loaded_in(model_dirs, tmp_path):
    AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    fingerprints = {dtype: model_fingerprint(AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=dtype),
                                             [0, 1, 4, 5])
                    for dtype in (torch.bfloat16, torch.float32)}
    assert fingerprints[torch.bfloat16] == fingerprints[torch.float32]

"""Plugging: an untrained adapter gives back the full model exactly; wrong adapters are refused."""

import pytest
import torch
from conftest import input_batch
from test_bundle import logits, make_bundle
from transformers import AutoModelForCausalLM

from offsite import PlugConfig, plug
from offsite.api import load_for_eval
from offsite.errors import OffsiteError
from offsite.exchange.adapter import Adapter, extract, load_adapter
from offsite.exchange.bundle import bundle_index, load_bundle


def untrained_adapter(bundle, directory):
    """The adapter exactly as shipped in the bundle, saved as an adapter file."""
    model, manifest = load_bundle(bundle)
    positions = bundle_index(manifest)
    directory.mkdir()
    Adapter(extract(model, {i: positions[i] for i in manifest.plan.adapter}), manifest.fingerprint,
            manifest.base_model).save(directory)
    return directory


def shifted_adapter(bundle, directory, by: float):
    """The bundle's adapter layers with `by` added to every weight, saved as an adapter file."""
    adapter_dir = untrained_adapter(bundle, directory)
    adapter = load_adapter(adapter_dir)
    for named in adapter.tensors.values():
        for tensor in named.values():
            tensor.add_(by)
    adapter.save(adapter_dir)
    return adapter_dir


def test_plugging_untrained_adapter_reproduces_full_model(family, model_dirs, tmp_path):
    bundle = make_bundle(model_dirs[family], tmp_path / "b")
    adapter = untrained_adapter(bundle, tmp_path / "a")
    plugged = plug(PlugConfig(model=str(model_dirs[family]), adapter=str(adapter), output=str(tmp_path / "p")))
    full = AutoModelForCausalLM.from_pretrained(model_dirs[family])
    ids = input_batch()
    assert torch.equal(logits(full, ids), logits(AutoModelForCausalLM.from_pretrained(plugged), ids))


def test_plug_replaces_exactly_the_adapter_layers(model_dirs, tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    adapter_dir = shifted_adapter(bundle, tmp_path / "a", 0.5)
    plugged = AutoModelForCausalLM.from_pretrained(
        plug(PlugConfig(str(model_dirs["llama"]), str(adapter_dir), str(tmp_path / "p"))))
    full = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    for index in range(8):
        same = torch.equal(plugged.model.layers[index].mlp.up_proj.weight, full.model.layers[index].mlp.up_proj.weight)
        assert same == (index not in (0, 1, 6, 7))


def test_adapter_for_another_base_is_refused_naming_both_fingerprints(model_dirs, tmp_path):
    from tiny_models import save_tiny_model
    other = save_tiny_model("llama", tmp_path / "other", num_layers=8, seed=1)
    adapter = untrained_adapter(make_bundle(model_dirs["llama"], tmp_path / "b"), tmp_path / "a")
    expected = load_adapter(adapter).fingerprint[:16]
    with pytest.raises(OffsiteError, match=f"another base model: its fingerprint is {expected}"):
        plug(PlugConfig(model=str(other), adapter=str(adapter), output=str(tmp_path / "p")))
    assert not (tmp_path / "p").exists()


def test_strict_keys_shapes_and_dtypes(model_dirs, tmp_path):
    adapter_dir = untrained_adapter(make_bundle(model_dirs["llama"], tmp_path / "b"), tmp_path / "a")
    full = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    from offsite.exchange.adapter import apply
    identity = {i: i for i in (0, 1, 6, 7)}
    broken = load_adapter(adapter_dir)
    broken.tensors[0]["mlp.extra.weight"] = torch.zeros(1)
    with pytest.raises(OffsiteError, match="unexpected keys \\['mlp.extra.weight'\\]"):
        apply(full, broken, identity, adapter_dir)
    broken = load_adapter(adapter_dir)
    del broken.tensors[6]["mlp.up_proj.weight"]
    with pytest.raises(OffsiteError, match="missing keys \\['mlp.up_proj.weight'\\]"):
        apply(full, broken, identity, adapter_dir)
    broken = load_adapter(adapter_dir)
    broken.tensors[1]["mlp.up_proj.weight"] = broken.tensors[1]["mlp.up_proj.weight"].half()
    with pytest.raises(OffsiteError, match="mixes dtypes \\['torch.float16', 'torch.float32'\\]"):
        apply(full, broken, identity, adapter_dir)
    broken = load_adapter(adapter_dir)
    broken.tensors[1]["mlp.up_proj.weight"] = broken.tensors[1]["mlp.up_proj.weight"][:, :1].contiguous()
    with pytest.raises(OffsiteError, match="layers.1.mlp.up_proj.weight: shape"):
        apply(full, broken, identity, adapter_dir)
    broken = load_adapter(adapter_dir)
    broken.tensors = {i: {k: v.to(torch.int32) for k, v in named.items()} for i, named in broken.tensors.items()}
    with pytest.raises(OffsiteError, match="torch.int32 but the model expects"):
        apply(full, broken, identity, adapter_dir)


def test_adapter_round_trips(model_dirs, tmp_path):
    adapter_dir = untrained_adapter(make_bundle(model_dirs["gpt2"], tmp_path / "b"), tmp_path / "a")
    first = load_adapter(adapter_dir)
    first.save(adapter_dir)
    second = load_adapter(adapter_dir)
    assert {p.name for p in adapter_dir.iterdir()} == {"adapter.safetensors", "adapter.json"}
    assert second.layers == [0, 1, 6, 7] and second.fingerprint == first.fingerprint
    for index in first.layers:
        assert first.tensors[index].keys() == second.tensors[index].keys()
        for name, tensor in first.tensors[index].items():
            assert torch.equal(tensor, second.tensors[index][name])


def test_eval_applies_adapter_to_bundle_and_to_full_model(model_dirs, tmp_path):
    bundle = make_bundle(model_dirs["qwen2"], tmp_path / "b")
    adapter = untrained_adapter(bundle, tmp_path / "a")
    ids = input_batch()
    bundle_model, _ = load_bundle(bundle)
    assert torch.equal(logits(load_for_eval(str(bundle), str(adapter))[0], ids), logits(bundle_model, ids))
    full = AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"])
    assert torch.equal(logits(load_for_eval(str(model_dirs["qwen2"]), str(adapter))[0], ids), logits(full, ids))
    other = make_bundle(model_dirs["llama"], tmp_path / "other")
    with pytest.raises(OffsiteError, match="was not trained for bundle"):
        load_for_eval(str(other), str(adapter))[0]

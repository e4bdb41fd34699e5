"""Bundles on every supported family: layer selection, config surgery, file format, loading."""

import json

import pytest
import torch
from conftest import NUM_LAYERS, input_batch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from offsite import EmulateConfig, SplitConfig, emulate
from offsite.arch import get_layers
from offsite.constants import MANIFEST
from offsite.errors import OffsiteError
from offsite.exchange.bundle import load_bundle, read_manifest

BUNDLE_FILES = {"config.json", "generation_config.json", "model.safetensors", "offsite.json",
                "tokenizer.json", "tokenizer_config.json"}


def make_bundle(model_dir, out, **split):
    split = {"bottom": 2, "top": 2, "emulator_layers": 2, **split}
    return emulate(EmulateConfig(model=str(model_dir), output=str(out), split=SplitConfig(**split)))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_emulator_keeping_every_layer_equals_full_model(family, model_dirs, tmp_path):
    bundle = make_bundle(model_dirs[family], tmp_path / "b", emulator_layers=NUM_LAYERS - 4)
    full = AutoModelForCausalLM.from_pretrained(model_dirs[family])
    reloaded = AutoModelForCausalLM.from_pretrained(bundle)
    ids = input_batch()
    assert torch.equal(logits(full, ids), logits(reloaded, ids))


def test_a_bundle_carries_the_whole_model_only_when_asked_and_says_so(model_dirs, tmp_path, caplog):
    from offsite.api import describe
    default = emulate(EmulateConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "default")))
    plan = read_manifest(default).plan
    assert len(plan.emulator) == 2 and not plan.keeps_whole_middle  # 30% of the 4 middle layers, rounded up
    assert describe(default)["carries_whole_model"] is False
    assert read_manifest(default).emulator["keeps_every_middle_layer"] is False
    with caplog.at_level("WARNING", logger="offsite"):
        whole = make_bundle(model_dirs["llama"], tmp_path / "whole", emulator_layers=NUM_LAYERS - 4)
    assert "carries the whole full model" in caplog.text
    assert describe(whole)["carries_whole_model"] is True
    assert read_manifest(whole).emulator["keeps_every_middle_layer"] is True


def test_bundle_holds_no_dropped_layer(family, model_dirs, tmp_path):
    bundle = make_bundle(model_dirs[family], tmp_path / "b")
    manifest = read_manifest(bundle)
    assert manifest.plan.kept == (0, 1, 2, 5, 6, 7)
    full = AutoModelForCausalLM.from_pretrained(model_dirs[family])
    full_layers = get_layers(full)
    shipped = list(load_file(str(bundle / "model.safetensors")).values())
    for dropped in (3, 4):
        for tensor in full_layers[dropped].state_dict().values():
            if tensor.unique().numel() == 1:
                continue  # freshly initialised norms (all ones) are the same in every layer
            assert not any(s.shape == tensor.shape and torch.equal(s, tensor) for s in shipped)
    # and every kept layer is shipped unchanged at its new position
    reloaded_layers = get_layers(AutoModelForCausalLM.from_pretrained(bundle))
    for position, original in enumerate(manifest.plan.kept):
        for name, tensor in full_layers[original].state_dict().items():
            assert torch.equal(reloaded_layers[position].state_dict()[name], tensor)


def test_bundle_config_is_consistent_and_generate_works(family, model_dirs, tmp_path):
    bundle = make_bundle(model_dirs[family], tmp_path / "b")
    config = json.loads((bundle / "config.json").read_text())
    full_config = json.loads((model_dirs[family] / "config.json").read_text())
    layer_count = config.get("num_hidden_layers", config.get("n_layer"))
    assert layer_count == 6
    if "layer_types" in full_config:
        assert config["layer_types"] == [full_config["layer_types"][i] for i in (0, 1, 2, 5, 6, 7)]
    model = AutoModelForCausalLM.from_pretrained(bundle)
    for position, layer in enumerate(get_layers(model)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                assert module.layer_idx == position
    prompt = input_batch(batch=1, length=12)
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)  # a wrongly numbered KV cache would make these differ


def test_in_memory_surgery_matches_reloaded_bundle(model_dirs, tmp_path):
    """The bundle's saved config reproduces exactly the model the surgery built."""
    from offsite.emulator.surgery import keep_layers
    for family in ("qwen2", "gemma3_text", "gpt2"):
        model = AutoModelForCausalLM.from_pretrained(model_dirs[family])
        keep_layers(model, (0, 1, 2, 5, 6, 7))
        bundle = make_bundle(model_dirs[family], tmp_path / family)
        ids = input_batch(length=30)
        assert torch.equal(logits(model, ids), logits(AutoModelForCausalLM.from_pretrained(bundle), ids))


def test_manifest_records_roles_files_and_fingerprint(model_dirs, tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    assert {p.name for p in bundle.iterdir()} == BUNDLE_FILES
    data = json.loads((bundle / MANIFEST).read_text())
    assert data["format"] == "offsite-bundle" and data["format_version"] == 1
    assert data["base_model"]["num_layers"] == NUM_LAYERS
    assert [(e["original_index"], e["role"]) for e in data["layers"]] == [
        (0, "adapter_bottom"), (1, "adapter_bottom"), (2, "emulator"), (5, "emulator"),
        (6, "adapter_top"), (7, "adapter_top")]
    assert set(data["files"]) == BUNDLE_FILES - {MANIFEST}
    assert len(data["fingerprint"]) == 64
    assert data["split"]["emulator_layers"] == 2


def test_tampered_or_extra_files_are_refused(model_dirs, tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "b")
    load_bundle(bundle)  # intact: loads
    (bundle / "pytorch_model.bin").write_bytes(b"not what the owner sent")
    with pytest.raises(OffsiteError, match="unexpected files \\['pytorch_model.bin'\\]"):
        load_bundle(bundle)
    (bundle / "pytorch_model.bin").unlink()
    with open(bundle / "config.json", "a") as handle:
        handle.write(" ")
    with pytest.raises(OffsiteError, match="config.json has been modified"):
        load_bundle(bundle)


def test_existing_output_is_never_overwritten_without_flag(model_dirs, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(OffsiteError, match="--overwrite"):
        make_bundle(model_dirs["llama"], out)
    assert (out / "precious.txt").read_text() == "user data"


def test_failed_emulate_leaves_nothing_behind(model_dirs, tmp_path):
    with pytest.raises(OffsiteError, match="--emulator-layers=9"):
        make_bundle(model_dirs["llama"], tmp_path / "b", emulator_layers=9)
    assert list(tmp_path.iterdir()) == []

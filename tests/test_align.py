"""`offsite align`: the model owner re-distils the emulator with a returned adapter in the loop."""

import json

import pytest
import torch
from conftest import input_batch
from safetensors.torch import load_file
from test_bundle import make_bundle

from offsite import TrainConfig, TuneConfig, tune
from offsite.api import align, load_for_eval
from offsite.cli import main
from offsite.config import AlignConfig, DistillConfig
from offsite.constants import MANIFEST
from offsite.emulator.distill import alignment_targets, kd_loss
from offsite.emulator.hidden import hidden_states_at
from offsite.errors import OffsiteError
from offsite.exchange.adapter import load_adapter
from offsite.exchange.bundle import check_bundle, read_manifest


@pytest.fixture
def returned(model_dirs, sample_text_file, tmp_path):
    """A bundle and the adapter a data owner trained on it."""
    bundle = make_bundle(model_dirs["llama"], tmp_path / "bundle")
    adapter = tune(TuneConfig(bundle=str(bundle), data=str(sample_text_file), output=str(tmp_path / "adapter"),
                              train=TrainConfig(max_steps=4, lr=1e-2, batch_size=2, seq_len=32)))
    return bundle, adapter


def distill_settings(corpus, steps=6):
    return DistillConfig(corpus=str(corpus), steps=steps, lr=1e-3, batch_size=2, seq_len=32, lm_weight=0.0)


def standin_error(model_dir, bundle, adapter):
    """How far the bundle with the adapter is from the full model with it, at the end of the middle block."""
    full, _ = load_for_eval(str(model_dir), str(adapter), str(bundle))
    student, _ = load_for_eval(str(bundle), str(adapter))
    plan = read_manifest(bundle).plan
    pairs = alignment_targets(plan, "final")
    inputs = {"input_ids": input_batch(length=32), "attention_mask": torch.ones(2, 32, dtype=torch.long)}
    with torch.no_grad():
        target, _ = hidden_states_at(full, inputs, {f for _, f in pairs})
        found, _ = hidden_states_at(student, inputs, {s for s, _ in pairs})
    return float(kd_loss(found, target, pairs, inputs["attention_mask"]))


def test_align_changes_only_the_emulator_and_keeps_the_bundle_format(model_dirs, returned, sample_text_file, tmp_path):
    bundle, adapter = returned
    out = align(AlignConfig(bundle=str(bundle), model=str(model_dirs["llama"]), adapter=str(adapter),
                            output=str(tmp_path / "aligned"), distill=distill_settings(sample_text_file)))
    before, after = read_manifest(bundle), check_bundle(out)  # the new bundle passes every check
    assert after.plan == before.plan and after.fingerprint == before.fingerprint and after.split == before.split
    assert set(after.files) == set(before.files)
    old, new = load_file(str(bundle / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(old) == set(new)
    emulator_positions = [p for p, (_, role) in enumerate(before.plan.roles()) if role == "emulator"]
    changed = {name for name in old if not torch.equal(old[name], new[name])}
    assert changed and all(any(f"layers.{p}." in name for p in emulator_positions) for name in changed)
    # The bundle still ships the pretrained adapter layers, never the data owner's.
    for name in old:
        if not any(f"layers.{p}." in name for p in emulator_positions):
            assert torch.equal(old[name], new[name]), name
    load_for_eval(str(out), str(adapter))  # the returned adapter still fits the new bundle (same fingerprint)
    rounds = json.loads((out / MANIFEST).read_text())["emulator"]["alignments"]
    assert len(rounds) == 1 and rounds[0]["adapter_fingerprint"] == before.fingerprint
    # What alignment is for: with the adapter in, the emulator stands in better for the middle block.
    assert standin_error(model_dirs["llama"], out, adapter) < standin_error(model_dirs["llama"], bundle, adapter)


def test_tune_can_start_from_a_returned_adapter(model_dirs, returned, sample_text_file, tmp_path):
    bundle, adapter = returned
    again = tune(TuneConfig(bundle=str(bundle), data=str(sample_text_file), output=str(tmp_path / "again"),
                            init_adapter=str(adapter), train=TrainConfig(max_steps=1, lr=1e-9, batch_size=2,
                                                                         seq_len=32)))
    start, after = load_adapter(adapter).tensors, load_adapter(again).tensors
    fresh = tune(TuneConfig(bundle=str(bundle), data=str(sample_text_file), output=str(tmp_path / "fresh"),
                            train=TrainConfig(max_steps=1, lr=1e-9, batch_size=2, seq_len=32)))
    from_bundle = load_adapter(fresh).tensors
    for layer, named in start.items():
        for name, tensor in named.items():
            assert torch.allclose(after[layer][name], tensor, atol=1e-6)
    assert any(not torch.allclose(from_bundle[layer][name], tensor, atol=1e-6)
               for layer, named in start.items() for name, tensor in named.items())


def test_align_refuses_an_adapter_of_another_bundle_and_needs_a_corpus(model_dirs, returned, sample_text_file,
                                                                       tmp_path, capsys):
    bundle, adapter = returned
    other = make_bundle(model_dirs["gpt2"], tmp_path / "other")
    with pytest.raises(OffsiteError, match="was not trained for bundle"):
        align(AlignConfig(bundle=str(other), model=str(model_dirs["gpt2"]), adapter=str(adapter),
                          output=str(tmp_path / "x"), distill=distill_settings(sample_text_file)))
    assert not (tmp_path / "x").exists()
    code = main(["align", str(bundle), "--model", str(model_dirs["llama"]), "--adapter", str(adapter),
                 "-o", str(tmp_path / "y")])
    assert code == 1 and "--distill CORPUS is required" in capsys.readouterr().err
    with pytest.raises(OffsiteError, match="--init-adapter"):
        tune(TuneConfig(bundle=str(other), data=str(sample_text_file), output=str(tmp_path / "z"),
                        init_adapter=str(adapter), train=TrainConfig(max_steps=1)))

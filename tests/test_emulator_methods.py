"""Emulator methods (similarity, gradient, share, lowrank, int8) on tiny random models."""

import copy

import pytest
import torch
from conftest import input_batch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from offsite import EmulateConfig, SplitConfig, emulate
from offsite.api import tune
from offsite.arch import get_layers
from offsite.config import DistillConfig, TrainConfig, TuneConfig
from offsite.data.tokens import collate
from offsite.emulator.compress import Int8Linear, LowRankLinear, emulator_bytes, rank_for
from offsite.emulator.share import nearest_schedule
from offsite.emulator.similarity import contiguous_medoids, linear_cka
from offsite.emulator.surgery import slice_config
from offsite.errors import OffsiteError
from offsite.exchange.adapter import extract, plug_into
from offsite.exchange.bundle import bundle_index, load_bundle, read_manifest

FAMILIES = ["llama", "gpt2", "opt", "qwen2", "gemma3_text"]


def make(model_dirs, family, out, method, **extra):
    split = SplitConfig(bottom=2, top=2, emulator_layers=2, method=method, **extra)
    return emulate(EmulateConfig(model=str(model_dirs[family]), output=str(out), split=split))


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


# --- the building blocks ---------------------------------------------------------------------

def test_lowrank_at_full_rank_reproduces_the_linear_map():
    torch.manual_seed(0)
    dense, x = nn.Linear(12, 8), torch.randn(3, 12)
    low = LowRankLinear.factorize(dense, rank=8)
    assert torch.allclose(low(x), dense(x), atol=1e-5)
    truncated = LowRankLinear.factorize(dense, rank=2)
    assert not torch.allclose(truncated(x), dense(x), atol=1e-3)
    assert rank_for(dense, 0.5) == 2  # factors of rank 2 hold 2 * (12 + 8) = 40 <= 48 = half of 8 * 12


def test_int8_is_close_to_the_float_map_and_four_times_smaller():
    torch.manual_seed(0)
    dense, x = nn.Linear(64, 32), torch.randn(5, 64)
    quantized = Int8Linear.quantize(dense)
    assert quantized.weight_int8.dtype == torch.int8
    error = (quantized(x) - dense(x)).norm() / dense(x).norm()
    assert error < 0.01
    assert quantized.weight_int8.numel() * 1 + quantized.scale.numel() * 4 < dense.weight.numel() * 4 / 3.5


def test_linear_cka_is_invariant_to_rotation_and_scale():
    torch.manual_seed(0)
    x = torch.randn(200, 16)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16))
    assert linear_cka(x, 3 * x @ rotation) == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(x, torch.randn(200, 16)) < 0.3


def test_contiguous_medoids_finds_blocks_of_similar_layers():
    blocks = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    similarity = torch.tensor([[0.9 if a == b else 0.1 for b in blocks] for a in blocks])
    similarity.fill_diagonal_(1.0)
    runs = contiguous_medoids(similarity, 3)
    assert [(first, last) for first, last, _ in runs] == [(0, 2), (3, 4), (5, 8)]
    assert all(first <= medoid <= last for first, last, medoid in runs)


def test_nearest_schedule_maps_each_middle_layer_to_the_closest_kept_one():
    assert nearest_schedule([2, 3, 4, 5], [2, 5]) == [2, 2, 5, 5]
    assert nearest_schedule([2, 3, 4, 5, 6], [2, 6]) == [2, 2, 2, 6, 6]  # a tie goes to the earlier


@pytest.mark.parametrize("method", ["banana", "uniform+similarity", "lowrank+int8", "share+share"])
def test_bad_methods_are_refused_with_the_flag_named(method):
    with pytest.raises(OffsiteError, match="--method"):
        SplitConfig(method=method)


# --- bundles made with each method -----------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["share", "lowrank", "int8", "similarity+share+int8"])
def test_untrained_adapter_from_any_method_plugs_back_exactly(family, method, model_dirs, tmp_path, sample_text_file):
    bundle = make(model_dirs, family, tmp_path / "b", method, calibration=str(sample_text_file))
    model, manifest = load_bundle(bundle)
    positions = bundle_index(manifest)
    ids = input_batch()
    assert torch.isfinite(logits(model, ids)).all()
    full = AutoModelForCausalLM.from_pretrained(model_dirs[family]).eval()
    expected = logits(full, ids)
    from offsite.exchange.adapter import Adapter
    adapter = Adapter(extract(model, {i: positions[i] for i in manifest.plan.adapter}), manifest.fingerprint,
                      manifest.base_model, {})
    plug_into(full, adapter, str(bundle), tuple(adapter.layers))
    assert torch.equal(logits(full, ids), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_bundle_runs_each_kept_layer_in_place_of_the_dropped_ones(family, model_dirs, tmp_path):
    bundle = make(model_dirs, family, tmp_path / "b", "share")
    model, manifest = load_bundle(bundle)
    schedule = manifest.emulator["share"]["schedule"]
    assert schedule == [2, 2, 5, 5] and manifest.plan.kept == (0, 1, 2, 5, 6, 7)
    assert len(get_layers(model)) == 8 and model.config.num_hidden_layers == 8
    # The same computation, built by hand: a full model whose dropped layers are copies of their stand-ins
    # (whole modules, so a stand-in keeps its own attention type, e.g. sliding window).
    reference = AutoModelForCausalLM.from_pretrained(model_dirs[family]).eval()
    layers = get_layers(reference)
    for position, original in enumerate(schedule, start=2):
        layers[position] = copy.deepcopy(layers[original])
        for module in layers[position].modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    slice_config(reference.config, (0, 1, *schedule, 6, 7))
    ids = input_batch()
    assert torch.allclose(logits(model, ids), logits(reference, ids), atol=1e-5)
    # Stored once: the bundle holds 6 layers, and the executed copies share their weights.
    assert get_layers(model)[2].mlp is get_layers(model)[3].mlp if hasattr(get_layers(model)[2], "mlp") else True
    with torch.no_grad():
        cached = model.generate(ids[:1, :6], max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = model.generate(ids[:1, :6], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_int8_and_lowrank_bundles_really_hold_fewer_bytes(family, model_dirs, tmp_path):
    sizes, memory = {}, {}
    for method in ("uniform", "lowrank", "int8"):
        bundle = make(model_dirs, family, tmp_path / method, method, rank_fraction=0.25)
        sizes[method] = (bundle / "model.safetensors").stat().st_size
        model, manifest = load_bundle(bundle)
        emulator = [bundle_index(manifest)[0] + 2 + i for i in range(len(manifest.plan.emulator))]
        memory[method] = emulator_bytes(model, emulator)
        assert manifest.emulator["bytes"] == memory[method]
    assert memory["int8"] < 0.35 * memory["uniform"]
    assert memory["lowrank"] < 0.4 * memory["uniform"]
    assert sizes["int8"] < sizes["uniform"] and sizes["lowrank"] < sizes["uniform"]


def test_similarity_keeps_medoids_of_measured_clusters(model_dirs, tmp_path, sample_text_file):
    bundle = make(model_dirs, "llama", tmp_path / "b", "similarity", calibration=str(sample_text_file))
    manifest = read_manifest(bundle)
    measured = manifest.emulator["similarity"]
    assert len(manifest.plan.emulator) == 2 and len(measured["cka"]) == 4
    assert all(2 <= i <= 5 for i in manifest.plan.emulator)
    assert manifest.emulator["share"] is None and measured["calibration_sha256"]


def test_similarity_without_a_corpus_is_a_clear_error(model_dirs, tmp_path):
    with pytest.raises(OffsiteError, match="--calibration"):
        make(model_dirs, "llama", tmp_path / "b", "similarity")
    assert not (tmp_path / "b").exists()


def test_tune_and_distill_work_through_compressed_shared_emulators(model_dirs, tmp_path, sample_text_file):
    config = EmulateConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "b"),
                           split=SplitConfig(emulator_layers=2, method="share+lowrank"),
                           distill=DistillConfig(corpus=str(sample_text_file), steps=3, batch_size=2, seq_len=32))
    bundle = emulate(config)
    manifest = read_manifest(bundle)
    assert manifest.emulator["method"] == "share+lowrank+distill" and manifest.emulator["distill"]["steps"] == 3
    adapter = tune(TuneConfig(bundle=str(bundle), data=str(sample_text_file), output=str(tmp_path / "a"),
                              train=TrainConfig(max_steps=2, batch_size=2, seq_len=32)))
    model, _ = load_bundle(bundle)
    assert (adapter / "adapter.safetensors").is_file()


def _with_identity_block(model_dirs, out, layer):
    """The tiny llama with block `layer` made an identity (its attention and MLP add nothing to the stream)."""
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    block = get_layers(model)[layer]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dirs["llama"]).save_pretrained(out)
    return out


def test_gradient_selection_first_drops_the_layer_whose_removal_leaves_the_adapter_gradients_unchanged(
        model_dirs, tmp_path, sample_text_file):
    from offsite.data.tokens import lm_sequences
    from offsite.emulator.gradient_selection import adapter_gradients, agreement, select_by_gradient
    from offsite.loading import load_tokenizer
    path = _with_identity_block(model_dirs, tmp_path / "model", 4)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), load_tokenizer(str(path))
    sequences = lm_sequences(tokenizer, [sample_text_file.read_text()], 32)[:4]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    kept, trace = select_by_gradient(model, [0, 1], [2, 3, 4, 5], [6, 7], 2, sequences, tokenizer.pad_token_id)
    assert trace[0] == {"dropped": 4, "agreement": 1.0} and len(trace) == 2 and len(kept) == 2 and 4 not in kept
    # the second choice is the best single drop among the rest, and the trace records its agreement
    batches = [collate(sequences, tokenizer.pad_token_id)]
    model.requires_grad_(False)
    for layer in (0, 1, 6, 7):
        get_layers(model)[layer].requires_grad_(True)
    reference = adapter_gradients(model, list(range(8)), [0, 1, 6, 7], batches)
    found = {layer: agreement(adapter_gradients(model, [0, 1] + [m for m in (2, 3, 5) if m != layer] + [6, 7],
                                                [0, 1, 6, 7], batches), reference) for layer in (2, 3, 5)}
    assert trace[1]["dropped"] == max(found, key=found.get)
    assert abs(trace[1]["agreement"] - found[trace[1]["dropped"]]) < 1e-3
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # nothing trained
    assert len(get_layers(model)) == 8 and model.config.num_hidden_layers == 8  # the model is restored


def test_a_gradient_selected_bundle_records_the_elimination_and_plugs_back(model_dirs, tmp_path, sample_text_file):
    path = _with_identity_block(model_dirs, tmp_path / "model", 3)
    split = SplitConfig(bottom=2, top=2, emulator_layers=2, method="gradient+share",
                        calibration=str(sample_text_file))
    bundle = emulate(EmulateConfig(model=str(path), output=str(tmp_path / "b"), split=split))
    manifest = read_manifest(bundle)
    measured = manifest.emulator["gradient"]
    assert manifest.emulator["selection"] == "gradient" and manifest.emulator["similarity"] is None
    assert measured["eliminated"][0]["dropped"] == 3 and 3 not in manifest.plan.emulator
    assert len(manifest.plan.emulator) == 2 and measured["calibration_sha256"]
    assert len(manifest.emulator["share"]["schedule"]) == 4
    model, _ = load_bundle(bundle)
    assert len(get_layers(model)) == 8  # shared: every middle position runs a kept layer
    with pytest.raises(OffsiteError, match="--method gradient measures the layers on text: pass --calibration"):
        emulate(EmulateConfig(model=str(path), output=str(tmp_path / "c"),
                              split=SplitConfig(emulator_layers=2, method="gradient")))

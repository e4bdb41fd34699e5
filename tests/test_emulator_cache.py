"""Top-only adapters with the emulator's output cached: same loss and gradients, same adapter, plugs in."""

import json

import pytest
import torch
from test_tune import run_tune

from offsite import EmulateConfig, OffsiteError, SplitConfig, emulate
from offsite.api import load_for_eval
from offsite.data.tokens import IGNORE, Sequence, collate
from offsite.exchange.adapter import load_adapter
from offsite.exchange.bundle import bundle_index, load_bundle
from offsite.training.emulator_cache import EmulatorCache
from offsite.training.loss import batch_loss
from offsite.training.parking import parked
from offsite.training.trainer import freeze_all_but


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are all overhead: one thread is faster, and it does not fight other work for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def top_only_bundle(model_dir, out):
    return emulate(EmulateConfig(model=str(model_dir), output=str(out),
                                 split=SplitConfig(bottom=0, top=2, emulator_layers=3)))


def sequences_of(lengths):
    generator = torch.Generator().manual_seed(0)
    return [Sequence(torch.randint(4, 400, (n,), generator=generator).tolist(), [IGNORE] * (n - 2) + [5, 6])
            for n in lengths]


# llama and gpt2 blocks return a tensor, bloom blocks a tuple.
@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
def test_replayed_emulator_gives_the_same_loss_and_gradients(family, model_dirs, tmp_path):
    model, manifest = load_bundle(top_only_bundle(model_dirs[family], tmp_path / "b"))
    positions = [bundle_index(manifest)[i] for i in manifest.plan.adapter]
    freeze_all_but(model, positions)
    model.eval()
    sequences = sequences_of((12, 9, 15))  # uneven: the cache is padded like the ids
    cache = EmulatorCache.build(model, sequences, positions, pad_id=0, batch_size=2)
    assert cache.prefix == 3 and [len(o) for o in cache.outputs] == [12, 9, 15]
    batch = collate(sequences, 0)
    expected = batch_loss(model, batch)
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    batch["frozen_output"] = cache.batch([0, 1, 2])
    replayed = cache.loss(model, batch)
    replayed.backward()
    assert torch.allclose(replayed, expected, atol=1e-6)
    for got, want in zip([p.grad for p in model.parameters() if p.requires_grad], expected_grads):
        assert torch.allclose(got, want, atol=1e-6)
    assert all(type(layer).__name__ != "Replay" for layer in model.modules())  # the real blocks are back


def test_cached_tuning_trains_the_same_adapter_and_plugs_in(model_dirs, sample_text_file, tmp_path):
    bundle = top_only_bundle(model_dirs["llama"], tmp_path / "b")
    # validation runs through the whole bundle, so the parked emulator weights must come back for it
    validated = {"eval_data": str(sample_text_file), "eval_every": 2}
    plain = run_tune(bundle, sample_text_file, tmp_path / "plain", max_steps=4, **validated)
    cached = run_tune(bundle, sample_text_file, tmp_path / "cached", max_steps=4, cache_emulator=True, **validated)
    adapter, reference = load_adapter(cached), load_adapter(plain)
    assert adapter.layers == [6, 7]
    for layer, tensors in adapter.tensors.items():
        for name, tensor in tensors.items():
            assert torch.allclose(tensor, reference.tensors[layer][name], atol=1e-5), (layer, name)
    summary = json.loads((cached / "adapter.json").read_text())["training"]["summary"]
    assert summary["cache_seconds"] > 0 and summary["steps"] == 4
    plain_summary = json.loads((plain / "adapter.json").read_text())["training"]["summary"]
    numbers = {k: v for k, v in summary["best_eval"].items() if isinstance(v, float)}
    assert numbers and numbers == pytest.approx({k: plain_summary["best_eval"][k] for k in numbers}, rel=1e-5)
    untrained, _ = load_bundle(bundle)
    assert not torch.equal(untrained.model.layers[4].mlp.up_proj.weight, adapter.tensors[7]["mlp.up_proj.weight"])
    plugged = load_for_eval(str(model_dirs["llama"]), str(cached))[0]  # plugging works as usual
    assert torch.equal(plugged.model.layers[7].mlp.up_proj.weight, adapter.tensors[7]["mlp.up_proj.weight"])


def test_cache_needs_a_bundle_without_bottom_layers(model_dirs, sample_text_file, tmp_path):
    bundle = emulate(EmulateConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "b"),
                                   split=SplitConfig(emulator_layers=2)))
    with pytest.raises(OffsiteError, match="--cache-emulator: block 0 is trainable.*--bottom 0"):
        run_tune(bundle, sample_text_file, tmp_path / "a", cache_emulator=True)
    assert not (tmp_path / "a").exists()


def test_parked_weights_leave_memory_and_come_back_exactly(model_dirs, tmp_path):
    model, manifest = load_bundle(top_only_bundle(model_dirs["llama"], tmp_path / "b"))
    blocks = list(model.model.layers[:3])
    blocks[0].self_attn.q_proj.weight.data = blocks[0].self_attn.q_proj.weight.data.bfloat16()  # any dtype
    blocks.append(blocks[1])  # a shared block (the +share methods) is parked once
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    nbytes = sum(p.numel() * p.element_size() for b in blocks[:3] for p in b.parameters())
    with parked(blocks) as weights:
        assert weights.nbytes == nbytes
        assert all(p.numel() == 0 for b in blocks for p in b.parameters())
        assert model.model.layers[3].mlp.up_proj.weight.numel() > 0  # only the given blocks
        with weights.loaded():
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        assert all(p.numel() == 0 for b in blocks for p in b.parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) and param.dtype == before[name].dtype, name

"""Checkpointed emulator blocks: same gradients and adapter, fewer stored activations, one more forward."""

import json

import pytest
import torch
from test_tune import run_tune

from offsite import EmulateConfig, SplitConfig, emulate
from offsite.arch import get_layers
from offsite.data.tokens import IGNORE, Sequence, collate
from offsite.exchange.adapter import load_adapter
from offsite.exchange.bundle import bundle_index, load_bundle
from offsite.studies.bench.tensor_memory import TensorPeak, existing_tensors
from offsite.training.checkpointing import checkpointed_blocks, gradient_pass_positions
from offsite.training.loss import batch_loss
from offsite.training.trainer import freeze_all_but


def sandwich(model_dir, out):
    return emulate(EmulateConfig(model=str(model_dir), output=str(out),
                                 split=SplitConfig(bottom=1, top=1, emulator_layers=4)))


def test_only_frozen_blocks_above_the_lowest_trainable_one_are_checkpointed():
    assert gradient_pass_positions(6, [0, 5]) == [1, 2, 3, 4]
    assert gradient_pass_positions(6, [2, 3]) == [4, 5]
    assert gradient_pass_positions(6, [4, 5]) == []  # top-only: nothing below needs a gradient
    assert gradient_pass_positions(6, []) == []


# llama and gpt2 blocks take keyword arguments differently; bloom returns a tuple.
@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
def test_same_loss_and_gradients_less_memory_and_blocks_are_restored(family, model_dirs, tmp_path):
    model, manifest = load_bundle(sandwich(model_dirs[family], tmp_path / "b"))
    positions = [bundle_index(manifest)[i] for i in manifest.plan.adapter]
    freeze_all_but(model, positions)
    model.train()
    generator = torch.Generator().manual_seed(0)
    batch = collate([Sequence(torch.randint(4, 400, (48,), generator=generator).tolist(), [IGNORE] * 46 + [5, 6])
                     for _ in range(4)], 0)
    calls = []
    # On a part of the block: the recompute calls the block's forward directly, its parts through their hooks.
    part = next(child for child in get_layers(model)[2].children() if any(True for _ in child.parameters()))
    hook = part.register_forward_hook(lambda *_: calls.append(1))

    def step():
        model.zero_grad(set_to_none=True)
        calls.clear()
        tracker = TensorPeak()
        tracker.add_all(existing_tensors(model) + list(batch.values()))
        with tracker:
            loss = batch_loss(model, batch)
            loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return loss.detach(), grads, tracker.peak, len(calls)

    plain_loss, plain_grads, plain_peak, plain_calls = step()
    with checkpointed_blocks(model, positions) as checkpointed:
        loss, grads, peak, forward_calls = step()
    assert checkpointed == [1, 2, 3, 4]
    assert torch.allclose(loss, plain_loss, atol=1e-6)
    for got, want in zip(grads, plain_grads):
        assert torch.allclose(got, want, atol=1e-5)
    assert (plain_calls, forward_calls) == (1, 2)  # the block ran again in the backward pass
    assert peak < plain_peak
    assert all("forward" not in layer.__dict__ for layer in get_layers(model))
    hook.remove()


def test_checkpointed_tuning_trains_the_same_adapter(model_dirs, sample_text_file, tmp_path):
    bundle = sandwich(model_dirs["llama"], tmp_path / "b")
    plain = load_adapter(run_tune(bundle, sample_text_file, tmp_path / "plain", max_steps=3))
    out = run_tune(bundle, sample_text_file, tmp_path / "ckpt", max_steps=3, checkpoint_emulator=True)
    checkpointed = load_adapter(out)
    for layer, tensors in checkpointed.tensors.items():
        for name, tensor in tensors.items():
            assert torch.allclose(tensor, plain.tensors[layer][name], atol=1e-5), (layer, name)
    settings = json.loads((out / "adapter.json").read_text())["training"]["settings"]["train"]
    assert settings["checkpoint_emulator"] is True

"""Hidden states at chosen depths, with the forward pass stopped after the deepest one."""

import pytest
import torch
from conftest import input_batch
from transformers import AutoModelForCausalLM

from offsite.arch import get_layers
from offsite.emulator.hidden import hidden_states_at
from offsite.emulator.share import expand


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_hidden_states_match_output_hidden_states_and_nothing_above_runs(family, model_dirs):
    model = AutoModelForCausalLM.from_pretrained(model_dirs[family]).eval()
    ids = input_batch()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        reference = model(**inputs, output_hidden_states=True).hidden_states
        above = []
        get_layers(model)[5].register_forward_hook(lambda *args: above.append(1))
        found, output = hidden_states_at(model, inputs, {2, 5})
    assert output is None and above == []  # stopped after block 4, whose output is hidden state 5
    for k in (2, 5):
        assert torch.allclose(found[k], reference[k], atol=1e-6)


def test_each_position_of_a_shared_layer_is_recorded_on_its_own(model_dirs):
    import copy

    from torch import nn

    from offsite.arch import layer_paths, set_submodule
    from offsite.emulator.surgery import slice_config
    schedule = [0, 1, 2, 2, 2, 5, 6, 7]  # stored layer 2 runs at positions 2, 3 and 4
    shared = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()
    expand(shared, schedule)
    # The reference: the same stack built from real copies, so nothing is shared.
    copies = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()
    layers = nn.ModuleList(copy.deepcopy(get_layers(copies)[p]) for p in schedule)
    for position, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    set_submodule(copies, layer_paths(copies).layers, layers)
    slice_config(copies.config, tuple(schedule))
    ids = input_batch()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        reference = copies(**inputs, output_hidden_states=True).hidden_states
        found, _ = hidden_states_at(shared, inputs, {3, 4, 5})
    for k in (3, 4, 5):
        assert torch.allclose(found[k], reference[k], atol=1e-6)
    assert not torch.allclose(found[3], found[4])

"""Layer surgery: a model reduced to some of its blocks, with a config that describes exactly those blocks."""

from __future__ import annotations

from torch import nn

from offsite.arch import blocks_config, get_layers, layer_paths, set_submodule
from offsite.errors import OffsiteError

# Config entries that are per-layer but are not lists of length num_hidden_layers.
# Qwen2-style models use sliding windows on layers with index >= max_window_layers.
_LAYER_THRESHOLD_KEYS = ("max_window_layers",)


def keep_layers(model: nn.Module, kept: tuple[int, ...]) -> None:
    """Reduce `model` in place to the blocks at original indices `kept`.

    The config must describe the new depth, or from_pretrained, the attention
    masks and the KV cache disagree with the weights: per-layer lists are sliced
    and every `layer_idx` renumbered to the block's new position.
    """
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False) and kept != tuple(range(len(kept))):
        # GPT-2 variants with this flag scale attention by the layer's position, so a block
        # moved to a new position would compute something else.
        raise OffsiteError("models with scale_attn_by_inverse_layer_idx=True cannot drop layers: "
                           "their blocks depend on their position in the stack")
    layers = get_layers(model)
    new_layers = nn.ModuleList([layers[i] for i in kept])
    for new_index, layer in enumerate(new_layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    set_submodule(model, layer_paths(model).layers, new_layers)
    slice_config(blocks_config(model.config), kept)


def slice_config(config, kept: tuple[int, ...]) -> None:
    """Make per-layer config entries describe the blocks `kept` (indices may repeat)."""
    num_layers = config.num_hidden_layers
    for key, value in list(config.__dict__.items()):
        if key != "architectures" and isinstance(value, (list, tuple)) and len(value) == num_layers:
            setattr(config, key, type(value)(value[i] for i in kept))
    for key in _LAYER_THRESHOLD_KEYS:
        threshold = getattr(config, key, None)
        if isinstance(threshold, int):
            setattr(config, key, sum(1 for i in kept if i < threshold))
    if isinstance(getattr(config, "stage_names", None), list):
        _slice_backbone_stages(config, kept)
    config.num_hidden_layers = len(kept)


def _slice_backbone_stages(config, kept: tuple[int, ...]) -> None:
    """Encoders that can serve as backbones (BEiT, DINOv2) name one stage per block ("stage<k>" is block
    k-1's output) and check their output stages against that list; renumber both to the kept blocks."""
    new_position = {block + 1: position + 1 for position, block in enumerate(kept)}  # stage k -> new stage
    outputs = [new_position[i] for i in (config.out_indices or []) if i in new_position]
    config.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(kept) + 1)]
    config.out_indices = outputs or [len(kept)]

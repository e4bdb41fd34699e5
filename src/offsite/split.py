"""Split planning (which layers form the adapter and the emulator) and layer selection."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from offsite.arch import get_layers, layer_paths, set_submodule
from offsite.config import SplitConfig
from offsite.errors import OffsiteError, check

ROLES = ("adapter_bottom", "emulator", "adapter_top")

# Config entries that are per-layer but are not lists of length num_hidden_layers.
# Qwen2-style models use sliding windows on layers with index >= max_window_layers.
_LAYER_THRESHOLD_KEYS = ("max_window_layers",)


@dataclass(frozen=True)
class SplitPlan:
    """Original layer indices of each part of a model with `num_layers` blocks."""

    num_layers: int
    bottom: tuple[int, ...]
    emulator: tuple[int, ...]
    top: tuple[int, ...]

    @property
    def adapter(self) -> tuple[int, ...]:
        return self.bottom + self.top

    @property
    def kept(self) -> tuple[int, ...]:
        """Original indices of the bundle's layers, in order."""
        return self.bottom + self.emulator + self.top

    def roles(self) -> list[tuple[int, str]]:
        """(original index, role) for every bundle layer, in bundle order."""
        return ([(i, "adapter_bottom") for i in self.bottom] + [(i, "emulator") for i in self.emulator]
                + [(i, "adapter_top") for i in self.top])


def uniform_indices(middle: int, kept: int) -> list[int]:
    """Indices into a middle block of `middle` layers: round(i*(M-1)/(K-1)), ends always kept."""
    if kept == 1:
        return [0]
    return [round(i * (middle - 1) / (kept - 1)) for i in range(kept)]


def plan_split(num_layers: int, split: SplitConfig) -> SplitPlan:
    """Check `split` against a model with `num_layers` blocks and choose the layers."""
    problems: list[str] = []
    if split.bottom + split.top >= num_layers:
        problems.append(
            f"--bottom={split.bottom} plus --top={split.top} leaves no middle layer in a {num_layers}-layer "
            f"model; they must sum to at most {num_layers - 1}"
        )
    check(problems)
    middle = num_layers - split.bottom - split.top
    kept = split.kept_middle_count(middle)
    if kept > middle:
        problems.append(
            f"--emulator-layers={kept} is more than the {middle} middle layers of this {num_layers}-layer model "
            f"(after --bottom={split.bottom} --top={split.top}); use a value from 1 to {middle}"
        )
    check(problems)
    first = split.bottom
    return SplitPlan(
        num_layers=num_layers,
        bottom=tuple(range(split.bottom)),
        emulator=tuple(first + i for i in uniform_indices(middle, kept)),
        top=tuple(range(num_layers - split.top, num_layers)),
    )


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
    slice_config(model.config, kept)


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
    config.num_hidden_layers = len(kept)

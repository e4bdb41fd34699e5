"""Layer sharing: each kept emulator layer also runs in place of the dropped layers it represents.

The bundle stores only the kept layers; its manifest holds the schedule (which
stored layer runs at each position of the full middle block). Loading expands
the stack to the full depth with *views*: module objects that share every
weight with the stored layer but carry their own `layer_idx`, so the KV cache
and `generate()` keep one slot per executed position.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from torch import nn

from offsite.arch import blocks_config, get_layers, layer_paths, set_submodule
from offsite.emulator.split import SplitPlan
from offsite.emulator.surgery import slice_config


def nearest_schedule(middle: list[int], kept: list[int]) -> list[int]:
    """For each middle layer, the kept layer standing in for it: the nearest one (ties: the earlier)."""
    return [min(kept, key=lambda k: (abs(k - layer), k)) for layer in middle]


def _holds_layer_idx(module: nn.Module) -> bool:
    return any(hasattr(m, "layer_idx") for m in module.modules())


def shared_view(module: nn.Module, layer_idx: int) -> nn.Module:
    """A copy of `module` sharing all parameters and buffers, with `layer_idx` set on the copy only.

    Only the modules on the way to a `layer_idx` attribute are copied (shallowly);
    every other child is the very same object, so weights and their gradients are shared.
    """
    view = copy.copy(module)
    view._modules = {name: shared_view(child, layer_idx) if child is not None and _holds_layer_idx(child) else child
                     for name, child in module._modules.items()}
    if hasattr(view, "layer_idx"):
        view.layer_idx = layer_idx
    return view


def expand(model: nn.Module, schedule: list[int]) -> tuple[nn.ModuleList, dict]:
    """Run the stored blocks in the order `schedule` (positions, repeats allowed).

    The config's per-layer entries follow the schedule, so each executed position
    behaves as the stored layer it runs (e.g. its sliding-window type). Returns
    what `collapse` needs to restore the stored form.
    """
    stored, config = get_layers(model), copy.deepcopy(blocks_config(model.config).__dict__)
    executed = nn.ModuleList(shared_view(stored[p], i) for i, p in enumerate(schedule))
    set_submodule(model, layer_paths(model).layers, executed)
    slice_config(blocks_config(model.config), tuple(schedule))
    return stored, config


def collapse(model: nn.Module, stored: tuple[nn.ModuleList, dict]) -> None:
    """Undo `expand` (before saving): the stored blocks, and the config in place, since submodules share it."""
    layers, config = stored
    set_submodule(model, layer_paths(model).layers, layers)
    blocks_config(model.config).__dict__.clear()
    blocks_config(model.config).__dict__.update(config)


def executed_layers(plan: SplitPlan, info: dict[str, Any]) -> list[int]:
    """The original layer that runs at each position of the model a bundle loads as."""
    middle = info["share"]["schedule"] if info.get("share") else list(plan.emulator)
    return list(plan.bottom) + list(middle) + list(plan.top)


def executed_positions(plan: SplitPlan, info: dict[str, Any]) -> list[int]:
    """The stored position that runs at each executed position."""
    stored = {original: position for position, original in enumerate(plan.kept)}
    return [stored[original] for original in executed_layers(plan, info)]


def executed_plan(plan: SplitPlan, info: dict[str, Any]) -> SplitPlan:
    """With sharing, every middle position runs a layer: distillation aligns the full middle block."""
    if not info.get("share"):
        return plan
    return replace(plan, emulator=tuple(range(len(plan.bottom), plan.num_layers - len(plan.top))))

"""Checkpoints of long runs (tuning, distillation), so a killed run resumes where it stopped.

A checkpoint is a folder of safetensors files and a `state.json`, each written to a temp name
and renamed; `state.json` comes last, so a checkpoint counts only once its tensors are complete.
It is the machine's own state (it never crosses between owners), and a run resumes from it only
if the state's `identity` (inputs and settings) equals its own.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from offsite.errors import OffsiteError
from offsite.files import atomic_file

log = logging.getLogger(__name__)

STATE = "state.json"


def save_checkpoint(directory: Path, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
    """Write `tensors` (file name -> named tensors) and then `state`."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, named in tensors.items():
        with atomic_file(directory / f"{name}.safetensors") as tmp:
            save_file({key: value.detach().contiguous() for key, value in named.items()}, str(tmp))
    with atomic_file(directory / STATE) as tmp:
        tmp.write_text(json.dumps(state))


def read_state(directory: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's state if there is one made by a run of the same `identity`, else None."""
    path = directory / STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise OffsiteError(f"{path} is corrupt; delete {directory} to start from the beginning") from None
    if not isinstance(state, dict) or state.get("identity") != identity:
        log.warning("ignoring checkpoint %s: it was made by a run with other inputs or settings", directory)
        return None
    return state


def load_tensors(directory: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(directory / f"{name}.safetensors"))


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat named tensors (`<param index>.<name>`)."""
    return {f"{index}.{key}": value for index, state in optimizer.state_dict()["state"].items()
            for key, value in state.items()}


def optimizer_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The parameter groups' settings as JSON: with a scheduler, the learning rate of the next step."""
    return [{key: list(value) if isinstance(value, tuple) else value for key, value in group.items()}
            for group in optimizer.state_dict()["param_groups"]]


def load_optimizer(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor],
                   groups: list[dict[str, Any]] | None = None) -> None:
    """Restore `optimizer_tensors` (and `optimizer_groups`, else the groups keep their current settings)."""
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = tensor
    current = optimizer.state_dict()["param_groups"]
    restored = [{**group, **{k: tuple(v) if isinstance(current[i].get(k), tuple) else v for k, v in saved.items()}}
                for i, (group, saved) in enumerate(zip(current, groups))] if groups else current
    optimizer.load_state_dict({"state": per_param, "param_groups": restored})

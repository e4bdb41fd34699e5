"""Checks on tensors that come from the other party: nothing non-finite enters a model or leaves in a file."""

from __future__ import annotations

from typing import Iterable

import torch

from offsite.errors import OffsiteError
from offsite.files import one_line


def refuse_non_finite(tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Raise, naming the first tensor that holds a NaN or an infinity."""
    items = tensors.items() if isinstance(tensors, dict) else tensors
    for name, tensor in items:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise OffsiteError(f"{what}: tensor {one_line(name)} holds NaN or infinite values; "
                               "refusing it (a diverged training run, or a damaged or hostile file)")

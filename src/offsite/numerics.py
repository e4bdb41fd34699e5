"""Guards against non-finite numbers: none enters a model from a file, leaves in one, or trains on silently."""

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


def check_step(loss: torch.Tensor, params: list[torch.nn.Parameter], step: int, what: str, hint: str) -> None:
    """After backward: stop at the first non-finite loss or gradient, before the optimizer spreads it."""
    if not bool(torch.isfinite(loss)):
        raise OffsiteError(f"{what} step {step}: the loss is {loss.item()}; {hint}")
    grads = [p.grad for p in params if p.grad is not None]
    if grads and not bool(torch.isfinite(torch.stack([g.abs().amax() for g in grads])).all()):
        raise OffsiteError(f"{what} step {step}: a gradient is NaN or infinite; {hint}")

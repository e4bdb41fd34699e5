"""Weights that are not needed for a while, parked in a temporary file instead of in memory.

With the emulator's output cached (offsite.training.emulator_cache) no training step reads the
frozen blocks' weights; only an evaluation through the whole bundle does. Parking them
frees that memory for the training steps. The weights are written once, as raw bytes, to
an unnamed temporary file (removed when closed, or when the process ends) and read back
with `readinto` straight into fresh tensors, so bringing them back never holds two copies.
"""

from __future__ import annotations

import contextlib
import tempfile
from typing import Iterator

import torch
from torch import nn


def _raw(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, for any dtype (numpy has no bfloat16, so go through uint8)."""
    return memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


class ParkedWeights:
    """The parameters of `modules` (each once, even if modules share them), parkable on disk."""

    def __init__(self, modules: list[nn.Module]):
        unique = {id(p): p for module in modules for p in module.parameters()}
        self.params = list(unique.values())
        self.layout = [(p.shape, p.dtype) for p in self.params]
        self.nbytes = sum(p.numel() * p.element_size() for p in self.params)
        self.file = tempfile.TemporaryFile(prefix="offsite-parked-")
        for param in self.params:
            self.file.write(_raw(param))
        self.file.flush()
        self.parked = False

    def park(self) -> None:
        for param in self.params:
            param.data = torch.empty(0, dtype=param.dtype)
        self.parked = True

    def restore(self) -> None:
        self.file.seek(0)
        for param, (shape, dtype) in zip(self.params, self.layout):
            data = torch.empty(shape, dtype=dtype)
            self.file.readinto(_raw(data))
            param.data = data
        self.parked = False

    @contextlib.contextmanager
    def loaded(self) -> Iterator[None]:
        """The weights in memory for the duration (as they are outside `parked()`)."""
        if not self.parked:
            yield
            return
        self.restore()
        try:
            yield
        finally:
            self.park()

    def close(self) -> None:
        if self.parked:
            self.restore()
        self.file.close()


@contextlib.contextmanager
def parked(modules: list[nn.Module]) -> Iterator[ParkedWeights]:
    """The weights of `modules` parked on disk for the duration, then back in memory."""
    weights = ParkedWeights(modules)
    weights.park()
    try:
        yield weights
    finally:
        weights.close()

"""Peak tensor memory on any device: the CPU stand-in for torch.cuda.max_memory_allocated.

`TensorPeak` is a TorchDispatchMode. Every tensor an op returns inside it is looked at; a
storage not seen before is added to the running total, and a weak reference to the
storage subtracts it again when the storage is freed. Views share their base's storage,
so nothing is counted twice. Tensors that exist before the block (weights, optimizer
state, caches) are registered with `add`. The backward pass is seen too: autograd carries
the dispatch mode to the threads it runs on.

Why not torch's own MemTracker (torch.distributed._tools)? It registers a gradient hook on
every parameter of every module it sees and fails on frozen ones, which are the point here.
The two agree on a model whose parameters all train. Like MemTracker, this misses memory
that is not a tensor storage (allocator caches, Python objects, libraries' workspaces):
that shows in the peak resident memory instead.
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorPeak(TorchDispatchMode):
    """Running total and peak, in bytes, of the live tensor storages it knows."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata  # the StorageImpl's address: unique while the storage lives
        if key in self._live:
            return
        size = storage.nbytes()
        self.current += size
        self.peak = max(self.peak, self.current)
        self._live[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))

    def add_all(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            self.add(tensor)

    def _free(self, key: int, size: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.add(value)
        return out


def existing_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[torch.Tensor]:
    """Weights, buffers, gradients and optimizer state: what lives before a training step starts."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [value for state in optimizer.state.values() for value in state.values()
                    if isinstance(value, torch.Tensor)]
    return tensors

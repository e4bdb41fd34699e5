"""Activation checkpointing of the frozen blocks gradients pass through: memory traded for one more forward.

A frozen emulator block between two adapter blocks keeps its activations for the backward
pass, which needs them for the input gradient. Checkpointed, it keeps only its input and
runs its forward again during the backward pass. Blocks below every trainable block keep
nothing anyway (no gradient reaches them), so they are left alone.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from offsite.arch import get_layers


def gradient_pass_positions(num_layers: int, trainable: list[int]) -> list[int]:
    """Positions of the frozen blocks above the lowest trainable one: those a gradient passes through."""
    if not trainable:
        return []
    lowest = min(trainable)
    return [i for i in range(lowest + 1, num_layers) if i not in trainable]


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module, trainable: list[int]) -> Iterator[list[int]]:
    """Within the block, the frozen blocks gradients pass through recompute their activations in backward.

    Yields the checkpointed positions. Works for any architecture: each block's own forward
    is wrapped on the instance (so parameter names are unchanged) and restored on exit.
    Forwards without autograd (evaluation) run unwrapped.
    """
    layers = get_layers(model)
    positions = gradient_pass_positions(len(layers), trainable)
    patched = []
    for position in positions:
        block = layers[position]
        had_own_forward = "forward" in block.__dict__
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            if not torch.is_grad_enabled():
                return _original(*args, **kwargs)
            # Non-reentrant: keyword arguments and outputs that need no gradient are handled.
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        patched.append((block, had_own_forward, original))
    try:
        yield positions
    finally:
        for block, had_own_forward, original in patched:
            if had_own_forward:
                block.forward = original
            else:
                del block.forward

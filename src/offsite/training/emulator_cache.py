"""Top-only adapters: the emulator's output is computed once per example and replayed afterwards.

With a bundle made with `--bottom 0`, every block below the adapter is frozen and no
gradient has to pass through it, so its output for a training sequence never changes
during training. `EmulatorCache` runs those blocks once per sequence (in eval mode, so
without dropout) and keeps their output; each training step then swaps them for
`Replay` stand-ins that return the kept output, so a step costs only the top adapter
blocks and the head. The model's own forward still runs (embeddings, masks, position
encodings), so this works for every architecture the layer table knows.

While training on the cache, `frozen_blocks_parked()` moves the frozen blocks' weights to a
temporary file (offsite.training.parking): no replayed step reads them. Evaluation through the whole
bundle brings them back for its duration (`frozen_blocks_loaded()`).

The trade: later epochs are much cheaper, but the cache holds seq_len x hidden values per
training sequence, and the adapter can only adapt the top of the model.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from offsite.arch import get_layers
from offsite.data.tokens import Sequence, collate
from offsite.errors import OffsiteError
from offsite.training.chunked_loss import plain_head
from offsite.training.loss import batch_loss
from offsite.training.parking import ParkedWeights, parked

log = logging.getLogger(__name__)


class _FrozenBlocksDone(Exception):
    """Raised from a hook to end a forward pass once the frozen blocks have run: the rest is not needed."""


class Replay(nn.Module):
    """Stands in for a frozen block and returns the cached output of the frozen blocks, ignoring its input."""

    def __init__(self, block: nn.Module, output: torch.Tensor, tuple_length: int):
        super().__init__()
        # Not registered as a submodule: the frozen weights must not join the step's graph or parameters.
        object.__setattr__(self, "_block", block)
        self.output = output  # (B, T, C)
        self.tuple_length = tuple_length  # blocks of some families (bloom) return (hidden, ...) tuples

    def forward(self, *args, **kwargs):
        if self.tuple_length:
            return (self.output,) + (None,) * (self.tuple_length - 1)
        return self.output

    def __getattr__(self, name: str):
        # Some models read attributes off their blocks (e.g. `attention_type`); answer as the block would.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


def frozen_prefix(positions: list[int]) -> int:
    """How many blocks lie below the lowest trainable one: those can be cached."""
    first = min(positions)
    if first == 0:
        raise OffsiteError("--cache-emulator: block 0 is trainable, so no frozen block lies below the adapter; "
                           "make a bundle with --bottom 0 (`offsite emulate MODEL -o BUNDLE --bottom 0 ...`)")
    return first


@dataclass
class EmulatorCache:
    """Output of blocks [0, prefix) for every training sequence, (len, C) each, in sequence order."""

    model: nn.Module
    prefix: int
    outputs: list[torch.Tensor]
    tuple_length: int
    parked_weights: ParkedWeights | None = None

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, sequences: list[Sequence], positions: list[int], pad_id: int,
              batch_size: int) -> "EmulatorCache":
        prefix = frozen_prefix(positions)
        captured: list = []

        def stop_after_prefix(module, args, output):
            captured.append(output)
            raise _FrozenBlocksDone

        handle = get_layers(model)[prefix - 1].register_forward_hook(stop_after_prefix)
        was_training = model.training
        model.eval()
        outputs: list[torch.Tensor] = []
        try:
            for start in range(0, len(sequences), batch_size):
                chunk = sequences[start: start + batch_size]
                batch = collate(chunk, pad_id)
                with contextlib.suppress(_FrozenBlocksDone):
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                output = captured.pop()
                hidden = output[0] if isinstance(output, tuple) else output  # (B, T, C)
                # Right padding never changes the real positions' outputs (causal attention), so cut it off.
                outputs += [hidden[row, : len(seq.input_ids)].clone() for row, seq in enumerate(chunk)]
        finally:
            handle.remove()
            model.train(was_training)
        tuple_length = len(output) if isinstance(output, tuple) else 0
        log.info("cached the output of %d frozen blocks for %d sequences (%.0f MB)", prefix, len(outputs),
                 sum(o.numel() * o.element_size() for o in outputs) / 2**20)
        return cls(model, prefix, outputs, tuple_length)

    def batch(self, indices: list[int]) -> torch.Tensor:
        """The cached outputs of these sequences, right-padded with zeros like `collate` pads ids. (B, T, C)"""
        rows = [self.outputs[i] for i in indices]
        padded = rows[0].new_zeros(len(rows), max(len(r) for r in rows), rows[0].shape[-1])
        for row, output in enumerate(rows):
            padded[row, : len(output)] = output
        return padded

    @contextlib.contextmanager
    def replaying(self, output: torch.Tensor) -> Iterator[None]:
        """Within the block, the frozen blocks return `output` instead of computing it."""
        layers = get_layers(self.model)
        frozen = [layers[i] for i in range(self.prefix)]
        for i, block in enumerate(frozen):
            layers[i] = Replay(block, output, self.tuple_length)
        try:
            yield
        finally:
            for i, block in enumerate(frozen):
                layers[i] = block

    @contextlib.contextmanager
    def frozen_blocks_parked(self) -> Iterator[None]:
        """The cached blocks' weights on disk for the duration (training on the cache never reads them)."""
        plain_head(self.model)  # its one-time check runs the real blocks
        with parked(get_layers(self.model)[: self.prefix]) as weights:
            self.parked_weights = weights
            try:
                yield
            finally:
                self.parked_weights = None

    @contextlib.contextmanager
    def frozen_blocks_loaded(self) -> Iterator[None]:
        """The cached blocks' weights in memory for the duration, e.g. to evaluate through the whole model."""
        with self.parked_weights.loaded() if self.parked_weights else contextlib.nullcontext():
            yield

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`batch_loss` with the frozen blocks replayed; `model` may be the peft-wrapped model."""
        plain_head(model)  # its one-time check runs the real blocks, so it must come before the replay
        with self.replaying(batch["frozen_output"]):
            return batch_loss(model, batch)

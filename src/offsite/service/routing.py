"""One full model serving many customers' adapters: each request's adapter blocks are its own, the rest shared.

An adapter replaces a few blocks (on the built-in model 4 of 30), so the model owner keeps one full model in
memory and, per adapter, only copies of those blocks. At every adapter position the block becomes a
`RoutedBlock`: in a batch that mixes customers, each row runs through its own adapter's copy of the block
(rows of one adapter together), while every other block, the embeddings and the head run once for the
whole batch, as multi-LoRA servers share a base model. A row with no adapter runs the full model's own block.

The block's other arguments (attention mask, rotary position embeddings, ...) are cut to the rows of each
group wherever their first dimension is the batch; the KV cache is not (the router runs without one).
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from offsite.arch import get_layers, layer_paths
from offsite.errors import OffsiteError
from offsite.files import one_line

log = logging.getLogger(__name__)
from offsite.exchange.adapter import Adapter


class RoutedBlock(nn.Module):
    """A block position of the full model whose rows each run through the block of their own adapter."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.variants = nn.ModuleDict()  # adapter id -> this position's block with that adapter's weights
        self.routes: list[str | None] | None = None  # adapter id of each row of the batch being run

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        routes = self.routes
        if routes is None or len(routes) != hidden_states.shape[0]:
            raise RuntimeError("RoutedBlock ran without a route for every row; call through MultiAdapterModel")
        if len(set(routes)) == 1:  # one adapter (or none) in the batch: no cutting needed
            return self.block(routes[0])(hidden_states, *args, **kwargs)
        batch = hidden_states.shape[0]
        merged: Any = None
        for adapter, rows in _groups(routes).items():
            index = torch.tensor(rows, device=hidden_states.device)
            output = self.block(adapter)(hidden_states[index], *_rows(args, index, batch), **_rows(kwargs, index, batch))
            merged = _place(merged, output, index, batch)
        return merged

    def block(self, adapter: str | None) -> nn.Module:
        return self.base if adapter is None else self.variants[adapter]

    def __getattr__(self, name: str) -> Any:
        # The model's forward may read the block's own attributes (e.g. `attention_type` of sliding windows).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)


def _groups(routes: list[str | None]) -> dict[str | None, list[int]]:
    found: dict[str | None, list[int]] = {}
    for row, adapter in enumerate(routes):
        found.setdefault(adapter, []).append(row)
    return found


def _rows(value: Any, index: torch.Tensor, batch: int) -> Any:
    """`value` cut to the rows in `index` wherever it is a tensor whose first dimension is the batch."""
    if isinstance(value, torch.Tensor):
        return value[index] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_rows(v, index, batch) for v in value)
    if isinstance(value, list):
        return [_rows(v, index, batch) for v in value]
    if isinstance(value, dict):
        return {k: _rows(v, index, batch) for k, v in value.items()}
    return value


def _place(merged: Any, output: Any, index: torch.Tensor, batch: int) -> Any:
    """Write one group's block output into the batch's (a tensor, or a tuple whose first item is one)."""
    if isinstance(output, tuple):
        first = _place(merged[0] if merged is not None else None, output[0], index, batch)
        return (first, *output[1:])
    if merged is None:
        merged = output.new_empty((batch, *output.shape[1:]))
    merged[index] = output
    return merged


class MultiAdapterModel:
    """A full model and the adapter blocks of many adapters; `logits(input_ids, mask, routes)` runs a mixed batch.

    Adapters are checked before they are added (`check_fits`: keys, shapes, dtypes of the blocks they
    replace); their fingerprint and issued layers are checked by the caller, as `plug` checks them.
    Calls are serialised: the routes are set on the blocks for the duration of one forward pass.
    """

    def __init__(self, model: PreTrainedModel):
        if layer_paths(model).task_head:
            raise OffsiteError("serving routes language models; a classifier is scored with `offsite eval`")
        self.model = model.eval()
        self.blocks = get_layers(model)
        self.routed: dict[int, RoutedBlock] = {}
        self.adapters: dict[str, tuple[int, ...]] = {}
        self.mixes = True  # rows of different adapters share a forward pass (checked on every model: check_routing)
        self._lock = threading.Lock()

    def add(self, adapter_id: str, adapter: Adapter) -> None:
        """Give every position the adapter replaces a copy of the block holding the adapter's weights."""
        if adapter.head:
            raise OffsiteError(f"adapter {adapter_id} carries a classification head; serving routes language models")
        with self._lock:
            self.check(adapter_id, adapter)
            for index, named in adapter.tensors.items():
                routed = self._routed(index)
                block = copy.deepcopy(routed.base)
                block.load_state_dict(named, strict=True)
                routed.variants[_key(adapter_id)] = block.requires_grad_(False)
            self.adapters[adapter_id] = tuple(adapter.layers)
        if self.mixes:
            try:
                self.check_routing(adapter_id)
            except OffsiteError as error:
                log.warning("%s; each batch then runs one adapter at a time", error)
                self.mixes = False

    def check_routing(self, adapter_id: str) -> None:
        """A mixed batch gives each row what it gets alone: proof, on this model, that the block arguments were
        cut by row correctly (a model whose blocks take per-row arguments laid out otherwise fails here)."""
        generator = torch.Generator().manual_seed(0)
        vocab = self.model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (2, 8), generator=generator).to(self.model.device)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        routes = [adapter_id, None]
        try:
            mixed = self.logits(ids, mask, routes)
            alone = [self.logits(ids[i: i + 1, : int(mask[i].sum())], mask[i: i + 1, : int(mask[i].sum())],
                                 routes[i: i + 1])[0] for i in range(2)]
        except RuntimeError as error:
            raise OffsiteError(f"{self.model.config.model_type}: a batch mixing adapters cannot be routed through "
                               f"this model's blocks ({one_line(str(error))})") from error
        for row, found in enumerate(alone):
            if not torch.allclose(mixed[row, : found.shape[0]], found, atol=1e-4, rtol=1e-4):
                raise OffsiteError(f"{self.model.config.model_type}: a batch mixing adapters does not give each row "
                                   "its own plugged model's logits on this model")

    def check(self, adapter_id: str, adapter: Adapter) -> None:
        """Refuse an adapter whose layers this model lacks or whose tensors do not fit the blocks they replace."""
        if any(index >= len(self.blocks) for index in adapter.layers):
            raise OffsiteError(f"adapter {adapter_id} has layers {adapter.layers}; the full model has "
                               f"{len(self.blocks)} blocks")
        for index, named in adapter.tensors.items():
            block = self.blocks[index]
            check_fits_block(block.base if isinstance(block, RoutedBlock) else block, named, adapter_id, index)

    def remove(self, adapter_id: str) -> None:
        with self._lock:
            for index in self.adapters.pop(adapter_id, ()):
                del self.routed[index].variants[_key(adapter_id)]

    def _routed(self, index: int) -> RoutedBlock:
        if index not in self.routed:
            self.routed[index] = RoutedBlock(self.blocks[index])
            self.blocks[index] = self.routed[index]
        return self.routed[index]

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               routes: list[str | None]) -> torch.Tensor:
        """(B, T, V) logits, row b through the blocks of adapter `routes[b]` (None: the full model's own)."""
        unknown = sorted({r for r in routes if r is not None} - set(self.adapters))
        if unknown:
            raise OffsiteError(f"adapter {unknown[0]} is not loaded")
        if not self.mixes and len(set(routes)) > 1:  # one forward pass per adapter, stitched back in row order
            merged = None
            for adapter, rows in _groups(routes).items():
                index = torch.tensor(rows, device=input_ids.device)
                merged = _place(merged, self.logits(input_ids[index], attention_mask[index], [adapter] * len(rows)),
                                index, len(routes))
            return merged
        with self._lock:
            for index, routed in self.routed.items():
                routed.routes = [_key(r) if r is not None and index in self.adapters[r] else None for r in routes]
            try:
                return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            finally:
                for routed in self.routed.values():
                    routed.routes = None


def _key(adapter_id: str) -> str:
    return adapter_id.replace(".", "_")  # ModuleDict keys may not contain dots


def check_fits_block(block: nn.Module, named: dict[str, torch.Tensor], adapter_id: str, index: int) -> None:
    """The adapter's tensors for block `index`: the block's keys, shapes and (floating) dtypes, no more."""
    expected = block.state_dict()
    missing, unexpected = sorted(set(expected) - set(named)), sorted(set(named) - set(expected))
    if missing or unexpected:
        raise OffsiteError(f"adapter {adapter_id}, layer {index}: missing keys {missing}, unexpected keys {unexpected}")
    for name, tensor in named.items():
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype.is_floating_point != want.dtype.is_floating_point:
            raise OffsiteError(f"adapter {adapter_id}, layers.{index}.{name}: shape {tuple(tensor.shape)} "
                               f"{tensor.dtype} but the full model's block has {tuple(want.shape)} {want.dtype}")

"""Weight compression of emulator layers: low-rank factors and int8 storage.

Both replace the linear maps inside emulator blocks with modules that hold
fewer bytes. The bundle stores the compressed tensors as they are (the data
owner's download and memory really shrink), so such a bundle is rebuilt by
`rebuild`, which swaps the same modules into a freshly built model before the
weights are loaded. Adapter layers are never compressed: plug-in is unaffected.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from offsite.arch import get_layers, layer_paths, set_submodule
from offsite.errors import OffsiteError


def _dense(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as (out, in), bias) of an nn.Linear or a GPT-2 Conv1D (which stores (in, out))."""
    weight = module.weight.detach()
    return (weight.t() if isinstance(module, Conv1D) else weight), module.bias


class LowRankLinear(nn.Module):
    """y = up(down(x)): a (out, in) weight replaced by (out, rank) @ (rank, in)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @classmethod
    def factorize(cls, module: nn.Module, rank: int) -> "LowRankLinear":
        """Truncated SVD, the singular values split evenly between the two factors."""
        weight, bias = _dense(module)
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = s[:rank].sqrt()
        low = cls(weight.shape[1], weight.shape[0], rank, bias is not None)
        with torch.no_grad():
            low.down.weight.copy_((root[:, None] * vh[:rank]).to(weight.dtype))
            low.up.weight.copy_((u[:, :rank] * root).to(weight.dtype))
            if bias is not None:
                low.up.bias.copy_(bias.detach())
        return low


class Int8Linear(nn.Module):
    """A linear map stored as int8 with one float scale per output channel, dequantised per call."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only one layer's weight is ever dequantised at a time, so memory holds int8 plus one float matrix.
        weight = self.weight_int8.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return F.linear(x, weight, self.bias)

    @classmethod
    def quantize(cls, module: nn.Module) -> "Int8Linear":
        """Symmetric per-output-channel quantisation: scale = max |w| / 127."""
        weight, bias = _dense(module)
        scale = weight.float().abs().amax(dim=1).clamp_min(1e-12) / 127
        quantized = cls(weight.shape[1], weight.shape[0], bias is not None, weight.dtype)
        with torch.no_grad():
            quantized.weight_int8.copy_(torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8))
            quantized.scale.copy_(scale.to(weight.dtype))
            if bias is not None:
                quantized.bias.copy_(bias.detach())
        return quantized


def rank_for(module: nn.Module, fraction: float) -> int:
    """The rank whose two factors hold `fraction` of the dense weight's parameters."""
    out_features, in_features = _dense(module)[0].shape
    return max(1, math.floor(fraction * in_features * out_features / (in_features + out_features)))


def linear_modules(model: nn.Module, positions: list[int]) -> dict[str, nn.Module]:
    """Dotted name -> linear map (nn.Linear or Conv1D) inside the blocks at `positions`."""
    prefix = layer_paths(model).layers
    wanted = tuple(f"{prefix}.{p}." for p in positions)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and name.startswith(wanted)}


def compress(model: nn.Module, positions: list[int], method: str, rank_fraction: float) -> dict[str, Any]:
    """Compress the linear maps of the blocks at `positions` in place; return what `rebuild` needs."""
    modules: dict[str, dict[str, Any]] = {}
    for name, module in linear_modules(model, positions).items():
        if method == "lowrank":
            rank = rank_for(module, rank_fraction)
            set_submodule(model, name, LowRankLinear.factorize(module, rank))
            modules[name] = {"kind": "lowrank", "rank": rank}
        else:
            set_submodule(model, name, Int8Linear.quantize(module))
            modules[name] = {"kind": "int8"}
    return {"method": method, "rank_fraction": rank_fraction if method == "lowrank" else None, "modules": modules}


def rebuild(model: nn.Module, compression: dict[str, Any]) -> None:
    """Swap empty compressed modules into `model` where the manifest says the bundle holds them."""
    for name, spec in compression["modules"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise OffsiteError(f"the bundle's manifest lists a compressed module {name!r} that this "
                               f"{model.config.model_type} model does not have") from None
        weight, bias = _dense(module)
        out_features, in_features = weight.shape
        if spec["kind"] == "lowrank":
            replacement: nn.Module = LowRankLinear(in_features, out_features, int(spec["rank"]), bias is not None)
        else:
            replacement = Int8Linear(in_features, out_features, bias is not None)
        set_submodule(model, name, replacement)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def emulator_bytes(model: nn.Module, positions: list[int]) -> int:
    layers = get_layers(model)
    return sum(tensor_bytes(layers[p]) for p in positions)

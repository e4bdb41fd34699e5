"""Weight compression of emulator layers: low-rank factors and int8 storage.

Both replace the linear maps inside emulator blocks with modules that hold
fewer bytes. The bundle stores the compressed tensors as they are (the data
owner's download and memory really shrink), so such a bundle is rebuilt by
`rebuild`, which swaps the same modules into a freshly built model before the
weights are loaded. Adapter layers are never compressed: plug-in is unaffected.

Each compression is registered once in `COMPRESSIONS` (as peft registers each tuner); the
emulator pipeline, the loader and the manifest check all ask the registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

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


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class Compression:
    """One way of storing an emulator's linear maps in fewer bytes.

    `compress` turns a dense module into the compressed one and the manifest entry that
    describes it; `empty` builds that module without weights from the entry, for loading.
    """

    name: str
    # lowrank runs before distillation, which repairs the truncation; int8 weights do not train, so after.
    before_distillation: bool
    compress: Callable[[nn.Module, float], tuple[nn.Module, dict[str, Any]]]
    empty: Callable[[int, int, bool, dict[str, Any]], nn.Module]
    valid: Callable[[dict[str, Any]], bool]
    byte_share: Callable[[float], float]  # bytes of a compressed layer / its float32 bytes, from rank_fraction


def _lowrank(module: nn.Module, rank_fraction: float) -> tuple[nn.Module, dict[str, Any]]:
    rank = rank_for(module, rank_fraction)
    return LowRankLinear.factorize(module, rank), {"kind": "lowrank", "rank": rank}


COMPRESSIONS: dict[str, Compression] = {}


def register(compression: Compression) -> None:
    COMPRESSIONS[compression.name] = compression


register(Compression("lowrank", before_distillation=True, compress=_lowrank,
                     empty=lambda i, o, bias, spec: LowRankLinear(i, o, int(spec["rank"]), bias),
                     valid=lambda spec: _positive_int(spec.get("rank")), byte_share=lambda fraction: fraction))
register(Compression("int8", before_distillation=False,
                     compress=lambda module, _: (Int8Linear.quantize(module), {"kind": "int8"}),
                     empty=lambda i, o, bias, spec: Int8Linear(i, o, bias),
                     valid=lambda spec: True, byte_share=lambda _: 0.25))


def valid_spec(spec: Any) -> bool:
    """Whether a manifest's entry for one compressed module names a registered compression correctly."""
    return isinstance(spec, dict) and spec.get("kind") in COMPRESSIONS and COMPRESSIONS[spec["kind"]].valid(spec)


def linear_modules(model: nn.Module, positions: list[int]) -> dict[str, nn.Module]:
    """Dotted name -> linear map (nn.Linear or Conv1D) inside the blocks at `positions`."""
    prefix = layer_paths(model).layers
    wanted = tuple(f"{prefix}.{p}." for p in positions)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and name.startswith(wanted)}


def compress(model: nn.Module, positions: list[int], method: str, rank_fraction: float) -> dict[str, Any]:
    """Compress the linear maps of the blocks at `positions` in place; return what `rebuild` needs."""
    compression = COMPRESSIONS[method]
    modules: dict[str, dict[str, Any]] = {}
    for name, module in linear_modules(model, positions).items():
        replacement, modules[name] = compression.compress(module, rank_fraction)
        set_submodule(model, name, replacement)
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
        if spec["kind"] == "lowrank" and spec["rank"] > min(in_features, out_features):
            raise OffsiteError(f"the bundle's manifest gives {name!r} rank {spec['rank']}, more than its "
                               f"{out_features} x {in_features} weight can have; ask the model owner for a fresh bundle")
        set_submodule(model, name, COMPRESSIONS[spec["kind"]].empty(in_features, out_features, bias is not None, spec))


def tensor_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        key = id(tensor) if tensor.is_meta else tensor.data_ptr()  # a skeleton's tensors all have pointer 0
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def emulator_bytes(model: nn.Module, positions: list[int]) -> int:
    layers = get_layers(model)
    return sum(tensor_bytes(layers[p]) for p in positions)

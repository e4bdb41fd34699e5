"""Where a model runs and in what precision: `--device` and `--dtype`.

The rule is the one mixed-precision training uses everywhere: weights that train (the adapter,
or the emulator while it is distilled) stay float32, with their optimizer state, and the forward
runs under autocast in the low-precision dtype; frozen weights may be held in that dtype, which
halves their memory. On a CPU the default is float32 throughout.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from offsite.config import DEVICE_PATTERN, DTYPE_NAMES
from offsite.errors import OffsiteError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES[1:]}  # float32, bfloat16, float16


def valid_device(spec: str) -> bool:
    return bool(re.fullmatch(DEVICE_PATTERN, spec))


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto`: the first accelerator found (CUDA, then Apple's MPS), else the CPU."""
    if not valid_device(spec):
        raise OffsiteError(f"--device {spec!r} is not a device; use {DEVICE_CHOICES}")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OffsiteError(f"--device {spec}: no CUDA GPU is visible to torch here (this torch build: "
                               f"{torch.__version__}); use --device cpu, or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OffsiteError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here; "
                               f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not _mps_available():
        raise OffsiteError(f"--device {spec}: Apple's MPS is not available here; use --device cpu")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that supports it, else float32 (a CPU gains little from it and loses precision)."""
    if spec not in DTYPE_NAMES:
        raise OffsiteError(f"--dtype {spec!r} is not a dtype; use one of {', '.join(DTYPE_NAMES)}")
    if spec != "auto":
        return DTYPES[spec]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass(frozen=True)
class Placement:
    """A device and the compute dtype of the forward pass there."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, device: str = "auto", dtype: str = "auto") -> "Placement":
        resolved = resolve_device(device)
        return cls(resolved, resolve_dtype(dtype, resolved))

    @property
    def mixed(self) -> bool:
        return self.dtype != torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward in the compute dtype (matmuls there, reductions and losses in float32)."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: value.to(self.device, non_blocking=True) for name, value in batch.items()}

    def synchronize(self) -> None:
        """Wait for the device's queued work (timings on a GPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_mb(self) -> float | None:
        """The accelerator's peak allocated memory since the last reset; None on the CPU (see bench's TensorPeak)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return None

    def describe(self) -> dict[str, str]:
        found = {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}
        if self.device.type == "cuda":
            found["gpu"] = torch.cuda.get_device_name(self.device)
        return found


CPU = Placement(torch.device("cpu"), torch.float32)  # the default everywhere: what offsite did before --device


def place_model(model: nn.Module, placement: Placement, keep_float32: list[nn.Module] = ()) -> nn.Module:
    """Move `model` to the device; hold its weights in the compute dtype except `keep_float32`'s.

    `keep_float32`: the modules that train; their weights (master weights) and so their optimizer
    state stay float32, whatever the compute dtype.
    """
    if placement.mixed:
        model.to(placement.dtype)
        for module in keep_float32:
            module.float()
    return model.to(placement.device)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())

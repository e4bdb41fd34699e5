"""The base fingerprint: what ties an adapter file to the full model its bundle was made from.

`plug` recomputes it from the full model and refuses an adapter made for another base. A local
model's fingerprint is read from its files tensor by tensor (`file_fingerprint`), never loading it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from offsite.arch import get_layers
from offsite.weights import StreamedModel, layer_tensor_names, stores_layers


def fingerprint(layers: dict[int, nn.Module], model_type: str, num_layers: int) -> str:
    """SHA-256 over the architecture and the original weights of the adapter layers.

    `layers` maps original index -> block. Weights are hashed as float32 so the
    same checkpoint loaded in another dtype (bf16 -> fp32 is exact) matches.
    """
    return _digest({index: dict(block.state_dict()) for index, block in layers.items()}, model_type, num_layers)


def _digest(layers: dict[int, dict[str, Callable[[], torch.Tensor] | torch.Tensor]], model_type: str,
            num_layers: int) -> str:
    """The fingerprint of tensors (or of functions that read them, called one at a time)."""
    digest = hashlib.sha256()
    header = {"model_type": model_type, "num_layers": num_layers, "adapter_layers": sorted(layers)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for index in sorted(layers):
        for name, tensor in sorted(layers[index].items()):
            tensor = tensor() if callable(tensor) else tensor
            digest.update(f"{index}.{name}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: PreTrainedModel, adapter: tuple[int, ...] | list[int]) -> str:
    """Fingerprint of a full model for the given adapter layer indices."""
    layers = get_layers(model)
    return fingerprint({i: layers[i] for i in adapter}, model.config.model_type, len(layers))


def file_fingerprint(model: StreamedModel, adapter: tuple[int, ...] | list[int]) -> str | None:
    """The same fingerprint read from a local model's files one tensor at a time; None if a tensor is not stored.

    Each tensor is cast to the dtype loading would give it first, so the result equals
    `model_fingerprint` of the loaded model.
    """
    if not stores_layers(model, adapter):
        return None
    blocks = get_layers(model.skeleton)
    layers: dict[int, dict[str, Callable[[], torch.Tensor]]] = {}
    for index in adapter:
        expected = blocks[index].state_dict()
        keys = layer_tensor_names(model, index)
        layers[index] = {name: (lambda key=key, dtype=expected[name].dtype: model.files.get(key).to(dtype))
                         for name, key in keys.items()}
    return _digest(layers, model.skeleton.config.model_type, len(blocks))

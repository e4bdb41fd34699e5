"""The base fingerprint: what ties an adapter file to the full model its bundle was made from.

`plug` recomputes it from the full model and refuses an adapter made for another base.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn
from transformers import PreTrainedModel

from offsite.arch import get_layers


def fingerprint(layers: dict[int, nn.Module], model_type: str, num_layers: int) -> str:
    """SHA-256 over the architecture and the original weights of the adapter layers.

    `layers` maps original index -> block. Weights are hashed as float32 so the
    same checkpoint loaded in another dtype (bf16 -> fp32 is exact) matches.
    """
    digest = hashlib.sha256()
    header = {"model_type": model_type, "num_layers": num_layers, "adapter_layers": sorted(layers)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for index in sorted(layers):
        for name, tensor in sorted(layers[index].state_dict().items()):
            digest.update(f"{index}.{name}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: PreTrainedModel, adapter: tuple[int, ...] | list[int]) -> str:
    """Fingerprint of a full model for the given adapter layer indices."""
    layers = get_layers(model)
    return fingerprint({i: layers[i] for i in adapter}, model.config.model_type, len(layers))

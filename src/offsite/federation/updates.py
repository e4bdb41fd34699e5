"""What travels in a federation round: the adapter's tensors as a Flower ArrayRecord, and their checks.

The keys are the adapter file's (`layers.<original index>.<name>`), so a round's arrays mean the
same thing in the bundle, in the full model and in an adapter file. The server checks every
client's reply the way `plug` checks an adapter file (keys, shapes, dtypes, finite values, size)
before it is averaged: one bad client is dropped from its round, never averaged in.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from offsite.config import TrainConfig
from offsite.exchange.adapter import Adapter, extract
from offsite.exchange.bundle import bundle_index, open_bundle

ARRAYS = "arrays"  # Flower's default record keys (its strategies read these)
METRICS = "metrics"
CONFIG = "config"
WEIGHT = "num-examples"
EMULATOR = "emulator"  # the server's re-aligned emulator layers (keys by bundle position), with a round's adapter
# An .npy header is about 128 bytes; a payload larger than the tensor and this is not an adapter tensor.
NPY_HEADER_SLACK = 4096


def flat(tensors: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """An adapter's tensors by file key, float32 on the CPU."""
    return {f"layers.{index}.{name}": tensor.detach().to("cpu", torch.float32).contiguous()
            for index, named in sorted(tensors.items()) for name, tensor in sorted(named.items())}


def nested(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """File keys back to tensors by layer index (the keys are checked: `check_update`)."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        layers.setdefault(int(index), {})[name] = tensor
    return layers


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({key: Array(tensor.numpy()) for key, tensor in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.array(array.numpy(), dtype=np.float32)) for key, array in record.items()}


@dataclass(frozen=True)
class Reference:
    """The shapes an update must have: those of the bundle's adapter layers, in float32."""

    shapes: dict[str, tuple[int, ...]]
    fingerprint: str
    base_model: dict

    @classmethod
    def of(cls, start: dict[str, torch.Tensor], fingerprint: str, base_model: dict) -> "Reference":
        return cls({key: tuple(t.shape) for key, t in start.items()}, fingerprint, base_model)

    def adapter(self, tensors: dict[str, torch.Tensor], training: dict) -> Adapter:
        return Adapter(nested(tensors), self.fingerprint, self.base_model, training)


def bundle_adapter(bundle: str, trust: str | None = None) -> tuple[dict[str, torch.Tensor], Reference]:
    """The bundle's adapter layers (where training starts) and the reference updates are checked against."""
    model, _, manifest = open_bundle(bundle, trust=trust)
    positions = bundle_index(manifest)
    start = flat(extract(model, {i: positions[i] for i in manifest.plan.adapter}))
    return start, Reference.of(start, manifest.fingerprint, manifest.base_model)


def check_update(content: RecordDict, reference: Reference) -> str | None:
    """Why a client's reply cannot be averaged in, or None if it can."""
    records = content.array_records
    if list(records) != [ARRAYS]:
        return f"its reply holds array records {sorted(records)}, expected one named '{ARRAYS}'"
    metrics = content.metric_records.get(METRICS)
    weight = None if metrics is None else metrics.get(WEIGHT)
    if isinstance(weight, bool) or not isinstance(weight, int) or weight <= 0:
        return f"its reply has no positive integer '{WEIGHT}' in '{METRICS}' (got {weight!r})"
    arrays = records[ARRAYS]
    missing = sorted(set(reference.shapes) - set(arrays))
    extra = sorted(set(arrays) - set(reference.shapes))
    if missing or extra:
        return f"missing tensors {missing[:3]}{'…' if len(missing) > 3 else ''}, unexpected tensors {extra[:3]}" \
               f"{'…' if len(extra) > 3 else ''}"
    for key, shape in reference.shapes.items():
        array = arrays[key]
        size = 4 * int(np.prod(shape, dtype=np.int64))
        if len(array.data) > size + NPY_HEADER_SLACK:  # before deserialising: a huge payload costs nothing
            return f"{key}: {len(array.data)} bytes, more than a float32 tensor of shape {shape}"
        try:
            value = array.numpy()
        except (TypeError, ValueError) as error:
            return f"{key}: unreadable ({error})"
        if value.dtype != np.float32 or tuple(value.shape) != shape:
            return f"{key}: {value.dtype} of shape {tuple(value.shape)}, expected float32 of shape {shape}"
        if not np.isfinite(value).all():
            return f"{key}: holds NaN or infinite values"
    return None


def round_settings(config: Mapping[str, Any]) -> TrainConfig:
    """The training settings the server sent, with this round's seed and (FedProx) proximal weight."""
    train = TrainConfig.from_dict(json.loads(str(config["train"])))
    mu = float(config.get("proximal-mu", train.proximal_mu))  # FedProx's strategy sends it under this key
    return dataclasses.replace(train, seed=train.seed + int(config["server-round"]), proximal_mu=mu)

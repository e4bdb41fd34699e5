"""The data owner's side of a federation: train the round's adapter on local data, send back only the adapter.

Each round runs `offsite tune` itself (the same trainer, LoRA, schedule and device handling),
started from the round's global adapter (`--init-adapter`) through the owner's own copy of the
bundle. The data file and the bundle are the node's own configuration: the server never sees
their paths, only the trained tensors and how many examples they were trained on.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from offsite.api import tune
from offsite.config import DeviceConfig, TrainConfig, TuneConfig
from offsite.errors import OffsiteError
from offsite.exchange.adapter import Adapter, load_adapter
from offsite.exchange.bundle import read_manifest
from offsite.federation import secure
from offsite.federation.updates import (ARRAYS, CONFIG, EMULATOR, METRICS, WEIGHT, flat, from_record, nested,
                                       round_settings, to_record)


@dataclass(frozen=True)
class Node:
    """One data owner's own configuration: never sent to the server."""

    bundle: str
    data: str
    runtime: DeviceConfig = dataclasses.field(default_factory=DeviceConfig)
    trust: str | None = None  # the model owner's public key, if the bundle must be signed with it


@dataclass(frozen=True)
class LocalResult:
    tensors: dict[str, torch.Tensor]
    examples: int
    loss: float


def train_locally(node: Node, start: dict[str, torch.Tensor], train: TrainConfig, fingerprint: str,
                  emulator: dict[str, torch.Tensor] | None = None) -> LocalResult:
    """One round on one data owner: `offsite tune` from `start` on the owner's data; the trained tensors.

    `emulator`: the model owner's re-aligned emulator layers for this round, if it sent them; the
    owner's bundle on disk is left as it is.
    """
    manifest = read_manifest(node.bundle, node.trust)
    if manifest.fingerprint != fingerprint:
        raise OffsiteError(f"bundle {node.bundle} is not the one this federation trains (fingerprints "
                           f"{manifest.fingerprint[:16]}… and {fingerprint[:16]}…); use the model owner's bundle")
    with tempfile.TemporaryDirectory(prefix="offsite-federate-") as scratch:
        initial, trained = Path(scratch) / "start", Path(scratch) / "trained"
        initial.mkdir()
        Adapter(nested(start), manifest.fingerprint, manifest.base_model).save(initial)
        tune(TuneConfig(bundle=node.bundle, data=node.data, output=str(trained), init_adapter=str(initial),
                        train=train, runtime=node.runtime, trust=node.trust),
             emulator=nested(emulator) if emulator else None)
        adapter = load_adapter(trained)
    summary = adapter.training["summary"]
    return LocalResult(flat(adapter.tensors), int(summary["train_sequences"]), float(summary["final_loss"]))


def client_app(node_of: Callable[[Context], Node], mods: tuple[Callable, ...] = ()) -> ClientApp:
    """The Flower ClientApp of a data owner; `node_of(context)`: the owner's bundle and data.

    `mods`: more Flower client mods, run outside SecAgg+'s (e.g. Flower's local DP mod).
    """
    app = ClientApp(mods=[*mods, secure.when_asked])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        node = node_of(context)
        if secure.is_secure(message):  # SecAgg+ rounds carry the legacy layout; the mod masks the reply
            return secure.train_masked(message, node, train_locally)
        config = message.content[CONFIG]
        records = message.content.array_records
        emulator = from_record(records[EMULATOR]) if EMULATOR in records else None
        result = train_locally(node, from_record(records[ARRAYS]), round_settings(config), str(config["fingerprint"]),
                               emulator)
        metrics = MetricRecord({WEIGHT: result.examples, "train-loss": result.loss})
        return Message(RecordDict({ARRAYS: to_record(result.tensors), METRICS: metrics}), reply_to=message)

    return app


def deployed_node(context: Context) -> Node:
    """A SuperNode's own settings: `flower-supernode --node-config 'bundle="…" data-file="…"'`."""
    settings = context.node_config
    missing = [key for key in ("bundle", "data-file") if key not in settings]
    if missing:
        raise OffsiteError(f"this SuperNode has no {', '.join(missing)} in --node-config; start it with "
                           "--node-config 'bundle=\"BUNDLE\" data-file=\"DATA\"'")
    runtime = DeviceConfig(device=str(settings.get("device", "auto")), dtype=str(settings.get("dtype", "auto")))
    trust = settings.get("trust")
    return Node(str(settings["bundle"]), str(settings["data-file"]), runtime, str(trust) if trust else None)

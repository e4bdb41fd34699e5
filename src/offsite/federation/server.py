"""The model owner's side of a federation: the global adapter, the strategy, the checks and the round log.

The server holds the bundle (for the adapter's starting weights and the shapes every update must
have) and, optionally, the full model and held-out data to score each round's plug-in. It writes
`rounds.jsonl` (one line per round: who trained, who was dropped and why, the training loss, the
score) and, at the end, the global adapter as an ordinary adapter file that `offsite plug` takes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedProx, FedYogi,
                                     Strategy)
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from offsite.api import load_for_eval
from offsite.config import FederateConfig, TrainConfig
from offsite.data.read import read_data
from offsite.data.types import limit
from offsite.device import Placement, place_model
from offsite.errors import OffsiteError
from offsite.exchange.adapter import apply, plug_into
from offsite.exchange.bundle import bundle_index, read_manifest
from offsite.federation import secure
from offsite.federation.alignment import Aligner
from offsite.federation.updates import (EMULATOR, WEIGHT, Reference, bundle_adapter, check_update, from_record,
                                       to_record)
from offsite.scoring import score

log = logging.getLogger(__name__)

ROUNDS = "rounds.jsonl"


def round_training(config: FederateConfig) -> TrainConfig:
    """What each owner trains per round: the flags' settings for `--local-steps` steps."""
    return dataclasses.replace(config.train, max_steps=config.local_steps, epochs=None)


def build_strategy(config: FederateConfig) -> Strategy:
    """Flower's strategy for `--strategy`, wrapped in its DP wrapper with `--dp-noise`.

    With DP, the owners' clipped updates are averaged with equal weights (the server's `Checked`):
    the noise is calibrated to one owner's share of the average, 1/owners, which weighting by
    example counts would change (Flower's accountant refuses unequal weights).
    """
    every = {"fraction_evaluate": 0.0, "min_train_nodes": config.num_clients,
             "min_available_nodes": config.num_clients}  # the owners score nothing: the server does
    strategy: Strategy
    if config.strategy == "fedavg":
        strategy = FedAvg(**every)
    elif config.strategy == "fedprox":
        strategy = FedProx(**every, proximal_mu=config.train.proximal_mu)
    else:
        optimizer = FedAdam if config.strategy == "fedadam" else FedYogi
        strategy = optimizer(**every, eta=config.server_lr, eta_l=config.train.lr)
    if config.dp_noise is not None:
        strategy = DifferentialPrivacyServerSideFixedClipping(strategy, config.dp_noise, config.dp_clip,
                                                              config.num_clients, accountant=_accountant(config))
    return strategy


def _accountant(config: FederateConfig) -> RdpAccountant | None:
    """Flower's RDP accountant of the owner-level privacy spent: every owner trains every round (no sampling
    to amplify it). Flower accounts only for FedAvg's aggregation (fedavg, fedprox)."""
    if config.strategy not in ("fedavg", "fedprox"):
        log.warning("--strategy %s: Flower's accountant does not cover its aggregation; the epsilon spent is not "
                    "reported", config.strategy)
        return None
    return RdpAccountant(PrivacyConfig(config.dp_delta, config.num_clients, NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       SamplingMethod.NO_AMPLIFICATION))


class Checked(Strategy):
    """A strategy whose owners' replies are checked before it aggregates them (see updates.check_update).

    A reply that fails is left out of its round, with the owner's node id and the reason in the log
    and in `self.pending`; the round goes on with the others. With `self.emulator` set (a
    re-aligned emulator), every round's message carries it next to the adapter. `uniform`: average
    the updates with equal weights, not by example counts (DP: see `build_strategy`).
    """

    def __init__(self, strategy: Strategy, reference: Reference, uniform: bool = False) -> None:
        self.strategy = strategy
        self.reference = reference
        self.uniform = uniform
        self.pending: dict[str, Any] = {}
        self.emulator: dict[str, torch.Tensor] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if self.emulator is not None:
            record = to_record(self.emulator)
            for message in messages:  # Flower's strategies give every message one shared RecordDict
                message.content[EMULATOR] = record
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept, dropped, failed = [], [], []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                failed.append({"node": node, "reason": reply.error.reason})
                continue
            reason = check_update(reply.content, self.reference)
            if reason is None:
                kept.append(reply)
            else:
                log.warning("round %d: dropped the update of node %d: %s", server_round, node, reason)
                dropped.append({"node": node, "reason": reason})
        for failure in failed:
            log.warning("round %d: node %d failed: %s", server_round, failure["node"], failure["reason"])
        weights = [int(r.content["metrics"][WEIGHT]) for r in kept]
        if self.uniform:
            for r in kept:
                r.content["metrics"][WEIGHT] = 1
        arrays, metrics = self.strategy.aggregate_train(server_round, kept) if kept else (None, None)
        losses = [float(r.content["metrics"].get("train-loss", float("nan"))) for r in kept]
        self.pending = {"clients": len(kept), "dropped": dropped, "failed": failed, "examples": sum(weights),
                        "train_loss": sum(w * l for w, l in zip(weights, losses)) / sum(weights) if kept else None,
                        **self.privacy_spent()}
        return arrays, metrics

    def privacy_spent(self) -> dict[str, Any]:
        """The epsilon (at delta) spent so far, where DP is accounted for."""
        spent = self.strategy.privacy_spent() if hasattr(self.strategy, "privacy_spent") else None
        return {} if spent is None else {"dp_epsilon": spent.epsilon, "dp_delta": spent.delta}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


class Scorer:
    """Scores an adapter on the model owner's held-out data: plugged into the full model, or in the bundle."""

    def __init__(self, config: FederateConfig) -> None:
        self.data = read_data(config.eval_data, "--eval-data", default_split="validation")
        if config.eval_limit is not None:
            self.data = limit(self.data, config.eval_limit)
        manifest = read_manifest(config.bundle)
        self.plug_in = config.model is not None
        self.model, self.tokenizer = load_for_eval(config.model or config.bundle, None)
        self.positions = ({i: i for i in manifest.plan.adapter} if self.plug_in else
                          {i: bundle_index(manifest)[i] for i in manifest.plan.adapter})
        self.placement = Placement.of(config.runtime.device, config.runtime.dtype)
        place_model(self.model, self.placement)
        self.seq_len, self.batch_size = config.train.seq_len, config.train.batch_size
        self.checked = False

    def __call__(self, reference: Reference, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        adapter = reference.adapter(tensors, {})
        if self.plug_in and not self.checked:  # checked once: the fingerprint and layers do not change
            plug_into(self.model, adapter, "the global adapter", tuple(self.positions))
            self.checked = True
        else:
            apply(self.model, adapter, self.positions, "the global adapter")
        with self.placement.autocast():
            result = score(self.model, self.tokenizer, self.data, self.seq_len, self.batch_size)
        return {**result, "scored": "plug-in" if self.plug_in else "bundle"}


class Server:
    """The ServerApp's work: run the rounds, log each, write the final adapter into `output`."""

    def __init__(self, config: FederateConfig, output: Path) -> None:
        self.config = config
        self.output = output
        self.start, self.reference = bundle_adapter(config.bundle)
        self.scorer = Scorer(config) if config.eval_data else None
        self.aligner = Aligner(config) if config.alignment else None
        self.emulator: dict[str, torch.Tensor] | None = None  # the latest re-aligned emulator, if any
        self.began = time.perf_counter()
        self.applied = 0
        self.alignments = 0

    def round_config(self, server_round: int | None = None) -> dict[str, Any]:
        settings = {"train": json.dumps(round_training(self.config).to_dict()),
                    "fingerprint": self.reference.fingerprint}
        return settings if server_round is None else {**settings, "server-round": server_round}

    def on_round(self, server_round: int, tensors: dict[str, torch.Tensor], pending: dict[str, Any]
                 ) -> dict[str, Any]:
        """Score the round's global adapter, re-align the emulator for the next round (with --distill) and
        append the round's line to rounds.jsonl; the score for Flower."""
        if server_round > 0 and pending.get("clients"):
            self.applied += 1
        scored = self.scorer(self.reference, tensors) if self.scorer else None
        aligned = None
        if self.aligner and 0 < server_round < self.config.rounds and pending.get("clients"):
            self.emulator, aligned = self.aligner(server_round, self.reference.adapter(tensors, {}))
            self.alignments += 1
        line = {"round": server_round, **pending, "eval": scored, **({"alignment": aligned} if aligned else {}),
                "seconds": round(time.perf_counter() - self.began, 2)}
        with open(self.output / ROUNDS, "a") as rounds:
            rounds.write(json.dumps(line) + "\n")
        if scored:
            log.info("round %d: %s", server_round, {k: v for k, v in scored.items() if k in ("accuracy", "perplexity")})
        return {k: v for k, v in (scored or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def run(self, grid: Grid, context: Context) -> None:
        config = self.config
        privacy: dict[str, Any] = {}
        if config.secagg:
            strategy = secure.MaskedAverage(self.start, self.round_config, config.num_clients, self.on_round)
            final = secure.run_masked(grid, context, strategy, config.rounds, config.round_timeout,
                                      config.num_clients)
        else:
            checked = Checked(build_strategy(config), self.reference, uniform=config.dp_noise is not None)

            def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
                pending, checked.pending = checked.pending, {}
                metrics = MetricRecord(self.on_round(server_round, from_record(arrays), pending))
                checked.emulator = self.emulator  # the next round trains through it
                return metrics

            result = checked.start(grid, to_record(self.start), config.rounds, config.round_timeout,
                                   train_config=ConfigRecord(self.round_config()), evaluate_fn=evaluate)
            final = from_record(result.arrays) if len(result.arrays) else self.start
            privacy = checked.privacy_spent()
        if not self.applied:
            raise OffsiteError(f"no round of the federation produced an update (see {self.output / ROUNDS}); "
                               "no adapter was written")
        summary = {"rounds": config.rounds, "rounds_applied": self.applied, "clients": config.num_clients,
                   "alignments": self.alignments, **privacy, "seconds": round(time.perf_counter() - self.began, 2)}
        settings = {k: v for k, v in config.to_dict().items() if k not in ("client_data",)}  # owners' paths stay out
        self.reference.adapter(final, {"federation": settings, "summary": summary}).save(self.output)


def server_app(config: FederateConfig, output: Path, outcome: dict[str, Any]) -> ServerApp:
    """The Flower ServerApp of a federation whose settings are `config`.

    `outcome` gets "server" when it finished, or "error" (the exception), which the simulation runtime
    would otherwise only log.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            server = Server(config, output)
            server.run(grid, context)
            outcome["server"] = server
        except Exception as error:
            outcome["error"] = error
            raise

    return app

"""Secure aggregation (Flower's SecAgg+): the server learns only the weighted average of the updates.

Flower runs SecAgg+ on its workflow API (`SecAggPlusWorkflow` on the server, `secaggplus_mod`
on the client), which carries the legacy FitIns/FitRes layout; this module speaks that layout on
both sides. Clients send their *update* (trained minus received weights), not the weights: SecAgg+
quantizes values clipped to a fixed range, and updates are small, so the range can be tight and the
rounding error small. The server never sees one client's update, so it cannot check it the way
the plain rounds do (`updates.check_update`): each client checks its own before masking it, and
the server checks the average (shapes, finite values) before applying it.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from offsite.errors import OffsiteError
from offsite.federation.updates import round_settings
from offsite.numerics import refuse_non_finite

log = logging.getLogger(__name__)

# Each client's update, scaled by its weight's share of MAX_WEIGHT, is clipped to [-CLIP, CLIP]
# and quantized (Flower's default range is [-8, 8], for whole weights). An adapter's update after a
# few local steps at lr 1e-4 is of order 1e-3, far inside the range.
CLIP = 1.0
# A client's weight (its example count) is quantized as a share of this: counts above it are capped.
MAX_WEIGHT = 10_000
MODULUS = 2 ** 32  # the masks' range, Flower's default (and its maximum)


def levels(num_clients: int) -> int:
    """Quantization levels: as many as the sum of every client's masked values leaves room for in MODULUS.

    A client with few examples sends its update times a small share of MAX_WEIGHT, so the rounding
    step must be fine: 2**29 levels for 3 or 4 owners (Flower's default is 2**22).
    """
    return 2 ** min(30, 31 - math.ceil(math.log2(num_clients)))


def when_asked(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's SecAgg+ client mod for the rounds that run it; plain rounds pass through."""
    if RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


def is_secure(message: Message) -> bool:
    return "fitins.parameters" in message.content.array_records


def train_masked(message: Message, node: Any, train_locally: Callable) -> Message:
    """A SecAgg+ round on the client: train, then reply with the update (which the mod masks)."""
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    config = fitins.config
    keys = json.loads(str(config["keys"]))
    start = {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in zip(keys, parameters_to_ndarrays(
        fitins.parameters), strict=True)}
    result = train_locally(node, start, round_settings(config), str(config["fingerprint"]))
    update = {k: result.tensors[k] - start[k] for k in keys}
    refuse_non_finite(update, "this round's adapter update")  # the server cannot check one client's update
    weight = min(result.examples, int(config["max-weight"]))
    if weight < result.examples:
        log.warning("secure aggregation weighs at most %d examples; this owner's %d count as %d",
                    weight, result.examples, weight)
    # float64: the mod adds CLIP before quantizing, and a float32 sum near 1 keeps only 2**-24 of the update
    fitres = FitRes(Status(Code.OK, "OK"), ndarrays_to_parameters([update[k].double().numpy() for k in keys]), weight,
                    {"train-loss": result.loss})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)


class MaskedAverage(FedAvg):
    """The server's strategy under SecAgg+: adds the securely averaged update to the global adapter.

    `on_round(round, tensors, metrics)` is called after every round (and for round 0) and returns
    the centralised evaluation's metrics.
    """

    def __init__(self, start: dict[str, torch.Tensor], round_config: Callable[[int], dict[str, Any]],
                 num_clients: int, on_round: Callable[[int, dict[str, torch.Tensor], dict[str, Any]], dict]):
        self.keys = list(start)
        self.tensors = dict(start)
        self.on_round = on_round
        self.pending: dict[str, Any] = {}
        super().__init__(fraction_evaluate=0.0, min_fit_clients=num_clients, min_available_clients=num_clients,
                         on_fit_config_fn=lambda r: {**round_config(r), "keys": json.dumps(self.keys),
                                                     "max-weight": MAX_WEIGHT},
                         initial_parameters=ndarrays_to_parameters([t.numpy() for t in start.values()]))

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        self.pending = {"clients": len(results), "failed": [str(f) for f in failures], "dropped": []}
        if not results:
            return None, {}
        # SecAgg+ put the same weighted average of the updates into every result
        average = parameters_to_ndarrays(results[0][1].parameters)
        shapes = [tuple(t.shape) for t in self.tensors.values()]
        if [tuple(a.shape) for a in average] != shapes or not all(np.isfinite(a).all() for a in average):
            self.pending["dropped"] = [{"node": "all", "reason": "the securely averaged update has wrong shapes or "
                                        "non-finite values; the round's update was not applied"}]
            return None, {}
        self.tensors = {k: self.tensors[k] + torch.from_numpy(np.array(a, dtype=np.float32))
                        for k, a in zip(self.keys, average)}
        examples = sum(res.num_examples for _, res in results)
        loss = sum(float(res.metrics.get("train-loss", 0.0)) * res.num_examples for _, res in results) / examples
        self.pending.update({"examples": examples, "train_loss": loss})
        return ndarrays_to_parameters([t.numpy() for t in self.tensors.values()]), {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Any]] | None:
        metrics = self.on_round(server_round, self.tensors, self.pending)
        self.pending = {}
        return 0.0, metrics


def run_masked(grid: Grid, context: Context, strategy: MaskedAverage, rounds: int, timeout: float,
               num_clients: int) -> dict[str, torch.Tensor]:
    """Run `rounds` SecAgg+ rounds; return the final global adapter tensors."""
    if num_clients < 3:
        raise OffsiteError(f"--secagg needs at least 3 data owners (SecAgg+ splits each key into shares among them); "
                           f"this federation has {num_clients}")
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=rounds, round_timeout=timeout), strategy=strategy)
    workflow = SecAggPlusWorkflow(num_shares=num_clients, reconstruction_threshold=max(2, num_clients // 2 + 1),
                                  max_weight=MAX_WEIGHT, clipping_range=CLIP, quantization_range=levels(num_clients),
                                  modulus_range=MODULUS,
                                  timeout=timeout)
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    return strategy.tensors

"""`offsite federate`: the federation simulated on one machine, one Flower client per data file.

The ServerApp and ClientApp are those the deployment runtime runs (`offsite.federation.app`);
here Flower's simulation runtime runs them, each client in its own process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from flwr.app import Context
from flwr.simulation import run_simulation

from offsite.config import FederateConfig
from offsite.constants import ADAPTER_METADATA
from offsite.data.read import read_data
from offsite.errors import OffsiteError
from offsite.exchange.bundle import read_manifest
from offsite.federation.client import Node, client_app
from offsite.federation.server import ROUNDS, server_app
from offsite.files import atomic_dir, check_output_dir
from offsite.loading import is_classifier


def federate(config: FederateConfig, client_mods: tuple[Callable, ...] = ()) -> Path:
    """Run the federation of `config` in Flower's simulation runtime; write the global adapter to `config.output`.

    `client_mods`: Flower client mods every simulated owner runs (see `client.client_app`).
    """
    if len(config.client_data) < 2:
        raise OffsiteError("--client-data: a federation needs two or more data owners' files (one per owner)")
    if config.min_clients is not None and config.min_clients != len(config.client_data):
        raise OffsiteError(f"--min-clients {config.min_clients}: the simulation trains with every --client-data file "
                           f"({len(config.client_data)}); drop --min-clients")
    inputs = (config.bundle, *config.client_data, *(p for p in (config.eval_data, config.model) if p))
    check_output_dir(config.output, config.overwrite, inputs=inputs)
    read_manifest(config.bundle)  # a missing or damaged bundle fails now, not in every client
    if is_classifier(config.bundle):
        raise OffsiteError(f"bundle {config.bundle} is a classifier's; federating a classifier (its head with the "
                           "adapter) is not built yet: train it with offsite tune")
    for path in config.client_data:  # and so does an owner's unreadable data
        read_data(path, "--client-data")
    nodes = [Node(config.bundle, path, config.runtime) for path in config.client_data]

    def node_of(context: Context) -> Node:
        return nodes[int(context.node_config["partition-id"])]

    outcome: dict = {}
    with atomic_dir(config.output, config.overwrite) as tmp:
        run_simulation(server_app(config, tmp, outcome), client_app(node_of, client_mods), num_supernodes=len(nodes),
                       backend_config=_backend(config))
        if isinstance(outcome.get("error"), OffsiteError):
            raise outcome["error"]
        if "error" in outcome:
            error = outcome["error"]
            raise OffsiteError(f"the federation's server failed: {type(error).__name__}: {error}") from error
        if "server" not in outcome or not (tmp / ADAPTER_METADATA).exists():
            log_path = tmp / ROUNDS
            rounds = log_path.read_text() if log_path.exists() else ""
            raise OffsiteError("the federation did not finish (see Flower's log above)"
                               + (f"; the rounds it logged: {rounds.strip()}" if rounds else ""))
    return Path(config.output)


def _backend(config: FederateConfig) -> dict:
    """Ray's resources: each owner `--client-cpus` cores (and a GPU share where training runs on one)."""
    resources: dict[str, float] = {"num_cpus": config.client_cpus, "num_gpus": 0.0}
    if config.runtime.device != "cpu" and torch.cuda.is_available():
        resources["num_gpus"] = 1.0 / len(config.client_data)
    return {"client_resources": resources, "init_args": {"num_cpus": os.cpu_count() or 1}}

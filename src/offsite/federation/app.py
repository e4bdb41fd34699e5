"""The Flower App the deployment runtime runs: `server_app` on the model owner's SuperLink, `client_app` on
each data owner's SuperNode.

`offsite federate BUNDLE ... --write-app DIR` writes the app's project (`DIR/pyproject.toml`):
the components below and the federation's settings as its run config, so `flwr run DIR SUPERLINK`
runs the same federation `offsite federate` simulates. Each data owner's bundle copy and data file
are its SuperNode's own `--node-config`, never part of the run config (see docs/federation.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import tomli_w
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from offsite import __version__
from offsite.config import FederateConfig
from offsite.errors import OffsiteError
from offsite.federation.client import client_app as make_client_app
from offsite.federation.client import deployed_node
from offsite.federation.server import Server
from offsite.files import atomic_dir, check_output_dir

PROJECT = "pyproject.toml"
NESTED = ("train", "runtime", "alignment")


PATHS = ("bundle", "output", "eval_data", "model")


def run_config(config: FederateConfig) -> dict[str, Any]:
    """The federation's settings as a Flower run config (TOML has no null: unset settings are left out).

    Paths are made absolute: the ServerApp does not run in the directory `offsite` was called from.
    """
    settings = {k: v for k, v in config.to_dict().items() if k != "client_data"}  # the owners' paths stay home
    settings.update({k: str(Path(settings[k]).absolute()) for k in PATHS if settings[k] and Path(settings[k]).exists()
                     or k == "output"})
    corpus = (settings.get("alignment") or {}).get("corpus")
    if corpus and Path(corpus).exists():  # a file; a built-in corpus is a name
        settings["alignment"] = {**settings["alignment"], "corpus": str(Path(corpus).absolute())}
    return {key: ({k: v for k, v in value.items() if v is not None} if key in NESTED else value)
            for key, value in settings.items() if value is not None}


def config_from_run(settings: Mapping[str, Any]) -> FederateConfig:
    """A FederateConfig from a run config, which Flower flattens (`train.lr`)."""
    nested: dict[str, Any] = {}
    for key, value in settings.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            nested[key] = value
    return FederateConfig.from_dict(nested)


def write_app(config: FederateConfig, directory: str | Path) -> Path:
    """Write the Flower App project for `config` into `directory`; return its pyproject.toml."""
    if config.min_clients is None:
        raise OffsiteError("--write-app: give --min-clients N, the number of data owners' SuperNodes to train with")
    if config.client_data:
        raise OffsiteError("--write-app: --client-data is each data owner's own setting in a deployment (their "
                           "SuperNode's --node-config); drop it")
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "offsite-federation", "version": __version__, "license": "Apache-2.0",
                    "description": "An offsite federation: one adapter trained over many data owners' data",
                    "dependencies": [f"offsite=={__version__}"]},
        "tool": {"flwr": {"app": {
            "publisher": "offsite",
            "components": {"serverapp": "offsite.federation.app:server_app",
                           "clientapp": "offsite.federation.app:client_app"},
            "config": run_config(config),
        }}},
    }
    root = check_output_dir(directory, config.overwrite, flag="--write-app", markers=(PROJECT,))
    with atomic_dir(root, config.overwrite, markers=(PROJECT,)) as tmp:
        (tmp / PROJECT).write_text(tomli_w.dumps(project))
    return root / PROJECT


server_app = ServerApp()


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    config = config_from_run(context.run_config)
    check_output_dir(config.output, config.overwrite, inputs=tuple(p for p in (config.bundle, config.model,
                                                                               config.eval_data) if p))
    with atomic_dir(config.output, config.overwrite) as tmp:
        Server(config, tmp).run(grid, context)


client_app = make_client_app(deployed_node)

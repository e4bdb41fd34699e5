"""Starting the service: customers added from the command line, then uvicorn on the configured address."""

from __future__ import annotations

import logging

from offsite.config import LOOPBACK, ServeConfig
from offsite.service.server import Service, create_app
from offsite.service.state import ServiceState

log = logging.getLogger(__name__)


def add_customer(state: str, name: str) -> str:
    """Register a customer in the service's state; its token (shown once)."""
    service_state = ServiceState(state)
    try:
        return service_state.add_customer(name)
    finally:
        service_state.close()


def serve(config: ServeConfig) -> None:
    """Load the full model and every registered adapter, then answer requests until interrupted."""
    import uvicorn  # noqa: PLC0415 - the server's runtime, only for this command

    if config.host not in LOOPBACK and config.ssl_certfile is None:
        log.warning("listening on %s without TLS: tokens and adapters cross the network in the clear; "
                    "give --ssl-certfile and --ssl-keyfile", config.host)
    service = Service(config)
    try:
        uvicorn.run(create_app(service), host=config.host, port=config.port, ssl_certfile=config.ssl_certfile,
                    ssl_keyfile=config.ssl_keyfile, log_level="warning")
    finally:
        service.close()

"""Running the app under uvicorn: one process, one event loop, graceful shutdown on SIGTERM.

On SIGTERM uvicorn stops accepting connections and waits (up to
`shutdown_timeout_s`) for in-flight requests; the lifespan's shutdown then lets
the batcher answer what it still holds. Scale out with more replicas, not
workers: each process holds its own model and thread pool.
"""

from __future__ import annotations

import logging

import uvicorn

from serving.app import create_app
from serving.logs import configure_logging
from serving.settings import Settings

log = logging.getLogger(__name__)


def server_config(settings: Settings, log_level: str = "INFO") -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # logging is configured by configure_logging
        log_level=log_level.lower(),
        access_log=False,  # the app logs requests with their id
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)),
        server_header=False,
    )


def run(settings: Settings, log_level: str = "INFO") -> None:
    configure_logging(log_level, as_json=settings.log_json)
    log.info(
        "serving %s on %s:%d",
        settings.bundle or f"{settings.artifacts}/LATEST",
        settings.host,
        settings.port,
    )
    uvicorn.Server(server_config(settings, log_level)).run()

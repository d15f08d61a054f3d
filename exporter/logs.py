"""Logging set-up: structlog JSON lines (or console rendering) on stdout, in one place.

Standard-library loggers (aiohttp, botocore) are routed through the same renderer so stdout
stays one JSON object per line. botocore is held at WARNING whatever the level: at DEBUG it
logs canonical requests and SigV4 signatures, which must never reach a log.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from exporter.auth import silence_botocore_debug

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """(Re)configure structlog and the standard library; safe to call again on reload."""
    out = stream if stream is not None else sys.stdout
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(LEVELS[level], logging.INFO))
    silence_botocore_debug()
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

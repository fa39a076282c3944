"""structlog set-up: a console renderer on a TTY, JSON lines otherwise.

Call :func:`configure_logging` once per process at the entry point. Records from
stdlib loggers (transformers, watchdog, zarr) go through the same processors, so a
daemon writes one JSON object per line whatever library logged it.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

__all__ = ["configure_logging"]


def configure_logging(
    level: str = "INFO",
    *,
    renderer: Literal["auto", "console", "json"] = "auto",
    stream=None,
) -> None:
    """Route structlog and stdlib logging to ``stream`` (default stderr).

    Args:
        level: minimum level name, for example "INFO" or "DEBUG".
        renderer: "console" for humans, "json" for machines; "auto" picks console
            when ``stream`` is a TTY.
        stream: text stream to write to; default ``sys.stderr``.
    """
    stream = sys.stderr if stream is None else stream
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level '{level}': use DEBUG, INFO, WARNING or ERROR")

    if renderer == "auto":
        renderer = "console" if stream.isatty() else "json"
    if renderer == "console":
        # The console renderer formats tracebacks itself.
        final = [structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    else:
        final = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]

    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *final,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric_level)

"""Operational logs: structlog JSON lines on stderr. They carry names and counts, never field values."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog


def _dumps(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def configure(level: str = "info") -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Third-party loggers (pycasbin logs whole requests at INFO) stay at WARNING.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("casbin").setLevel(logging.ERROR)
    # asyncpg's pool logs each failed reconnect with a traceback; the keystore's own errors say it in one line.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)

"""The SIEM copy of the trail: one JSON line per record through structlog, to a file or to stdout.

It is a copy for monitoring, not the evidence: the durable trail (proxy.audit.trail) is what
`fieldguard audit verify` checks. Checkpoints are copied too, so an anchor is kept outside this host.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import orjson
import structlog

from proxy.audit.record import AuditRecord


def _dumps(value: Any, **_: Any) -> str:
    return orjson.dumps(value).decode()


class JsonLinesTrail:
    """One JSON line per record, for a SIEM: to a file or to stdout ("-")."""

    def __init__(self, target: str) -> None:
        self._own = target not in ("-", "")
        if self._own:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        self._out: TextIO = Path(target).open("a", encoding="utf-8") if self._own else sys.stdout  # noqa: SIM115
        self._log = structlog.wrap_logger(
            structlog.WriteLogger(self._out),
            processors=[structlog.processors.JSONRenderer(serializer=_dumps)],
        )

    def append(self, record: AuditRecord) -> None:
        self._log.msg("access", **record.as_dict())
        self._out.flush()

    def append_bodies(self, bodies: list[bytes]) -> None:
        """Records already rendered as canonical JSON (the durable trail's bodies): one write for a batch."""
        self._out.write("".join('{"event":"access",' + b[1:].decode() + "\n" for b in bodies))
        self._out.flush()

    def checkpoint(self, fields: dict[str, object]) -> None:
        """A copy of each signed checkpoint for the SIEM: an anchor kept outside this host."""
        self._log.msg("audit checkpoint", **fields)
        self._out.flush()

    def close(self) -> None:
        if self._own:
            self._out.close()


class MultiTrail:
    """The same lines to several places (the demo: a file and the terminal)."""

    def __init__(self, trails: Iterable[JsonLinesTrail]) -> None:
        self._trails = list(trails)

    def append(self, record: AuditRecord) -> None:
        for trail in self._trails:
            trail.append(record)

    def append_bodies(self, bodies: list[bytes]) -> None:
        for trail in self._trails:
            trail.append_bodies(bodies)

    def checkpoint(self, fields: dict[str, object]) -> None:
        for trail in self._trails:
            trail.checkpoint(fields)

    def close(self) -> None:
        for trail in self._trails:
            trail.close()


Siem = JsonLinesTrail | MultiTrail


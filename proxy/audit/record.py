"""The audit record: one per request, built explicitly, holding names and never values.

Who (user, active role, roles), why (purpose of use), what (method, route template, status), which
clients (by pseudonym, never the CRM id), which field classes and paths were shown, pseudonymised,
masked, removed or refused, which rule decided, and under which policy hash. Field values, request
and response bodies and whole tokens never enter it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import orjson


@dataclass(slots=True)
class AuditRecord:
    request_id: str
    method: str
    caller_request_id: str | None = None  # the caller's own X-Request-Id, if they sent one
    peer: str | None = None  # the address the request came from (the proxy's, behind one)
    seq: int | None = None  # position in the durable trail, set when committed
    started: float = field(default_factory=time.time)
    user: str | None = None
    role: str | None = None
    roles: list[str] = field(default_factory=list)
    purpose: str | None = None
    token_id: str | None = None
    route: str | None = None  # the route template, never the concrete path (it holds ids)
    status: int = 0
    outcome: str = "allowed"  # allowed | denied | error
    reason: str | None = None
    clients: list[str] = field(default_factory=list)  # pseudonyms
    relations: list[str] = field(default_factory=list)
    shown: dict[str, list[str]] = field(default_factory=dict)
    pseudonymised: dict[str, list[str]] = field(default_factory=dict)
    masked: dict[str, list[str]] = field(default_factory=dict)
    removed: dict[str, list[str]] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)  # map paths a write changed
    reclassified: list[str] = field(default_factory=list)  # flags a write set (they decide other fields' class)
    refused: list[str] = field(default_factory=list)  # fields a write was refused for
    unclassified: list[str] = field(default_factory=list)
    rows_dropped: int = 0
    rules: list[str] = field(default_factory=list)
    policy: str = ""
    break_glass: str | None = None
    rectification: str | None = None  # the client's correction request a write applied (Art. 16)
    disclosure: dict[str, Any] | None = None  # a release outside the service: grant, recipient, basis, what, told
    consent: dict[str, Any] | None = None  # a consent recorded or withdrawn: what, to whom, why, until when
    cover: list[dict[str, str]] = field(default_factory=list)  # cover grants that decided: id and reason
    key_ids: list[str] = field(default_factory=list)
    decrypt_failures: list[str] = field(default_factory=list)  # "resource.path: reason", never the ciphertext
    counts: dict[str, int] = field(default_factory=dict)  # operations on many records (keys, migration)
    about: dict[str, str] | None = None  # an officer's explain: the role, user and route it answered for
    shadow: list[str] | None = None  # shadow mode: what the candidate policy would have decided differently
    shadow_policy: str | None = None
    upstream_status: int | None = None
    amends: str | None = None  # a correction: that request's response was withheld after its record was queued
    duration_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """A shallow view for serialising (dataclasses.asdict deep-copies: 50 µs a record here)."""
        data = {name: getattr(self, name) for name in _FIELDS}
        data["time"] = datetime.fromtimestamp(self.started, UTC).isoformat(timespec="milliseconds")
        return data

    def encode(self) -> bytes:
        """The record as canonical JSON, without its sequence number (the trail's writer puts it first). Done
        on the event loop, before the record is queued: what reaches the writer thread is bytes, never an
        object, and a value that cannot be encoded is made printable here rather than stopping the trail."""
        data = self.as_dict()
        del data["seq"]
        try:
            return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
        except TypeError:
            return orjson.dumps(_printable(data), option=orjson.OPT_SORT_KEYS)


_FIELDS = tuple(f.name for f in fields(AuditRecord) if f.name != "started")


def _printable(value: Any) -> Any:
    """Every string encodable as UTF-8 (a lone surrogate becomes U+FFFD); anything else as its text."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return _printable(str(value))

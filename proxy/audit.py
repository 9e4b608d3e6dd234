"""The audit record: one per request, built explicitly, holding names and never values.

Who (user, active role, roles), why (purpose of use), what (method, route template, status), which
clients (by pseudonym, never the CRM id), which field classes and paths were shown, pseudonymised,
masked, removed or refused, which rule decided, and under which policy hash. Field values, request
and response bodies and whole tokens never enter it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

import orjson
import structlog

from proxy.decision import Outcome, Relation


class Note:
    """One (outcome, field class, path) a response disclosed. Compared by identity: the redaction plans
    make each once, so noting it per row is a set insertion with no hashing of strings or enums."""

    __slots__ = ("field_class", "outcome", "path")

    def __init__(self, outcome: Outcome, field_class: str, path: str) -> None:
        self.outcome = outcome
        self.field_class = field_class
        self.path = path


_NOTES: dict[tuple[Outcome, str, str], Note] = {}


def note_of(outcome: Outcome, field_class: str, path: str) -> Note:
    """The one `Note` for these names (paths come from the field map, so there are few of them)."""
    found = _NOTES.get((outcome, field_class, path))
    if found is None:
        if len(_NOTES) > 100_000:
            _NOTES.clear()
        found = _NOTES[(outcome, field_class, path)] = Note(outcome, field_class, path)
    return found


@dataclass(slots=True)
class Disclosure:
    """What one response revealed, gathered while it is rewritten."""

    notes: set[Note] = field(default_factory=set)
    unclassified: set[str] = field(default_factory=set)
    clients: dict[str, Relation] = field(default_factory=dict)
    dropped_rows: int = 0
    key_ids: set[str] = field(default_factory=set)
    failures: set[str] = field(default_factory=set)  # "session_note.body: key belongs to another client"

    def note(self, outcome: Outcome, field_class: str, path: str) -> None:
        self.notes.add(note_of(outcome, field_class, path))


@dataclass(frozen=True, slots=True)
class Summary:
    """What a set of notes comes to in an audit record: class -> sorted paths per outcome, and the rules
    that decided. Summaries are cached and shared between records, so nothing may change one."""

    shown: dict[str, list[str]]
    pseudonymised: dict[str, list[str]]
    masked: dict[str, list[str]]
    removed: dict[str, list[str]]
    rules: list[str]

    @classmethod
    def of(cls, notes: Iterable[Note], rules: Iterable[str]) -> Summary:
        gathered: dict[Outcome, dict[str, set[str]]] = {o: {} for o in Outcome}
        for n in notes:
            gathered[n.outcome].setdefault(n.field_class, set()).add(n.path)
        done = {o: {c: sorted(p) for c, p in sorted(by_class.items())} for o, by_class in gathered.items()}
        return cls(done[Outcome.CLEAR], done[Outcome.PSEUDONYM], done[Outcome.MASK], done[Outcome.REMOVE],
                   sorted(rules))


_LABELS = {r: r.label for r in (Relation(bits) for bits in range(1 << len(Relation)))}


@dataclass(slots=True)
class AuditRecord:
    request_id: str
    method: str
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
    refused: list[str] = field(default_factory=list)  # fields a write was refused for
    unclassified: list[str] = field(default_factory=list)
    rows_dropped: int = 0
    rules: list[str] = field(default_factory=list)
    policy: str = ""
    break_glass: str | None = None
    key_ids: list[str] = field(default_factory=list)
    decrypt_failures: list[str] = field(default_factory=list)  # "resource.path: reason", never the ciphertext
    counts: dict[str, int] = field(default_factory=dict)  # operations on many records (keys, migration)
    shadow: list[str] | None = None  # shadow mode: what the candidate policy would have decided differently
    shadow_policy: str | None = None
    upstream_status: int | None = None
    duration_ms: float = 0.0

    def add_disclosure(self, d: Disclosure, summary: Summary, pseudonyms: dict[str, str]) -> None:
        self.shown = summary.shown
        self.pseudonymised = summary.pseudonymised
        self.masked = summary.masked
        self.removed = summary.removed
        self.rules = summary.rules
        self.unclassified = sorted(d.unclassified)
        self.clients = sorted({pseudonyms.get(c, "unresolved") for c in d.clients})
        self.relations = sorted({_LABELS[r] for r in set(d.clients.values())})
        self.rows_dropped = d.dropped_rows
        self.key_ids = sorted(d.key_ids)
        self.decrypt_failures = sorted(d.failures)

    def as_dict(self) -> dict[str, Any]:
        """A shallow view for serialising (dataclasses.asdict deep-copies: 50 µs a record here)."""
        data = {name: getattr(self, name) for name in _FIELDS}
        data["time"] = datetime.fromtimestamp(self.started, UTC).isoformat(timespec="milliseconds")
        return data


_FIELDS = tuple(f.name for f in fields(AuditRecord) if f.name != "started")


def _dumps(value: Any, **_: Any) -> str:
    return orjson.dumps(value).decode()


class AuditTrail(Protocol):
    """Where audit records go. `append` returns only once the record is as durable as the trail promises."""

    async def open(self) -> None: ...

    async def append(self, record: AuditRecord) -> None: ...

    async def close(self) -> None: ...


class JsonLinesTrail:
    """One JSON line per record through structlog, for a SIEM: to a file or to stdout."""

    def __init__(self, target: str) -> None:
        self._own = target not in ("-", "")
        if self._own:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        self._out: TextIO = Path(target).open("a", encoding="utf-8") if self._own else sys.stdout  # noqa: SIM115
        self._log = structlog.wrap_logger(
            structlog.WriteLogger(self._out),
            processors=[structlog.processors.JSONRenderer(serializer=_dumps)],
        )

    async def open(self) -> None:
        return None

    async def append(self, record: AuditRecord) -> None:
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

    async def close(self) -> None:
        if self._own:
            self._out.close()


class MultiTrail:
    def __init__(self, trails: Iterable[JsonLinesTrail]) -> None:
        self._trails = list(trails)

    async def open(self) -> None:
        return None

    def checkpoint(self, fields: dict[str, object]) -> None:
        for trail in self._trails:
            trail.checkpoint(fields)

    async def append(self, record: AuditRecord) -> None:
        for trail in self._trails:
            await trail.append(record)

    def append_bodies(self, bodies: list[bytes]) -> None:
        for trail in self._trails:
            trail.append_bodies(bodies)

    async def close(self) -> None:
        for trail in self._trails:
            await trail.close()

"""Need-to-know relations: how a caller stands to a client (caseload, supervision, cover, self).

Caseload and supervision are facts of the CRM (the client's assigned counsellor, the counsellor's
supervisor); the gateway reads them from the CRM's own API and refreshes them, rather than copying
one policy row per client. Cover is a grant the gateway keeps itself, with a start and an end, because
Casbin's conditional role links break ordinary role checks in pycasbin 2.8.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from proxy.policy.decision import Relation
from proxy.policy.fieldmap import RelationSource
from proxy.policy.yamlfile import MapError, line_of, load_yaml

log = structlog.get_logger("fieldguard.relations")

FetchJson = Callable[[str, Mapping[str, str]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class CoverGrant:
    """A time-boxed grant: `user` covers the caseload of `covers` from `start` until `until` (UTC)."""

    user: str
    covers: str
    start: datetime
    until: datetime
    reason: str
    source: str

    def active(self, now: datetime) -> bool:
        return self.start <= now < self.until


def parse_cover(text: str, file: str = "cover.yaml") -> tuple[CoverGrant, ...]:
    doc = load_yaml(text, file) or {}
    if not isinstance(doc, dict) or set(doc) - {"grants"}:
        raise MapError(1, "expected a mapping with 'grants'", file)
    grants = doc.get("grants") or []
    if not isinstance(grants, list):
        raise MapError(line_of(doc, "grants"), "grants must be a list", file)
    out: list[CoverGrant] = []
    for g in grants:
        line = g.line if hasattr(g, "line") else None
        if not isinstance(g, dict) or set(g) != {"user", "covers", "from", "until", "reason"}:
            raise MapError(line, "a grant needs exactly user, covers, from, until, reason", file)
        start, until = _when(g["from"], line, file), _when(g["until"], line, file)
        if until <= start:
            raise MapError(line, "grant ends before it starts", file)
        if not str(g["reason"]).strip():
            raise MapError(line, "a grant needs a reason", file)
        out.append(CoverGrant(str(g["user"]), str(g["covers"]), start, until, str(g["reason"]), f"{file}:{line}"))
    return tuple(out)


def _when(value: Any, line: int | None, file: str) -> datetime:
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            raise MapError(line, f"{value!r} is not an ISO 8601 time", file) from None
    if moment.tzinfo is None:
        raise MapError(line, "times need a zone (e.g. 2026-11-30T17:00:00Z)", file)
    return moment.astimezone(UTC)


@dataclass(slots=True)
class RelationIndex:
    """Client -> assigned counsellor and counsellor -> supervisor, read from the CRM."""

    counsellor_of: dict[str, str] = field(default_factory=dict)
    supervisor_of: dict[str, str] = field(default_factory=dict)
    caseloads: dict[str, set[str]] = field(default_factory=dict)
    synced_at: float | None = None
    last_error: str | None = None

    def observe(self, client_id: str, counsellor: Any) -> bool:
        """Refresh one client's assignment from a record the CRM just returned; True if it changed."""
        new = counsellor if isinstance(counsellor, str) and counsellor else None
        old = self.counsellor_of.get(client_id)
        if old == new:
            return False
        if old is not None:
            self.caseloads.get(old, set()).discard(client_id)
            del self.counsellor_of[client_id]
        if new is not None:
            self.counsellor_of[client_id] = new
            self.caseloads.setdefault(new, set()).add(client_id)
        return True

    def forget(self, client_id: str) -> None:
        self.observe(client_id, None)

    def relations(self, user: str, own_client: str | None, client_id: str, cover: Iterable[CoverGrant],
                  now: datetime) -> Relation:
        """How `user` (as the CRM knows them; `own_client` for a client) stands to `client_id`."""
        counsellor = self.counsellor_of.get(client_id)
        return self.relations_with(user, own_client, client_id, [counsellor] if counsellor else [], cover, now)

    def relations_with(self, user: str, own_client: str | None, client_id: str | None, counsellors: Iterable[str],
                       cover: Iterable[CoverGrant], now: datetime) -> Relation:
        """How `user` would stand to a client assigned to `counsellors`: what a new client's record, or a
        reassignment, establishes, decided before the CRM sees it."""
        rels = Relation.ANY
        if own_client is not None and own_client == client_id:
            rels |= Relation.SELF
        grants = list(cover)
        for counsellor in counsellors:
            if counsellor == user:
                rels |= Relation.CASELOAD
            if self.supervisor_of.get(counsellor) == user:
                rels |= Relation.SUPERVISION
            if any(g.user == user and g.covers == counsellor and g.active(now) for g in grants):
                rels |= Relation.COVER
        return rels

    def clients_for(
        self, user: str, own_client: str | None, wanted: Relation, cover: Iterable[CoverGrant], now: datetime
    ) -> set[str]:
        """Every client to whom `user` holds one of the `wanted` relations: the rows a list may show."""
        found: set[str] = set()
        if Relation.SELF in wanted and own_client is not None:
            found.add(own_client)
        counsellors: set[str] = set()
        if Relation.CASELOAD in wanted:
            counsellors.add(user)
        if Relation.SUPERVISION in wanted:
            counsellors.update(c for c, s in self.supervisor_of.items() if s == user)
        if Relation.COVER in wanted:
            counsellors.update(g.covers for g in cover if g.user == user and g.active(now))
        for c in counsellors:
            found.update(self.caseloads.get(c, ()))
        return found

    async def sync(self, source: RelationSource, items_key: str, fetch: FetchJson) -> None:
        """Re-read every assignment from the CRM; swap in the new facts only when the walk completes."""
        started = time.monotonic()
        counsellor_of: dict[str, str] = {}
        supervisor_of: dict[str, str] = {}
        async for row in _walk(source, source.clients_path, items_key, fetch):
            cid, who = row.get(source.client_id), row.get(source.counsellor)
            if cid is not None and isinstance(who, str) and who:
                counsellor_of[str(cid)] = who
        async for row in _walk(source, source.staff_path, items_key, fetch):
            user, sup = row.get(source.staff_user), row.get(source.supervisor)
            if isinstance(user, str) and isinstance(sup, str) and sup:
                supervisor_of[user] = sup
        caseloads: dict[str, set[str]] = {}
        for cid, who in counsellor_of.items():
            caseloads.setdefault(who, set()).add(cid)
        changed = (len(counsellor_of), len(supervisor_of)) != (len(self.counsellor_of), len(self.supervisor_of))
        (log.info if changed or self.synced_at is None else log.debug)(
            "relations synced", clients=len(counsellor_of), staff=len(supervisor_of),
            seconds=round(time.monotonic() - started, 3))
        self.counsellor_of, self.supervisor_of, self.caseloads = counsellor_of, supervisor_of, caseloads
        self.synced_at = time.time()
        self.last_error = None


async def _walk(source: RelationSource, path: str, items_key: str, fetch: FetchJson) -> Any:
    page = 1
    previous: list[Any] | None = None
    while True:
        body = await fetch(path, {source.page_param: str(page), source.size_param: str(source.page_size)})
        rows = body if items_key == "." else (body.get(items_key) if isinstance(body, dict) else None)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: the CRM did not answer with a list")
        if rows and rows == previous:  # a CRM that ignores the page parameter would be walked for ever
            raise ValueError(f"{path}: page {page} repeats page {page - 1}; relations.page_param "
                             f"({source.page_param!r}) is not this CRM's paging parameter")
        for row in rows:
            if isinstance(row, dict):
                yield row
        if len(rows) < source.page_size:
            return
        previous = rows
        page += 1
        if page > 100_000:
            raise ValueError(f"{path}: too many pages")

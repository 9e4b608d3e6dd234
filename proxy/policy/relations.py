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
    source: str  # "cover.yaml:12"
    grant_id: str = ""  # the officer's reference for it (`id:`), else its source

    def active(self, now: datetime) -> bool:
        return self.start <= now < self.until

    @property
    def name(self) -> str:
        return self.grant_id or self.source


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
        if not isinstance(g, dict) or set(g) - {"id"} != {"user", "covers", "from", "until", "reason"}:
            raise MapError(line, "a grant needs exactly user, covers, from, until, reason (and may have an id)", file)
        start, until = _when(g["from"], line, file), _when(g["until"], line, file)
        if until <= start:
            raise MapError(line, "grant ends before it starts", file)
        if not str(g["reason"]).strip():
            raise MapError(line, "a grant needs a reason", file)
        out.append(CoverGrant(str(g["user"]), str(g["covers"]), start, until, str(g["reason"]), f"{file}:{line}",
                              str(g.get("id") or "")))
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


def assigned_ids(value: Any) -> list[str]:
    """One id or a list of ids, as the CRM keeps them; anything else is no id (fail closed)."""
    values = value if isinstance(value, list) else [value]
    return [str(v) for v in values if (isinstance(v, str) and v) or (isinstance(v, int) and not isinstance(v, bool))]


@dataclass(slots=True)
class RelationIndex:
    """The need-to-know facts read from the CRM: each client's practitioners (their caseload), each
    practitioner's supervisors, and, where callers are matched to staff by another key (an e-mail), that
    key's staff id."""

    counsellor_of: dict[str, frozenset[str]] = field(default_factory=dict)  # client -> practitioners
    supervisors_of: dict[str, frozenset[str]] = field(default_factory=dict)  # practitioner -> supervisors
    caseloads: dict[str, set[str]] = field(default_factory=dict)  # practitioner -> clients
    staff_ids: dict[str, str] | None = None  # staff_match value -> staff id (None: the caller's id is it)
    staff_rows: int = 0
    supervision_links: int = 0
    cover: tuple[CoverGrant, ...] = ()  # grants the CRM keeps (relations.cover_path), besides cover.yaml
    synced_at: float | None = None

    def observe(self, client_id: str, practitioners: Any) -> bool:
        """Refresh one client's assignment from a record the CRM just returned; True if it changed."""
        new = frozenset(assigned_ids(practitioners))
        old = self.counsellor_of.get(client_id, frozenset())
        if old == new:
            return False
        for who in old - new:
            self.caseloads.get(who, set()).discard(client_id)
        for who in new - old:
            self.caseloads.setdefault(who, set()).add(client_id)
        if new:
            self.counsellor_of[client_id] = new
        else:
            self.counsellor_of.pop(client_id, None)
        return True

    def forget(self, client_id: str) -> None:
        self.observe(client_id, None)

    def staff_id(self, user: str | None) -> str | None:
        """The caller's staff id in the CRM (None: no staff row matches them; they hold no staff relation)."""
        if user is None:
            return None
        return user if self.staff_ids is None else self.staff_ids.get(user)

    def relations(self, user: str | None, own_client: str | None, client_id: str, cover: Iterable[CoverGrant],
                  now: datetime) -> Relation:
        """How `user` (as the CRM knows them; `own_client` for a client) stands to `client_id`."""
        return self.relations_with(user, own_client, client_id, self.counsellor_of.get(client_id, ()), cover, now)

    def relations_with(self, user: str | None, own_client: str | None, client_id: str | None,
                       counsellors: Iterable[str], cover: Iterable[CoverGrant], now: datetime) -> Relation:
        """How `user` would stand to a client assigned to `counsellors`: what a new client's record, or a
        reassignment, establishes, decided before the CRM sees it."""
        rels = Relation.ANY
        if own_client is not None and own_client == client_id:
            rels |= Relation.SELF
        staff = self.staff_id(user)
        if staff is None:
            return rels
        grants = list(cover)
        for counsellor in counsellors:
            if counsellor == staff:
                rels |= Relation.CASELOAD
            if staff in self.supervisors_of.get(counsellor, ()):
                rels |= Relation.SUPERVISION
            if any(g.user == staff and g.covers == counsellor and g.active(now) for g in grants):
                rels |= Relation.COVER
        return rels

    def cover_grants(self, user: str | None, client_id: str, cover: Iterable[CoverGrant],
                     now: datetime) -> list[CoverGrant]:
        """The active grants through which `user` covers `client_id`: named in the audit record they decide."""
        staff = self.staff_id(user)
        practitioners = self.counsellor_of.get(client_id, frozenset())
        return [g for g in cover if g.user == staff and g.covers in practitioners and g.active(now)]

    def clients_for(
        self, user: str | None, own_client: str | None, wanted: Relation, cover: Iterable[CoverGrant], now: datetime
    ) -> set[str]:
        """Every client to whom `user` holds one of the `wanted` relations: the rows a list may show."""
        found: set[str] = set()
        if Relation.SELF in wanted and own_client is not None:
            found.add(own_client)
        staff = self.staff_id(user)
        if staff is None:
            return found
        counsellors: set[str] = set()
        if Relation.CASELOAD in wanted:
            counsellors.add(staff)
        if Relation.SUPERVISION in wanted:
            counsellors.update(c for c, s in self.supervisors_of.items() if staff in s)
        if Relation.COVER in wanted:
            counsellors.update(g.covers for g in cover if g.user == staff and g.active(now))
        for c in counsellors:
            found.update(self.caseloads.get(c, ()))
        return found

    async def sync(self, source: RelationSource, items_key: str, fetch: FetchJson) -> None:
        """Re-read every assignment from the CRM; swap in the new facts only when the walk completes."""
        started = time.monotonic()
        counsellor_of: dict[str, set[str]] = {}
        if source.caseload_path:
            async for row in _walk(source, source.caseload_path, items_key, fetch):
                practitioners = assigned_ids(row.get(source.caseload_practitioner))
                for cid in assigned_ids(row.get(source.caseload_client)):
                    counsellor_of.setdefault(cid, set()).update(practitioners)
        if source.clients_path and source.counsellor:
            async for row in _walk(source, source.clients_path, items_key, fetch):
                for cid in assigned_ids(row.get(source.client_id)):
                    counsellor_of.setdefault(cid, set()).update(assigned_ids(row.get(source.counsellor)))
        supervisors_of: dict[str, set[str]] = {}
        staff_ids: dict[str, str] | None = {} if source.staff_match and source.staff_match != source.staff_user \
            else None
        staff_rows = 0
        if source.staff_path and (source.supervisor or source.supervises or staff_ids is not None):
            async for row in _walk(source, source.staff_path, items_key, fetch):
                staff_rows += 1
                me = assigned_ids(row.get(source.staff_user))
                if not me:
                    continue
                if staff_ids is not None:
                    for key in assigned_ids(row.get(source.staff_match)):
                        staff_ids[key] = me[0]
                if source.supervisor:
                    supervisors_of.setdefault(me[0], set()).update(assigned_ids(row.get(source.supervisor)))
                if source.supervises:
                    for supervisee in assigned_ids(row.get(source.supervises)):
                        supervisors_of.setdefault(supervisee, set()).add(me[0])
        if source.supervision_path:
            async for row in _walk(source, source.supervision_path, items_key, fetch):
                supervisors = assigned_ids(row.get(source.supervision_supervisor))
                for supervisee in assigned_ids(row.get(source.supervision_supervisee)):
                    supervisors_of.setdefault(supervisee, set()).update(supervisors)
        cover: list[CoverGrant] = []
        if source.cover_path:
            async for row in _walk(source, source.cover_path, items_key, fetch):
                grant = _cover_row(source, row)
                if grant is not None:
                    cover.append(grant)
        assigned = {c: frozenset(p) for c, p in counsellor_of.items() if p}
        supervised = {s: frozenset(p) for s, p in supervisors_of.items() if p}
        caseloads: dict[str, set[str]] = {}
        for cid, assignees in assigned.items():
            for who in assignees:
                caseloads.setdefault(who, set()).add(cid)
        links = sum(len(s) for s in supervised.values())
        counts = (len(assigned), staff_rows, links)
        first = self.synced_at is None
        (log.info if first or counts != (len(self.counsellor_of), self.staff_rows, self.supervision_links)
         else log.debug)("relations synced", clients=len(assigned), staff=staff_rows, supervision_links=links,
                         seconds=round(time.monotonic() - started, 3))
        if first and not assigned:
            log.warning("relations matched no client: every decision that needs a relation is refused; "
                        "check relations.clients_path and relations.counsellor (or caseload_path)")
        self.counsellor_of, self.supervisors_of, self.caseloads = assigned, supervised, caseloads
        self.staff_ids, self.staff_rows, self.supervision_links = staff_ids, staff_rows, links
        self.cover = tuple(cover)
        self.synced_at = time.time()


def _cover_row(source: RelationSource, row: dict[str, Any]) -> CoverGrant | None:
    """A cover grant as the CRM keeps it; a row without a user, a covered practitioner, a reason, or valid
    times with a zone is no grant (fail closed)."""
    user, covers = assigned_ids(row.get(source.cover_user)), assigned_ids(row.get(source.cover_covers))
    reason = row.get(source.cover_reason)
    try:
        start = _when(row.get(source.cover_from), None, source.cover_path)
        until = _when(row.get(source.cover_until), None, source.cover_path)
    except MapError:
        return None
    if not user or not covers or not isinstance(reason, str) or not reason.strip() or until <= start:
        return None
    ref = row.get("id")
    where = f"{source.cover_path}/{ref}" if ref else source.cover_path
    return CoverGrant(user[0], covers[0], start, until, reason, where)


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

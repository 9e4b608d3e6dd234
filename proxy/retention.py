"""The retention engine: what of each client falls due under `retention.yaml`, and destroying it.

Every client is read from the CRM as a subject access export reads them (`proxy.release.gather`, every
class opened), so sealed dates and fields count. A client falls due when every client schedule that
applies to them has run out (`verdict`); a record schedule makes single records due (process notes at the
supervision session after them: `records_due`). Destroying a client (`destroy_client`, shared by erasure)
deletes their records through the CRM's DELETE routes, blanks their own record's fields through its PATCH
route except the classes `erasure.keep_classes` names, then shreds all their keys (the keystore's tombstone
stops any new key or pseudonym); destroying records deletes them and shreds (or rotates) the key scope they
were sealed under. Both are idempotent, so a run that stops part-way is resumed by running it again.
Nothing here decides who may: the commands do.
"""

from __future__ import annotations

import secrets
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx

from proxy.audit import AuditStore, is_shared, store_of
from proxy.config import Settings
from proxy.keys import KeyRing
from proxy.policy import FieldMap, PolicyBundle, Resource, RetentionRules, Schedule
from proxy.release import Gathered, Scope, crm_client, gather, walk
from proxy.routes import Shape


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a client is due, under which schedule, and until when they are kept."""

    client_id: str
    due: bool
    schedule: str | None  # the schedule that keeps them longest (or that made them due last)
    until: date | None  # None: kept with no end yet (an open case, no schedule, a hold)
    why: str
    blocks_erasure: str | None = None  # a legal minimum in force: "safeguarding (70 years from case_closed, ...)"
    held: bool = False  # kept by a legal hold or a restriction, whatever the schedules say


@dataclass(frozen=True, slots=True)
class RecordDue:
    resource: str
    record_id: str
    client_id: str
    schedule: str
    scope: str | None  # the key scope its record class is sealed under
    author: str | None


@dataclass(slots=True)
class Destruction:
    client_id: str
    keys_destroyed: list[str] = field(default_factory=list)
    deleted: dict[str, list[str]] = field(default_factory=dict)
    blanked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # what the CRM would not do: said, never hidden

    def as_dict(self) -> dict[str, Any]:
        return {"client": self.client_id, "keys_destroyed": self.keys_destroyed, "deleted": self.deleted,
                "blanked": self.blanked, "failed": self.failed}


def day_of(value: object) -> date | None:
    """The ISO date at the start of a value ("2026-11-03", "2026-11-03T10:00:00"), else None."""
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def value_at(row: Any, path: str) -> Any:
    for part in path.split("."):
        row = row.get(part) if isinstance(row, dict) else None
    return row


# ---------------------------------------------------------------------------------------------- reading
async def client_ids(settings: Settings, fm: FieldMap) -> list[str]:
    """Every client the CRM lists (the relations source's client list)."""
    source = fm.relations
    async with _crm(settings) as crm:
        rows, _ = await walk(crm, fm, source.clients_path, {})
    return [str(r[source.client_id]) for r in rows if r.get(source.client_id) is not None]


async def read_client(settings: Settings, fm: FieldMap, client_id: str, pseudonym: str, ring: KeyRing,
                      resources: frozenset[str] | None = None, crm: httpx.AsyncClient | None = None) -> Gathered:
    """The client's records (of these resources, or all), every class opened: what schedules decide on."""
    scope = Scope(client_id, pseudonym, tuple(fm.classes), resources=resources)
    return await gather(settings, fm, scope, ring, crm)


def record_resources(rules: RetentionRules, fm: FieldMap) -> frozenset[str]:
    """The resources the record schedules apply to: all a supervision session needs read."""
    return frozenset(r.name for r in fm.resources.values() if r.client_field is not None
                     and any(r.record_class in s.classes for s in rules.record_schedules))


def _crm(settings: Settings) -> httpx.AsyncClient:
    return crm_client(settings)


# ---------------------------------------------------------------------------------------------- deciding
def verdict(rules: RetentionRules, fm: FieldMap, client_id: str, found: Gathered, recorded: dict[str, str],
            as_of: date, held: str | None = None) -> Verdict:
    """The client schedules that apply to the client, and whether all have run out by `as_of`. `held` says
    why the client is kept whatever the schedules say (a legal hold, a restriction)."""
    own = (found.records.get(fm.client_resource.name) or [{}])[0]
    applying: list[tuple[Schedule, date | None]] = []
    for s in rules.client_schedules:
        if s.categories and str(own.get(rules.category_field or "")) not in s.categories:
            continue
        if s.holds is not None:
            resource, path, values = s.holds
            if not any(str(value_at(r, path)) in values for r in found.records.get(resource, [])):
                continue
        start = _event_date(rules, fm, s.event, own, found, recorded)
        applying.append((s, s.keep.after(start) if start is not None else None))
    legal = [f"{s.name} ({s.keep} from {s.event}, until {until or 'no end yet'})" for s, until in applying
             if s.blocks_erasure and (until is None or until > as_of)]
    blocks = legal[0] if legal else None
    if held is not None:
        return Verdict(client_id, False, None, None, held, blocks, held=True)
    if not applying:
        return Verdict(client_id, False, None, None, "no schedule applies: kept", blocks)
    open_ended = next(((s, u) for s, u in applying if u is None), None)
    if open_ended is not None:
        s = open_ended[0]
        return Verdict(client_id, False, s.name, None, f"{s.name}: no {s.event} date yet", blocks)
    s, until = max(applying, key=lambda pair: pair[1] or date.max)
    assert until is not None
    due = until <= as_of
    return Verdict(client_id, due, s.name, until, f"{s.name}: {s.keep} from {s.event}, "
                   f"{'due' if due else 'kept until'} {until}", blocks)


def _event_date(rules: RetentionRules, fm: FieldMap, name: str, own: dict[str, Any], found: Gathered,
                recorded: dict[str, str]) -> date | None:
    event = rules.events[name]
    if event.field is not None:
        return day_of(value_at(own, event.field))
    if event.recorded is not None:
        return day_of(recorded.get(event.recorded))
    dates = [d for r in event.latest_of for row in found.records.get(r, [])
             if (d := day_of(row.get(fm.resources[r].dated or ""))) is not None]
    return max(dates) if dates else None


def records_due(rules: RetentionRules, fm: FieldMap, client_id: str, found: Gathered,
                supervision: dict[str, list[str]], as_of: date, author: str | None = None) -> list[RecordDue]:
    """Records whose record schedule has run out by `as_of` (of one author only, when given)."""
    out: list[RecordDue] = []
    for s in rules.record_schedules:
        event = rules.events[s.event]
        for resource in fm.resources.values():
            if resource.record_class not in s.classes or resource.client_field is None:
                continue
            writer = next((p for p, how in resource.gateway_set.items() if how == "user"), None)
            for row in found.records.get(resource.name, []):
                by = str(row.get(writer)) if writer and row.get(writer) is not None else None
                if author is not None and by != author:
                    continue
                written = day_of(row.get(resource.dated or ""))
                if written is None:
                    continue  # undated: never destroyed by a record schedule
                if event.per_record == "next_supervision":
                    after = [day_of(d) for d in supervision.get(by or "", [])]
                    start = next((d for d in after if d is not None and d >= written), None)
                else:
                    start = written
                if start is not None and s.keep.after(start) <= as_of:
                    out.append(RecordDue(resource.name, str(row.get(resource.record_id or "id")), client_id, s.name,
                                         fm.classes[resource.record_class].key_scope, by))
    return out


# ---------------------------------------------------------------------------------------------- destroying
async def destroy_client(settings: Settings, bundle: PolicyBundle, ring: KeyRing, client_id: str, found: Gathered,
                         reason: str) -> Destruction:
    """Delete the client's records, blank their own record, then shred every key of theirs (see the module).
    The CRM goes first: if it fails part-way the keys are still there and running the step again finishes it."""
    fm = bundle.fieldmap
    out = Destruction(client_id)
    async with _crm(settings) as crm:  # the CRM first: a step that fails leaves the keys, so a rerun can finish
        for name, rows in found.records.items():
            resource = fm.resources[name]
            if name == fm.client_resource.name:
                continue
            for row in rows:
                rid = str(row.get(resource.record_id or "id"))
                if await _delete(crm, fm, resource, rid, out):
                    out.deleted.setdefault(name, []).append(rid)
        await _blank(crm, bundle, client_id, out)
    out.keys_destroyed = [k.hex_id for k in await ring.store.destroy(client_id, None, reason)]
    return out


async def destroy_records(settings: Settings, fm: FieldMap, ring: KeyRing, due: list[RecordDue], found: Gathered,
                          reason: str) -> Destruction:
    """Delete the due records of one client; shred the key scope they were sealed under when no other record
    of the client (in `found`) has a field sealed under it, else rotate it so that what is written next is
    sealed under a new key."""
    client_id = due[0].client_id
    out = Destruction(client_id)
    async with _crm(settings) as crm:
        for r in due:
            if await _delete(crm, fm, fm.resources[r.resource], r.record_id, out):
                out.deleted.setdefault(r.resource, []).append(r.record_id)
    gone = {(r.resource, r.record_id) for r in due}
    for scope in sorted({r.scope for r in due if r.scope is not None}):
        if _sealed_under(fm, found, scope) - gone:
            await ring.store.retire_active(client_id, scope)
        else:
            out.keys_destroyed += [k.hex_id for k in await ring.store.destroy(client_id, scope, reason)]
    return out


def _sealed_under(fm: FieldMap, found: Gathered, scope: str) -> set[tuple[str, str]]:
    """(resource, id) of the client's records with a field of a class sealed under `scope`."""
    out = set()
    for name, rows in found.records.items():
        resource = fm.resources[name]
        if any(fm.classes[c].key_scope == scope for c in resource.classes if c in fm.classes):
            out |= {(name, str(row.get(resource.record_id or "id"))) for row in rows}
    return out


async def _delete(crm: httpx.AsyncClient, fm: FieldMap, resource: Resource, record_id: str, out: Destruction) -> bool:
    route = next((r for r in fm.routes if r.resource == resource.name and r.method == "DELETE"
                  and r.shape is Shape.RECORD and len(r.params) == 1), None)
    if route is None:
        out.failed.append(f"{resource.name} {record_id}: the field map has no DELETE route (its keys are shredded)")
        return False
    answer = await crm.delete(route.render(route.template, {route.params[0][1]: record_id}))
    if answer.status_code in (200, 202, 204, 404):  # 404: gone already (a resumed run)
        return True
    out.failed.append(f"{resource.name} {record_id}: the CRM answered {answer.status_code} to DELETE")
    return False


async def _blank(crm: httpx.AsyncClient, bundle: PolicyBundle, client_id: str, out: Destruction) -> None:
    fm, keeps = bundle.fieldmap, bundle.retention.erasure_keeps
    resource = fm.client_resource
    route = next((r for r in fm.routes if r.resource == resource.name and r.method == "PATCH"
                  and [p[1] for p in r.params] == ["client_id"]), None)
    body: dict[str, Any] = {}
    for spec in resource.specs:
        if spec.field_class in keeps or (resource.client_field and spec.path == resource.client_field):
            continue
        top, _, rest = spec.path.partition(".")
        if top.endswith("[]"):
            body[top[:-2]] = []
        elif rest and not top.endswith("]"):
            body.setdefault(top, {})[rest] = None
        else:
            body[top.removesuffix("[]")] = None
        out.blanked.append(spec.path)
    if route is None:
        out.failed.append(f"{resource.name} {client_id}: the field map has no PATCH route: its fields are not blanked")
        out.blanked = []
        return
    answer = await crm.patch(route.render(route.template, {"client_id": client_id}), json=body)
    if answer.status_code >= 300:
        out.failed.append(f"{resource.name} {client_id}: the CRM answered {answer.status_code} to the blanking PATCH")
        out.blanked = []


# ---------------------------------------------------------------------------------------------- certificate
def certificate(kind: str, settings: Settings, bundle: PolicyBundle, destroyed: list[Destruction], **facts: Any
                ) -> dict[str, Any]:
    """A certificate of destruction: what, when, by whom, the key ids destroyed, and the trail's last signed
    checkpoint at the time (its size and head: a later verify shows the trail held this erasure)."""
    return {"certificate": "destruction", "id": "cd-" + secrets.token_hex(8), "kind": kind,
            "destroyed_at": datetime.now(UTC).isoformat(timespec="seconds"), "policy": bundle.digest, **facts,
            "clients": [d.as_dict() for d in destroyed], "trail": last_checkpoint(store_of(settings))}


def last_checkpoint(store: AuditStore) -> dict[str, Any] | None:
    """The trail's last signed checkpoint, for a certificate of destruction."""
    if is_shared(store):
        from proxy.audit.pgverify import last_seal

        last = last_seal(str(store))
        return None if last is None else {"size": last.size, "head": last.head.hex(), "time": last.time,
                                          "key_id": last.key_id}
    store = Path(store)
    if not store.exists():
        return None
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    try:
        row = conn.execute("SELECT size, head, time, key_id FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()
    finally:
        conn.close()
    return None if row is None else {"size": row[0], "head": bytes(row[1]).hex(), "time": row[2], "key_id": row[3]}

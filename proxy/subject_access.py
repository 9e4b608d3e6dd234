"""A client's own copy of what the service holds on them: subject access (UK GDPR Art. 15) and portability
(Art. 20).

The package is read from the CRM the way a disclosure is (`proxy.release.gather`), for a view in which every
class is shown in clear except those the field map marks `withheld_from_subject` (information from third
parties): their content is never in the package, only a note of what kind of information was left out and
why. To the records it adds the access history (who, role, when, why, what) and the disclosures the client
may be told of, from the audit trail. The portable copy is the part the client gave or that was observed of
them (classes not marked `portable: false`), as one JSON document of a documented shape and a CSV per
resource; it carries no access history.
"""

from __future__ import annotations

import asyncio
import calendar
import csv
import hashlib
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from proxy.asgi import Incoming, Reply
from proxy.audit import AuditRecord
from proxy.config import Settings
from proxy.errors import GatewayError
from proxy.identity import Principal
from proxy.keys import KeyRing
from proxy.policy import FieldMap, PolicyBundle
from proxy.release import ALWAYS, Gathered, Scope, failures_withheld, flat_fields, gather, withheld_text
from proxy.release import cell as cell_text
from proxy.runtime import Runtime

PORTABLE_FORMAT = "fieldguard-portable/1"


@dataclass(slots=True)
class Package:
    document: dict[str, Any]
    json_bytes: bytes
    html: str = ""
    csv: dict[str, bytes] = field(default_factory=dict)  # resource -> CSV, for the portable copy
    records: dict[str, list[str]] = field(default_factory=dict)  # resource -> record ids included

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.json_bytes).hexdigest()

    @property
    def count(self) -> int:
        return sum(len(ids) for ids in self.records.values())


def due_date(received: date) -> date:
    """One calendar month from the day of receipt (the ICO's rule): the same day of the next month, or that
    month's last day when it has no such day; a Saturday or Sunday moves to the Monday. Bank holidays are not
    known here: a service that closes on one counts it itself."""
    year, month = (received.year + 1, 1) if received.month == 12 else (received.year, received.month + 1)
    due = date(year, month, min(received.day, calendar.monthrange(year, month)[1]))
    while due.weekday() >= 5:
        due += timedelta(days=1)
    return due


def history(settings: Settings, pseudonym: str, public_key: Path | None = None) -> dict[str, Any]:
    """Who accessed the client's record, and what was disclosed of it, from the trail (verified first, as
    `audit report` verifies it). Operators' commands are not accesses to the record; a release outside the
    service is."""
    from proxy.audit import store_exists, store_of
    from proxy.audit.views import Integrity, Query, access_report, integrity_of, query

    store = store_of(settings)
    if not store_exists(store):
        return access_report([], pseudonym, Integrity(ok=False, problems=(f"no audit store at {store}",)))
    integrity = integrity_of(settings, store, public_key)
    found = query(store, Query(pseudonym=pseudonym, limit=1_000_000))
    records = [r for r in found.records if r.get("method") != "CLI" or r.get("route") == "disclose export"]
    return access_report(records, pseudonym, integrity, found.unreadable)


def shown_classes(fm: FieldMap, portable: bool) -> tuple[str, ...]:
    return tuple(name for name, c in fm.classes.items()
                 if not c.withheld_from_subject and (c.portable or not portable or name in ALWAYS))


async def package(settings: Settings, bundle: PolicyBundle, ring: KeyRing, client_id: str, pseudonym: str,
                  head: dict[str, Any], history: dict[str, Any] | None, *, portable: bool = False) -> Package:
    """The package for one client. `head` says which request it answers (reference, received, due, by);
    `history` is the access report of the audit trail (`proxy.audit.views.access_report`), left out of a
    portable copy."""
    fm = bundle.fieldmap
    found = await gather(settings, fm, Scope(client_id, pseudonym, shown_classes(fm, portable)), ring)
    ids = found.ids(fm)
    produced = datetime.now(UTC).isoformat(timespec="seconds")
    if portable:
        document: dict[str, Any] = {
            "format": PORTABLE_FORMAT, "client": client_id, "produced_at": produced, **head,
            "fields": _described(fm, found), "records": found.records,
        }
        data = orjson.dumps(document, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)
        return Package(document, data, csv={name: _csv(rows) for name, rows in found.records.items()}, records=ids)
    withheld = [*found.withheld, *_withheld_classes(fm, found), *failures_withheld(found)]
    document = {
        "subject_access": {"client": client_id, "produced_at": produced, "policy": bundle.digest, **head},
        "records": found.records, "record_ids": ids, "withheld": withheld,
        "access_history": (history or {}).get("accesses", []),
        "disclosures": (history or {}).get("disclosures", []),
        "trail": (history or {}).get("trail"), "warnings": (history or {}).get("warnings", []),
    }
    data = orjson.dumps(document, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)
    return Package(document, data, render_html(document), records=ids)


def _withheld_classes(fm: FieldMap, found: Gathered) -> list[dict[str, Any]]:
    """What was left out, by class: the paths and the field map's reason, never the content."""
    out = []
    for name, paths in found.removed.items():
        c = fm.classes.get(name)
        why = c.withheld_from_subject if c is not None and c.withheld_from_subject else "not held in a form "\
            "that can be given (unclassified)"
        out.append({"class": name, "paths": paths, "why": why})
    return out


def _described(fm: FieldMap, found: Gathered) -> dict[str, dict[str, str]]:
    """For the portable copy: each resource's fields and what they are (the class's description)."""
    out: dict[str, dict[str, str]] = {}
    for name, rows in found.records.items():
        resource = fm.resources[name]
        paths = {p for row in rows for p, _ in flat_fields(row)}
        specs = {s.path: s for s in resource.specs}
        out[name] = {}
        for path in sorted(paths):
            spec = specs.get(path) or specs.get(_generic(path))
            c = fm.classes.get(spec.field_class) if spec is not None else None
            out[name][path] = c.description or c.name if c is not None else ""
    return out


def _generic(path: str) -> str:
    """emergency_contacts[0].name -> emergency_contacts[].name, as the field map writes it."""
    out, i = [], 0
    while i < len(path):
        if path[i] == "[":
            j = path.index("]", i)
            out.append("[]")
            i = j + 1
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def _csv(rows: list[dict[str, Any]]) -> bytes:
    """One CSV of a resource's records: a column per field path, in the order first met."""
    columns: dict[str, None] = {}
    flat = []
    for row in rows:
        cells = dict(flat_fields(row))
        flat.append(cells)
        columns.update(dict.fromkeys(cells))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for cells in flat:
        writer.writerow([cell_text(cells.get(c)) for c in columns])
    return out.getvalue().encode()


# ---------------------------------------------------------------------------------------------- the page
_CSS = """body{font:11pt/1.4 Georgia,serif;margin:2cm;color:#111}h1{font-size:16pt}h2{font-size:13pt;
border-bottom:1px solid #999;margin-top:1.5em}table{border-collapse:collapse;width:100%;margin:.5em 0}
td,th{border:1px solid #bbb;padding:3px 6px;vertical-align:top;text-align:left}th{background:#eee}
.cover td:first-child{width:28%;font-weight:bold}.record{page-break-inside:avoid}.warning{border:2px solid #b00;
padding:6px}@media print{body{margin:1cm}.cover{page-break-after:always}}"""


def render_html(document: dict[str, Any]) -> str:
    """The client's printable copy: a cover (the request, its dates, what is included and what was left out
    and why), every record, then who accessed the record and what was disclosed."""
    e = html.escape
    head = document["subject_access"]
    cover = [("Client", head["client"]), ("Request", head.get("request") or "-"),
             ("Received", head.get("received") or "-"), ("Due", head.get("due") or "-"),
             ("Produced at", head["produced_at"]), ("Produced by", head.get("produced_by") or "-")]
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Your records</title>"
             f"<style>{_CSS}</style></head><body><section class=cover><h1>The records we hold about you</h1>",
             "<table>", *(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in cover), "</table>",
             "<h2>Included</h2><ul>",
             *([f"<li>{e(n)}: {len(ids)} record(s)</li>" for n, ids in document["record_ids"].items()]
               or ["<li>nothing</li>"]), "</ul><h2>Not included, and why</h2><ul>",
             *([f"<li>{e(withheld_text(w))}</li>" for w in document["withheld"]] or ["<li>nothing</li>"]),
             "</ul></section>"]
    for name, rows in document["records"].items():
        parts.append(f"<h2>{e(name)}</h2>")
        for row in rows:
            parts += ["<table class=record>",
                      *(f"<tr><th>{e(k)}</th><td>{e(cell_text(v))}</td></tr>" for k, v in flat_fields(row)),
                      "</table>"]
    parts += [f'<p class="warning" role="alert">{e(w)}</p>' for w in document.get("warnings") or []]
    parts.append("<h2>Who accessed your record</h2><table><tr><th>When</th><th>Who</th><th>Role</th><th>Why</th>"
                 "<th>What</th><th>Outcome</th><th>Shown</th></tr>")
    parts += ["<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in (
        a["when"], a["who"], a["role"], a["why"], a["action"], a["outcome"], ", ".join(a["shown"]) or "-")) + "</tr>"
        for a in document["access_history"]]
    parts.append("</table><h2>Shared outside the service</h2><table><tr><th>When</th><th>To</th><th>Basis</th>"
                 "<th>Reference</th><th>What</th></tr>")
    parts += ["<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in (
        d["when"], d["to"], d["basis"], d["reference"], ", ".join(d["classes"] or []))) + "</tr>"
        for d in document["disclosures"]]
    parts.append("</table></body></html>")
    return "".join(parts)


def render_pdf(document: dict[str, Any]) -> bytes:
    """The same package as a PDF: the cover, every record, who accessed the record, what was shared."""
    from proxy.printing import Bundle
    from proxy.printing import render_pdf as printed

    head = document["subject_access"]
    cover = [("Client", head["client"]), ("Request", head.get("request") or "-"),
             ("Received", head.get("received") or "-"), ("Due", head.get("due") or "-"),
             ("Produced at", head["produced_at"]), ("Produced by", head.get("produced_by") or "-")]
    history: list[Sequence[str]] = [
        (a["when"], a["who"], a["role"], a["why"], a["action"], a["outcome"], ", ".join(a["shown"]))
        for a in document["access_history"]]
    shared: list[Sequence[str]] = [(d["when"], d["to"], d["basis"], d["reference"], ", ".join(d["classes"] or []))
              for d in document["disclosures"]]
    return printed(Bundle(
        "The records we hold about you", [(k, str(v)) for k, v in cover],
        [f"{n}: {len(ids)} record(s)" for n, ids in document["record_ids"].items()],
        [withheld_text(w) for w in document["withheld"]],
        {name: [[(k, cell_text(v)) for k, v in flat_fields(row)] for row in rows]
         for name, rows in document["records"].items()},
        [("Who accessed your record", ("When", "Who", "Role", "Why", "What", "Outcome", "Shown"), history),
         ("Shared outside the service", ("When", "To", "Basis", "Reference", "What"), shared)],
        list(document.get("warnings") or [])))


# ---------------------------------------------------------------------------------------------- the route
async def own_copy(runtime: Runtime, req: Incoming, principal: Principal, bundle: PolicyBundle,
                   record: AuditRecord) -> Reply:
    """`GET /_fieldguard/subject-access[?format=html|portable]`: the client reads their own package with
    their own token (role `client`, the token's client claim naming them). Any other caller is refused:
    staff answer a request with `fieldguard sar export`."""
    if req.method != "GET" or len(req.segments) != 2:
        raise GatewayError(404, "no such FieldGuard endpoint", reason="unknown subject access endpoint")
    if principal.role != "client" or not principal.client_id:
        raise GatewayError(403, "only the client reads their own copy here; staff answer a request with "
                                "fieldguard sar export", reason="subject access: not the client")
    wanted = dict(req.query()).get("format", "json")
    if wanted not in ("json", "html", "portable"):
        raise GatewayError(400, "format is json, html or portable", reason="subject access: bad format")
    ring = runtime.ring
    if ring is None:
        raise GatewayError(503, "the keystore is not open", reason="keystore not open")
    client_id = principal.client_id
    if await ring.store.tombstoned([client_id]):
        raise GatewayError(410, "this client's records were erased", reason="client erased")
    pseudonym = (await ring.pseudonyms([client_id]))[client_id]
    record.clients = [pseudonym]
    portable = wanted == "portable"
    report = None if portable else await asyncio.to_thread(history, runtime.settings, pseudonym)
    head = {"request": None, "received": None, "due": None, "produced_by": principal.user}
    made = await package(runtime.settings, bundle, ring, client_id, pseudonym, head, report, portable=portable)
    record.reason = f"{'portability' if portable else 'subject access'}: the client's own copy ({made.count} records)"
    if wanted == "html":
        return Reply(200, made.html.encode(), [(b"content-type", b"text/html; charset=utf-8")])
    return Reply(200, made.json_bytes, [(b"content-type", b"application/json")])

"""A disclosure's export: exactly what a grant names of one client, read from the CRM, and nothing else.

For every resource of the field map that holds client data, the client's records are read from the CRM
(the resource's per-client list route, or its flat list filtered by the client, or the client's own record
route) and rewritten by the same redactor the gateway uses, for a view in which the grant's classes (and
`reference`, the record ids the register lists) are shown in clear and every other class is removed. A
record is released when its record class is named; its fields of other classes are withheld, and so is
every record outside the grant's date range (decided on the resource's `dated` field; a resource without
one is withheld from a ranged grant, the client's own record excepted). What was withheld, and why, is
counted on the cover sheet; never its content.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

from proxy.cases import DisclosureGrant
from proxy.config import Settings
from proxy.keys import FieldCipher, KeyRing
from proxy.policy import ClassDecision, DecisionTable, FieldMap, Outcome, PolicyBundle, Relation, Resource, View
from proxy.redact import Disclosure, Plans, Redactor
from proxy.routes import Shape

ROLE = "disclosure"  # the redactor's role for an export: a view made from the grant, not from policy.csv
ALWAYS = ("reference",)  # record ids and links: what the register lists as released


@dataclass(slots=True)
class Export:
    document: dict[str, Any]
    json_bytes: bytes
    html: str
    records: dict[str, list[str]] = field(default_factory=dict)  # resource -> record ids released
    withheld: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.json_bytes).hexdigest()

    @property
    def html_sha256(self) -> str:
        return hashlib.sha256(self.html.encode()).hexdigest()


def grant_view(classes: tuple[str, ...], fieldmap: FieldMap) -> DecisionTable:
    """A decision table of one role and one view: the grant's classes (and `reference`) in clear."""
    shown = {c: ClassDecision(Outcome.CLEAR, None) for c in (*classes, *ALWAYS) if c in fieldmap.classes}
    view = View(ROLE, Relation.ANY, shown, frozenset(), frozenset())
    return DecisionTable({(ROLE, Relation.ANY): view}, {ROLE: frozenset()})


@dataclass(frozen=True, slots=True)
class Scope:
    """What of one client an export reads: the classes shown in clear, the record classes released (None:
    every record), and a date range decided on each resource's `dated` field."""

    client_id: str
    pseudonym: str
    classes: tuple[str, ...]
    record_classes: tuple[str, ...] | None = None
    date_from: str | None = None
    date_until: str | None = None
    resources: frozenset[str] | None = None  # read only these resources (None: every resource of client data)


@dataclass(slots=True)
class Gathered:
    """One client's records as a scope shows them, and what was left out (counted, never its content)."""

    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    withheld: list[dict[str, Any]] = field(default_factory=list)  # by resource: records left out, and why
    removed: dict[str, list[str]] = field(default_factory=dict)  # class -> the paths removed from records
    failures: list[str] = field(default_factory=list)  # fields that could not be opened

    def ids(self, fm: FieldMap) -> dict[str, list[str]]:
        return {name: [str(r.get(fm.resources[name].record_id or "id")) for r in rows]
                for name, rows in self.records.items()}


def crm_client(settings: Settings) -> httpx.AsyncClient:
    """A client of the CRM itself, as the deployment reaches it (its URL, headers and time-out)."""
    return httpx.AsyncClient(base_url=settings.upstream.url, timeout=settings.upstream.timeout_seconds,
                             headers=dict(settings.upstream.headers))


async def gather(settings: Settings, fm: FieldMap, scope: Scope, ring: KeyRing,
                 shared: httpx.AsyncClient | None = None) -> Gathered:
    """Read the client's records of every client resource from the CRM and rewrite them for the scope
    (on `shared`, a CRM client many reads reuse, or one of its own)."""
    disclosure = Disclosure()
    cipher = FieldCipher(ring)
    names = {scope.client_id: scope.pseudonym}.get
    redactor = Redactor(grant_view(scope.classes, fm), ROLE, lambda _c: Relation.ANY, names, disclosure,
                        Plans(fm.classes, fm.identifying), cipher=cipher)
    # the records' dates may be sealed too: read (never released) through a view that opens every class
    dating = Redactor(grant_view(tuple(fm.classes), fm), ROLE, lambda _c: Relation.ANY, names, Disclosure(),
                      Plans(fm.classes, fm.identifying), cipher=cipher)
    out = Gathered()
    ranged = bool(scope.date_from or scope.date_until)
    async with contextlib.AsyncExitStack() as stack:
        crm = shared if shared is not None else await stack.enter_async_context(crm_client(settings))
        for resource in fm.resources.values():
            if resource.client_field is None or (scope.resources is not None and resource.name not in scope.resources):
                continue
            rows, body = await _rows_of(crm, fm, resource, scope.client_id)
            if rows is None:
                out.withheld.append(_held(resource, None, "the field map gives no route to this client's records"))
                continue
            await cipher.prefetch(body)
            kept: list[dict[str, Any]] = []
            outside = undated = unnamed = 0
            for row in rows:
                if str(redactor.client_of(resource, row)) != scope.client_id:
                    continue  # a CRM that ignores the filter: never another client's record
                if scope.record_classes is not None and resource.record_class not in scope.record_classes:
                    unnamed += 1
                    continue
                when: Any = _date_of(resource, dating.record(resource, row) or {}, fm) if ranged else _UNDATED_OK
                if when is not _UNDATED_OK:
                    if when is None:
                        undated += 1
                        continue
                    if (scope.date_from and when < scope.date_from) or (scope.date_until and when > scope.date_until):
                        outside += 1
                        continue
                shown = redactor.record(resource, row)
                if shown is not None:
                    kept.append(shown)
            if kept:
                out.records[resource.name] = kept
            if unnamed:
                why = f"their record class {resource.record_class} is not named"
                out.withheld.append(_held(resource, unnamed, why))
            if outside:
                out.withheld.append(_held(resource, outside, "dated outside the grant's range"))
            if undated:
                out.withheld.append(_held(resource, undated, "undated: the range cannot be applied to them"))
    out.removed = dict(sorted(redactor.summary().removed.items()))
    out.failures = sorted(disclosure.failures)
    return out


def failures_withheld(found: Gathered) -> list[dict[str, Any]]:
    return [{"field": f.split(":")[0], "why": f"could not be opened: {f.split(': ', 1)[-1]}"} for f in found.failures]


async def export(settings: Settings, bundle: PolicyBundle, grant: DisclosureGrant, ring: KeyRing,
                 released_by: str, basis_label: str) -> Export:
    fm = bundle.fieldmap
    scope = Scope(grant.client_id, grant.pseudonym, grant.classes, grant.classes, grant.date_from, grant.date_until)
    found = await gather(settings, fm, scope, ring)
    withheld = [*found.withheld, *({"class": cls, "paths": paths, "why": _why_class(cls, grant)}
                                   for cls, paths in found.removed.items()), *failures_withheld(found)]
    ids = found.ids(fm)
    head = {
        "grant": grant.grant_id, "client": grant.pseudonym, "recipient": grant.recipient, "basis": grant.basis,
        "basis_label": basis_label, "reference": grant.reference, "classes": list(grant.classes),
        "date_from": grant.date_from, "date_until": grant.date_until, "granted_by": grant.granted_by,
        "approved_by": grant.approved_by, "released_by": released_by,
        "released_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "client_told": grant.notify, "exemption": grant.exemption, "consent": grant.consent_id,
        "policy": bundle.digest,
    }
    document = {"disclosure": head, "records": found.records, "released_ids": ids, "withheld": withheld}
    data = orjson.dumps(document, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)
    return Export(document, data, render_html(document, fm), ids, withheld)


_UNDATED_OK = object()  # the client's own record: current, not dated


def _date_of(resource: Resource, row: dict[str, Any], fm: FieldMap) -> Any:
    if resource.name == fm.relations.resource:
        return _UNDATED_OK
    if resource.dated is None:
        return None
    value = row.get(resource.dated)
    if not isinstance(value, str) or len(value) < 10:
        return None
    day = value[:10]
    try:
        datetime.strptime(day, "%Y-%m-%d")
    except ValueError:
        return None
    return day


def _held(resource: Resource, count: int | None, why: str) -> dict[str, Any]:
    return {"resource": resource.name, "records": count, "why": why}


def _why_class(cls: str, grant: DisclosureGrant) -> str:
    if cls == "third_party":
        return "information from third parties: not named in the grant"
    return "class not named in the grant" if cls not in grant.classes else "withheld"


async def _rows_of(crm: httpx.AsyncClient, fm: FieldMap, resource: Resource, client: str
                   ) -> tuple[list[dict[str, Any]] | None, bytes]:
    """The client's records of one resource, and the raw bodies (for the key prefetch)."""
    routes = [r for r in fm.routes if r.resource == resource.name and r.method == "GET"]
    own = next((r for r in routes if r.shape is Shape.RECORD and [p[1] for p in r.params] == ["client_id"]
                and resource.name == fm.relations.resource), None)
    if own is not None:
        r = await crm.get(own.render(own.template, {"client_id": client}))
        if r.status_code == 404:
            return [], b""
        r.raise_for_status()
        doc = r.json()
        return ([doc] if isinstance(doc, dict) else []), r.content
    nested = next((r for r in routes if r.shape is Shape.LIST and [p[1] for p in r.params] == ["client_id"]), None)
    flat = next((r for r in routes if r.shape is Shape.LIST and not r.params and r.filter_param), None)
    if nested is not None:
        return await walk(crm, fm, nested.render(nested.template, {"client_id": client}), {})
    if flat is not None and flat.filter_param is not None:
        return await walk(crm, fm, flat.template, {flat.filter_param: client})
    return None, b""


async def walk(crm: httpx.AsyncClient, fm: FieldMap, path: str, query: dict[str, str]
                ) -> tuple[list[dict[str, Any]], bytes]:
    source, fmt = fm.relations, fm.list_format
    rows: list[dict[str, Any]] = []
    bodies = b""
    page = 1
    while True:
        r = await crm.get(path, params={**query, source.page_param: page, source.size_param: source.page_size})
        r.raise_for_status()
        doc = r.json()
        found = doc if fmt.items == "." else (doc.get(fmt.items) if isinstance(doc, dict) else None)
        if not isinstance(found, list):
            raise ValueError(f"{path}: the CRM did not answer with a list")
        rows += [row for row in found if isinstance(row, dict)]
        bodies += r.content
        if len(found) < source.page_size or page >= 10_000:
            return rows, bodies
        page += 1


# ---------------------------------------------------------------------------------------------- the bundle
_CSS = """body{font:11pt/1.4 Georgia,serif;margin:2cm;color:#111}h1{font-size:16pt}h2{font-size:13pt;
border-bottom:1px solid #999;margin-top:1.5em}table{border-collapse:collapse;width:100%;margin:.5em 0}
td,th{border:1px solid #bbb;padding:3px 6px;vertical-align:top;text-align:left}th{background:#eee}
.cover td:first-child{width:28%;font-weight:bold}.record{page-break-inside:avoid}
@media print{body{margin:1cm}.cover{page-break-after:always}}"""


def cover_rows(head: dict[str, Any]) -> list[tuple[str, Any]]:
    """The cover sheet's lines: recipient, basis, reference, what, the dates, who granted, approved, released."""
    return [("Recipient", head["recipient"]), ("Basis", f"{head['basis_label']} ({head['basis']})"),
             ("Reference", head["reference"]), ("Client", f"{head['client']} (the service's pseudonym)"),
             ("Classes released", ", ".join(head["classes"]) + " (and record ids)"),
             ("Records dated", f"{head['date_from'] or 'any date'} to {head['date_until'] or 'any date'}"),
             ("Granted by", head["granted_by"]), ("Approved by", head["approved_by"] or "not required"),
             ("Released by", head["released_by"]), ("Released at", head["released_at"]),
             ("Client told", "yes" if head["client_told"] else f"no: exemption {head['exemption']}"),
             ("Grant", head["grant"])]


def render_html(document: dict[str, Any], fm: FieldMap) -> str:
    """The printable bundle: a cover sheet (recipient, basis, reference, what is included, what was withheld
    and why), then every released record as a table of its fields."""
    head = document["disclosure"]
    e = html.escape
    cover = cover_rows(head)
    included = [(name, len(ids)) for name, ids in document["released_ids"].items()]
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Disclosure {e(head['grant'])}</title>"
             f"<style>{_CSS}</style></head><body><section class=cover><h1>Disclosure of records</h1><table>",
             *(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in cover), "</table><h2>Included</h2><ul>",
             *([f"<li>{e(name)}: {n} record(s)</li>" for name, n in included] or ["<li>nothing</li>"]),
             "</ul><h2>Withheld</h2><ul>",
             *([f"<li>{e(withheld_text(w))}</li>" for w in document["withheld"]] or ["<li>nothing</li>"]),
             "</ul><p>This bundle holds only what the grant names. Its SHA-256 is kept in the service's "
             "disclosure register.</p></section>"]
    for name, rows in document["records"].items():
        parts.append(f"<h2>{e(name)}</h2>")
        for row in rows:
            parts.append("<table class=record>")
            parts += [f"<tr><th>{e(k)}</th><td>{e(cell(v))}</td></tr>" for k, v in flat_fields(row)]
            parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)


def render_pdf(document: dict[str, Any]) -> bytes:
    """The same bundle as a PDF."""
    from proxy.printing import Bundle
    from proxy.printing import render_pdf as printed

    head = document["disclosure"]
    return printed(Bundle(
        "Disclosure of records", [(k, str(v)) for k, v in cover_rows(head)],
        [f"{name}: {len(ids)} record(s)" for name, ids in document["released_ids"].items()],
        [withheld_text(w) for w in document["withheld"]],
        {name: [[(k, cell(v)) for k, v in flat_fields(row)] for row in rows]
         for name, rows in document["records"].items()}))


def withheld_text(w: dict[str, Any]) -> str:
    if "resource" in w:
        count = f"{w['records']} record(s)" if w["records"] is not None else "all records"
        return f"{w['resource']}: {count}, {w['why']}"
    if "class" in w:
        return f"class {w['class']} ({', '.join(w['paths'])}): {w['why']}"
    return f"{w.get('field')}: {w['why']}"


def flat_fields(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out += flat_fields(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        out = []
        for i, v in enumerate(value):
            out += flat_fields(v, f"{prefix}[{i}]")
        return out
    return [(prefix, value)]


def cell(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return "" if value is None else str(value)

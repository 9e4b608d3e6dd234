"""What auditors, data-protection officers and clients ask of the trail: queries, the "who accessed my
record" report, and exports in FHIR R4 AuditEvent (IHE BALP shape) and Elastic Common Schema."""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from proxy.audit.trail import connect, read_checkpoints, read_records


@dataclass(frozen=True, slots=True)
class Query:
    pseudonym: str | None = None  # the client, already resolved from their CRM id through the keystore
    user: str | None = None
    role: str | None = None
    purpose: str | None = None
    since: str | None = None  # ISO 8601
    until: str | None = None
    outcome: str | None = None  # allowed | denied | error | break-glass
    limit: int = 1000


def _where(q: Query) -> tuple[str, list[object]]:
    clauses: list[str] = []
    args: list[object] = []
    if q.pseudonym is not None:
        clauses.append("EXISTS (SELECT 1 FROM json_each(body, '$.clients') WHERE value = ?)")
        args.append(q.pseudonym)
    for key, value in (("user", q.user), ("role", q.role), ("purpose", q.purpose)):
        if value is not None:
            clauses.append(f"json_extract(body, '$.{key}') = ?")
            args.append(value if key != "user" or value.startswith("u:") else f"u:{value}")
    if q.since is not None:
        clauses.append("recorded_at >= ?")
        args.append(datetime.fromisoformat(q.since).timestamp())
    if q.until is not None:
        clauses.append("recorded_at < ?")
        args.append(datetime.fromisoformat(q.until).timestamp())
    if q.outcome == "break-glass":
        clauses.append("json_extract(body, '$.break_glass') IS NOT NULL")
    elif q.outcome is not None:
        clauses.append("json_extract(body, '$.outcome') = ?")
        args.append(q.outcome)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def query(store: Path, q: Query) -> list[dict[str, Any]]:
    conn = connect(store, readonly=True)
    try:
        where, args = _where(q)
        rows = conn.execute(f"SELECT body FROM audit_records{where} ORDER BY seq LIMIT ?",  # noqa: S608
                            [*args, q.limit]).fetchall()
    finally:
        conn.close()
    return [json.loads(bytes(r[0])) for r in rows]


TABLE_COLUMNS = ("seq", "time", "user", "role", "purpose", "method", "route", "status", "outcome", "clients")


def table(records: list[dict[str, Any]]) -> str:
    rows = [[_cell(r.get(c)) for c in TABLE_COLUMNS] for r in records]
    widths = [max([len(c), *(len(row[i]) for row in rows)]) for i, c in enumerate(TABLE_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(TABLE_COLUMNS, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)


# ---------------------------------------------------------------------------------------------- report
def access_report(records: list[dict[str, Any]], pseudonym: str) -> dict[str, Any]:
    """Who saw the client's record, when, why and what: for a subject access request."""
    entries = []
    for r in records:
        entries.append({
            "when": r.get("time"), "who": r.get("user"), "role": r.get("role"), "why": r.get("purpose"),
            "action": f"{r.get('method')} {r.get('route')}", "outcome": r.get("outcome"),
            "shown": sorted(r.get("shown") or {}), "pseudonymised": sorted(r.get("pseudonymised") or {}),
            "masked": sorted(r.get("masked") or {}), "withheld": sorted(r.get("removed") or {}),
            "break_glass": r.get("break_glass"),
        })
    return {"client": pseudonym, "accesses": entries, "count": len(entries)}


def report_html(report: dict[str, Any]) -> str:
    e = html.escape
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in (
            a["when"], a["who"], a["role"], a["why"], a["action"], a["outcome"], ", ".join(a["shown"]) or "-",
            ", ".join(a["pseudonymised"] + a["masked"]) or "-")) + "</tr>"
        for a in report["accesses"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Who accessed this record</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px;text-align:left}}</style></head><body>
<h1>Who accessed this record</h1>
<p>Client reference {e(report["client"])}: {report["count"]} recorded accesses. Each line says who (user and
role), when, why (purpose of use), what they did and which kinds of information they were shown.</p>
<table><tr><th>When</th><th>Who</th><th>Role</th><th>Why</th><th>Action</th><th>Outcome</th>
<th>Shown</th><th>Shown in reduced form</th></tr>
{rows}
</table></body></html>
"""


# ---------------------------------------------------------------------------------------------- exports
def export_jsonl(store: Path) -> Iterator[str]:
    """Records with their hashes and the signed checkpoints: `fieldguard audit verify --export` reads this."""
    conn = connect(store, readonly=True)
    try:
        for rec in read_records(conn):
            yield json.dumps({"seq": rec.seq, "leaf": rec.leaf.hex(), "link": rec.link.hex(),
                              "body": rec.body.decode()})
        for cp in read_checkpoints(conn):
            yield json.dumps({"checkpoint": cp.as_dict()})
    finally:
        conn.close()


def all_records(store: Path) -> Iterator[dict[str, Any]]:
    conn = connect(store, readonly=True)
    try:
        for rec in read_records(conn):
            yield json.loads(rec.body)
    finally:
        conn.close()


_FHIR_ACTION = {"GET": "R", "POST": "C", "PUT": "U", "PATCH": "U", "DELETE": "D"}
_FHIR_SUBTYPE = {"GET": "read", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
_OUTCOME = {"allowed": "0", "dry-run": "0", "denied": "4", "error": "8"}


def fhir_audit_event(r: dict[str, Any], origin: str) -> dict[str, Any]:
    """One FHIR R4 AuditEvent in the IHE BALP shape (RESTful activity, purpose of use, patient entities)."""
    method = str(r.get("method"))
    purpose = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                            "code": r["purpose"]}]}] if r.get("purpose") else []
    details = [{"type": kind, "valueString": ",".join(sorted(r.get(kind) or {}))}
               for kind in ("shown", "pseudonymised", "masked", "removed") if r.get(kind)]
    entities: list[dict[str, Any]] = [{
        "what": {"identifier": {"system": "urn:fieldguard:client-pseudonym", "value": p}},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1",
                 "display": "Person"},
        "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"},
        "detail": details,
    } for p in r.get("clients") or []]
    entities.append({
        "what": {"identifier": {"system": "urn:fieldguard:request-id", "value": r.get("request_id")}},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2",
                 "display": "System Object"},
        "detail": [{"type": "route", "valueString": str(r.get("route"))},
                   {"type": "policy", "valueString": str(r.get("policy"))},
                   *({"type": "rule", "valueString": rule} for rule in r.get("rules") or [])],
    })
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"fieldguard-{r.get('seq')}",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
                 "display": "RESTful Operation"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction",
                     "code": _FHIR_SUBTYPE.get(method, "operation")}],
        "action": _FHIR_ACTION.get(method, "E"),
        "recorded": r.get("time"),
        "outcome": _OUTCOME.get(str(r.get("outcome")), "8"),
        "purposeOfEvent": purpose,
        "agent": [
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                                  "code": "humanuser", "display": "human user"}]},
             "who": {"identifier": {"value": r.get("user") or "anonymous"}},
             "requestor": True,
             "role": [{"text": r.get("role") or ""}],
             "purposeOfUse": purpose},
            {"type": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110153",
                                  "display": "Source Role ID"}]},
             "who": {"display": "FieldGuard"}, "requestor": False},
        ],
        "source": {"observer": {"display": origin},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4",
                             "display": "Application Server"}]},
        "entity": entities,
    }
    if r.get("reason"):
        event["outcomeDesc"] = r["reason"]
    return event


def ecs_event(r: dict[str, Any]) -> dict[str, Any]:
    """One Elastic Common Schema document; FieldGuard's own fields under `fieldguard.*`."""
    denied = r.get("outcome") == "denied"
    return {
        "@timestamp": r.get("time"),
        "event": {"kind": "event", "category": ["database", "iam"], "type": ["access", "denied" if denied else
                                                                            "allowed"],
                  "outcome": "success" if r.get("outcome") in ("allowed", "dry-run") else "failure",
                  "action": f"{r.get('method')} {r.get('route')}", "reason": r.get("reason"),
                  "sequence": r.get("seq"), "id": r.get("request_id")},
        "user": {"id": r.get("user"), "roles": r.get("roles") or []},
        "http": {"request": {"method": r.get("method")}, "response": {"status_code": r.get("status")}},
        "url": {"path": r.get("route")},
        "rule": {"ruleset": r.get("policy"), "id": ",".join(r.get("rules") or [])},
        "fieldguard": {k: r.get(k) for k in ("purpose", "role", "clients", "relations", "shown", "pseudonymised",
                                             "masked", "removed", "refused", "unclassified", "key_ids",
                                             "decrypt_failures", "break_glass", "counts")},
    }


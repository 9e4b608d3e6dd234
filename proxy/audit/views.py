"""What auditors, data-protection officers and clients ask of the trail: queries, the "who accessed my
record" report, and exports in FHIR R4 AuditEvent (IHE BALP shape) and Elastic Common Schema.

A view reads what is stored, and what is stored may have been edited by hand (sqlite3 keeps a Python str
as TEXT where the writer stored a BLOB, and the text need not even be JSON): a body that is not a JSON
object is left out and counted, never a traceback, and every view says when the trail does not verify
(`Integrity`, from the same verification as `fieldguard audit verify`)."""

from __future__ import annotations

import html
import ipaddress
import json
import re
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proxy.audit.trail import connect, read_checkpoints, read_records


# ---------------------------------------------------------------------------------------------- reading
def parse(body: object) -> dict[str, Any] | None:
    """A stored body as the record it should be, or None when it is not one: bytes (as the gateway writes
    them) or text (as sqlite3 stores a str written by hand), holding a JSON object."""
    if isinstance(body, memoryview):
        body = bytes(body)
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(body, str):
        return None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


@dataclass(slots=True)
class Found:
    """The records a view read, and the sequence numbers of those it could not read (left out, and said)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)


def _rows(store: Path) -> Iterator[tuple[int, object, object]]:
    conn = connect(store, readonly=True)
    try:
        yield from conn.execute("SELECT seq, recorded_at, body FROM audit_records ORDER BY seq")
    finally:
        conn.close()


def all_records(store: Path, unreadable: list[int]) -> Iterator[dict[str, Any]]:
    """Every readable record in order; the sequence number of each unreadable one is appended to `unreadable`."""
    for seq, _at, body in _rows(store):
        record = parse(body)
        if record is None:
            unreadable.append(int(seq))
        else:
            yield record


@dataclass(frozen=True, slots=True)
class Query:
    pseudonym: str | None = None  # the client, already resolved from their CRM id through the keystore
    user: str | None = None
    role: str | None = None
    purpose: str | None = None
    since: str | None = None  # ISO 8601
    until: str | None = None
    outcome: str | None = None  # allowed | denied | error | dry-run | break-glass
    limit: int = 1000


def query(store: Path, q: Query) -> Found:
    """Matching records in order, at most `q.limit`. Every record is read (it is checked whether it can be),
    so the unreadable ones of the whole trail are counted, not only those before the limit.
    Raises ValueError for a `since` or `until` that is not ISO 8601."""
    since = datetime.fromisoformat(q.since).timestamp() if q.since is not None else None
    until = datetime.fromisoformat(q.until).timestamp() if q.until is not None else None
    user = q.user if q.user is None or q.user.startswith("u:") else f"u:{q.user}"
    found = Found()
    amended: dict[str, str] = {}  # request id -> the record saying its response was withheld after all
    for seq, recorded_at, body in _rows(store):
        record = parse(body)
        if record is None:
            found.unreadable.append(int(seq))
            continue
        if isinstance(record.get("amends"), str):
            amended[record["amends"]] = str(record.get("request_id"))
        if len(found.records) >= q.limit:
            continue
        at = recorded_at if isinstance(recorded_at, int | float) else None
        if since is not None and (at is None or at < since):
            continue
        if until is not None and (at is None or at >= until):
            continue
        if q.pseudonym is not None and not _names_client(record.get("clients"), q.pseudonym):
            continue
        if any(want is not None and record.get(key) != want
               for key, want in (("user", user), ("role", q.role), ("purpose", q.purpose))):
            continue
        if q.outcome == "break-glass":
            if record.get("break_glass") is None:
                continue
        elif q.outcome is not None and record.get("outcome") != q.outcome:
            continue
        found.records.append(record)
    for record in found.records:  # a view's own field: the stored record is left as it was committed
        if record.get("request_id") in amended:
            record["amended_by"] = amended[record["request_id"]]
    return found


def _names_client(clients: object, pseudonym: str) -> bool:
    return pseudonym in clients if isinstance(clients, list) else clients == pseudonym


# ---------------------------------------------------------------------------------------------- integrity
@dataclass(frozen=True, slots=True)
class Integrity:
    """What `fieldguard audit verify` says of the trail a view was made from. A view of a trail that does
    not verify says so, with the first bad record, wherever it goes (stderr, the table, the report)."""

    ok: bool
    problems: tuple[str, ...] = ()
    first_bad: int | None = None
    records: int = 0  # in the trail
    verified: int = 0  # in order, up to the first bad one
    unsigned: str | None = None  # intact, but not covered to its end by a recent signed checkpoint: why

    def warnings(self, unreadable: Sequence[int] = ()) -> list[str]:
        out: list[str] = []
        if self.unsigned is not None:
            out.append(f"the audit trail is not verified to its end: {self.unsigned}")
        if not self.ok:
            text = "the audit trail does not verify: " + (self.problems[0] if self.problems else "unknown problem")
            if self.first_bad is not None:
                text += (f"; record {self.first_bad} and every record after it are unverified, so what follows "
                         f"may not be what was recorded")
            out.append(text + " (`fieldguard audit verify` says more)")
        if unreadable:
            shown = ", ".join(str(s) for s in unreadable[:10]) + (", ..." if len(unreadable) > 10 else "")
            few = len(unreadable) == 1
            out.append(f"{len(unreadable)} record{'' if few else 's'} of the trail could not be read (not a JSON "
                       f"record) and {'is' if few else 'are'} left out: {shown}")
        return out

    def as_dict(self, unreadable: Sequence[int] = ()) -> dict[str, Any]:
        return {"verified": self.ok and self.unsigned is None, "records": self.records,
                "verified_records": self.verified, "first_bad_record": self.first_bad,
                "problems": list(self.problems), "unsigned": self.unsigned, "unreadable_records": list(unreadable)}


# ---------------------------------------------------------------------------------------------- the table
TABLE_COLUMNS = ("seq", "at (UTC)", "user", "role", "method", "route", "status", "outcome", "clients")
TABLE_WIDTH = 120  # what a terminal shows without wrapping; `--format json` has everything
_WIDEST = (8, 19, 16, 16, 6, 36, 6, 8, 24)  # a cell longer ends in an ellipsis
# when the table is still too wide, these give way in this order, each down to its narrowest
_GIVE_WAY = ((8, 12), (2, 10), (3, 10), (5, 18))
_GAP = " "


def table(records: list[dict[str, Any]], warnings: Sequence[str] = ()) -> str:
    """The records as a table no wider than TABLE_WIDTH: cells too long end in an ellipsis, several clients
    show as the first and how many more, a route's ids as {…}; warnings come first, wrapped to the width."""
    rows = [[_printable(c) for c in _row(r)] for r in records]
    widths = [min(top, max([len(h), *(len(row[i]) for row in rows)]))
              for i, (h, top) in enumerate(zip(TABLE_COLUMNS, _WIDEST, strict=True))]
    for column, narrowest in _GIVE_WAY:
        over = sum(widths) + len(_GAP) * (len(widths) - 1) - TABLE_WIDTH
        if over <= 0:
            break
        widths[column] = max(narrowest, widths[column] - over)
    lines = [piece for w in warnings for piece in textwrap.wrap(f"WARNING: {w}", TABLE_WIDTH, subsequent_indent="  ")]
    lines.append(_GAP.join(_fit(h, w) for h, w in zip(TABLE_COLUMNS, widths, strict=True)).rstrip())
    last = len(TABLE_COLUMNS) - 1  # clients: "P-... +2" keeps its count when the pseudonym is shortened
    lines += [_GAP.join(_fit(v, w, i == last) for i, (v, w) in enumerate(zip(row, widths, strict=True))).rstrip()
              for row in rows]
    return "\n".join(lines)


def _row(r: dict[str, Any]) -> list[str]:
    clients = r.get("clients")
    if isinstance(clients, list):
        names = [str(c) for c in clients]
        who = (names[0] + (f" +{len(names) - 1}" if len(names) > 1 else "")) if names else ""
    else:
        who = _cell(clients)
    route = _cell(r.get("route"))
    if r.get("method") != "CLI":
        route = _ROUTE_PARAM.sub("{\N{HORIZONTAL ELLIPSIS}}", route)
    return [_cell(r.get("seq")), _moment(r.get("time")), _cell(r.get("user")).removeprefix("u:"),
            _cell(r.get("role")), _cell(r.get("method")), route, _cell(503 if r.get("amended_by") else r.get("status")),
            "withheld" if r.get("amended_by") else _cell(r.get("outcome")), who]


_ROUTE_PARAM = re.compile(r"\{[^}]*\}")  # /clients/{client_id:int}/letters is shown as /clients/{…}/letters


def _moment(value: object) -> str:
    try:
        at = datetime.fromisoformat(str(value))
    except ValueError:
        return _cell(value)
    if at.tzinfo is None:
        return _cell(value)
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)


def _printable(text: str) -> str:
    """No control characters reach the auditor's terminal (a hand-edited record could hold escapes)."""
    return "".join(ch if ch.isprintable() else "\N{REPLACEMENT CHARACTER}" for ch in text)


def _fit(text: str, width: int, keep_count: bool = False) -> str:
    if len(text) <= width:
        return text.ljust(width)
    more = _MORE.search(text) if keep_count else None
    if more is not None and width > len(more.group()) + 1:
        room = width - len(more.group()) - 1
        return text[:min(room, more.start())] + "\N{HORIZONTAL ELLIPSIS}" + more.group()
    return text[:width - 1] + "\N{HORIZONTAL ELLIPSIS}"


_MORE = re.compile(r" \+\d+$")


# ---------------------------------------------------------------------------------------------- report
def access_report(records: list[dict[str, Any]], pseudonym: str, integrity: Integrity | None = None,
                  unreadable: Sequence[int] = ()) -> dict[str, Any]:
    """Who saw the client's record, when, why and what: for a subject access request. `trail` and
    `warnings` say whether the trail it was made from verifies, and what could not be read."""
    entries = []
    disclosures = []
    for r in records:
        if r.get("amends") is not None:
            continue  # said on the record it amends
        released = r.get("disclosure")
        if isinstance(released, dict) and released.get("exemption"):
            continue  # telling the client would be an offence (the Terrorism Act, POCA): left out of their report
        if isinstance(released, dict) and r.get("route") == "disclose export" and r.get("outcome") == "allowed":
            disclosures.append({"when": r.get("time"), "to": released.get("recipient"),
                                "basis": released.get("basis"), "reference": released.get("reference"),
                                "classes": released.get("classes"), "by": r.get("user"),
                                "approved_by": released.get("approved_by")})
            continue  # a release, not an access: listed with the disclosures
        if r.get("amended_by") is not None:  # committed after its time-out: the caller got 503 and nothing
            r = {**r, "outcome": "withheld", "shown": {}, "pseudonymised": {}, "masked": {}}
        entries.append({
            "when": r.get("time"), "who": r.get("user"), "role": r.get("role"), "why": r.get("purpose"),
            "action": f"{r.get('method')} {r.get('route')}", "outcome": r.get("outcome"),
            "shown": sorted(_names(r.get("shown"))), "pseudonymised": sorted(_names(r.get("pseudonymised"))),
            "masked": sorted(_names(r.get("masked"))), "withheld": sorted(_names(r.get("removed"))),
            "break_glass": r.get("break_glass"), "disclosed_to": (released or {}).get("recipient"),
        })
    check = integrity or Integrity(ok=True)
    return {"client": pseudonym, "accesses": entries, "count": len(entries), "disclosures": disclosures,
            "trail": check.as_dict(unreadable), "warnings": check.warnings(unreadable)}


def report_html(report: dict[str, Any]) -> str:
    e = html.escape
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in (
            a["when"], a["who"], a["role"], a["why"], a["action"], a["outcome"], ", ".join(a["shown"]) or "-",
            ", ".join(a["pseudonymised"] + a["masked"]) or "-")) + "</tr>"
        for a in report["accesses"])
    disclosed = "\n".join(
        "<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in (
            d["when"], d["to"], d["basis"], d["reference"], ", ".join(d["classes"] or []), d["by"],
            d["approved_by"] or "-")) + "</tr>"
        for d in report.get("disclosures") or [])
    warnings = "\n".join(f'<p class="warning" role="alert"><strong>Warning:</strong> {e(w)}</p>'
                         for w in report.get("warnings") or [])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Who accessed this record</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px;text-align:left}}.warning{{border:2px solid #b00;background:#fee;padding:8px}}</style></head><body>
<h1>Who accessed this record</h1>
{warnings}
<p>Client reference {e(report["client"])}: {report["count"]} recorded accesses. Each line says who (user and
role), when, why (purpose of use), what they did and which kinds of information they were shown.</p>
<table><tr><th>When</th><th>Who</th><th>Role</th><th>Why</th><th>Action</th><th>Outcome</th>
<th>Shown</th><th>Shown in reduced form</th></tr>
{rows}
</table>
<h2>Released outside the service</h2>
<p>{len(report.get("disclosures") or [])} disclosure(s): to whom, on what basis, what.</p>
<table><tr><th>When</th><th>To</th><th>Basis</th><th>Reference</th><th>What</th><th>By</th><th>Approved by</th></tr>
{disclosed}
</table></body></html>
"""


# ---------------------------------------------------------------------------------------------- exports
def export_jsonl(store: Path) -> Iterator[str]:
    """Records with their hashes and the signed checkpoints: `fieldguard audit verify --export` reads this.
    Every record goes in as stored, readable or not, so that the export verifies exactly as the store does."""
    conn = connect(store, readonly=True)
    try:
        for rec in read_records(conn):
            yield json.dumps({"seq": rec.seq, "leaf": rec.leaf.hex(), "link": rec.link.hex(),
                              "body": rec.body.decode("utf-8", "replace")})
        for cp in read_checkpoints(conn):
            yield json.dumps({"checkpoint": cp.as_dict()})
    finally:
        conn.close()


class Unexportable(ValueError):
    """A record that cannot be put in the format (it has no valid time): left out of the export, and counted."""


def _text(value: object) -> str | None:
    """A value as a FHIR string (or an ECS keyword): None for nothing, since FHIR has no empty strings and
    "None" is not a value; other whitespace than space, tab and newline, and control characters, are spaces."""
    if value is None or isinstance(value, dict | list):
        return None
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    text = "".join(ch if ch.isprintable() or ch in "\r\n\t" else " " for ch in text).strip()
    return text or None


def _names(value: object) -> list[str]:
    """The names a record lists, in its order: a dict's keys (class -> paths), a list's items; once each,
    without empties."""
    items = value.keys() if isinstance(value, dict) else value if isinstance(value, list) else [value]
    return list(dict.fromkeys(t for item in items if (t := _text(item)) is not None))


def _instant(value: object) -> str:
    """The record's time as a FHIR instant / ECS date (UTC, milliseconds), or Unexportable."""
    try:
        at = datetime.fromisoformat(str(value))
    except ValueError:
        raise Unexportable("no valid time") from None
    if at.tzinfo is None:
        raise Unexportable("no time zone in its time")
    return at.astimezone(UTC).isoformat(timespec="milliseconds")


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


_CODE = re.compile(r"[^\s]+( [^\s]+)*")  # FHIR's `code`: no leading, trailing or double whitespace
_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
_PURPOSE_CODE = re.compile(r"[A-Z][A-Z0-9_]*")  # what v3-ActReason codes look like (TREAT, HOPERAT, ...)
_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_FHIR_ACTION = {"POST": "C", "PUT": "U", "PATCH": "U", "DELETE": "D"}
_FHIR_SUBTYPE = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete", "OPTIONS": "capabilities"}
_OUTCOME = {"allowed": "0", "dry-run": "0", "denied": "4", "error": "8"}
_DISCLOSED = ("shown", "pseudonymised", "masked", "removed")  # field classes, per kind of outcome


def _is_item_route(route: str | None) -> bool:
    """A route ending in an id reads one resource (BALP Read); any other GET is a search (BALP Query)."""
    return route is not None and route.rstrip("/").endswith("}")


def _detail(kind: str, value: object) -> dict[str, str] | None:
    text = _text(value)
    return {"type": kind, "valueString": text} if text is not None else None


def fhir_audit_event(r: dict[str, Any], origin: str) -> dict[str, Any]:
    """One FHIR R4 AuditEvent in the IHE BALP shape: a RESTful interaction (Read, Query, Create, Update,
    Delete) with the user (requestor), the client's address (Source Role ID) and FieldGuard (Destination
    Role ID) as agents, the purpose of use, a Patient entity per client pseudonym whose `detail` lists the
    field classes disclosed, and a System Object entity for the request (route, policy, rules). An operator's
    command (method CLI) is an Application Activity, or Audit Log Used for the audit commands. No element is
    empty: what a record does not have is left out. Raises Unexportable for a record with no valid time."""
    method = _text(r.get("method")) or ""
    route = _text(r.get("route"))
    cli = method == "CLI"
    event: dict[str, Any] = {"resourceType": "AuditEvent"}
    seq = _int(r.get("seq"))
    if seq is not None:
        event["id"] = f"fieldguard-{seq}"
    if cli:
        audit_use = bool(route and route.startswith("audit "))
        event["type"] = {"system": _DCM, "code": "110101" if audit_use else "110100",
                         "display": "Audit Log Used" if audit_use else "Application Activity"}
        if route and _CODE.fullmatch(route):
            event["subtype"] = [{"system": "urn:fieldguard:command", "code": route}]
        event["action"] = "E"
    else:
        event["type"] = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
                         "display": "RESTful Operation"}
        if method in ("GET", "HEAD"):
            item = _is_item_route(route)
            subtype, action = ("read", "R") if item else ("search-type", "E")
        else:
            subtype, action = _FHIR_SUBTYPE.get(method, "operation"), _FHIR_ACTION.get(method, "E")
        event["subtype"] = [{"system": "http://hl7.org/fhir/restful-interaction", "code": subtype}]
        event["action"] = action
    event["recorded"] = _instant(r.get("time"))
    outcome = _OUTCOME.get(str(r.get("outcome")))
    if outcome is not None:
        event["outcome"] = outcome
    reason = _text(r.get("reason"))
    if reason is not None:
        event["outcomeDesc"] = reason
    purpose = _purpose(r.get("purpose"))
    if purpose:
        event["purposeOfEvent"] = purpose
    event["agent"] = _agents(r, purpose, origin)
    event["source"] = {"observer": {"display": _text(origin) or "FieldGuard"},
                       "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                                 "code": "4", "display": "Application Server"}]}
    event["entity"] = _entities(r, route, cli)
    return event


def _purpose(value: object) -> list[dict[str, Any]]:
    text = _text(value)
    if text is None:
        return []
    if _PURPOSE_CODE.fullmatch(text):
        return [{"coding": [{"system": _ACT_REASON, "code": text}]}]
    return [{"text": text}]


def _agents(r: dict[str, Any], purpose: list[dict[str, Any]], origin: str) -> list[dict[str, Any]]:
    user = _text(r.get("user"))
    person: dict[str, Any] = {
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                             "code": "humanuser", "display": "human user"}]},
        "who": {"identifier": {"value": user}} if user else {"display": "unidentified caller"},
        "requestor": True,
    }
    role = _text(r.get("role"))
    if role is not None:
        person["role"] = [{"text": role}]
    if purpose:
        person["purposeOfUse"] = purpose
    agents = [person]
    peer = _text(r.get("peer"))
    if peer is not None:
        agents.append({"type": {"coding": [{"system": _DCM, "code": "110153", "display": "Source Role ID"}]},
                       "who": {"display": peer}, "requestor": False,
                       "network": {"address": peer, "type": "2" if _is_ip(peer) else "1"}})
    agents.append({"type": {"coding": [{"system": _DCM, "code": "110152", "display": "Destination Role ID"}]},
                   "who": {"display": f"FieldGuard at {_text(origin)}" if _text(origin) else "FieldGuard"},
                   "requestor": False})
    return agents


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _entities(r: dict[str, Any], route: str | None, cli: bool) -> list[dict[str, Any]]:
    disclosed = [d for kind in _DISCLOSED if (d := _detail(kind, ",".join(_names(r.get(kind))))) is not None]
    disclosed += [d for kind in ("written", "refused") if (d := _detail(kind, ", ".join(_names(r.get(kind)))))]
    entities: list[dict[str, Any]] = []
    for pseudonym in _names(r.get("clients")):
        patient: dict[str, Any] = {
            "what": {"identifier": {"system": "urn:fieldguard:client-pseudonym", "value": pseudonym}},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1",
                     "display": "Person"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1",
                     "display": "Patient"},
        }
        if disclosed:
            patient["detail"] = disclosed
        entities.append(patient)
    details = [d for d in (
        _detail("command" if cli else "route", route), _detail("status", _int(r.get("status")) or None),
        _detail("policy", r.get("policy")), _detail("token", r.get("token_id")),
        _detail("break-glass", r.get("break_glass")),
    ) if d is not None]
    details += [d for rule in _names(r.get("rules")) if (d := _detail("rule", rule)) is not None]
    cover = r.get("cover")
    for grant in cover if isinstance(cover, list) else []:
        if isinstance(grant, dict) and (d := _detail("cover", "; ".join(
                t for t in (_text(grant.get("grant")), _text(grant.get("reason"))) if t))) is not None:
            details.append(d)
    counts = r.get("counts")
    for name, n in sorted(counts.items()) if isinstance(counts, dict) else []:
        if (d := _detail(f"count {name}", n)) is not None:
            details.append(d)
    request: dict[str, Any] = {"type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                                        "code": "2", "display": "System Object"}}
    request_id = _text(r.get("request_id"))
    if request_id is not None:
        request["what"] = {"identifier": {"system": "urn:fieldguard:request-id", "value": request_id}}
    if details:
        request["detail"] = details
    if len(request) > 1:
        entities.append(request)
    return entities


# ECS 8.x: event.category `database` expects event.type access, change, info or error (ecs_flat.yml)
_ECS_VERSION = "8.11.0"
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_ECS_OUTCOME = {"allowed": "success", "dry-run": "success", "denied": "failure", "error": "failure"}
_FIELDGUARD = ("purpose", "role", "clients", "relations", "shown", "pseudonymised", "masked", "removed", "written",
               "refused", "unclassified", "key_ids", "decrypt_failures", "break_glass", "cover", "counts",
               "rows_dropped", "caller_request_id", "token_id", "upstream_status", "shadow", "shadow_policy")


def ecs_event(r: dict[str, Any], origin: str = "") -> dict[str, Any]:
    """One Elastic Common Schema document. The categorisation is ECS's for a data store: `event.kind: event`,
    `event.category: [database]`, `event.type` `access` (a read), `change` (a write), `error` (the gateway or
    the CRM failed) or `info` (an operator's command), `event.outcome` success / failure / unknown. The
    decision is `event.action` (allowed, denied, error, dry-run) with `event.reason`, and the policy rows
    that made it are `rule.id` under `rule.version` (the policy hash). FieldGuard's own fields are under
    `fieldguard.*`; empty ones are left out. Raises Unexportable for a record with no valid time."""
    method = _text(r.get("method"))
    decision = _text(r.get("outcome"))
    if decision == "error":
        kind = "error"
    elif method == "CLI":
        kind = "info"
    elif method in _WRITES:
        kind = "change"
    else:
        kind = "access"
    event: dict[str, Any] = {"kind": "event", "category": ["database"], "type": [kind],
                             "outcome": _ECS_OUTCOME.get(decision or "", "unknown"),
                             "provider": "fieldguard", "dataset": "fieldguard.audit"}
    for key, value in (("action", decision), ("reason", _text(r.get("reason"))),
                       ("id", _text(r.get("request_id"))), ("sequence", _int(r.get("seq")))):
        if value is not None:
            event[key] = value
    duration = r.get("duration_ms")
    if isinstance(duration, int | float) and not isinstance(duration, bool) and duration > 0:
        event["duration"] = int(duration * 1_000_000)  # nanoseconds
    doc: dict[str, Any] = {"@timestamp": _instant(r.get("time")), "ecs": {"version": _ECS_VERSION}, "event": event}
    user: dict[str, Any] = {}
    if (uid := _text(r.get("user"))) is not None:
        user["id"] = uid
        user["name"] = uid.removeprefix("u:")
    if roles := _names(r.get("roles")):
        user["roles"] = roles
    if user:
        doc["user"] = user
    status = _int(r.get("status"))
    if method is not None and method != "CLI":
        doc["http"] = {"request": {"method": method}}
        if status:
            doc["http"]["response"] = {"status_code": status}
    peer = _text(r.get("peer"))
    if peer is not None:
        doc["source"] = {"address": peer, **({"ip": peer} if _is_ip(peer) else {})}
    rule: dict[str, Any] = {"ruleset": "fieldguard policy"}
    if rules := _names(r.get("rules")):
        rule["id"] = rules
    if (policy := _text(r.get("policy"))) is not None:
        rule["version"] = policy
    if len(rule) > 1:
        doc["rule"] = rule
    if (name := _text(origin)) is not None:
        doc["observer"] = {"product": "FieldGuard", "name": name}
    own: dict[str, Any] = {}
    if (route := _text(r.get("route"))) is not None:
        own["command" if method == "CLI" else "route"] = route
    own.update({k: v for k in _FIELDGUARD if (v := r.get(k)) not in (None, "", [], {}, 0)})
    if own:
        doc["fieldguard"] = own
    return doc

"""The trail in other shapes, one JSON document a line: the verifiable export (records with their hashes
and the signed checkpoints), FHIR R4 AuditEvent in the IHE BALP shape (a release outside the service as a
PrivacyDisclosure, a recorded consent as a Consent), and Elastic Common Schema. Every element is one a
validator accepts: what a record does not have is left out, never empty."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proxy.audit.stores import AuditStore, is_shared
from proxy.audit.trail import connect, read_checkpoints, read_records


# ---------------------------------------------------------------------------------------------- exports
def export_jsonl(store: AuditStore) -> Iterator[str]:
    """Records with their hashes and the signed checkpoints: `fieldguard audit verify --export` reads this.
    Every record goes in as stored, readable or not, so that the export verifies exactly as the store does.
    A shared trail's: every replica's chain, the sealed log and its checkpoints."""
    if is_shared(store):
        from proxy.audit.pgverify import export_lines

        yield from (json.dumps(line) for line in export_lines(str(store)))
        return
    conn = connect(Path(store), readonly=True)
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


def names_in(value: object) -> list[str]:
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
    released = r.get("disclosure") if route == "disclose export" else None
    if isinstance(released, dict):  # IHE BALP PrivacyDisclosure at the source: an export, to a recipient
        event["type"] = {"system": _DCM, "code": "110106", "display": "Export"}
        event["subtype"] = [{"system": "http://terminology.hl7.org/CodeSystem/iso-21089-lifecycle",
                             "code": "disclose", "display": "Disclose Record Lifecycle Event"}]
        event["action"] = "R"
    elif cli:
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
    purpose = _purpose(r.get("purpose")) if not isinstance(released, dict) else _basis(released)
    if purpose:
        event["purposeOfEvent"] = purpose
    event["agent"] = _agents(r, purpose, origin) if not isinstance(released, dict) else _release_agents(
        r, released, origin)
    event["source"] = {"observer": {"display": _text(origin) or "FieldGuard"},
                       "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                                 "code": "4", "display": "Application Server"}]}
    event["entity"] = _entities(r, route, cli)
    return event


_LEGAL = frozenset({"court_order", "witness_summons", "police_rta", "statute", "complaint"})


def _basis(released: dict[str, Any]) -> list[dict[str, Any]]:
    """A disclosure's purpose: its basis in words, coded HLEGAL where the law compels it."""
    basis = _text(released.get("basis"))
    if basis is None:
        return []
    reason: dict[str, Any] = {"text": basis}
    if basis in _LEGAL:
        reason["coding"] = [{"system": _ACT_REASON, "code": "HLEGAL", "display": "legal requirement"}]
    return [reason]


def _release_agents(r: dict[str, Any], released: dict[str, Any], origin: str) -> list[dict[str, Any]]:
    """Who released it (the requestor), FieldGuard as the source, the recipient as the destination."""
    user = _text(r.get("user"))
    agents: list[dict[str, Any]] = [{
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                             "code": "humanuser", "display": "human user"}]},
        "who": {"identifier": {"value": user}} if user else {"display": "unidentified operator"},
        "requestor": True}]
    approver = _text(released.get("approved_by"))
    if approver is not None:
        agents.append({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                            "code": "AUT", "display": "author (originator)"}]},
                       "role": [{"text": "approved the disclosure"}], "who": {"identifier": {"value": approver}},
                       "requestor": False})
    agents.append({"type": {"coding": [{"system": _DCM, "code": "110153", "display": "Source Role ID"}]},
                   "who": {"display": f"FieldGuard at {_text(origin)}" if _text(origin) else "FieldGuard"},
                   "requestor": False})
    agents.append({"type": {"coding": [{"system": _DCM, "code": "110152", "display": "Destination Role ID"}]},
                   "who": {"display": _text(released.get("recipient")) or "unnamed recipient"}, "requestor": False})
    return agents


def fhir_consent(c: dict[str, Any], withdrawn: bool) -> dict[str, Any]:
    """A recorded consent as a FHIR R4 Consent: a permit, for its classes, to its recipient, until its end."""
    consent: dict[str, Any] = {
        "resourceType": "Consent", "id": _text(c.get("consent")) or "unknown",
        "status": "inactive" if withdrawn else "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy", "display": "Privacy Consent"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0", "display": "Patient Consent"}]}],
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN",
                                   "display": "opt-in"}]},
    }
    client = _text(c.get("client"))
    if client is not None:
        consent["patient"] = {"identifier": {"system": "urn:fieldguard:client-pseudonym", "value": client}}
    recorded = c.get("recorded_at")
    if isinstance(recorded, str) and recorded:
        consent["dateTime"] = recorded
    form = _text(c.get("form"))
    if form is not None:
        consent["sourceAttachment"] = {"title": form}
    provision: dict[str, Any] = {"type": "permit"}
    until = _text(c.get("until"))
    if until is not None:
        provision["period"] = {"end": until}
    recipient = _text(c.get("recipient"))
    if recipient is not None:
        provision["actor"] = [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                                    "code": "IRCP", "display": "information recipient"}]},
                               "reference": {"display": recipient}}]
    classes = [x for x in names_in(c.get("classes")) if _CODE.fullmatch(x)]
    if classes:
        provision["securityLabel"] = [{"system": "urn:fieldguard:field-class", "code": x} for x in classes]
    consent["provision"] = provision
    return consent


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
    disclosed = [d for kind in _DISCLOSED if (d := _detail(kind, ",".join(names_in(r.get(kind))))) is not None]
    disclosed += [d for kind in ("written", "refused") if (d := _detail(kind, ", ".join(names_in(r.get(kind)))))]
    found = r.get("disclosure")
    released: dict[str, Any] = found if isinstance(found, dict) else {}
    if (d := _detail("disclosed", ",".join(names_in(released.get("classes"))))) is not None:
        disclosed.append(d)
    entities: list[dict[str, Any]] = []
    for pseudonym in names_in(r.get("clients")):
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
        _detail("break-glass", r.get("break_glass")), _detail("disclosure grant", released.get("grant")),
        _detail("basis", released.get("basis")), _detail("reference", released.get("reference")),
        _detail("sha256", released.get("sha256")), _detail("consent", released.get("consent")),
    ) if d is not None]
    details += [d for rule in names_in(r.get("rules")) if (d := _detail("rule", rule)) is not None]
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
    if roles := names_in(r.get("roles")):
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
    if rules := names_in(r.get("rules")):
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

"""`/_fieldguard/break-glass`: a practitioner declares an emergency for one client, and may end it early.

    POST   /_fieldguard/break-glass         {"client": "7", "reason": "risk_to_self",
                                             "justification": "...", "minutes": 60}
    GET    /_fieldguard/break-glass         the caller's open grants
    DELETE /_fieldguard/break-glass/{grant} end one early

The rules are the bundle's `breakglass.yaml` (who may ask, the coded reasons, the time box) and policy.csv's
rows under the relation `breakglass` (what it shows). Each refusal says why; each grant is stored, alerted
at once and queued for review (`proxy.cases`), and its record in the trail names it.
"""

from __future__ import annotations

import re
import time
from typing import Any

import orjson
import structlog

from proxy.asgi import Incoming, Reply
from proxy.audit import AuditRecord
from proxy.cases import GrantRow, iso, new_alert, new_grant_id
from proxy.errors import GatewayError
from proxy.identity import Principal
from proxy.keys import seal
from proxy.policy import PolicyBundle, opened_by_breakglass
from proxy.routes import PSEUDONYM, Shape
from proxy.runtime import Runtime

log = structlog.get_logger("fieldguard.breakglass")

HEADER = b"x-fieldguard-break-glass"
CLIENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_JUSTIFICATION = 2000
FIELDS = frozenset({"client", "reason", "justification", "minutes"})


async def emergency(runtime: Runtime, req: Incoming, principal: Principal, bundle: PolicyBundle,
                    record: AuditRecord) -> Reply:
    rest = req.segments[2:]
    if req.method == "POST" and not rest:
        return await declare(runtime, req, principal, bundle, record)
    if req.method == "GET" and not rest:
        held = runtime.glass.open_for(principal.user, time.time())
        record.clients = sorted(g.pseudonym for g in held.values())
        return Reply.json(200, {"grants": [_shown(g) for g in held.values()]})
    if req.method == "DELETE" and len(rest) == 1:
        return await end(runtime, principal, rest[0], record)
    raise GatewayError(404, "no such FieldGuard endpoint", reason="unknown break-glass endpoint")


async def declare(runtime: Runtime, req: Incoming, principal: Principal, bundle: PolicyBundle,
                  record: AuditRecord) -> Reply:
    rules = bundle.breakglass
    if principal.role not in rules.roles:
        raise GatewayError(403, f"role {principal.role} may not break the glass (breakglass.yaml lists who may)",
                           reason="break-glass not allowed for role")
    asked = await _body(req, runtime.settings.server.max_body_bytes, runtime.settings.server.body_timeout_seconds)
    code = asked.get("reason")
    reason = rules.reasons.get(code) if isinstance(code, str) else None
    if reason is None:
        raise GatewayError(422, f"reason must be one of: {', '.join(sorted(rules.reasons))}",
                           reason="break-glass reason unknown")
    text = asked.get("justification")
    if not isinstance(text, str) or len(text.strip()) < rules.min_justification_chars:
        raise GatewayError(422, f"justification must say why, in at least {rules.min_justification_chars} "
                                "characters: a code alone is not a reason", reason="break-glass justification short")
    if len(text) > MAX_JUSTIFICATION:
        raise GatewayError(422, f"justification is longer than {MAX_JUSTIFICATION} characters",
                           reason="break-glass justification long")
    minutes = asked.get("minutes", rules.default_minutes)
    if isinstance(minutes, bool) or not isinstance(minutes, int) or not 1 <= minutes <= rules.max_minutes:
        raise GatewayError(422, f"minutes must be a whole number from 1 to {rules.max_minutes}",
                           reason="break-glass minutes out of range")
    if not bundle.table.purpose_allowed(principal.role, reason.purpose):
        raise GatewayError(403, f"purpose of use {reason.purpose} not allowed for role {principal.role}",
                           reason="purpose not allowed")
    classes = opened_by_breakglass(bundle.table, principal.role)
    if not classes:
        raise GatewayError(403, f"policy.csv opens nothing to role {principal.role} under break-glass",
                           reason="break-glass opens nothing")
    client = await _client(runtime, bundle, asked.get("client"))
    ring, store = runtime.ring, runtime.cases
    assert ring is not None and store is not None
    pseudonym = (await ring.pseudonyms([client]))[client]
    record.clients = [pseudonym]
    now = time.time()
    grant_id = new_grant_id()
    grant = GrantRow(grant_id=grant_id, user=principal.user, role=principal.role, client_id=client,
                     pseudonym=pseudonym, reason=reason.code, purpose=reason.purpose,
                     justification=await _sealed(runtime, client, grant_id, text.strip()), classes=tuple(classes),
                     policy=bundle.digest, opened_at=now, expires_at=now + 60 * minutes,
                     review_due=now + 86400 * rules.review_days)
    held = await store.open_grant(grant, new_alert(grant, reason.label))
    if held is not None:
        record.break_glass = held.grant_id
        raise GatewayError(409, f"a break-glass grant for this client is already open until {iso(held.expires_at)} "
                                f"({held.grant_id}); grants are not stacked", reason="break-glass already open")
    runtime.glass.add(grant)
    runtime.wake("alerts")
    record.break_glass, record.purpose = grant_id, reason.purpose
    record.reason = f"break-glass opened: {reason.code}"
    record.counts = {"minutes": minutes}
    # the register's entry: what the emergency opens, to whom, why (a disclosure inside the service)
    record.disclosure = {"basis": "breakglass", "reason": reason.code, "grant": grant_id, "recipient": principal.user,
                         "role": principal.role, "classes": list(classes), "until": iso(grant.expires_at)}
    runtime.metrics.inc("fieldguard_breakglass_opened_total", reason=reason.code, role=principal.role)
    log.warning("break-glass opened", grant=grant_id, user=principal.user, role=principal.role, client=pseudonym,
                reason=reason.code, classes=classes, expires_at=iso(grant.expires_at))
    return Reply.json(201, _shown(grant), [(HEADER, _header(grant))])


async def end(runtime: Runtime, principal: Principal, grant_id: str, record: AuditRecord) -> Reply:
    held = next((g for g in runtime.glass.open_for(principal.user, time.time()).values()
                 if g.grant_id == grant_id), None)
    store = runtime.cases
    assert store is not None
    if held is None or not await store.end_grant(grant_id, principal.user, time.time(), holder=principal.user):
        raise GatewayError(404, "no open break-glass grant of yours by that id", reason="break-glass grant unknown")
    runtime.glass.end(held)
    record.clients, record.break_glass, record.reason = [held.pseudonym], grant_id, "break-glass ended"
    log.info("break-glass ended", grant=grant_id, user=principal.user)
    return Reply.json(200, {"grant": grant_id, "ended": True})


def _header(grant: GrantRow) -> bytes:
    return f'{grant.grant_id}; reason="{grant.reason}"; expires="{iso(grant.expires_at)}"'.encode()


def _shown(grant: GrantRow) -> dict[str, Any]:
    return {"grant": grant.grant_id, "client": grant.pseudonym, "reason": grant.reason, "purpose": grant.purpose,
            "classes": list(grant.classes), "opened_at": iso(grant.opened_at), "expires_at": iso(grant.expires_at),
            "review_by": iso(grant.review_due)}


async def _body(req: Incoming, limit: int, seconds: float) -> dict[str, Any]:
    content_type = req.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/json":
        raise GatewayError(415, "request body must be application/json")
    try:
        body = orjson.loads(await req.body(limit, seconds))
    except orjson.JSONDecodeError:
        raise GatewayError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise GatewayError(422, "request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise GatewayError(422, f"unknown field {unknown[0]!r} (known: {', '.join(sorted(FIELDS))})",
                           reason="break-glass field unknown")
    return body


async def _client(runtime: Runtime, bundle: PolicyBundle, given: Any) -> str:
    """The CRM id of the client asked for (by id or by pseudonym), once the CRM is known to hold them."""
    if isinstance(given, int) and not isinstance(given, bool):
        given = str(given)
    if not isinstance(given, str) or not CLIENT_ID.fullmatch(given):
        raise GatewayError(422, "client must be the client's id or pseudonym", reason="break-glass client invalid")
    ring = runtime.ring
    assert ring is not None
    if PSEUDONYM.match(given):
        found = await ring.store.client_of_pseudonym(given)
        if found is None:
            raise GatewayError(404, "no such client", reason="unknown pseudonym")
        given = found
    client: str = given
    if await ring.store.tombstoned([client]):
        raise GatewayError(410, "this client's records were erased", reason="client erased")
    if client in runtime.index.counsellor_of:
        return client
    fm = bundle.fieldmap
    route = next((r for r in fm.routes if r.resource == fm.relations.resource and r.method == "GET"
                  and r.shape is Shape.RECORD and [p[1] for p in r.params] == ["client_id"]), None)
    if route is None or not _fits(route.params[0][2], client):
        raise GatewayError(404, "no such client", reason="break-glass client unknown")
    status = (await runtime.upstream.request("GET", route.render(route.template, {"client_id": client}),
                                             {"accept": "application/json"})).status
    if status == 404:
        raise GatewayError(404, "no such client", reason="break-glass client unknown")
    if status != 200:
        raise GatewayError(502, "the CRM could not say whether the client exists", reason=f"upstream status {status}")
    return client


def _fits(kind: str, value: str) -> bool:
    return value.isdigit() if kind == "int" else True


async def _sealed(runtime: Runtime, client: str, grant_id: str, text: str) -> str:
    """The justification under the client's record key (shredded with the client), where the deployment
    encrypts; as it was written where it does not."""
    ring = runtime.ring
    if ring is None or not ring.can_encrypt:
        return text
    key = await ring.for_writing(client, "record")
    return seal(key.aead, key.key.key_id, text, "breakglass", "justification", "breakglass", grant_id.encode())

"""Rectification (UK GDPR Art. 16): a client's correction, recorded by the DPO, applied or refused by a
practitioner through the gateway.

    GET  /_fieldguard/rectifications         the open requests the caller may apply (their correction opened)
    POST /_fieldguard/rectifications/{req}   {"decision": "refused", "reason": "..."}
    PATCH|PUT <the record's route>  with  X-FieldGuard-Rectification: {req}   applies it

A caller may apply or refuse a request when policy lets them write the field's class for that client (a
counsellor, for her own caseload). The write is an ordinary write, decided, sealed and audited as any other;
the header only ties it to the request, which closes when the CRM accepts it, and its audit record names the
request and the paths written. What the client asked for is sealed under their record key, like a note.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson

from proxy.asgi import Incoming, Reply
from proxy.audit import AuditRecord
from proxy.cases import RightsRequest
from proxy.errors import GatewayError
from proxy.identity import Principal
from proxy.keys import PREFIX as SEALED
from proxy.keys import KeyRing, seal
from proxy.keys.envelope import EnvelopeError, open_sealed, parse
from proxy.policy import PolicyBundle
from proxy.routes import Route
from proxy.runtime import Runtime

HEADER = "x-fieldguard-rectification"
_AAD = ("rectification", "correction", "rectification")


async def seal_correction(ring: KeyRing, client_id: str, request_id: str, text: str) -> str:
    """The client's words under their record key: shredded with them."""
    if not ring.can_encrypt:
        return text
    key = await ring.for_writing(client_id, "record")
    return seal(key.aead, key.key.key_id, text, *_AAD, request_id.encode())


async def open_correction(ring: KeyRing, r: RightsRequest) -> str | None:
    text = str(r.detail.get("correction", ""))
    if not text.startswith(SEALED):
        return text
    try:
        envelope = parse(text)
        await ring.prefetch([envelope[1]])
        opened = ring.opened(envelope[1])
        if opened is None or opened.key.client_id != r.client_id:
            return None
        return str(open_sealed(opened.aead, envelope, *_AAD, r.request_id.encode()))
    except EnvelopeError:
        return None


def _may_apply(runtime: Runtime, bundle: PolicyBundle, principal: Principal, r: RightsRequest) -> bool:
    """Whether policy lets the caller write the field's class for the client."""
    ctx = runtime.context
    resource = bundle.fieldmap.resources.get(str(r.detail.get("resource")))
    if ctx is None or resource is None:
        return False
    spec = next((s for s in resource.specs if s.path == r.detail.get("field")), None)
    if spec is None:
        return False
    relations = ctx.index.relations(principal.staff, principal.client_id, r.client_id,
                                    (*bundle.cover, *ctx.index.cover), datetime.now(UTC))
    view = bundle.table.view(principal.role, relations)
    return view is not None and spec.field_class in view.writable


async def rectifications(runtime: Runtime, req: Incoming, principal: Principal, bundle: PolicyBundle,
                         record: AuditRecord) -> Reply:
    store, ring = runtime.cases, runtime.ring
    if store is None or ring is None:
        raise GatewayError(503, "the cases store is not open", reason="cases store not open")
    rest = req.segments[2:]
    if req.method == "GET" and not rest:
        mine = [r for r in await store.requests(kind="rectification", open_only=True)
                if _may_apply(runtime, bundle, principal, r)]
        record.clients = sorted({r.pseudonym for r in mine})
        return Reply.json(200, {"requests": [{**_shown(r), "correction": await open_correction(ring, r)}
                                             for r in mine]})
    if req.method == "POST" and len(rest) == 1:
        r = await _open_request(runtime, bundle, principal, rest[0], record)
        asked = await _body(req, runtime)
        why = asked.get("reason")
        if asked.get("decision") != "refused" or not isinstance(why, str) or len(why.strip()) < 10:
            raise GatewayError(422, 'send {"decision": "refused", "reason": "..."} (at least 10 characters); a '
                                    "correction is applied by writing it", reason="rectification decision invalid")
        if not await store.update_request(r.request_id, "refused", closed_by=principal.user, closed_at=time.time(),
                                          outcome=why.strip()):
            raise GatewayError(409, "the request was closed meanwhile", reason="rectification closed")
        record.reason = f"rectification refused: {r.request_id}"
        return Reply.json(200, {"request": r.request_id, "status": "refused"})
    raise GatewayError(404, "no such FieldGuard endpoint", reason="unknown rectification endpoint")


async def applying(runtime: Runtime, req: Incoming, principal: Principal, bundle: PolicyBundle, route: Route,
                   params: dict[str, str], record: AuditRecord) -> RightsRequest | None:
    """The request a write says it applies (X-FieldGuard-Rectification), checked before the write: open, for
    the record this route addresses, and the caller one who may apply it. None when the header is absent."""
    given = req.headers.get(HEADER)
    if given is None:
        return None
    r = await _open_request(runtime, bundle, principal, given.strip(), record)
    record_id = next((params[name] for _, name, _ in route.params if name != "client_id"), None) \
        or params.get("client_id")
    if req.method not in ("PATCH", "PUT") or route.resource != r.detail.get("resource") \
            or record_id != str(r.detail.get("record")):
        raise GatewayError(409, f"{r.request_id} corrects {r.detail.get('resource')} {r.detail.get('record')}: apply "
                                "it with a PATCH or PUT of that record", reason="rectification elsewhere")
    return r


async def applied(runtime: Runtime, r: RightsRequest, principal: Principal, status: int, record: AuditRecord) -> None:
    """After the write: the CRM took it, so the request is closed as applied; its record names it."""
    record.rectification = r.request_id
    if status < 300 and runtime.cases is not None:
        paths = ", ".join(record.written) or "nothing"
        await runtime.cases.update_request(r.request_id, "completed", closed_by=principal.user,
                                           closed_at=time.time(), outcome=f"applied: {paths}")
        record.reason = f"rectification applied: {r.request_id}"


async def _open_request(runtime: Runtime, bundle: PolicyBundle, principal: Principal, request_id: str,
                        record: AuditRecord) -> RightsRequest:
    assert runtime.cases is not None
    r = await runtime.cases.request(request_id)
    if r is None or r.kind != "rectification":
        raise GatewayError(404, "no such rectification request", reason="rectification unknown")
    record.clients = [r.pseudonym]
    if not _may_apply(runtime, bundle, principal, r):
        raise GatewayError(403, "you may not change this field of this client's record", reason="rectification "
                                "not yours")
    if not r.is_open:
        raise GatewayError(409, f"{request_id} is {r.status}", reason="rectification closed")
    return r


async def _body(req: Incoming, runtime: Runtime) -> dict[str, Any]:
    raw = await req.body(runtime.settings.server.max_body_bytes, runtime.settings.server.body_timeout_seconds)
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise GatewayError(400, "the body is not JSON", reason="invalid JSON") from None
    if not isinstance(doc, dict):
        raise GatewayError(400, "the body must be a JSON object", reason="invalid JSON")
    return doc


def _shown(r: RightsRequest) -> dict[str, Any]:
    return {"request": r.request_id, "client": r.client_id, "resource": r.detail.get("resource"),
            "record": r.detail.get("record"), "field": r.detail.get("field"), "received": r.received, "due": r.due,
            "reference": r.reference}

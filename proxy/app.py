"""The gateway: one pure ASGI application in front of the CRM.

One request, in the order `Gateway.serve` takes it:

    1. authenticate  a verified bearer token becomes a `Principal` (no identity, no access)
    2. match         the normalised path against the field map's routes (unknown: refused)
    3. authorise     the active role is known and may act for the stated purpose of use
    4. read          a write's JSON body, parsed once
    5. locate        whose record it is, and how the caller stands to that client (need to know)
    6. check         every field written allowed for this client; sensitive ones sealed with its key
    7. forward       to the CRM, on the normalised path with the allowed query
    8. rewrite       the answer, field by field, for this caller
    9. record        the audit record, committed before a byte of the response leaves

Every refusal and fault becomes a short JSON error (status, message, request id; never a stack trace or
a value) and an audit record too. No record, no data: if the trail cannot take it, the caller gets 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

import structlog

from proxy.asgi import Incoming, Receive, Reply, Scope, Send, error_body, send_reply
from proxy.audit import AuditRecord, AuditUnavailable, Siem
from proxy.changes import kind_of
from proxy.config import Settings
from proxy.emergency import HEADER as BREAK_GLASS
from proxy.emergency import emergency
from proxy.errors import GatewayError
from proxy.identity import Principal
from proxy.keys import KeystoreUnavailable
from proxy.officer import PREFIX, compare_shadow, officer
from proxy.policy import ANONYMOUS as ANONYMOUS_ROLE
from proxy.policy import PolicyBundle
from proxy.postgres import DatabaseError
from proxy.probes import PROBES, probe
from proxy.rectification import applied, applying, rectifications
from proxy.routes import PSEUDONYM, Route, normalise_path
from proxy.runtime import Runtime
from proxy.subject_access import own_copy
from proxy.writes import WriteRefused

log = structlog.get_logger("fieldguard.gateway")


class Gateway:
    """The ASGI application. Construct with settings; uvicorn drives the lifespan."""

    def __init__(self, settings: Settings, siem: Siem | None = None, bundle: PolicyBundle | None = None) -> None:
        self.runtime = Runtime(settings, siem, bundle)
        self._background: set[asyncio.Task[None]] = set()  # records no response waits for, on their way

    @property
    def bundle(self) -> PolicyBundle:
        return self.runtime.bundle

    async def startup(self) -> None:
        await self.runtime.start()

    async def shutdown(self) -> None:
        await self.runtime.stop()

    # ------------------------------------------------------------------ ASGI
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """No route is a WebSocket: the upgrade is refused (403 before accepting), and audited."""
        req = Incoming.of(scope, receive)
        record = AuditRecord(request_id=req.request_id, method="WEBSOCKET", policy=self.runtime.bundle.digest,
                             caller_request_id=req.caller_request_id, peer=req.peer or None, status=403,
                             outcome="denied", reason="websocket refused")
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.close", "code": 1008})
        with contextlib.suppress(AuditUnavailable):
            await self.runtime.trail.append(record)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # the shared database's own messages carry no secret: said in full
                    log.error("gateway failed to start", error=type(exc).__name__,
                              detail=str(exc) if isinstance(exc, DatabaseError) else None)
                    await send({"type": "lifespan.startup.failed", "message": type(exc).__name__})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        req = Incoming.of(scope, receive)
        runtime = self.runtime
        if scope["path"] in PROBES and req.method == "GET":  # no data: no identity, not audited
            await send_reply(send, await probe(runtime, scope["path"], req.headers), req.request_id)
            return
        bundle = runtime.bundle  # one policy decides the request and is named in its record
        record = AuditRecord(request_id=req.request_id, method=req.method, policy=bundle.digest,
                             caller_request_id=req.caller_request_id, peer=req.peer or None)
        runtime.coming += 1
        try:
            reply = await self._answer(req, bundle, record)
        finally:
            runtime.coming -= 1  # the record is handed over next, with no await in between
        if record.break_glass and not any(name == BREAK_GLASS for name, _ in reply.headers):
            reply.headers.append((BREAK_GLASS, record.break_glass.encode()))  # marked, whatever the answer
        record.status = reply.status
        record.duration_ms = round((time.perf_counter() - started) * 1000, 3)
        runtime.metrics.inc("fieldguard_requests_total", outcome=record.outcome, status=str(reply.status))
        if record.decrypt_failures:
            runtime.metrics.inc("fieldguard_decrypt_failures_total", len(record.decrypt_failures))
        try:  # 9. record
            await runtime.trail.append(record)
        except AuditUnavailable as exc:
            # no durable record, no data: the caller learns nothing but that the trail is down
            if reply.stream is not None:
                reply.stream.close()
            reply = Reply(503, error_body("audit trail unavailable; nothing was released", req.request_id))
            if exc.queued:  # the record may still land, saying what the caller never got: a correction follows it
                self._correct(record, str(exc))
            record.status, record.outcome, record.reason = 503, "error", f"withheld: {exc}"
            runtime.metrics.inc("fieldguard_audit_withheld_total")
            with contextlib.suppress(Exception):
                runtime.trail.siem.append(record)
        await send_reply(send, reply, req.request_id)

    def _correct(self, record: AuditRecord, why: str) -> None:
        """Queue a record amending one whose commit timed out: the trail will hold both, the first with the
        status the caller would have had, this one saying they got 503 and nothing was released. Queued in
        the background, so the 503 is not held for it; if the trail is down it reaches the SIEM log only."""
        amendment = AuditRecord(request_id=secrets.token_hex(12), method=record.method, policy=record.policy,
                                peer=record.peer, user=record.user, role=record.role, roles=record.roles,
                                purpose=record.purpose, token_id=record.token_id, route=record.route,
                                clients=record.clients, status=503, outcome="error", reason=f"withheld: {why}",
                                amends=record.request_id)
        self._append_later(amendment)

    def refused_connection(self, status: int, message: str, request_id: str, peer: str | None) -> None:
        """A request refused by the connection before the application saw it (a head too large or too slow,
        `proxy.connection`): audited like any denial, with no user, since no token was read."""
        log.warning("request refused at the connection", status=status, reason=message, request_id=request_id)
        self.runtime.metrics.inc("fieldguard_requests_total", outcome="denied", status=str(status))
        self._append_later(AuditRecord(request_id=request_id, method="HTTP", policy=self.runtime.bundle.digest,
                                       peer=peer, status=status, outcome="denied", reason=message))

    def _append_later(self, record: AuditRecord) -> None:
        """Audit a record no response waits for, in the background; if the trail is down, the SIEM log has it."""
        trail = self.runtime.trail

        async def append() -> None:
            try:
                await trail.append(record)
            except AuditUnavailable:
                with contextlib.suppress(Exception):
                    trail.siem.append(record)

        task = asyncio.get_running_loop().create_task(append())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _answer(self, req: Incoming, bundle: PolicyBundle, record: AuditRecord) -> Reply:
        """The reply to one audited request; every refusal and fault is a short JSON error."""
        try:
            req.segments = normalise_path(req.raw_path)
            return await self.serve(req, bundle, record)
        except GatewayError as exc:
            record.outcome = "denied" if exc.status < 500 else "error"
            record.reason = exc.reason
            if isinstance(exc, WriteRefused):
                record.refused = exc.fields
            return Reply(exc.status, error_body(exc.message, record.request_id))
        except KeystoreUnavailable as exc:
            log.error("keystore unavailable; nothing encrypted released", error=str(exc), request_id=record.request_id)
            record.outcome, record.reason = "error", f"keystore unavailable: {exc}"[:200]
            return Reply(503, error_body("keystore unavailable; nothing was released", record.request_id))
        except Exception as exc:  # never a stack trace or a value to the caller
            log.error("internal error", error=type(exc).__name__, request_id=record.request_id, where=_where(exc))
            record.outcome, record.reason = "error", f"internal error: {type(exc).__name__}"
            return Reply(500, error_body("internal error", record.request_id))

    # ------------------------------------------------------------------ the pipeline
    async def serve(self, req: Incoming, bundle: PolicyBundle, record: AuditRecord) -> Reply:
        """Steps 1 to 8 for one request, in order; each raises `GatewayError` to refuse."""
        runtime = self.runtime
        matched = bundle.routes.match(req.method, req.segments)
        public = matched is not None and matched[0].public
        if "authorization" in req.repeated:  # which one would count? neither
            raise GatewayError(400, "send one Authorization header", reason="repeated authorization header")
        # 1. authenticate (a public route has nobody to: it is decided for the anonymous role, like any caller)
        principal = ANONYMOUS if public else runtime.verifier.authenticate(req.headers)
        _record_caller(record, principal)
        if req.segments[:2] == (PREFIX, "break-glass"):  # a practitioner's emergency, not an officer's tool
            record.route = "/_fieldguard/break-glass" + ("/{grant}" if len(req.segments) > 2 else "")
            _authorise(bundle, principal)
            return await emergency(runtime, req, principal, bundle, record)
        if req.segments[:2] == (PREFIX, "rectifications"):  # a practitioner's answer to a client's correction
            record.route = "/_fieldguard/rectifications" + ("/{request}" if len(req.segments) > 2 else "")
            _authorise(bundle, principal)
            return await rectifications(runtime, req, principal, bundle, record)
        if req.segments[:2] == (PREFIX, "subject-access"):  # the client's own copy (UK GDPR Art. 15, 20)
            record.route = "/_fieldguard/subject-access"
            _authorise(bundle, principal)
            return await own_copy(runtime, req, principal, bundle, record)
        if req.segments[:1] == (PREFIX,):
            record.route = "/" + "/".join(req.segments)
            return await officer(runtime, req, principal, bundle, record)
        if matched is None:  # 2. match
            raise GatewayError(403, "route not allowed", reason="unknown route")
        route, params = matched
        record.route = route.template
        if not public:
            _authorise(bundle, principal)  # 3. authorise
        await self._unpseudonymise(route, params, req)
        correcting = await applying(runtime, req, principal, bundle, route, params, record)
        assert runtime.context is not None
        exchange = kind_of(route)(runtime.context, bundle, principal, route, params, req, record)
        try:
            await exchange.read()  # 4. read
            exchange.require_fresh_relations()
            async with runtime.upstream.share.turn(route.template):  # one route cannot take the CRM's pool
                await exchange.locate()  # 5. locate, on facts fresh enough to decide on
                body = await exchange.check()  # 6. check (and seal)
                answer = await exchange.forward(body)  # 7. forward
                reply = await exchange.rewrite(answer)  # 8. rewrite
            if correcting is not None:
                await applied(runtime, correcting, principal, reply.status, record)
            return reply
        finally:
            await exchange.finish()
            compare_shadow(runtime, exchange, record)

    async def _unpseudonymise(self, route: Route, params: dict[str, str], req: Incoming) -> None:
        """A client addressed by their pseudonym: resolved to the CRM id here, which never reaches the caller."""
        given = params.get("client_id")
        if given is None or not PSEUDONYM.match(given):
            return
        ring = self.runtime.ring
        client = await ring.store.client_of_pseudonym(given) if ring is not None else None
        if client is None:
            raise GatewayError(404, "no such client", reason="unknown pseudonym")
        params["client_id"] = client
        index = next(i for i, name, _ in route.params if name == "client_id")
        req.segments = (*req.segments[:index], client, *req.segments[index + 1:])


# A public route's caller. Its user has no "u:" prefix, so no token's subject can be recorded as it.
ANONYMOUS = Principal(subject="", roles=frozenset({ANONYMOUS_ROLE}), role=ANONYMOUS_ROLE, purpose="PUBLIC")


def _record_caller(record: AuditRecord, principal: Principal) -> None:
    record.user = principal.user if principal is not ANONYMOUS else ANONYMOUS_ROLE
    record.role, record.roles = principal.role, sorted(principal.roles)
    record.purpose, record.token_id = principal.purpose, principal.token_id


def _authorise(bundle: PolicyBundle, principal: Principal) -> None:
    table = bundle.table
    if principal.role not in table.roles:
        raise GatewayError(403, "role not known to the policy", reason="unknown role")
    if not table.purpose_allowed(principal.role, principal.purpose):
        raise GatewayError(403, f"purpose of use {principal.purpose} not allowed for role {principal.role}",
                           reason="purpose not allowed")


def _where(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"

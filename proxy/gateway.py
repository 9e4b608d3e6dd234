"""The gateway: one pure ASGI application in front of the CRM.

One request: identify the caller, match the route on the normalised path, authorise role and purpose,
check (and seal) a write body, forward, rewrite the answer field by field, write the audit record, and
only then send the response. Every refusal is a short JSON error and an audit record too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
import structlog

from proxy.audit import AuditRecord, Disclosure, JsonLinesTrail, MultiTrail
from proxy.checkpoints import CheckpointSigner, load_public
from proxy.config import Settings
from proxy.custody import open_kek, open_keyring
from proxy.decision import Outcome, Relation, View
from proxy.errors import GatewayError
from proxy.fieldcipher import FieldCipher, seal_fields
from proxy.fieldmap import Resource
from proxy.identity import IdentitySettings, Principal, TokenVerifier
from proxy.keyring import KeyRing
from proxy.metrics import Metrics
from proxy.policy import BundleSource, PolicyBundle, PolicyError, load_bundle
from proxy.redact import Redactor
from proxy.relations import RelationIndex
from proxy.reload import PolicyWatcher
from proxy.routes import Route, Shape, Verb, encode_path, normalise_path
from proxy.trail import AuditUnavailable, DurableTrail, UndurableTrail
from proxy.upstream import OpenStream, Upstream, UpstreamResponse, UpstreamSettings
from proxy.writes import WriteRefused, check_write

log = structlog.get_logger("fieldguard.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
_JSON = b"application/json"
_PROBES = frozenset({"/healthz", "/readyz", "/metrics"})  # no data: no identity, not audited
OFFICER_PREFIX = "_fieldguard"  # the gateway's own endpoints (explain, reload): officers only, audited


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]
    stream: OpenStream | None = None  # opaque routes: the body is streamed from the CRM


def error_body(message: str, request_id: str) -> bytes:
    return orjson.dumps({"error": message, "request_id": request_id})


def open_trail(settings: Settings, siem: JsonLinesTrail | MultiTrail | None = None,
               coming: Callable[[], int] = lambda: 0) -> DurableTrail | UndurableTrail:
    """The deployment's durable audit trail, with its SIEM copy. `coming` counts the requests whose
    records are still to be handed over: group commit waits for them."""
    audit = settings.audit
    siem = siem or JsonLinesTrail(str(settings.path(audit.log)) if audit.log != "-" else "-")
    if not audit.durable:
        return UndurableTrail(siem)
    return DurableTrail(
        settings.path(audit.store), CheckpointSigner(settings.path(settings.keys.dir) / audit.signing_key),
        origin=audit.origin, timeout_seconds=audit.timeout_seconds, checkpoint_every=audit.checkpoint_every,
        checkpoint_seconds=audit.checkpoint_seconds, max_bytes=audit.max_bytes,
        commit_delay_seconds=max(0.0, min(audit.commit_delay_ms / 1000, audit.timeout_seconds / 4)),
        coming=coming, siem=siem)


def policy_source(settings: Settings) -> BundleSource:
    fields = settings.policy.fields_file
    return BundleSource(settings.path(settings.policy.dir), settings.path(fields) if fields else None)


class Gateway:
    """The ASGI application. Construct with settings; uvicorn drives the lifespan."""

    def __init__(self, settings: Settings, siem: JsonLinesTrail | MultiTrail | None = None,
                 bundle: PolicyBundle | None = None) -> None:
        self.settings = settings
        keys_dir = settings.path(settings.keys.dir)
        self.proofs = keys_dir / "proofs"
        officer = load_public(settings.path(settings.policy.signing_public_key)) \
            if settings.policy.require_signature else None
        bundle = bundle or load_bundle(policy_source(settings), self.proofs, officer)
        self.metrics = Metrics()
        self.policy = PolicyWatcher(bundle, self.proofs, officer, on_swap=self._swapped, on_failure=self._refused)
        self.shadow: PolicyWatcher | None = None
        if settings.policy.shadow_dir:
            candidate = BundleSource(settings.path(settings.policy.shadow_dir))
            self.shadow = PolicyWatcher(load_bundle(candidate, self.proofs), self.proofs)
        ident = settings.identity
        self.verifier = TokenVerifier(IdentitySettings(
            issuer=ident.issuer,
            audience=ident.audience,
            public_key_file=settings.path(ident.public_key_file) if ident.public_key_file else None,
            jwks_file=settings.path(ident.jwks_file) if ident.jwks_file else None,
            demo_hs256_secret_file=(
                settings.path(ident.demo_hs256_secret_file) if ident.demo_hs256_secret_file else None
            ),
            demo=ident.demo,
            roles_claim=ident.roles_claim,
            purpose_claim=ident.purpose_claim,
            client_claim=ident.client_claim,
            leeway_seconds=ident.leeway_seconds,
        ))
        up = settings.upstream
        self.upstream = Upstream(UpstreamSettings(
            url=up.url,
            timeout_seconds=up.timeout_seconds,
            connect_timeout_seconds=up.connect_timeout_seconds,
            max_response_bytes=up.max_response_bytes,
            pool_size=up.pool_size,
            headers=up.headers,
        ))
        self.forward_headers = tuple(h.lower() for h in up.forward_headers)
        self.index = RelationIndex()
        encrypted = any(c.key_scope for c in bundle.fieldmap.classes.values())
        self.kek = open_kek(settings) if encrypted else None
        self.ring: KeyRing | None = None
        self.coming = 0  # requests being served whose audit record is not yet handed to the trail
        self.trail = open_trail(settings, siem, coming=lambda: self.coming)
        self.siem = self.trail.siem
        self._tasks: list[asyncio.Task[None]] = []
        self._last_refresh = 0.0
        self._refreshing = False

    @property
    def bundle(self) -> PolicyBundle:
        return self.policy.bundle

    # ------------------------------------------------------------------ ASGI
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": type(exc).__name__})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        await self.trail.open()
        self.ring = await open_keyring(self.settings, self.kek)
        self._tasks.append(asyncio.create_task(
            self.ring.watch_revocations(self.settings.keys.revocation_poll_seconds)))
        await self.upstream.start()
        await self.refresh_relations()
        if self.settings.policy.watch:
            self._tasks.append(asyncio.create_task(self.policy.watch(self.settings.policy.poll_seconds)))
            if self.shadow is not None:
                self._tasks.append(asyncio.create_task(self.shadow.watch(self.settings.policy.poll_seconds)))
        if self.settings.server.pid_file:
            self.settings.path(self.settings.server.pid_file).write_text(f"{os.getpid()}\n")
        self.metrics.gauge("fieldguard_audit_records", lambda: float(self.trail.health()["records"]))
        self.metrics.gauge("fieldguard_relations_clients", lambda: float(len(self.index.counsellor_of)))
        self._tasks.append(asyncio.create_task(self._refresh_loop()))
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, lambda: self._tasks.append(asyncio.create_task(self._reload_quietly()))
            )
        log.info("gateway ready", policy=self.bundle.short_hash, upstream=self.upstream.base,
                 routes=len(self.bundle.routes.routes), clients=len(self.index.counsellor_of))

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.upstream.close()
        if self.settings.server.pid_file:
            with contextlib.suppress(OSError):
                self.settings.path(self.settings.server.pid_file).unlink()
        if self.ring is not None:
            await self.ring.store.close()
        await self.trail.close()

    async def _reload_quietly(self) -> None:
        await self.policy.reload()
        if self.shadow is not None:
            await self.shadow.reload()

    async def _swapped(self, old: PolicyBundle, new: PolicyBundle) -> None:
        self.metrics.inc("fieldguard_policy_reloads_total", result="applied")
        await self._policy_event("allowed", f"policy {old.short_hash} replaced by {new.short_hash}", new.digest)

    async def _refused(self, error: PolicyError) -> None:
        self.metrics.inc("fieldguard_policy_reloads_total", result="refused")
        first = "; ".join(str(f) for f in error.findings[:3])
        await self._policy_event("error", f"policy reload refused, previous policy kept: {first}"[:500],
                                 self.bundle.digest)

    async def _policy_event(self, outcome: str, reason: str, digest: str) -> None:
        """Rollouts are audited like accesses: auditors see when the rules changed, and failed attempts."""
        record = AuditRecord(request_id=secrets.token_hex(12), method="POLICY", route="policy reload",
                             outcome=outcome, reason=reason, policy=digest, status=200 if outcome == "allowed" else 409)
        try:
            await self.trail.append(record)
        except AuditUnavailable:
            log.error("policy change could not be audited", outcome=outcome)

    async def refresh_relations(self) -> None:
        fm = self.bundle.fieldmap
        self._last_refresh = time.monotonic()
        try:
            await self.index.sync(fm.relations, fm.list_format.items, self.upstream.get_json)
        except (GatewayError, ValueError) as exc:
            self.index.last_error = str(exc)
            log.error("relations sync failed; unknown relations show less", reason=str(exc))

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.relations.refresh_seconds)
            await self.refresh_relations()

    def _refresh_soon(self) -> None:
        """A client the index does not know: re-read the facts, at most every five seconds."""
        if self._refreshing or time.monotonic() - self._last_refresh < 5:
            return
        self._refreshing = True

        async def run() -> None:
            try:
                await self.refresh_relations()
            finally:
                self._refreshing = False

        self._tasks.append(asyncio.create_task(run()))

    # ------------------------------------------------------------------ one request
    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers = _headers(scope)
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else secrets.token_hex(12)
        method = str(scope["method"]).upper()
        if scope["path"] in _PROBES and method == "GET":
            await _send(send, await self._probe(scope["path"][1:]), request_id)
            return
        bundle = self.bundle  # one policy decides the request and is named in its record
        record = AuditRecord(request_id=request_id, method=method, policy=bundle.digest)
        self.coming += 1
        try:
            reply = await self._answer(scope, receive, headers, method, bundle, record)
        finally:
            self.coming -= 1  # the record is handed over next, with no await in between
        record.status = reply.status
        record.duration_ms = round((time.perf_counter() - started) * 1000, 3)
        self.metrics.inc("fieldguard_requests_total", outcome=record.outcome, status=str(reply.status))
        if record.decrypt_failures:
            self.metrics.inc("fieldguard_decrypt_failures_total", len(record.decrypt_failures))
        try:
            await self.trail.append(record)
        except AuditUnavailable as exc:
            # no durable record, no data: the caller learns nothing but that the trail is down
            if reply.stream is not None:
                reply.stream.close()
            reply = Reply(503, error_body("audit trail unavailable; nothing was released", request_id), [])
            record.status, record.outcome, record.reason = 503, "error", f"withheld: {exc}"
            self.metrics.inc("fieldguard_audit_withheld_total")
            with contextlib.suppress(Exception):
                await self.siem.append(record)
        await _send(send, reply, request_id)

    async def _answer(self, scope: Scope, receive: Receive, headers: dict[str, str], method: str,
                      bundle: PolicyBundle, record: AuditRecord) -> Reply:
        """The reply to one audited request; every refusal and fault is a short JSON error."""
        try:
            segments = normalise_path(scope.get("raw_path") or str(scope["path"]).encode())
            if segments[:1] == (OFFICER_PREFIX,):
                return await self._officer(scope, headers, method, segments, bundle, record)
            return await self._exchange(scope, receive, headers, method, segments, bundle, record)
        except GatewayError as exc:
            record.outcome = "denied" if exc.status < 500 else "error"
            record.reason = exc.reason
            if isinstance(exc, WriteRefused):
                record.refused = exc.fields
            return Reply(exc.status, error_body(exc.message, record.request_id), [])
        except Exception as exc:  # never a stack trace or a value to the caller
            log.error("internal error", error=type(exc).__name__, request_id=record.request_id,
                      where=_where(exc))
            record.outcome, record.reason = "error", f"internal error: {type(exc).__name__}"
            return Reply(500, error_body("internal error", record.request_id), [])

    async def _exchange(
        self,
        scope: Scope,
        receive: Receive,
        headers: dict[str, str],
        method: str,
        segments: tuple[str, ...],
        bundle: PolicyBundle,
        record: AuditRecord,
    ) -> Reply:
        matched = bundle.routes.match(method, segments)
        if matched is not None and matched[0].public:
            record.route = matched[0].template
            return await self._public(matched[0], segments, scope, headers, record)
        principal = self.verifier.authenticate(headers)
        record.user, record.role, record.roles = principal.user, principal.role, sorted(principal.roles)
        record.purpose, record.token_id, record.break_glass = (
            principal.purpose, principal.token_id, principal.break_glass)
        if matched is None:
            raise GatewayError(403, "route not allowed", reason="unknown route")
        route, params = matched
        record.route = route.template
        table = bundle.table
        if principal.role not in table.roles:
            raise GatewayError(403, "role not known to the policy", reason="unknown role")
        if not table.purpose_allowed(principal.role, principal.purpose):
            raise GatewayError(403, f"purpose of use {principal.purpose} not allowed for role {principal.role}",
                               reason="purpose not allowed")
        exchange = Exchange(self, bundle, principal, route, params, segments, scope, headers, record)
        try:
            if route.shape is Shape.OPAQUE:
                return await exchange.opaque()
            if route.verb is Verb.READ:
                body_reply = await (exchange.read_list() if route.shape is Shape.LIST else exchange.read_record())
            elif route.verb is Verb.DELETE:
                body_reply = await exchange.delete()
            else:
                body = await _read_body(receive, headers, self.settings.server.max_body_bytes)
                body_reply = await exchange.write(body)
            return body_reply
        finally:
            await exchange.finish()
            if self.shadow is not None:
                self._compare_shadow(exchange)

    async def _officer(self, scope: Scope, headers: dict[str, str], method: str, segments: tuple[str, ...],
                       bundle: PolicyBundle, record: AuditRecord) -> Reply:
        """The security officers' endpoints: `GET /_fieldguard/explain`, `POST /_fieldguard/reload`."""
        principal = self.verifier.authenticate(headers)
        record.user, record.role, record.roles = principal.user, principal.role, sorted(principal.roles)
        record.purpose, record.token_id = principal.purpose, principal.token_id
        record.route = "/" + "/".join(segments)
        if principal.role != self.settings.policy.officer_role:
            raise GatewayError(403, "only the security officer role may use this endpoint", reason="not an officer")
        if not bundle.table.purpose_allowed(principal.role, principal.purpose):
            raise GatewayError(403, f"purpose of use {principal.purpose} not allowed for role {principal.role}",
                               reason="purpose not allowed")
        if segments == (OFFICER_PREFIX, "reload") and method == "POST":
            swapped = await self.policy.reload()
            body = {"reloaded": swapped, "policy": self.bundle.digest, "error": self.policy.status.last_error}
            return Reply(200 if self.policy.status.last_error is None else 409, orjson.dumps(body), [])
        if segments == (OFFICER_PREFIX, "explain") and method == "GET":
            return self._explain(scope, bundle)
        raise GatewayError(404, "no such FieldGuard endpoint", reason="unknown officer endpoint")

    def _explain(self, scope: Scope, bundle: PolicyBundle) -> Reply:
        """The same as `fieldguard policy explain`, with the caseload facts the gateway holds now."""
        from proxy.policytool import explain_class, explain_resource

        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        role, purpose = query.get("role", ""), query.get("purpose")
        rels = Relation.ANY
        try:
            for name in filter(None, query.get("relation", "").split(",")):
                rels |= Relation.parse(name)
        except ValueError as exc:
            raise GatewayError(400, str(exc)) from None
        if "class" in query:
            e = explain_class(bundle.table, role, rels, purpose, query["class"])
            return Reply(200, orjson.dumps(e.as_dict()), [])
        target = query.get("path")
        if not target:
            raise GatewayError(400, "give path= (a route) or class=")
        matched = bundle.routes.match(query.get("method", "GET"), normalise_path(target.encode()))
        if matched is None:
            return Reply(200, orjson.dumps({"route": None, "reason": "no such route: it is refused (403)"}), [])
        route, params = matched
        user = query.get("user")
        if user and "client_id" in params:
            who = Principal(subject=user, roles=frozenset(), role=role, purpose=purpose or "",
                            client_id=query.get("client_id"))
            rels = self.index.relations(who, params["client_id"], bundle.cover, datetime.now(UTC))
        items = explain_resource(bundle.table, bundle.fieldmap, route.resource, role, rels, purpose)
        resource = bundle.fieldmap.resources[route.resource]
        visible = explain_class(bundle.table, role, rels, purpose, resource.record_class).outcome != "remove"
        return Reply(200, orjson.dumps({"route": f"{route.method} {route.template}", "relations": rels.label,
                                        "visible": visible, "fields": [e.as_dict() for e in items]}), [])

    def _compare_shadow(self, exchange: Exchange) -> None:
        """Shadow mode: what the candidate policy would have decided differently, audited, never enforced."""
        assert self.shadow is not None
        candidate = self.shadow.bundle.table
        role = exchange.who.role
        differences: set[str] = set()
        if candidate.purpose_allowed(role, exchange.who.purpose) != exchange.bundle.table.purpose_allowed(
                role, exchange.who.purpose):
            differences.add(f"purpose {exchange.who.purpose}")
        for rels, view in exchange.redactor.views.items():
            other = candidate.view(role, rels)
            for cls in exchange.resource.classes:
                mine = view.outcome(cls)
                theirs = other.outcome(cls) if other is not None else Outcome.REMOVE
                if mine is not theirs:
                    differences.add(f"{cls}: {mine.value} -> {theirs.value} ({rels.label})")
        exchange.record.shadow = sorted(differences)
        exchange.record.shadow_policy = self.shadow.bundle.digest
        if differences:
            self.metrics.inc("fieldguard_shadow_differences_total", route=exchange.route.template)

    async def _public(
        self, route: Route, segments: tuple[str, ...], scope: Scope, headers: dict[str, str], record: AuditRecord
    ) -> Reply:
        """An explicitly public route: forwarded without identity, JSON only, audited as anonymous."""
        resp = await self.upstream.request("GET", encode_path(segments), self._forward_headers(scope, headers, record))
        if not resp.is_json():
            raise GatewayError(502, "upstream answered with a content type this route does not allow")
        record.upstream_status = resp.status
        return Reply(resp.status if resp.status < 500 else 502, resp.body, [])

    async def _probe(self, name: str) -> Reply:
        if name == "healthz":
            return Reply(200, orjson.dumps({"status": "ok"}), [])
        if name == "metrics":
            return Reply(200, self.metrics.render().encode(), [(b"content-type", b"text/plain; version=0.0.4")])
        bundle = self.bundle
        upstream = await self.upstream.reachable()
        relations_ok = self.index.synced_at is not None
        checks = {
            "policy": {"ok": self.policy.status.last_error is None, "hash": bundle.digest,
                       "loaded_at": bundle.loaded_at, "reload_failures": self.policy.status.failures,
                       "last_reload_error": self.policy.status.last_error,
                       "shadow": self.shadow.bundle.digest if self.shadow else None},
            "upstream": {"ok": upstream},
            "relations": {"ok": relations_ok, "clients": len(self.index.counsellor_of),
                          "synced_at": self.index.synced_at, "last_error": self.index.last_error},
        }
        audit = self.trail.health()
        free = audit["free_bytes"]
        audit["ok"] = audit["ok"] and (free is None or free >= self.settings.audit.min_free_bytes)
        checks["audit"] = audit
        ready = upstream and relations_ok and self.policy.status.last_error is None and audit["ok"]
        return Reply(200 if ready else 503, orjson.dumps({"ready": ready, "checks": checks}), [])

    def _forward_headers(self, scope: Scope, headers: dict[str, str], record: AuditRecord) -> dict[str, str]:
        out = {name: headers[name] for name in self.forward_headers if name in headers}
        client = scope.get("client")
        peer = client[0] if client else ""
        prior = headers.get("x-forwarded-for")
        out["x-forwarded-for"] = f"{prior}, {peer}" if prior else peer
        out["x-forwarded-proto"] = str(scope.get("scheme", "http"))
        if "host" in headers:
            out["x-forwarded-host"] = headers["host"]
        out["x-request-id"] = record.request_id
        out["accept"] = "application/json"
        return out


class Exchange:
    """One authorised request on its way through the pipeline, with the caller's context."""

    def __init__(
        self,
        gateway: Gateway,
        bundle: PolicyBundle,
        principal: Principal,
        route: Route,
        params: dict[str, str],
        segments: tuple[str, ...],
        scope: Scope,
        headers: dict[str, str],
        record: AuditRecord,
    ) -> None:
        self.g = gateway
        self.bundle = bundle
        self.who = principal
        self.route = route
        self.params = params
        self.segments = segments
        self.scope = scope
        self.headers = headers
        self.record = record
        self.resource: Resource = bundle.fieldmap.resources[route.resource]
        self.now = datetime.now(UTC)
        self.disclosure = Disclosure()
        self.pseudonyms: dict[str, str] = {}
        self.cipher = FieldCipher(gateway.ring, bundle.fieldmap.classes) if gateway.ring is not None else None
        self.redactor = Redactor(
            bundle.table, principal.role, self.relations_of, self.pseudonyms.get, self.disclosure, bundle.plans,
            cipher=self.cipher, observe=self._observe,
        )

    # -------------------------------------------------------------- facts
    def relations_of(self, client_id: str) -> Relation:
        index = self.g.index
        if client_id not in index.counsellor_of:
            self.g._refresh_soon()
        return index.relations(self.who, client_id, self.bundle.cover, self.now)

    def _observe(self, resource: Resource, record: dict[str, Any]) -> bool:
        source = self.bundle.fieldmap.relations
        if resource.name == source.resource and source.counsellor in record:
            cid = record.get(source.client_id)
            if cid is not None:
                return self.g.index.observe(str(cid), record.get(source.counsellor))
        return False

    def view(self, client_id: str | None) -> View:
        return self.redactor.view_for(client_id)

    async def resolve(self, client_ids: set[str]) -> None:
        """Fetch the pseudonyms of these clients (one keystore query for those not cached)."""
        missing = client_ids - self.pseudonyms.keys()
        if missing and self.g.ring is not None:
            self.pseudonyms.update(await self.g.ring.pseudonyms(missing))

    async def prepare(self, body: bytes, rows: list[Any]) -> None:
        """Before a response is rewritten: its keystore rows and its clients' pseudonyms, in one go each."""
        if self.cipher is not None:
            await self.cipher.prefetch(body)
        await self.resolve({c for row in rows if isinstance(row, dict)
                            and (c := self.redactor.client_of(self.resource, row)) is not None})

    async def finish(self) -> None:
        await self.resolve(set(self.disclosure.clients))
        self.record.add_disclosure(self.disclosure, self.redactor.summary(), self.pseudonyms)

    # -------------------------------------------------------------- forwarding
    def _query(self, extra: dict[str, list[str]] | None = None) -> list[tuple[str, str]]:
        """The caller's query, each parameter allowed by the route and by what it reveals."""
        raw = self.scope.get("query_string", b"").decode("latin-1")
        if not raw and not extra:
            return []
        pairs = parse_qsl(raw, keep_blank_values=True)
        allowed = dict(self.route.query)
        if self.route.shape is Shape.LIST:
            allowed.update({p: None for p in self.bundle.fieldmap.list_format.paging_query})
        any_view = self.view(None)
        for name, _ in pairs:
            if name not in allowed:
                raise GatewayError(400, f"query parameter not allowed: {name}")
            revealed = allowed[name]
            if revealed is not None and not self._may_filter_on(revealed, any_view):
                raise GatewayError(403, f"not allowed to filter on {name}", reason=f"filter reveals {revealed}")
        if extra:
            pairs = [(k, v) for k, v in pairs if k not in extra]
            style = self.bundle.fieldmap.list_format.filter_style
            for name, values in extra.items():
                if style == "comma":
                    pairs.append((name, ",".join(values)))
                else:
                    pairs.extend((name, v) for v in values)
        return pairs

    def _may_filter_on(self, field_class: str, any_view: View) -> bool:
        """Filtering on a class reveals it: the caller must see it in clear wherever rows are visible."""
        if any_view.shows(self.resource.record_class):
            return any_view.outcome(field_class) is Outcome.CLEAR
        table = self.bundle.table
        ok = False
        for rel in (Relation.CASELOAD, Relation.SUPERVISION, Relation.COVER, Relation.SELF):
            view = table.view(self.who.role, Relation.ANY | rel)
            if view is None or not view.shows(self.resource.record_class):
                continue
            if view.outcome(field_class) is not Outcome.CLEAR:
                return False
            ok = True
        return ok

    def _target(self, query: list[tuple[str, str]]) -> str:
        path = encode_path(self.segments)
        return f"{path}?{urlencode(query)}" if query else path

    async def _forward(self, method: str, query: list[tuple[str, str]], body: bytes | None = None) -> UpstreamResponse:
        headers = self.g._forward_headers(self.scope, self.headers, self.record)
        if body is not None:
            headers["content-type"] = "application/json"
        resp = await self.g.upstream.request(method, self._target(query), headers, body)
        self.record.upstream_status = resp.status
        return resp

    def _json(self, resp: UpstreamResponse) -> Any:
        if resp.status >= 400:
            if resp.status >= 500:
                raise GatewayError(502, "upstream failed", reason=f"upstream status {resp.status}")
            raise GatewayError(resp.status, f"upstream refused the request ({resp.status})",
                               reason=f"upstream status {resp.status}")
        if not resp.is_json():
            raise GatewayError(502, "upstream answered with a content type this route does not allow",
                               reason="upstream content type not JSON")
        try:
            return orjson.loads(resp.body)
        except orjson.JSONDecodeError:
            raise GatewayError(502, "upstream sent malformed JSON") from None

    def _reply(self, status: int, document: Any, extra: list[tuple[bytes, bytes]] | None = None) -> Reply:
        """A rewritten document. The CRM's validators (ETag, Last-Modified) describe the unredacted
        record, so they are never passed on: a hash of hidden fields is a way to guess them."""
        return Reply(status, orjson.dumps(document), [(b"content-type", _JSON), *(extra or [])])

    # -------------------------------------------------------------- reads
    async def read_record(self) -> Reply:
        client = self.params.get("client_id")
        if client is not None:
            self._require_visible(self.view(client))
        resp = await self._forward("GET", self._query())
        document = self._json(resp)
        if not isinstance(document, dict):
            raise GatewayError(502, "upstream record has an unexpected shape")
        await self.prepare(resp.body, [document])
        shown = self.redactor.record(self.resource, document)
        if shown is None:
            raise GatewayError(403, "no access to this record", reason="no relation to the record's client")
        return self._reply(resp.status, shown)

    async def read_list(self) -> Reply:
        fmt = self.bundle.fieldmap.list_format
        extra: dict[str, list[str]] | None = None
        self._query()  # refuse a disallowed parameter whatever the push-down decides
        client = self.params.get("client_id")
        if client is not None:
            self._require_visible(self.view(client))
        elif not self.view(None).shows(self.resource.record_class):
            allowed = self._clients_with_access()
            if self.route.filter_param is not None:
                wanted = self._requested_filter(self.route.filter_param)
                chosen = sorted(allowed & wanted if wanted is not None else allowed, key=_natural)
                if not chosen:
                    return self._empty_list()
                extra = {self.route.filter_param: chosen}
        resp = await self._forward("GET", self._query(extra))
        document = self._json(resp)
        rows = document if fmt.items == "." else (document.get(fmt.items) if isinstance(document, dict) else None)
        if not isinstance(rows, list):
            raise GatewayError(502, "upstream list has an unexpected shape")
        await self.prepare(resp.body, rows)
        shown = self.redactor.rows(self.resource, rows)
        dropped = self.disclosure.dropped_rows
        extra_headers: list[tuple[bytes, bytes]] = []
        if fmt.total_header and fmt.total_header.lower() in resp.headers:
            total = _int(resp.headers[fmt.total_header.lower()])
            if total is not None:
                extra_headers.append((fmt.total_header.encode(), str(max(total - dropped, 0)).encode()))
        if fmt.items == ".":
            return self._reply(resp.status, shown, extra_headers)
        assert isinstance(document, dict)
        out: dict[str, Any] = {k: document[k] for k in fmt.metadata if k in document}
        for key in document:
            if key != fmt.items and key not in fmt.metadata:
                self.disclosure.unclassified.add(f"(list).{key}")
        if fmt.total and isinstance(out.get(fmt.total), int) and dropped:
            out[fmt.total] = max(out[fmt.total] - dropped, 0)
        out[fmt.items] = shown
        return self._reply(resp.status, out, extra_headers)

    def _empty_list(self) -> Reply:
        fmt = self.bundle.fieldmap.list_format
        headers = [(b"content-type", _JSON)]
        if fmt.total_header:
            headers.append((fmt.total_header.encode(), b"0"))
        if fmt.items == ".":
            return Reply(200, b"[]", headers)
        document: dict[str, Any] = {k: None for k in fmt.metadata}
        if fmt.total:
            document[fmt.total] = 0
        document[fmt.items] = []
        return Reply(200, orjson.dumps(document), headers)

    def _requested_filter(self, name: str) -> set[str] | None:
        raw = self.scope.get("query_string", b"").decode("latin-1")
        values = [v for k, v in parse_qsl(raw, keep_blank_values=True) if k == name]
        if not values:
            return None
        if self.bundle.fieldmap.list_format.filter_style == "comma":
            return {part for v in values for part in v.split(",") if part}
        return set(values)

    def _clients_with_access(self) -> set[str]:
        """Push the need-to-know filter down to the CRM, so paging counts only visible rows."""
        wanted = Relation(0)
        for rel in (Relation.CASELOAD, Relation.SUPERVISION, Relation.COVER, Relation.SELF):
            view = self.bundle.table.view(self.who.role, Relation.ANY | rel)
            if view is not None and view.shows(self.resource.record_class):
                wanted |= rel
        if not wanted:
            raise GatewayError(403, f"role {self.who.role} has no access to {self.resource.name} records",
                               reason="no relation gives access")
        return self.g.index.clients_for(self.who, wanted, self.bundle.cover, self.now)

    def _require_visible(self, view: View) -> None:
        if not self.redactor.visible(view, self.resource):
            if self.g.index.synced_at is None:
                raise GatewayError(503, "need-to-know relations are not available yet",
                                   reason="relations never synced")
            raise GatewayError(403, "no access to this client's records", reason="no relation to the client")

    # -------------------------------------------------------------- changes
    async def _locate(self) -> str | None:
        """The client a change is about: from the path, or from the record as the CRM holds it."""
        if "client_id" in self.params:
            return self.params["client_id"]
        if self.route.locate is None:
            return None
        current = await self.g.upstream.get_json(self.route.render(self.route.locate, self.params))
        if not isinstance(current, dict):
            raise GatewayError(502, "upstream record has an unexpected shape")
        return self.redactor.client_of(self.resource, current)

    async def write(self, raw: bytes) -> Reply:
        content_type = self.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            raise GatewayError(415, "request body must be application/json")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise GatewayError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise GatewayError(422, "request body must be a JSON object")
        creating = self.route.verb is Verb.CREATE
        if creating and "client_id" not in self.params:
            client = self.redactor.client_of(self.resource, body) if self.resource.client_field != "id" else None
        else:
            client = await self._locate()
        view = self.view(client)
        out, written = check_write(self.resource, body, view, replace=self.route.verb is Verb.REPLACE)
        target = self.redactor.client_of(self.resource, body) if self.resource.client_field != "id" else None
        moving = not creating and target is not None and target != client
        if moving:
            # moving a record to another client writes to both: each must allow it
            check_write(self.resource, body, self.view(target), replace=False)
        owners = [client] if creating else [client, target] if moving else []
        for who in owners:
            if self.resource.record_class not in self.view(who).writable:
                raise GatewayError(403, f"not allowed to {'create' if creating else 'move'} "
                                        f"{self.resource.name} records for this client",
                                   reason=f"no write on {self.resource.record_class}")
        classes = self.bundle.fieldmap.classes
        if moving and any(classes[c].key_scope for c in self.resource.classes):
            raise GatewayError(409, f"{self.resource.name} records hold fields sealed with their client's key "
                                    "and cannot move to another client; create a new record instead")
        orphans = await self._seal(out, written, client)
        try:
            resp = await self._forward(self.route.method, self._query(), orjson.dumps(out))
            document = self._json(resp)
        except GatewayError:
            await self._settle(orphans, None)
            raise
        await self._settle(orphans, self.redactor.client_of(self.resource, document)
                           if isinstance(document, dict) else None)
        if not isinstance(document, dict):
            return Reply(resp.status, b"{}", [(b"content-type", _JSON)])
        await self.prepare(resp.body, [document])
        shown = self.redactor.record(self.resource, document)
        return self._reply(resp.status, shown if shown is not None else {})

    async def _seal(self, body: dict[str, Any], written: set[str], client: str | None) -> list[bytes]:
        """Seal the fields of encrypted classes with the client's keys; return keys made for a new client."""
        if self.cipher is None:
            raise GatewayError(503, "field encryption is not available", reason="keyring not open")
        scopes = self.cipher.scopes(written)
        if not scopes:
            return []
        ring = self.cipher.ring
        if not ring.can_encrypt:
            raise GatewayError(503, "field encryption is not available", reason="no KEK")
        keys = {scope: await ring.for_writing(client, scope) for scope in sorted(scopes)}
        seal_fields(self.resource, body, self.bundle.fieldmap.classes, keys)
        self.disclosure.key_ids |= {k.key.hex_id for k in keys.values()}
        return [k.key.key_id for k in keys.values()] if client is None else []

    async def _settle(self, orphans: list[bytes], new_client: str | None) -> None:
        """Keys made before the CRM named a new client: link them to it, or destroy them if it refused."""
        if not orphans or self.cipher is None:
            return
        if new_client is None:
            await self.cipher.ring.discard(orphans, "the CRM did not create the record")
        else:
            for key_id in orphans:
                await self.cipher.ring.link(key_id, new_client)

    async def delete(self) -> Reply:
        client = await self._locate()
        view = self.view(client)
        if self.resource.record_class not in view.deletable:
            raise GatewayError(403, f"not allowed to delete {self.resource.name} records",
                               reason=f"no delete on {self.resource.record_class}")
        resp = await self._forward("DELETE", self._query())
        if resp.status >= 400:
            self._json(resp)
        if client is not None and self.resource.name == self.bundle.fieldmap.relations.resource:
            self.g.index.forget(client)
        return Reply(resp.status if resp.status != 200 else 204, b"", [])

    async def opaque(self) -> Reply:
        """Bytes the gateway cannot rewrite (a letter's PDF): all or nothing, by the guarding field."""
        assert self.route.locate is not None and self.route.opaque_field is not None
        located = await self.g.upstream.get_json(self.route.render(self.route.locate, self.params))
        if not isinstance(located, dict):
            raise GatewayError(502, "upstream record has an unexpected shape")
        client = self.redactor.client_of(self.resource, located)
        view = self.view(client)
        spec = next((s for s in self.resource.specs if s.path == self.route.opaque_field), None)
        if spec is None:
            raise GatewayError(403, "route guards an unknown field")
        cls = spec.class_for(located)
        if view.outcome(cls) is not Outcome.CLEAR:
            self.disclosure.note(Outcome.REMOVE, cls, spec.path)
            raise GatewayError(403, "no access to this document", reason=f"{cls} not shown in clear")
        headers = self.g._forward_headers(self.scope, self.headers, self.record)
        headers["accept"] = "*/*"
        stream = await self.g.upstream.open_stream("GET", self._target([]), headers)
        self.record.upstream_status = stream.status
        if stream.status >= 400:
            stream.close()
            raise GatewayError(502 if stream.status >= 500 else stream.status,
                               f"upstream refused the request ({stream.status})")
        self.disclosure.note(Outcome.CLEAR, cls, spec.path)
        out = [(b"content-type", stream.headers.get("content-type", "application/octet-stream").encode("latin-1"))]
        for name in ("content-disposition", "content-length"):
            if name in stream.headers:
                out.append((name.encode(), stream.headers[name].encode("latin-1")))
        return Reply(stream.status, b"", out, stream)


# ---------------------------------------------------------------------- helpers
def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    declared = headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise GatewayError(413, f"request body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise GatewayError(400, "client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, f"request body larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send(send: Send, reply: Reply, request_id: str) -> None:
    headers = list(reply.headers)
    if not any(name == b"content-type" for name, _ in headers):
        headers.append((b"content-type", _JSON))
    headers += [
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        (b"x-request-id", request_id.encode()),
    ]
    if reply.stream is None:
        headers.append((b"content-length", str(len(reply.body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})
        return
    try:
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        async for chunk in reply.stream.chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        reply.stream.close()


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _natural(value: str) -> tuple[int, str]:
    return (int(value), "") if value.isdigit() else (1 << 62, value)


def _where(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"

"""One authorised request on its way through the pipeline, step by step (see `proxy.app`).

An `Exchange` is made once the caller is known, the route matched and the role and purpose allowed.
Each kind of route answers the same steps in its own way (the reads here, the changes in `proxy.changes`):

    read     the write's body, parsed once (writes only)
    locate   whose record this is, and how the caller stands to that client (need to know)
    check    a write's fields, each allowed for this client, and the sensitive ones sealed; a delete allowed
    forward  to the CRM, on the normalised path with the allowed query
    rewrite  the CRM's answer, field by field, for this caller
    finish   what was disclosed, by name, into the audit record

It sees the running gateway only through a `Context`: the CRM, the relation facts, the key ring.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson

from proxy.asgi import JSON, Incoming, Reply
from proxy.audit import AuditRecord
from proxy.cases import GlassBook, GrantRow
from proxy.errors import GatewayError
from proxy.identity import Principal
from proxy.keys import FieldCipher, KeyRing
from proxy.policy import Outcome, PolicyBundle, Relation, RelationIndex, Resource, View
from proxy.policy.review import explain_class
from proxy.redact import Disclosure, Plans, Redactor
from proxy.routes import Route, Shape, encode_path
from proxy.scrub import ClientNames
from proxy.upstream import OpenStream, Upstream, UpstreamResponse

NEEDS_RELATIONS = (Relation.CASELOAD, Relation.SUPERVISION, Relation.COVER, Relation.SELF, Relation.BREAKGLASS)


@dataclass(frozen=True, slots=True)
class Context:
    """What one request may use of the running gateway."""

    upstream: Upstream
    index: RelationIndex
    ring: KeyRing | None
    forward_headers: tuple[str, ...]  # the caller's headers passed on to the CRM
    max_body_bytes: int
    body_timeout_seconds: float
    relations_max_age: float  # seconds: older facts refuse decisions that need them
    refresh_soon: Callable[[], None]  # a client the facts do not know: re-read them soon
    names: ClientNames  # clients' names, to scrub from what pseudonymising views are shown
    trusted_proxies: frozenset[str] = frozenset()  # peers whose X-Forwarded-For is believed
    glass: GlassBook = field(default_factory=GlassBook)  # open break-glass grants, restricted clients
    restriction_exempt: frozenset[str] = frozenset({"dpo"})  # roles a restriction does not stop

    def forwarded(self, req: Incoming) -> dict[str, str]:
        """The headers the CRM receives: the allowed few, the forwarding chain, our request id."""
        out = {name: req.headers[name] for name in self.forward_headers if name in req.headers}
        prior = req.headers.get("x-forwarded-for") if req.peer in self.trusted_proxies else None
        out["x-forwarded-for"] = f"{prior}, {req.peer}" if prior else req.peer
        out["x-forwarded-proto"] = str(req.scope.get("scheme", "http"))
        if "host" in req.headers:
            out["x-forwarded-host"] = req.headers["host"]
        out["x-request-id"] = req.request_id
        out["accept"] = "application/json"
        return out


Answer = UpstreamResponse | OpenStream | None  # None: nothing needed asking (an empty list)


class Exchange:
    """The steps every kind of route shares; the subclasses below answer them per kind."""

    def __init__(self, ctx: Context, bundle: PolicyBundle, principal: Principal, route: Route,
                 params: dict[str, str], req: Incoming, record: AuditRecord) -> None:
        self.ctx = ctx
        self.bundle = bundle
        self.who = principal
        self.route = route
        self.params = params
        self.req = req
        self.record = record
        self.resource: Resource = bundle.fieldmap.resources[route.resource]
        self.now = datetime.now(UTC)
        self.cover = (*bundle.cover, *ctx.index.cover)  # the officers' grants and the CRM's
        self.glass: Mapping[str, GrantRow] = ctx.glass.open_for(principal.user, time.time())  # by client id
        self.restricted: set[str] = set()  # restricted clients this request asked about
        self.disclosure = Disclosure()
        self.pseudonyms: dict[str, str] = {}
        self.erased: set[str] = set()  # clients in this response whose keys and pseudonym were destroyed
        self.cipher = FieldCipher(ctx.ring) if ctx.ring is not None else None
        self.plans = Plans.of(bundle)
        self.redactor = Redactor(bundle.table, principal.role, self.relations_of, self.pseudonyms.get,
                                 self.disclosure, self.plans, cipher=self.cipher, observe=self._observe,
                                 names=ctx.names.pattern)

    # ------------------------------------------------------------------ the steps
    async def read(self) -> None:
        """Writes read and parse their body here; reads have none."""

    async def locate(self) -> None:
        raise NotImplementedError

    async def check(self) -> bytes | None:
        """The body to forward (writes), after every field has been allowed and sealed."""
        return None

    async def forward(self, body: bytes | None) -> Answer:
        return await self._request(self.route.method, self._query(), body)

    async def rewrite(self, answer: Answer) -> Reply:
        raise NotImplementedError

    async def finish(self) -> None:
        named = set(self.disclosure.clients)
        on_record = {c for c in named if c in self.ctx.index.counsellor_of}  # the CRM's caseloads name them
        await self._resolve(on_record)
        await self._resolve(named - on_record, create=False)
        self.disclosure.into(self.record, self.redactor.summary(), {**{c: "erased" for c in self.erased},
                                                                      **self.pseudonyms})
        covered = [c for c, rels in self.disclosure.clients.items() if Relation.COVER in rels]
        if covered:
            grants = {g.name: g.reason for c in covered
                      for g in self.ctx.index.cover_grants(self.who.staff, c, self.cover, self.now)}
            self.record.cover = [{"grant": name, "reason": reason} for name, reason in sorted(grants.items())]
        used = sorted({g.grant_id: g for c, rels in self.disclosure.clients.items() if Relation.BREAKGLASS in rels
                       and (g := self.glass.get(c)) is not None}.values(), key=lambda g: g.grant_id)
        if used:  # the emergency's purpose of use, and the grants it was made under
            self.record.break_glass = ",".join(g.grant_id for g in used)
            self.record.purpose = used[0].purpose

    # ------------------------------------------------------------------ facts
    def relations_of(self, client_id: str) -> Relation:
        index = self.ctx.index
        if client_id not in index.counsellor_of:
            self.ctx.refresh_soon()
        if client_id in self.ctx.glass.restricted and self.who.role not in self.ctx.restriction_exempt:
            # Art. 18: stored, not processed; only an emergency declared for the client opens what it opens
            self.restricted.add(client_id)
            return Relation.ANY | Relation.BREAKGLASS if client_id in self.glass else Relation(0)
        rels = index.relations(self.who.staff, self.who.client_id, client_id, self.cover, self.now)
        return rels | Relation.BREAKGLASS if client_id in self.glass else rels

    def _refuse_restricted(self, clients: set[str | None]) -> None:
        """No change to a restricted client's records (storage only), but by a role the restriction exempts."""
        if self.who.role not in self.ctx.restriction_exempt and clients & self.ctx.glass.restricted:
            raise GatewayError(403, "this client's records are restricted (UK GDPR Art. 18): nothing is changed "
                                    "while the restriction stands", reason="client restricted")

    def require_fresh_relations(self) -> None:
        """Decisions that depend on relations are refused, never guessed, while the facts are missing or old."""
        if self.resource.client_field is None or not self.bundle.table.needs_relations(self.who.role):
            return
        synced = self.ctx.index.synced_at
        if synced is None:
            raise GatewayError(503, "need-to-know relations are not available yet", reason="relations never synced")
        if time.time() - synced > self.ctx.relations_max_age:
            raise GatewayError(503, "need-to-know relations are out of date; try again shortly",
                               reason="relations stale")

    def _observe(self, resource: Resource, record: dict[str, Any]) -> bool:
        source = self.bundle.fieldmap.relations
        if resource.name == source.resource and source.counsellor in record:
            cid = record.get(source.client_id)
            if cid is not None:
                return self.ctx.index.observe(str(cid), record.get(source.counsellor))
        return False

    def view(self, client_id: str | None) -> View:
        return self.redactor.view_for(client_id)

    def _require_visible(self, view: View) -> None:
        if not self.redactor.visible(view, self.resource):
            raise self._hidden(view, "no access to this client's records")
        if self.plans.plan(self.resource, view).unlinkable:
            raise GatewayError(403, f"{self.resource.name} records are anonymised for role {self.who.role}: they are "
                                    "not served per client", reason="unlinkable for this role")

    def _hidden(self, view: View, message: str) -> GatewayError:
        """A refusal with its true reason: an explicit deny (and where it is written), a relation the caller
        does not hold, or no rule at all; the same words `policy explain` gives."""
        if self.restricted and not view.relations:
            return GatewayError(403, "this client's records are restricted (UK GDPR Art. 18): they are kept, "
                                     "not processed", reason="client restricted")
        why = explain_class(self.bundle.table, self.who.role, view.relations, None, self.resource.record_class)
        return GatewayError(403, f"{message}: {why.reason}", reason=why.reason)

    async def _located_client(self) -> str | None:
        """The client a change is about: from the path, or from the record as the CRM holds it."""
        if "client_id" in self.params:
            return self.params["client_id"]
        if self.route.locate is None:
            return None
        current = await self.ctx.upstream.get_json(self.route.render(self.route.locate, self.params))
        if not isinstance(current, dict):
            raise GatewayError(502, "upstream record has an unexpected shape")
        return self.redactor.client_of(self.resource, current)

    async def _resolve(self, client_ids: set[str], create: bool = True) -> None:
        """Fetch the pseudonyms of these clients (one keystore query for those not cached). Only clients the CRM
        has (it answered about them, or its caseloads name them) get one made (`create`): an id that was only
        asked for, and refused, gets none, or every denied request naming a new id would grow the keystore for
        ever; its record says "unresolved"."""
        missing = client_ids - self.pseudonyms.keys() - self.erased
        if missing and self.ctx.ring is not None:
            if create:
                self.pseudonyms.update(await self.ctx.ring.pseudonyms(missing))
            else:
                self.pseudonyms.update(await self.ctx.ring.known_pseudonyms(missing))
            unknown = missing - self.pseudonyms.keys()  # none is made for an erased client
            if unknown:
                self.erased |= await self.ctx.ring.store.tombstoned(unknown)

    async def _prepare(self, body: bytes, rows: list[Any]) -> None:
        """Before a response is rewritten: its keystore rows, its clients' pseudonyms, and, for the clients the
        caller may not identify, their names to scrub from the text."""
        if self.cipher is not None:
            await self.cipher.prefetch(body)
        clients = {c: row for row in rows if isinstance(row, dict)
                   and (c := self.redactor.client_of(self.resource, row)) is not None}
        await self._resolve(set(clients))
        anonymous = [c for c in clients if self.plans.anonymous(self.view(c))]
        if anonymous:
            fm = self.bundle.fieldmap
            if self.resource.name == fm.relations.resource:  # the client's own record: their names are here
                for client in anonymous:
                    self.ctx.names.observe(client, clients[client], fm.client_names)
            await self.ctx.names.fetch(anonymous, self._client_record_path(), fm.client_names)

    def _client_record_path(self) -> Callable[[str], str] | None:
        """How to read a client's own record (the field map's GET of one client)."""
        fm = self.bundle.fieldmap
        route = next((r for r in fm.routes if r.resource == fm.relations.resource and r.method == "GET"
                      and r.shape is Shape.RECORD and [p[1] for p in r.params] == ["client_id"]), None)
        if route is None:
            return None
        return lambda client: route.render(route.template, {"client_id": client})

    # ------------------------------------------------------------------ the CRM
    def _query(self, extra: dict[str, list[str]] | None = None) -> list[tuple[str, str]]:
        """The caller's query, each parameter allowed by the route and by what it reveals."""
        pairs = self.req.query()
        if not pairs and not extra:
            return []
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
        ok = False
        for rel in NEEDS_RELATIONS:
            if rel is Relation.BREAKGLASS and not self.glass:  # no grant held: no row shown through one
                continue
            view = self.bundle.table.view(self.who.role, Relation.ANY | rel)
            if view is None or not view.shows(self.resource.record_class):
                continue
            if view.outcome(field_class) is not Outcome.CLEAR:
                return False
            ok = True
        return ok

    def _target(self, query: list[tuple[str, str]]) -> str:
        path = encode_path(self.req.segments)
        return f"{path}?{urlencode(query)}" if query else path

    async def _request(self, method: str, query: list[tuple[str, str]], body: bytes | None = None,
                       etag: str | None = None) -> UpstreamResponse:
        headers = self.ctx.forwarded(self.req)
        if body is not None:
            headers["content-type"] = "application/json"
        if etag is not None:
            headers["if-match"] = etag
        resp = await self.ctx.upstream.request(method, self._target(query), headers, body, encoded=True)
        self.record.upstream_status = resp.status
        return resp

    @staticmethod
    def _json(answer: Answer) -> Any:
        if not isinstance(answer, UpstreamResponse):
            raise GatewayError(502, "upstream answered unexpectedly")
        if answer.status >= 400:
            if answer.status >= 500:
                raise GatewayError(502, "upstream failed", reason=f"upstream status {answer.status}")
            if answer.status == 412:
                raise GatewayError(409, "the record changed while this write was being made; read it and try again",
                                   reason="upstream status 412")
            raise GatewayError(answer.status, f"upstream refused the request ({answer.status})",
                               reason=f"upstream status {answer.status}")
        if not answer.is_json():
            raise GatewayError(502, "upstream answered with a content type this route does not allow",
                               reason="upstream content type not JSON")
        try:
            return orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            raise GatewayError(502, "upstream sent malformed JSON") from None

    @staticmethod
    def _reply(status: int, document: Any, extra: list[tuple[bytes, bytes]] | None = None) -> Reply:
        """A rewritten document. The CRM's validators (ETag, Last-Modified) describe the unredacted
        record, so they are never passed on: a hash of hidden fields is a way to guess them."""
        return Reply.json(status, document, extra)


class RecordRead(Exchange):
    """`GET /clients/7`: one record, visible only with a relation that shows its record class."""

    async def locate(self) -> None:
        client = self.params.get("client_id")
        if client is not None:
            self._require_visible(self.view(client))

    async def rewrite(self, answer: Answer) -> Reply:
        document = self._json(answer)
        if not isinstance(document, dict):
            raise GatewayError(502, "upstream record has an unexpected shape")
        assert isinstance(answer, UpstreamResponse)
        await self._prepare(answer.body, [document])
        shown = self.redactor.record(self.resource, document)
        if shown is None:
            raise self._hidden(self.view(self.redactor.client_of(self.resource, document)), "no access to this record")
        return self._reply(answer.status, shown)


class ListRead(Exchange):
    """`GET /clients`: the rows the caller has a relation to, the filter pushed down so paging counts them."""

    extra: dict[str, list[str]] | None = None
    nothing: bool = False  # no client the caller may see: answer an empty list without asking

    async def locate(self) -> None:
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
                    self.nothing = True
                else:
                    self.extra = {self.route.filter_param: chosen}

    async def forward(self, body: bytes | None) -> Answer:
        if self.nothing:
            return None
        return await self._request("GET", self._query(self.extra))

    async def rewrite(self, answer: Answer) -> Reply:
        fmt = self.bundle.fieldmap.list_format
        if answer is None:
            return self._empty()
        document = self._json(answer)
        assert isinstance(answer, UpstreamResponse)
        rows = document if fmt.items == "." else (document.get(fmt.items) if isinstance(document, dict) else None)
        if not isinstance(rows, list):
            raise GatewayError(502, "upstream list has an unexpected shape")
        await self._prepare(answer.body, rows)
        shown = self.redactor.rows(self.resource, rows)
        if self.redactor.unlinked:  # anonymised rows: no order that would follow the clients' own
            secrets.SystemRandom().shuffle(shown)
        dropped = self.disclosure.dropped_rows
        extra_headers: list[tuple[bytes, bytes]] = []
        if not self._counted():  # the CRM counted rows the caller may not see: no total, rather than a wrong one
            document = {k: v for k, v in document.items() if k != fmt.total} if isinstance(document, dict) else document
        elif fmt.total_header and fmt.total_header.lower() in answer.headers:
            total = _int(answer.headers[fmt.total_header.lower()])
            if total is not None:
                extra_headers.append((fmt.total_header.encode(), str(max(total - dropped, 0)).encode()))
        if fmt.items == ".":
            return self._reply(answer.status, shown, extra_headers)
        assert isinstance(document, dict)
        out: dict[str, Any] = {k: document[k] for k in fmt.metadata if k in document}
        for key in document:
            if key != fmt.items and key not in fmt.metadata:
                self.disclosure.unclassified.add(f"(list).{key}")
        if fmt.total and isinstance(out.get(fmt.total), int) and dropped:
            out[fmt.total] = max(out[fmt.total] - dropped, 0)
        out[fmt.items] = shown
        return self._reply(answer.status, out, extra_headers)

    def _counted(self) -> bool:
        """Whether the CRM's total counts only rows the caller may see: the rows of one client, a filter pushed
        down to the caller's clients, or a view that shows every row."""
        return ("client_id" in self.params or self.extra is not None
                or self.view(None).shows(self.resource.record_class))

    def _empty(self) -> Reply:
        fmt = self.bundle.fieldmap.list_format
        headers = [(b"content-type", JSON)]
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
        values = [v for k, v in self.req.query() if k == name]
        if not values:
            return None
        if self.bundle.fieldmap.list_format.filter_style == "comma":
            return {part for v in values for part in v.split(",") if part}
        return set(values)

    def _clients_with_access(self) -> set[str]:
        """Push the need-to-know filter down to the CRM, so paging counts only visible rows."""
        wanted = Relation(0)
        for rel in NEEDS_RELATIONS:
            view = self.bundle.table.view(self.who.role, Relation.ANY | rel)
            if view is not None and view.shows(self.resource.record_class):
                wanted |= rel
        if not wanted:
            raise self._hidden(self.view(None), f"role {self.who.role} has no access to {self.resource.name} records")
        found = self.ctx.index.clients_for(self.who.staff, self.who.client_id, wanted, self.cover, self.now)
        if Relation.BREAKGLASS in wanted:
            found.update(self.glass)
        return found


class OpaqueRead(Exchange):
    """Bytes the gateway cannot rewrite (a letter's PDF): all or nothing, by the class of the guarding field."""

    guard: tuple[str, str] = ("", "")  # (class, path) of the field that guards the bytes

    async def locate(self) -> None:
        assert self.route.locate is not None and self.route.opaque_field is not None
        located = await self.ctx.upstream.get_json(self.route.render(self.route.locate, self.params))
        if not isinstance(located, dict):
            raise GatewayError(502, "upstream record has an unexpected shape")
        view = self.view(self.redactor.client_of(self.resource, located))
        spec = next((s for s in self.resource.specs if s.path == self.route.opaque_field), None)
        if spec is None:
            raise GatewayError(403, "route guards an unknown field")
        cls = spec.class_for(located)
        if view.outcome(cls) is not Outcome.CLEAR:
            self.disclosure.note(Outcome.REMOVE, cls, spec.path)
            raise GatewayError(403, "no access to this document", reason=f"{cls} not shown in clear")
        self.guard = (cls, spec.path)

    async def forward(self, body: bytes | None) -> Answer:
        headers = self.ctx.forwarded(self.req)
        headers["accept"] = "*/*"
        stream = await self.ctx.upstream.open_stream("GET", self._target([]), headers)
        self.record.upstream_status = stream.status
        return stream

    async def rewrite(self, answer: Answer) -> Reply:
        assert isinstance(answer, OpenStream)
        if answer.status >= 400:
            answer.close()
            raise GatewayError(502 if answer.status >= 500 else answer.status,
                               f"upstream refused the request ({answer.status})")
        self.disclosure.note(Outcome.CLEAR, *self.guard)
        out = [(b"content-type", answer.headers.get("content-type", "application/octet-stream").encode("latin-1"))]
        for name in ("content-disposition", "content-length"):
            if name in answer.headers:
                out.append((name.encode(), answer.headers[name].encode("latin-1")))
        return Reply(answer.status, b"", out, answer)


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _natural(value: str) -> tuple[int, str]:
    return (int(value), "") if value.isdigit() else (1 << 62, value)

"""The exchanges that change the CRM: writes (create, update, replace) and deletes.

A write is allowed field by field before the CRM sees it (`proxy.writes`), under the relation the caller
holds to the record's client, or, for a create, the relation the new record gives them; nested objects are
merged into the stored record here when the CRM would replace them; sensitive fields are sealed with the
client's key. A delete needs `delete` on the record class, for the record's own client.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.asgi import JSON, Reply
from proxy.errors import GatewayError
from proxy.exchange import Answer, Exchange, ListRead, OpaqueRead, RecordRead
from proxy.keys import CipherFailure, associated_class, associated_where, is_sealed, record_ref
from proxy.policy import View, assigned_ids
from proxy.routes import Route, Shape, Verb
from proxy.upstream import UpstreamResponse
from proxy.writes import (
    Reclassed,
    WriteRefused,
    check_write,
    fill_gateway_set,
    merged,
    needs_stored,
    put_at,
    reclassified,
    seal_fields,
)


def kind_of(route: Route) -> type[Exchange]:
    """Which exchange answers a route."""
    if route.shape is Shape.OPAQUE:
        return OpaqueRead
    if route.verb is Verb.READ:
        return ListRead if route.shape is Shape.LIST else RecordRead
    return Delete if route.verb is Verb.DELETE else Write


class Write(Exchange):
    """`POST`, `PATCH`, `PUT`: every field known and writable for this client, sealed, before the CRM sees it."""

    body: dict[str, Any]
    client: str | None = None
    stored: dict[str, Any] | None = None  # the record as the CRM holds it, when a partial body is merged here
    etag: str | None = None
    written: frozenset[str] = frozenset()
    orphans: tuple[bytes, ...] = ()  # keys made for a client the CRM has not named yet
    sealed_with: tuple[bytes, ...] = ()  # the client's keys the body was sealed with

    async def read(self) -> None:
        content_type = self.req.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            raise GatewayError(415, "request body must be application/json")
        raw = await self.req.body(self.ctx.max_body_bytes, self.ctx.body_timeout_seconds)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise GatewayError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise GatewayError(422, "request body must be a JSON object")
        self.body = body

    async def locate(self) -> None:
        in_path, in_body = self.params.get("client_id"), self._client_in_body()
        if in_path is not None and in_body is not None and in_body != in_path:
            field = self.resource.client_field
            raise WriteRefused(422, f"{field} in the body names another client than the path", [str(field)])
        if self.route.verb is Verb.UPDATE and (needs_stored(self.route.merge, self.body)
                                               or any(flag in self.body for flag in self.resource.flags)):
            await self._read_stored()  # a flag set re-seals the stored fields whose class it changes
        if self.route.verb is Verb.CREATE and "client_id" not in self.params:
            self.client = self._client_in_body()
        elif self.stored is not None and "client_id" not in self.params:
            self.client = self.redactor.client_of(self.resource, self.stored)
        else:
            self.client = await self._located_client()

    async def _read_stored(self) -> None:
        """The record as the CRM holds it, to merge a partial body into (with its ETag, when it has one, so that
        a change made meanwhile is refused by the CRM rather than overwritten)."""
        path = self.route.render(self.route.locate or self.route.template, self.params)
        resp = await self.ctx.upstream.request("GET", path, {"accept": "application/json"})
        stored = self._json(resp)
        if not isinstance(stored, dict):
            raise GatewayError(502, "upstream record has an unexpected shape")
        self.stored, self.etag = stored, resp.headers.get("etag")

    def _record_id(self) -> bytes | None:
        """The record's id, bound into what is sealed for it: the stored record's, or the path's when the route
        names it as an integer (canonical: `/notes/007` is record 7); None for a create (the CRM has not
        given one yet) or where neither says."""
        name = self.resource.record_id
        if name is None or self.route.verb is Verb.CREATE:
            return None
        if self.stored is not None:
            return record_ref(self.stored.get(name))
        if any(n == name and kind == "int" for _, n, kind in self.route.params) and name in self.params:
            return record_ref(int(self.params[name]))
        return None

    def _client_in_body(self) -> str | None:
        return self.redactor.client_of(self.resource, self.body) if self.resource.client_field != "id" else None

    async def check(self) -> bytes | None:
        """A create is decided under the relations the new record gives the caller (`create` on its record
        class, `write` on every class it writes); a change under those held to the client now, and a move (to
        another client, or a client to another practitioner) under those it will hold afterwards as well."""
        await self._refuse_erased()
        self._refuse_restricted({self.client, self._client_in_body()})
        creating = self.route.verb is Verb.CREATE
        view = self._established(self.client) if creating else self.view(self.client)
        if creating and self.resource.record_class not in view.creatable:
            raise GatewayError(403, f"not allowed to create {self.resource.name} records for this client",
                               reason=f"no create on {self.resource.record_class} ({view.relations.label})")
        checked = check_write(self.resource, self.body, view, replace=self.route.verb is Verb.REPLACE,
                              stored=self.stored)
        self.written = frozenset(checked.classes)
        self.record.written, self.record.reclassified = checked.paths, checked.flags
        if creating:
            filled = fill_gateway_set(self.resource, self.body,
                                      self.ctx.index.staff_id(self.who.staff) or self.who.staff or self.who.subject,
                                      self.now)
            self.record.written = sorted({*checked.paths, *filled})
            self.written |= {s.field_class for s in self.resource.specs if s.path in filled}
        else:
            self._check_move()
        self.orphans = tuple(await self._seal(self.body, self.client))
        if self.stored is not None:  # sealed first: what is merged in from the CRM is ciphertext already
            return orjson.dumps(merged(self.route.merge, self.stored, self.body))
        return orjson.dumps(self.body)

    async def _refuse_erased(self) -> None:
        """An erased client is a tombstone: nothing more is written about them, no key made for them."""
        named = {c for c in (self.client, self._client_in_body()) if c is not None}
        ring = self.ctx.ring
        if named and ring is not None and await ring.store.tombstoned(named):
            raise GatewayError(410, "this client's records were erased; nothing more can be written for them",
                               reason="client erased")

    def _established(self, client: str | None) -> View:
        """The view the caller would have of the record the body describes: for a client's own record, the
        relations its assignment gives them; for any other record, those held to its client."""
        assigned = self._assigned()
        if assigned is None:
            return self.view(client)
        rels = self.ctx.index.relations_with(self.who.staff, self.who.client_id, client, assigned,
                                             self.cover, self.now)
        return self.bundle.table.view(self.who.role, rels) or View(self.who.role, rels, {}, frozenset(), frozenset())

    def _assigned(self) -> list[str] | None:
        """The practitioners the body assigns the client to (None: the body does not say)."""
        source = self.bundle.fieldmap.relations
        if self.resource.name != source.resource or not source.counsellor or source.counsellor not in self.body:
            return None
        return assigned_ids(self.body[source.counsellor])

    def _check_move(self) -> None:
        """A change that moves the record to another client, or the client to another practitioner, writes
        to both sides: each must allow it."""
        target = self._client_in_body()
        moving = target is not None and target != self.client
        assigned = self._assigned()
        current = self.ctx.index.counsellor_of.get(self.client, frozenset()) if self.client is not None else frozenset()
        reassigning = assigned is not None and frozenset(assigned) != current
        if not moving and not reassigning:
            return
        after = self.view(target) if moving else self._established(self.client)
        check_write(self.resource, self.body, after, replace=False)
        for view in (self.view(self.client), after):
            if self.resource.record_class not in view.writable:
                raise GatewayError(403, f"not allowed to move {self.resource.name} records for this client",
                                   reason=f"no write on {self.resource.record_class} ({view.relations.label})")
        classes = self.bundle.fieldmap.classes
        if moving and any(classes[c].key_scope for c in self.resource.classes):
            raise GatewayError(409, f"{self.resource.name} records hold fields sealed with their client's key "
                                    "and cannot move to another client; create a new record instead")

    async def _seal(self, body: dict[str, Any], client: str | None) -> list[bytes]:
        """Seal the fields of encrypted classes with the client's keys; return keys made for a new client."""
        if self.cipher is None:
            raise GatewayError(503, "field encryption is not available", reason="keyring not open")
        classes = self.bundle.fieldmap.classes
        moved = reclassified(self.resource, self.stored, body) if self.stored is not None else []
        scopes = {s for c in self.written | {m.after for m in moved} if (s := classes[c].key_scope) is not None}
        record_id = self._record_id()
        if moved:
            await self._reseal(moved, client, record_id)
        if not scopes:
            return []
        ring = self.cipher.ring
        if not ring.can_encrypt:
            raise GatewayError(503, "field encryption is not available", reason="no KEK")
        keys = {scope: await ring.for_writing(client, scope) for scope in sorted(scopes)}
        seal_fields(self.resource, body, classes, keys, self.stored, record_id)
        self.disclosure.key_ids |= {k.key.hex_id for k in keys.values()}
        if client is not None:
            self.sealed_with = tuple(k.key.key_id for k in keys.values())
        return [k.key.key_id for k in keys.values()] if client is None else []

    async def _reseal(self, moved: list[Reclassed], client: str | None, record_id: bytes | None) -> None:
        """Open each stored field a flag reclassifies, under the class it was sealed as, and put its value in
        the body, where `seal_fields` seals it as the class it becomes (or leaves it plain, for a class that is
        not encrypted). One that does not open is refused: the flag would leave it unreadable."""
        assert self.cipher is not None
        classes = self.bundle.fieldmap.classes
        await self.cipher.prefetch(orjson.dumps([m.value for m in moved]))
        for m in moved:
            value, scope = m.value, classes[m.before].key_scope
            if is_sealed(value):
                where = associated_where(self.resource.name, m.path)
                try:
                    value = self.cipher.open(value, client, scope or "", where, associated_class(where, m.before),
                                             record_id, self.disclosure.key_ids)
                except CipherFailure as exc:
                    raise GatewayError(409, f"{m.path} cannot be opened to re-seal it as {m.after}; the flag is "
                                            "left as it is", reason=f"re-seal failed: {exc}") from None
            put_at(self.body, m.path, value)
        self.record.written = sorted({*self.record.written, *(m.path for m in moved)})
        self.written |= {m.after for m in moved}

    async def _keys_destroyed(self) -> bool:
        """Whether a shred committed (in any process) since the body was sealed: the keystore, not the cache."""
        if not self.sealed_with or self.cipher is None:
            return False
        rows = await self.cipher.ring.store.get_many(self.sealed_with)
        return any(rows.get(k) is None or rows[k].wrapped is None for k in self.sealed_with)

    async def forward(self, body: bytes | None) -> Answer:
        if await self._keys_destroyed():
            raise GatewayError(410, "this client's records were erased while the write was prepared; nothing was "
                                    "written", reason="client erased")
        try:
            answer = await self._request(self.route.method, self._query(), body, self.etag)
        except GatewayError:
            await self._settle(None)
            raise
        if isinstance(answer, UpstreamResponse) and answer.status < 400 and await self._keys_destroyed():
            # the shred won the race by a hair: the CRM holds fields sealed with keys that no longer exist
            raise GatewayError(410, "this client's records were erased while the write was in flight; what it "
                                    "sealed can never be read", reason="client erased during the write")
        return answer

    async def rewrite(self, answer: Answer) -> Reply:
        try:
            document = self._json(answer)
        except GatewayError:
            await self._settle(None)
            raise
        await self._settle(self.redactor.client_of(self.resource, document) if isinstance(document, dict) else None)
        assert isinstance(answer, UpstreamResponse)
        if not isinstance(document, dict):
            return Reply(answer.status, b"{}", [(b"content-type", JSON)])
        await self._prepare(answer.body, [document])
        shown = self.redactor.record(self.resource, document)
        return self._reply(answer.status, shown if shown is not None else {})

    async def _settle(self, new_client: str | None) -> None:
        """Keys made before the CRM named a new client: link them to it, or destroy them if it refused."""
        orphans, self.orphans = self.orphans, ()
        if not orphans or self.cipher is None:
            return
        if new_client is None:
            await self.cipher.ring.discard(orphans, "the CRM did not create the record")
        else:
            for key_id in orphans:
                await self.cipher.ring.link(key_id, new_client)


class Delete(Exchange):
    """`DELETE`: allowed by the delete rule on the record class, for the record's own client."""

    client: str | None = None

    async def locate(self) -> None:
        self.client = await self._located_client()

    async def check(self) -> bytes | None:
        self._refuse_restricted({self.client})
        if self.resource.record_class not in self.view(self.client).deletable:
            raise GatewayError(403, f"not allowed to delete {self.resource.name} records",
                               reason=f"no delete on {self.resource.record_class}")
        return None

    async def forward(self, body: bytes | None) -> Answer:
        return await self._request("DELETE", self._query())

    async def rewrite(self, answer: Answer) -> Reply:
        assert isinstance(answer, UpstreamResponse)
        if answer.status >= 400:
            self._json(answer)
        if self.client is not None and self.resource.name == self.bundle.fieldmap.relations.resource:
            self.ctx.index.forget(self.client)
        return Reply(answer.status if answer.status != 200 else 204, b"")

"""The ASGI plumbing the gateway needs and nothing more: one request as it arrived, one reply as it leaves.

The gateway is a plain ASGI application (no framework in the request path): `Incoming` holds what the
server handed over, parsed once; `Reply` is what goes back, sent by `send_reply` with the headers every
answer carries (no caching, no sniffing, the request id).
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson

from proxy.errors import GatewayError
from proxy.upstream import OpenStream

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = b"application/json"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    stream: OpenStream | None = None  # opaque routes: the body is streamed from the CRM

    @classmethod
    def json(cls, status: int, document: Any, headers: list[tuple[bytes, bytes]] | None = None) -> Reply:
        return cls(status, orjson.dumps(document), [(b"content-type", JSON), *(headers or [])])


def error_body(message: str, request_id: str) -> bytes:
    return orjson.dumps({"error": message, "request_id": request_id})


@dataclass(slots=True)
class Incoming:
    """One request as the server handed it over: headers lower-cased once, the request id settled."""

    scope: Scope
    receive: Receive
    method: str
    headers: dict[str, str]
    request_id: str  # ours, always: a caller's id could collide with another's record
    caller_request_id: str | None = None  # the caller's X-Request-Id, kept beside ours when well formed
    repeated: frozenset[str] = frozenset()  # header names the caller sent more than once
    segments: tuple[str, ...] = ()  # the normalised path, once the app has checked it

    @classmethod
    def of(cls, scope: Scope, receive: Receive) -> Incoming:
        headers: dict[str, str] = {}
        repeated: set[str] = set()
        for k, v in scope.get("headers", []):
            name = k.decode("latin-1").lower()
            if name in headers:
                repeated.add(name)
            headers[name] = v.decode("latin-1")
        given = headers.get("x-request-id", "")
        return cls(scope, receive, str(scope.get("method", "GET")).upper(), headers, secrets.token_hex(12),
                   given if _REQUEST_ID.match(given) else None, frozenset(repeated))

    @property
    def raw_path(self) -> bytes:
        return self.scope.get("raw_path") or str(self.scope["path"]).encode()

    @property
    def query_string(self) -> str:
        return bytes(self.scope.get("query_string", b"")).decode("latin-1")

    def query(self) -> list[tuple[str, str]]:
        raw = self.query_string
        return parse_qsl(raw, keep_blank_values=True) if raw else []

    @property
    def peer(self) -> str:
        client = self.scope.get("client")
        return str(client[0]) if client else ""

    async def body(self, limit: int, seconds: float) -> bytes:
        """The whole request body, refused past `limit` bytes, declared or streamed (413), or when it has not
        all arrived within `seconds` (408: a caller trickling a body holds a task and a connection)."""
        declared = self.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise GatewayError(413, f"request body larger than {limit} bytes")
        try:
            async with asyncio.timeout(seconds):
                return await self._read_body(limit)
        except TimeoutError:
            raise GatewayError(408, f"request body not received within {seconds:g} seconds",
                               reason="request body too slow") from None

    async def _read_body(self, limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise GatewayError(400, "client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise GatewayError(413, f"request body larger than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def send_reply(send: Send, reply: Reply, request_id: str) -> None:
    headers = list(reply.headers)
    if not any(name == b"content-type" for name, _ in headers):
        headers.append((b"content-type", JSON))
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

"""Bare pass-through proxies: the reference a Python gateway is held to.

Each forwards method, path, query, body and end-to-end headers to the upstream and returns its status,
end-to-end headers and body unchanged (hop-by-hop headers dropped, Content-Length recomputed). Variants:

    aiohttp    uvicorn (uvloop + httptools), bare ASGI callable, one shared aiohttp ClientSession
    starlette  uvicorn, Starlette catch-all route, the same aiohttp session
    httpx      uvicorn, bare ASGI callable, one shared httpx.AsyncClient (sniffio installed)
    granian    granian (ASGI, 1 worker, 1 runtime thread, uvloop), bare ASGI + aiohttp

    python -m benchmarks.passthrough --app aiohttp --port 8001 --upstream http://127.0.0.1:8100
    FGB_PASS_APP=aiohttp FGB_PASS_UPSTREAM=... python -m granian --interface asgi --factory \
        benchmarks.passthrough:from_env
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, Protocol

import aiohttp
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from yarl import URL

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
Answer = tuple[int, Headers, bytes]

APPS = ("aiohttp", "starlette", "httpx")
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length",
})
BAD_GATEWAY: Answer = (502, [(b"content-type", b"application/json")], b'{"error":"upstream unreachable"}')


class Forwarder(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def forward(self, method: str, target: str, headers: Headers, body: bytes) -> Answer: ...


def end_to_end(headers: Any) -> Headers:
    """Response headers minus hop-by-hop ones (and Content-Length, set again for the body sent)."""
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


def request_headers(headers: Headers) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if k.lower() not in HOP_BY_HOP]


class AiohttpForwarder:
    """One shared aiohttp session with a keep-alive pool; no automatic headers, no decompression."""

    def __init__(self, upstream: str, pool: int = 100) -> None:
        self.base, self.pool = upstream.rstrip("/"), pool
        self.session: Any = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.pool, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=10, connect=2), auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def forward(self, method: str, target: str, headers: Headers, body: bytes) -> Answer:
        try:
            async with self.session.request(method, URL(self.base + target, encoded=True),
                                            headers=request_headers(headers), data=body or None,
                                            allow_redirects=False) as resp:
                payload = await resp.read()
                return resp.status, end_to_end(resp.raw_headers), payload
        except (aiohttp.ClientError, OSError, TimeoutError):
            return BAD_GATEWAY


class HttpxForwarder:
    """One shared httpx.AsyncClient (httpcore pool)."""

    def __init__(self, upstream: str, pool: int = 100) -> None:
        self.base, self.pool = upstream.rstrip("/"), pool
        self.client: Any = None

    async def start(self) -> None:
        self.client = httpx.AsyncClient(base_url=self.base, timeout=10.0, follow_redirects=False,
                                        limits=httpx.Limits(max_connections=self.pool,
                                                            max_keepalive_connections=self.pool))

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def forward(self, method: str, target: str, headers: Headers, body: bytes) -> Answer:
        try:
            resp = await self.client.request(method, target, headers=request_headers(headers), content=body or None)
        except httpx.HTTPError:
            return BAD_GATEWAY
        return resp.status_code, end_to_end(resp.headers.raw), resp.content


def target_of(scope: Scope) -> str:
    path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    query = scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


async def read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def bare_app(forwarder: Forwarder) -> ASGIApp:
    """A bare ASGI callable around a forwarder."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(forwarder, receive, send)
            return
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        status, headers, payload = await forwarder.forward(scope["method"], target_of(scope), scope["headers"], body)
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    return app


async def lifespan(forwarder: Forwarder, receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await forwarder.start()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await forwarder.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


def starlette_app(forwarder: Forwarder) -> ASGIApp:
    """The same proxy as a Starlette catch-all route."""

    async def handle(request: Request) -> Response:
        body = await request.body()
        status, headers, payload = await forwarder.forward(request.method, target_of(request.scope),
                                                           request.headers.raw, body)
        response = Response(payload, status)
        response.raw_headers = [*headers, (b"content-length", str(len(payload)).encode())]
        return response

    @contextlib.asynccontextmanager
    async def span(_: Starlette) -> AsyncIterator[None]:
        await forwarder.start()
        yield
        await forwarder.close()

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", handle, methods=methods)], lifespan=span)


def make_app(name: str, upstream: str) -> ASGIApp:
    if name == "aiohttp":
        return bare_app(AiohttpForwarder(upstream))
    if name == "starlette":
        return starlette_app(AiohttpForwarder(upstream))
    if name == "httpx":
        return bare_app(HttpxForwarder(upstream))
    raise ValueError(f"unknown pass-through app {name!r}; one of {', '.join(APPS)}")


def from_env() -> ASGIApp:
    """Factory for servers started by import string (granian)."""
    return make_app(os.environ.get("FGB_PASS_APP", "aiohttp"), os.environ["FGB_PASS_UPSTREAM"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.passthrough", description=__doc__.split("\n")[0])
    parser.add_argument("--app", choices=APPS, default="aiohttp")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--reuse-port", action="store_true",
                        help="bind with SO_REUSEPORT: one of several processes on the port, as `serve --workers`")
    args = parser.parse_args(argv)
    config = uvicorn.Config(make_app(args.app, args.upstream), host="127.0.0.1", port=args.port, loop="uvloop",
                            http="httptools", lifespan="on", access_log=False, log_level="warning",
                            server_header=False, date_header=False, proxy_headers=False)
    if args.reuse_port:
        from proxy.workers import shared_socket

        uvicorn.Server(config).run(sockets=[shared_socket("127.0.0.1", args.port)])
    else:
        uvicorn.Server(config).run()


if __name__ == "__main__":
    main()

"""The CRM as the gateway reaches it: one pooled aiohttp session, bounded in time and size.

aiohttp costs 5-9x less CPU per proxied request than httpx's pool here (research/perf-anchors.md),
so it carries every forwarded request. Faults become short JSON errors: 502 when the CRM cannot be
reached or answers nonsense, 504 when it is too slow. Nothing of the CRM's error text is passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from yarl import URL

from proxy.config import UpstreamSection
from proxy.errors import GatewayError


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    headers: Mapping[str, str]  # lower-case names; the last value wins
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    def is_json(self) -> bool:
        ct = self.content_type
        return ct == "application/json" or (ct.startswith("application/") and ct.endswith("+json"))


class OpenStream:
    """A response whose body is still on the wire."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = _lower(resp.headers)

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._resp.content.iter_chunked(64 * 1024):
            yield chunk

    def close(self) -> None:
        self._resp.release()


class RouteShare:
    """Each route's share of the CRM: at most `limit` of its requests in flight at once. Without it 100 slow
    requests to one endpoint took every pooled connection, and every other caller got 504; now they wait
    for a turn (`wait` seconds at most) and get 503, and the other routes are served."""

    def __init__(self, limit: int, wait: float) -> None:
        self.limit, self.wait = limit, wait
        self._slots: dict[str, asyncio.Semaphore] = {}

    @contextlib.asynccontextmanager
    async def turn(self, route: str) -> AsyncIterator[None]:
        slots = self._slots.get(route)
        if slots is None:
            slots = self._slots[route] = asyncio.Semaphore(self.limit)
        if slots.locked():
            try:
                async with asyncio.timeout(self.wait):
                    await slots.acquire()
            except TimeoutError:
                raise GatewayError(503, "this route is busy; try again shortly",
                                   reason=f"route busy: {self.limit} requests at the CRM") from None
        else:
            await slots.acquire()  # free: taken at once
        try:
            yield
        finally:
            slots.release()


class Upstream:
    def __init__(self, settings: UpstreamSection) -> None:
        self.settings = settings
        if not 1 <= settings.max_per_route <= settings.pool_size:
            raise ValueError(f"upstream.max_per_route must be between 1 and pool_size ({settings.pool_size})")
        self.share = RouteShare(settings.max_per_route, settings.route_wait_seconds)
        parts = urlsplit(settings.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"upstream.url must be an http(s) URL, got {settings.url!r}")
        self.base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=settings.timeout_seconds, connect=settings.connect_timeout_seconds
        )

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.settings.pool_size, keepalive_timeout=30, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=True, skip_auto_headers=("User-Agent",)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        out = dict(headers)
        out["accept-encoding"] = "identity"
        if self.settings.headers:
            out.update(self.settings.headers)
        return out

    async def request(
        self, method: str, path_and_query: str, headers: Mapping[str, str], body: bytes | None = None,
        encoded: bool = False,
    ) -> UpstreamResponse:
        """Send one request and read the whole answer (bounded by max_response_bytes). `encoded`: the target
        is percent-encoded already (`routes.encode_path` and `urlencode`), so it is not parsed and encoded again."""
        session = self._require()
        target = URL(self.base + path_and_query, encoded=True) if encoded else self.base + path_and_query
        try:
            async with session.request(
                method, target, headers=self._headers(headers), data=body, allow_redirects=False,
            ) as resp:
                limit = self.settings.max_response_bytes
                length = resp.content_length
                if length is not None:
                    if length > limit:
                        raise GatewayError(502, "upstream response too large")
                    return UpstreamResponse(resp.status, _lower(resp.headers), await resp.read())
                chunks: list[bytes] = []  # no length said: read in chunks, counting
                size = 0
                async for chunk in resp.content.iter_any():
                    size += len(chunk)
                    if size > limit:
                        raise GatewayError(502, "upstream response too large")
                    chunks.append(chunk)
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                return UpstreamResponse(resp.status, _lower(resp.headers), body)
        except GatewayError:
            raise
        except TimeoutError:
            raise GatewayError(504, "upstream timed out") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise GatewayError(502, "upstream unreachable", reason=f"upstream fault: {type(exc).__name__}") from None

    async def open_stream(self, method: str, path_and_query: str, headers: Mapping[str, str]) -> OpenStream:
        """An opaque response, to be streamed through without being held in memory; close it after."""
        session = self._require()
        try:
            resp = await session.request(
                method, self.base + path_and_query, headers=self._headers(headers), allow_redirects=False
            )
        except TimeoutError:
            raise GatewayError(504, "upstream timed out") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise GatewayError(502, "upstream unreachable", reason=f"upstream fault: {type(exc).__name__}") from None
        return OpenStream(resp)

    async def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """The gateway's own reads (relations, locating a record): JSON or a 502."""
        query = "?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else ""
        resp = await self.request("GET", path + query, {"accept": "application/json"})
        if resp.status == 404:
            raise GatewayError(404, "record not found")
        if resp.status != 200 or not resp.is_json():
            raise GatewayError(502, "upstream answered an internal lookup badly",
                               reason=f"lookup status {resp.status}")
        try:
            return orjson.loads(resp.body)
        except orjson.JSONDecodeError:
            raise GatewayError(502, "upstream sent malformed JSON") from None

    async def reachable(self) -> bool:
        try:
            session = self._require()
            async with session.get(self.base + "/", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                await resp.read()
                return True
        except (aiohttp.ClientError, OSError, TimeoutError, GatewayError):
            return False

    def _require(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise GatewayError(503, "gateway not started")
        return self._session


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}

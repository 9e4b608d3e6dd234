"""The HTTP connection, guarded where uvicorn leaves it open: how long and how large a request's head may be.

uvicorn (httptools) closes a kept-alive connection that stays idle, but never one that is slow to send a
request's head, and it reads a head of any size: 200 slowloris connections stayed open for ever, and a
16 MB header was read whole before the application saw the request. Here a head must arrive within
`server.header_timeout_seconds` (from the connection, or from the request's first byte on a kept-alive
one) and fit in `server.max_header_bytes` (checked after each read that leaves it incomplete, so at most
one read, 256 KB, more is taken in); otherwise the caller gets 408 or 431 and the connection is
closed. The refusal is audited like any other (`on_refused`). The body's limits are the application's
(`Incoming.body`).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

Refused = Callable[[int, str, str, str | None], None]
"""Told of a refused connection: status, reason, the request id given to the caller, the peer's address."""

TOO_LARGE = (431, "request header fields too large")
TOO_SLOW = (408, "request head not received in time")


def guarded(max_header_bytes: int, header_timeout_seconds: float, on_refused: Refused) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with these limits (a class per server: uvicorn makes one per connection)."""

    class GuardedHttp(_Guarded):
        max_head = max_header_bytes
        head_seconds = header_timeout_seconds
        refused = staticmethod(on_refused)

    return GuardedHttp


class _Guarded(HttpToolsProtocol):
    max_head: int
    head_seconds: float
    refused: Refused

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # what has arrived of the current head, in reads that did not complete it
        self._in_head = True  # waiting for (the rest of) a request's head
        self._began = False  # a request began in the read being parsed: that read is not counted against it
        self._started = False  # a byte of the current request has arrived
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that sends nothing is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._began = False
        super().data_received(data)
        if self.transport.is_closing() or not self._in_head or not self._started:
            return
        if not self._began:
            self._head_bytes += len(data)
        if self._head_bytes > self.max_head:
            self._refuse(*TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._started, self._began, self._head_bytes = True, True, True, 0
        if self._head_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._in_head, self._started = False, False
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._in_head = True  # the next request's head; its first byte arms the timer (idle: uvicorn's keep-alive)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            if self._started:
                self._refuse(*TOO_SLOW)
            else:  # never said anything: nothing to answer
                self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """Answer with a short JSON error and close; the request never reaches the application."""
        self._disarm()
        request_id = secrets.token_hex(12)
        body = orjson.dumps({"error": message, "request_id": request_id})
        head = (f"HTTP/1.1 {status} {message.title()}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nx-request-id: {request_id}\r\nconnection: close\r\n\r\n")
        self.transport.write(head.encode() + body)
        self.transport.close()
        self._in_head = False
        self.refused(status, message, request_id, self.client[0] if self.client else None)

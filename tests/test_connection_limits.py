"""The connection's own limits, against a gateway process on loopback: a request's head must arrive in time
and fit, a body must arrive in time; each refusal is a short JSON error, closes the connection and is
audited, and callers who keep to the limits are served meanwhile."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Gateway, Signing, make_keys, policies_copy, start_gateway, wait_until

HEAD_SECONDS, BODY_SECONDS, MAX_HEAD = 1.0, 1.0, 16 * 1024


@pytest.fixture(scope="module")
def gw(crm: str, signing: Signing, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    d = tmp_path_factory.mktemp("limits")
    limits = (f"header_timeout_seconds = {HEAD_SECONDS}\nbody_timeout_seconds = {BODY_SECONDS}\n"
              f"max_header_bytes = {MAX_HEAD}")
    g = start_gateway(d / "gw", crm, signing, make_keys(d / "keys"), policies=policies_copy(d / "gw"),
                      process=True, server_extra=limits)
    yield g
    g.service.stop()


def _connect(gw: Gateway) -> socket.socket:
    host, port = gw.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _answer(s: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Read until the gateway closes the connection: status, headers, JSON body."""
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ", 2)[1]), headers, json.loads(body)


def _one_response(s: socket.socket) -> bytes:
    """One whole response off a kept-alive connection: its head, then Content-Length bytes of body
    (a body may come in several segments, and the next read must start at the next response)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def _record(gw: Gateway, request_id: str) -> dict[str, Any]:
    return wait_until(lambda: next((r for r in gw.audit_records() if r["request_id"] == request_id), None),
                      f"the audit record of {request_id}")


def test_a_head_sent_slowly_is_refused_and_the_connection_closed(gw: Gateway) -> None:
    """Slowloris: the head trickles in a byte at a time, each byte well within any idle time-out. Twenty
    such connections are each answered 408 and closed; a caller who sends a whole request is served."""
    alice = gw.as_user("alice", "counsellor")
    slow = [_connect(gw) for _ in range(20)]
    for s in slow:
        s.sendall(b"GET /clients/1 HTTP/1.1\r\nHost: x\r\n")
    deadline = time.monotonic() + HEAD_SECONDS * 3
    answered = []
    while time.monotonic() < deadline and len(answered) < len(slow):
        for s in slow:
            if s not in answered:
                try:
                    s.sendall(b"X")  # one more byte of a header that never ends
                except OSError:
                    answered.append(s)
        assert gw.get("/clients/1", alice).status_code == 200
        time.sleep(0.2)
    for s in slow:
        status, headers, body = _answer(s)
        assert status == 408 and headers["connection"] == "close"
        assert body == {"error": "request head not received in time", "request_id": headers["x-request-id"]}
        s.close()
    record = _record(gw, headers["x-request-id"])
    assert (record["method"], record["status"], record["outcome"]) == ("HTTP", 408, "denied")
    assert record["reason"] == "request head not received in time" and record["peer"] == "127.0.0.1"
    assert record["user"] is None


def test_a_connection_that_says_nothing_is_closed(gw: Gateway) -> None:
    with _connect(gw) as s:
        s.settimeout(HEAD_SECONDS * 5)
        assert s.recv(1) == b""  # closed by the gateway, with nothing to answer


def test_a_slow_head_on_a_kept_alive_connection_is_refused_too(gw: Gateway) -> None:
    alice = gw.as_user("alice", "counsellor")
    with _connect(gw) as s:
        s.sendall(f"GET /clients/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\n\r\n".encode())
        assert _one_response(s).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /clients/1 HTTP/1.1\r\n")  # the next request's head, never finished
        status, _, body = _answer(s)
    assert status == 408 and body["error"] == "request head not received in time"


def test_a_head_too_large_is_refused_before_it_is_read_whole(gw: Gateway) -> None:
    """A 4 MB header: 431 once the head passes max_header_bytes, the connection closed, so the rest is
    never read; a token of ordinary size is still served."""
    with _connect(gw) as s:
        s.sendall(b"GET /clients/1 HTTP/1.1\r\nHost: x\r\nX-Filler: ")
        sent = 0
        try:
            while sent < 4 * 1024 * 1024:
                s.sendall(b"a" * 65536)
                sent += 65536
        except OSError:
            pass  # the gateway closed the connection while we were still sending
        status, headers, body = _answer(s)
    assert sent < 4 * 1024 * 1024, "the whole header was taken in"
    assert status == 431 and body["error"] == "request header fields too large"
    record = _record(gw, headers["x-request-id"])
    assert record["status"] == 431 and record["reason"] == "request header fields too large"
    alice = gw.as_user("alice", "counsellor")
    assert gw.get("/clients/1", alice, headers={"x-filler": "a" * 4000}).status_code == 200


def test_a_body_sent_slowly_is_refused(gw: Gateway) -> None:
    alice = gw.as_user("alice", "counsellor")
    with _connect(gw) as s:
        s.sendall(f"PATCH /clients/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"email\": ".encode())
        status, headers, body = _answer_within(s)
    assert status == 408 and body["error"] == f"request body not received within {BODY_SECONDS:g} seconds"
    record = _record(gw, headers["x-request-id"])
    assert record["reason"] == "request body too slow" and record["user"] == "u:alice"


def _answer_within(s: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    """The answer to a request whose body was never finished (the gateway answers, then may keep the
    connection: read one response by its length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        body += s.recv(65536)
    return int(lines[0].split(" ", 2)[1]), headers, json.loads(body)



def test_one_slow_route_cannot_take_the_crm_pool(switchable: str, signing: Signing,
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    """Six note lists the CRM takes two seconds over, through a pool of three connections with two per
    route: two go to the CRM, four wait their turn briefly and get 503 (audited, `route busy`), and a
    record read on another route is answered while the slow lists are still at the CRM. Without the bound
    the slow lists took all three connections and the record read queued behind them."""
    import asyncio

    import httpx

    from tests.conftest import HTTP

    d = tmp_path_factory.mktemp("route-share")
    gw = start_gateway(d / "gw", switchable, signing, make_keys(d / "keys"), policies=policies_copy(d / "gw"),
                       upstream_extra="pool_size = 3\nmax_per_route = 2\nroute_wait_seconds = 0.3", timeout=10)
    alice = gw.as_user("alice", "counsellor")
    try:
        HTTP.post(switchable + "/_control", json={"delay": 2.0}).raise_for_status()

        async def run() -> tuple[list[httpx.Response], list[str]]:
            done: list[str] = []
            async with httpx.AsyncClient(base_url=gw.url, timeout=15,
                                         headers={"authorization": f"Bearer {alice}"}) as c:
                async def get(path: str, label: str) -> httpx.Response:
                    r = await c.get(path)
                    done.append(f"{label} {r.status_code}")
                    return r

                slow = [asyncio.create_task(get("/clients/1/session-notes", "slow")) for _ in range(6)]
                await asyncio.sleep(0.5)  # the slow lists are at the CRM (or refused) by now
                fast = await get("/clients/1", "fast")
                answers = await asyncio.gather(*slow)
            return [fast, *answers], done

        (fast, *slow), order = asyncio.run(run())
    finally:
        HTTP.post(switchable + "/_control", json={"delay": 0}).raise_for_status()
        gw.service.stop()
    assert fast.status_code == 200 and fast.json()["id"] == 1
    assert sorted(r.status_code for r in slow) == [200, 200, 503, 503, 503, 503]
    assert order.index("fast 200") < order.index("slow 200"), order  # before the lists that went to the CRM
    refused = next(r for r in slow if r.status_code == 503)
    assert refused.json()["error"] == "this route is busy; try again shortly"
    record = _record(gw, refused.headers["x-request-id"])
    assert record["reason"] == "route busy: 2 requests at the CRM" and record["outcome"] == "error"

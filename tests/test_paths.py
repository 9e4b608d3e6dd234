"""Path tricks: what the gateway authorises is exactly what the CRM receives, or nothing is sent."""

from __future__ import annotations

import socket

import pytest

from proxy.errors import GatewayError
from proxy.routes import encode_path, normalise_path
from tests.conftest import Gateway, wait_until
from tests.test_identity import refused


def raw_get(gw: Gateway, target: str, token: str, method: str = "GET") -> tuple[int, bytes]:
    """Send a request line exactly as written (no client-side normalisation)."""
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                  "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("target", [
    "/clients/1/..%2F2", "/clients/1%2f..%2f2", "/clients/%2e%2e%2fclients%2f2", "/clients/1;jsessionid=x",
    "/clients/%2531", "/clients/1%00", "/clients/1%5c..%5c2", "/../clients/1",
])
def test_ambiguous_paths_are_refused(gateway: Gateway, target: str) -> None:
    status, body = raw_get(gateway, target, gateway.as_user("alice", "counsellor"))
    assert status == 400, (target, body)
    assert b"Liam" not in body


@pytest.mark.parametrize(("target", "client"), [
    ("//clients///1//", 1), ("/clients/./1", 1), ("/clients/%31", 1), ("/clients/2/../1", 1),
    ("/clients/1/../2", 2), ("/clients/%2e%2e/clients/2", 2), ("/clients/1/session-notes/../../2", 2),
])
def test_paths_are_normalised_once_and_decided_on_what_is_forwarded(gateway: Gateway, target: str, client: int
                                                                    ) -> None:
    status, body = raw_get(gateway, target, gateway.as_user("alice", "counsellor"))
    if client == 1:
        assert status == 200 and b'"id":1,' in body, (target, body)
    else:
        assert status == 403, (target, body)  # client 2 is bob's


def test_unknown_routes_and_methods_are_refused(gateway: Gateway) -> None:
    alice = gateway.as_user("alice", "counsellor")
    for method, path in [("GET", "/admin"), ("GET", "/CLIENTS/1"), ("HEAD", "/clients/1"),
                         ("OPTIONS", "/clients/1"), ("TRACE", "/clients/1"), ("GET", "/clients/abc"),
                         ("GET", "/clients/1/secrets")]:
        r = gateway.request(method, path, alice)
        assert r.status_code == 403, (method, path)
        if method != "HEAD":
            assert r.json()["error"] == "route not allowed"
    refused(gateway, None, 401, "bearer token required", "no token", "/admin")  # no identity, no access, any route


def test_a_method_not_in_upper_case_is_refused_by_the_parser(gateway: Gateway) -> None:
    """Methods are case-sensitive (RFC 9110 9.1); httptools, which serves the gateway, refuses `get` or `Get`
    in the request line as malformed, before the application sees it: no route, no audit record, no CRM."""
    alice = gateway.as_user("alice", "counsellor")
    before = len(gateway.audit_records())
    for method in ("get", "Get", "gEt"):
        status, body = raw_get(gateway, "/clients/1", alice, method=method)
        assert (status, body) == (400, b"Invalid HTTP request received."), (method, body)
    # the same request in upper case is served; its record (after any the refused ones had) is the only one since
    status, body = raw_get(gateway, "/clients/1", alice)
    assert status == 200 and b'"id":1,' in body
    since = wait_until(lambda: gateway.audit_records()[before:], "the served request's audit record", timeout=5)
    assert [(r["method"], r["route"], r["status"]) for r in since] == [("GET", "/clients/{client_id:int}", 200)]


def test_normalise_path_unit() -> None:
    assert normalise_path(b"/a//b/./c/../d/") == ("a", "b", "d")
    assert encode_path(normalise_path(b"/a%20b/%C3%A9")) == "/a%20b/%C3%A9"
    for bad in (b"a", b"/a%2fb", b"/a;b", b"/%252e", b"/..", b"/a/%ff", b"/a%0a"):
        with pytest.raises(GatewayError):
            normalise_path(bad)


def test_a_pseudonym_is_a_client_address_and_nothing_else_is() -> None:
    from proxy.keys.store import new_pseudonym
    from proxy.policy import load_fieldmap
    from proxy.routes import PSEUDONYM, RouteTable
    from tests.conftest import REPO

    routes = RouteTable(list(load_fieldmap(REPO / "policies" / "fields.yaml").routes))
    made = new_pseudonym()
    assert PSEUDONYM.match(made)
    matched = routes.match("GET", ("clients", made, "session-notes"))
    assert matched is not None and matched[1] == {"client_id": made}
    assert routes.match("GET", ("session-notes", made)) is None  # only where the route names a client
    assert routes.match("GET", ("clients", "P-123")) is None

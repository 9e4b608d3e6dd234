"""Bad tokens never reach the CRM: expired, forged, unsigned, confused, or for someone else."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import AUDIENCE, HTTP, ISSUER, Gateway, Signing, start_gateway


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims(**kw: object) -> dict[str, object]:
    now = int(time.time())
    base: dict[str, object] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 600,
                               "roles": ["counsellor"], "purpose_of_use": ["TREAT"]}
    base.update(kw)
    return base


def sign(signing: Signing, **kw: object) -> str:
    key = serialization.load_pem_private_key(signing.private_pem, password=None)
    return jwt.encode(claims(**kw), key, algorithm="ES256")  # type: ignore[arg-type]


def status(gw: Gateway, token: str | None, path: str = "/clients/1", **headers: str) -> int:
    return gw.get(path, token, headers=headers).status_code


INVALID_SIGNATURE = "invalid token: InvalidSignatureError"


def refused(gw: Gateway, token: str | None, status_code: int, error: str, reason: str, path: str = "/clients/1",
            **headers: str) -> dict[str, Any]:
    """A refusal as the caller and the auditor see it: the status, the JSON error, and the audit record
    with the same status and the reason (so a refusal for some other cause does not pass for this one)."""
    r = gw.get(path, token, headers=headers)
    assert r.status_code == status_code, r.text
    assert r.json()["error"] == error, r.text
    rec = gw.audit_for(r.headers["x-request-id"])
    assert (rec["status"], rec["outcome"], rec["reason"]) == (status_code, "denied", reason), rec
    return rec


def test_a_good_token_works(gateway: Gateway, signing: Signing) -> None:
    assert status(gateway, sign(signing)) == 200


def test_missing_and_malformed_tokens(gateway: Gateway) -> None:
    refused(gateway, None, 401, "bearer token required", "no token")
    refused(gateway, None, 401, "bearer token required", "no token", authorization="Basic YWxpY2U6eA==")
    refused(gateway, "not-a-jwt", 401, "malformed token", "malformed token")
    refused(gateway, "a.b.c", 401, "malformed token", "malformed token")


def test_expired_token(gateway: Gateway, signing: Signing) -> None:
    old = int(time.time()) - 3600
    refused(gateway, sign(signing, iat=old, exp=old + 60), 401, "token expired", "token expired")


def test_wrong_signature(gateway: Gateway, signing: Signing) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    refused(gateway, jwt.encode(claims(), other, algorithm="ES256"), 401, "token not valid", INVALID_SIGNATURE)
    good = sign(signing)
    head, _body, sig = good.split(".")
    tampered = ".".join([head, _b64(claims(roles=["admin"], purpose_of_use=["HOPERAT"])), sig])
    refused(gateway, tampered, 401, "token not valid", INVALID_SIGNATURE)


def test_alg_none_is_refused(gateway: Gateway) -> None:
    token = _b64({"alg": "none", "typ": "JWT"}) + "." + _b64(claims()) + "."
    refused(gateway, token, 401, "token algorithm not accepted", "algorithm 'none' refused")


def test_hs256_signed_with_the_public_key_is_refused(gateway: Gateway, signing: Signing) -> None:
    """The HS/RS confusion attack: the verifier's public key used as an HMAC secret."""
    import hashlib
    import hmac

    secret = signing.public_file.read_bytes()
    head = _b64({"alg": "HS256", "typ": "JWT"})
    body = _b64(claims())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    token = f"{head}.{body}." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    refused(gateway, token, 401, "token algorithm not accepted", "algorithm 'HS256' refused")


def test_wrong_audience_and_issuer(gateway: Gateway, signing: Signing) -> None:
    refused(gateway, sign(signing, aud="someone-else"), 401, "token audience not accepted", "wrong audience")
    refused(gateway, sign(signing, iss="https://evil.example"), 401, "token issuer not accepted", "wrong issuer")


def test_roles_and_purposes_chosen_by_header(gateway: Gateway, signing: Signing) -> None:
    both = sign(signing, roles=["counsellor", "admin"], purpose_of_use=["TREAT", "HOPERAT"])
    refused(gateway, both, 400, "several roles held: choose one with the x-fieldguard-role header",
            "no active role chosen")
    assert status(gateway, both, **{"x-fieldguard-role": "counsellor", "x-fieldguard-purpose": "TREAT"}) == 200
    refused(gateway, both, 403, "requested role is not among the token's roles", "role not held",
            **{"x-fieldguard-role": "supervisor", "x-fieldguard-purpose": "TREAT"})
    # the admin role with the treatment purpose is not allowed by policy (purpose of use is per role)
    rec = refused(gateway, both, 403, "purpose of use TREAT not allowed for role admin", "purpose not allowed",
                  **{"x-fieldguard-role": "admin", "x-fieldguard-purpose": "TREAT"})
    assert (rec["user"], rec["role"], rec["purpose"]) == ("u:alice", "admin", "TREAT")
    refused(gateway, sign(signing, purpose_of_use=[]), 403, "purpose of use required", "no purpose of use")
    refused(gateway, sign(signing, roles=["superuser"], purpose_of_use=["TREAT"]), 403,
            "role not known to the policy", "unknown role")


def test_subject_cannot_masquerade_as_a_role(gateway: Gateway, signing: Signing) -> None:
    """Casbin's g(x, x) is true; the gateway never puts a user id where a role goes."""
    rec = refused(gateway, sign(signing, sub="admin", roles=["counsellor"]), 403,
                  "no access to this client's records: not on the caseload: policy.csv:35 grants counsellor "
                  "identity only through breakglass or caseload; the caller holds any",
                  "not on the caseload: policy.csv:35 grants counsellor identity only through breakglass or caseload; "
                  "the caller holds any", "/clients/2")
    assert (rec["user"], rec["role"]) == ("u:admin", "counsellor")


@pytest.fixture(scope="module")
def rsa_gateway(crm: str, signing: Signing, shared_keys: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Gateway]:
    d = tmp_path_factory.mktemp("gw-rsa")
    g = start_gateway(d, crm, signing, shared_keys, public_key=signing.rsa_public_file)
    yield g
    g.service.stop()


def test_rs256_gateway_refuses_hs256_made_from_its_public_key(rsa_gateway: Gateway, signing: Signing) -> None:
    key = serialization.load_pem_private_key(signing.rsa_private_pem, password=None)
    good = jwt.encode(claims(), key, algorithm="RS256")  # type: ignore[arg-type]
    assert status(rsa_gateway, good) == 200
    import hashlib
    import hmac

    head, body = _b64({"alg": "HS256", "typ": "JWT"}), _b64(claims())
    mac = hmac.new(signing.rsa_public_file.read_bytes(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    forged = f"{head}.{body}." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    refused(rsa_gateway, forged, 401, "token algorithm not accepted", "algorithm 'HS256' refused")
    # an ES256 token is not accepted by an RS256-keyed gateway either
    refused(rsa_gateway, sign(signing), 401, "token algorithm not accepted", "algorithm 'ES256' refused")


def test_every_refusal_is_audited_without_the_token(gateway: Gateway, signing: Signing) -> None:
    token = sign(signing, aud="someone-else")
    r = gateway.get("/clients/1", token)
    rec = gateway.audit_for(r.headers["x-request-id"])
    assert rec["status"] == 401 and rec["outcome"] == "denied" and rec["reason"] == "wrong audience"
    assert token not in gateway.audit.read_text()


def test_jwks_with_key_ids(crm: str, signing: Signing, shared_keys: Path, tmp_path: Path) -> None:
    keys = {kid: ec.generate_private_key(ec.SECP256R1()) for kid in ("k1", "k2")}
    jwks = {"keys": [{**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(k.public_key())), "kid": kid}
                     for kid, k in keys.items()]}
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    g = start_gateway(tmp_path, crm, signing, shared_keys, identity=f'jwks_file = "{tmp_path / "jwks.json"}"')
    try:
        for kid, key in keys.items():
            tok = jwt.encode(claims(), key, algorithm="ES256", headers={"kid": kid})
            assert status(g, tok) == 200
        wrong = jwt.encode(claims(), keys["k1"], algorithm="ES256", headers={"kid": "k2"})
        refused(g, wrong, 401, "token not valid", INVALID_SIGNATURE)
        refused(g, jwt.encode(claims(), keys["k1"], algorithm="ES256", headers={"kid": "k9"}), 401,
                "token signed by an unknown key", "unknown kid")
    finally:
        g.service.stop()


def test_token_command_mints_a_working_token(gateway: Gateway, tmp_path: Path) -> None:
    import subprocess
    import sys

    key = tmp_path / "signing.pem"
    key.write_bytes(gateway.signing.private_pem)
    cfg = tmp_path / "fg.toml"
    cfg.write_text(gateway.config.read_text().replace("[identity]", f'[identity]\ndemo_signing_key_file = "{key}"'))
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "token", "--config", str(cfg), "--sub", "alice",
                          "--role", "counsellor"], capture_output=True, text=True, check=True)
    token = out.stdout.strip()
    assert jwt.decode(token, options={"verify_signature": False})["purpose_of_use"] == ["TREAT"]
    assert status(gateway, token) == 200


def _high_s(token: str) -> str:
    """The same ES256 signature with S replaced by n - S: it still verifies, and is refused."""
    head, body, sig = token.split(".")
    raw = base64.urlsafe_b64decode(sig + "==")
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    s = int.from_bytes(raw[32:], "big")
    other = raw[:32] + (n - s).to_bytes(32, "big")
    return f"{head}.{body}." + base64.urlsafe_b64encode(other).rstrip(b"=").decode()


def test_signed_tokens_a_lenient_parser_would_take_are_refused(gateway: Gateway, signing: Signing) -> None:
    """Each needs the IdP's signature, and is refused all the same, with its reason in the audit record."""
    now = int(time.time())
    refused(gateway, sign(signing, exp=str(now + 600)), 401, "token not valid", "claim exp is not a number")
    refused(gateway, sign(signing, iat=now, exp=now + 40 * 86_400), 401, "token lives too long",
            "token lifetime above identity.max_token_lifetime")
    refused(gateway, sign(signing, roles="counsellor"), 403, "token carries no roles",
            "no roles claim (a list of names)")
    refused(gateway, sign(signing, sub="alice\n"), 401, "token subject not valid", "bad sub")
    refused(gateway, "x" * 20_000, 401, "token too large", "token too large")


def test_both_spellings_of_one_es256_signature_are_one_token(gateway: Gateway, signing: Signing) -> None:
    """(r, s) and (r, n - s) both verify: they are the same token, with the same identity in the trail (a
    refusal of high S would refuse half of every IdP's genuine tokens); a forged S is not either."""
    token = sign(signing, jti="malleable-1")
    other = _high_s(token)
    assert other != token
    records = [gateway.audit_for(gateway.get("/clients/1", t).headers["x-request-id"]) for t in (token, other)]
    assert [r["status"] for r in records] == [200, 200] and {r["token_id"] for r in records} == {"malleable-1"}
    head, body, sig = token.split(".")
    forged = f"{head}.{body}.{sig[:-4]}AAAA"
    refused(gateway, forged, 401, "token not valid", INVALID_SIGNATURE)


def test_two_authorization_headers_are_refused(gateway: Gateway, signing: Signing) -> None:
    good = f"Bearer {sign(signing)}"
    r = HTTP.get(gateway.url + "/clients/1", headers=[("authorization", good), ("authorization", good)])
    assert r.status_code == 400 and r.json()["error"] == "send one Authorization header"
    assert gateway.audit_for(r.headers["x-request-id"])["reason"] == "repeated authorization header"


def test_an_odd_claim_value_is_recorded_printable(gateway: Gateway, signing: Signing) -> None:
    """A lone surrogate or a control character in a signed claim cannot stop the trail: it is recorded as
    a replacement character, and the request is answered."""
    r = gateway.get("/clients/1", sign(signing, jti="ab\ud800\ncd"))
    assert r.status_code == 200
    assert gateway.audit_for(r.headers["x-request-id"])["token_id"] == "ab\ufffd\ufffdcd"


def test_a_websocket_upgrade_is_refused_and_audited(gateway: Gateway) -> None:
    import socket

    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET /clients/1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        answer = s.recv(4096).decode("latin-1")
    assert answer.startswith("HTTP/1.1 403"), answer
    deadline = time.monotonic() + 5
    while not any(r["method"] == "WEBSOCKET" for r in gateway.audit_records()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rec = [r for r in gateway.audit_records() if r["method"] == "WEBSOCKET"][-1]
    assert rec["outcome"] == "denied" and rec["reason"] == "websocket refused"

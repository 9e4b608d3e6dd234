"""Opt-ins a deployment must ask for explicitly: public routes, and HS256 demo tokens."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import jwt

from tests.conftest import AUDIENCE, ISSUER, KEK_ENV, Signing, start_gateway
from tests.test_identity import INVALID_SIGNATURE, refused


def hs256(secret: bytes) -> str:
    now = int(time.time())
    return jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 600,
                       "roles": ["counsellor"], "purpose_of_use": "TREAT"}, secret, algorithm="HS256")


def test_hs256_only_in_a_declared_demo(crm: str, signing: Signing, shared_keys: Path, tmp_path: Path) -> None:
    secret = tmp_path / "hs.secret"
    secret.write_bytes(b"0123456789abcdef0123456789abcdef-demo")
    secret.chmod(0o600)
    gw = start_gateway(tmp_path / "demo", crm, signing, shared_keys,
                       identity=f'demo_hs256_secret_file = "{secret}"\ndemo = true')
    try:
        assert gw.get("/clients/1", hs256(secret.read_bytes())).status_code == 200
        refused(gw, hs256(b"another secret of the same length!!!!"), 401, "token not valid", INVALID_SIGNATURE)
        refused(gw, signing.token("alice", "counsellor", "TREAT"), 401, "token algorithm not accepted",
                "algorithm 'ES256' refused")
        assert "HS256 demo secret in use" in gw.service.output()
    finally:
        gw.service.stop()
    cfg = (tmp_path / "demo" / "fieldguard.toml").read_text().replace("demo = true", "demo = false")
    (tmp_path / "prod.toml").write_text(cfg)
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(tmp_path / "prod.toml")],
                         capture_output=True, text=True, timeout=60, env={**os.environ, **KEK_ENV})
    assert out.returncode == 1 and "only with identity.demo = true" in out.stderr

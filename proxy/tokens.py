"""Tokens for the demo and the tests: signed like an identity provider's, by a key made at run time.

A deployment's tokens come from its IdP; `fieldguard token`, the demo and `policy test` mint their own
with a key that never leaves the machine they run on.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def mint_token(
    private_key_pem: bytes,
    *,
    subject: str,
    roles: list[str],
    issuer: str,
    audience: str,
    purposes: list[str] | None = None,
    client_id: str | None = None,
    ttl_seconds: int = 3600,
    kid: str | None = None,
    claims: dict[str, Any] | None = None,
) -> str:
    """A signed demo token (ES256 or RS256 by key type). Tests and `fieldguard token` use it."""
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    alg = "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256"
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": issuer, "aud": audience, "sub": subject, "iat": now, "exp": now + ttl_seconds,
        "jti": hashlib.sha256(f"{subject}{now}{time.perf_counter_ns()}".encode()).hexdigest()[:16],
        "roles": roles,
    }
    if purposes:
        payload["purpose_of_use"] = purposes
    if client_id is not None:
        payload["client_id"] = client_id
    payload.update(claims or {})
    headers = {"kid": kid} if kid else None
    return jwt.encode(payload, key, algorithm=alg, headers=headers)  # type: ignore[arg-type]


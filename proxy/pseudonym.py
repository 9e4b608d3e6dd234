"""Pseudonyms: a stable stand-in for a client where identity must not be shown.

A supervisor follows one client across sessions without learning who they are; a researcher links
records without identity. The pseudonym is a keyed HMAC of the client id, so it is stable, cannot be
reversed without the key, and differs between deployments.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


class Pseudonymizer:
    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("pseudonym key must be at least 32 bytes")
        self._key = key
        self._memo: dict[str, str] = {}

    def __call__(self, client_id: str) -> str:
        known = self._memo.get(client_id)
        if known is not None:
            return known
        digest = hmac.digest(self._key, b"client:" + client_id.encode(), hashlib.sha256)
        value = "P-" + base64.b32encode(digest[:10]).decode().rstrip("=")
        if len(self._memo) < 100_000:
            self._memo[client_id] = value
        return value

"""Field encryption on the request path: seal on the way to the CRM, open only for `clear`.

Opening checks, in order: the envelope's version and algorithm are known; the key is in the keystore
and not destroyed; the key belongs to the record's client and to the field class's key scope; the tag
verifies against this resource and path. Any failure removes the field and is reported for the audit
record; there is never a plaintext fallback or an error page carrying the ciphertext.
"""

from __future__ import annotations

import re
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.keys.envelope import EnvelopeError, key_id_in_head, open_where, parse
from proxy.keys.kek import KekError
from proxy.keys.ring import KeyRing

_SEALED_IN_BODY = re.compile(rb'"fg1\.([A-Za-z0-9_-]{24})')  # the header: version, algorithm, key id


class CipherFailure(Exception):
    """A ciphertext that cannot be opened for this record (bad tag, foreign key, destroyed key...)."""


class FieldCipher:
    """One request's opener: each (key, client, scope) is checked once, then every field it opens costs
    a base64 decode and an AES-GCM decryption."""

    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring
        self._granted: dict[tuple[bytes, str | None, str], AESGCM | str] = {}  # the AEAD, or why not

    async def prefetch(self, body: bytes) -> None:
        """Fetch the keystore rows a response will need, in one query, before it is rewritten."""
        if b'"fg1.' not in body:
            return
        heads = set(_SEALED_IN_BODY.findall(body))  # a list repeats a client's key in every row
        await self.ring.prefetch(k for h in heads if (k := key_id_in_head(h)) is not None)

    def open(self, value: str, client_id: str | None, scope: str, where: bytes, classed: bytes,
             record_id: bytes | None, key_ids: set[str]) -> Any:
        """The field's value; `scope` is its class's key scope, `where` its `envelope.associated_where`,
        `classed` the same with the class it is read as, `record_id` the record's (see `envelope`). The ids
        of the keys consulted are added to `key_ids`, for the audit record."""
        try:
            envelope = parse(value)
        except EnvelopeError as exc:
            raise CipherFailure(str(exc)) from None
        key_id = envelope[1]
        grant = self._granted.get((key_id, client_id, scope))
        if grant is None:
            grant = self._granted[(key_id, client_id, scope)] = self._grant(key_id, client_id, scope, key_ids)
        if isinstance(grant, str):
            raise CipherFailure(grant)
        try:
            return open_where(grant, envelope, where, classed, record_id)
        except EnvelopeError as exc:
            raise CipherFailure(str(exc)) from None

    def _grant(self, key_id: bytes, client_id: str | None, scope: str, key_ids: set[str]) -> AESGCM | str:
        """The key's AEAD if it may open this client's fields of this scope; else the reason, for the audit."""
        try:
            opened = self.ring.opened(key_id)
        except KekError:
            return "key-encryption key unavailable"
        if opened is None:
            return "unknown or destroyed key"
        key_ids.add(opened.key.hex_id)
        key = opened.key
        if key.client_id is None or key.client_id != client_id:
            return "key belongs to another client"
        if not scope or key.scope != scope:
            return "key of another scope"
        return opened.aead

"""The field ciphertext: text that fits the CRM's string columns and says which key opens it.

    fg1.<base64url(version | algorithm | key id (16 B) | nonce (12 B) | AES-256-GCM ciphertext and tag)>

The associated data is the 18-byte header plus the resource and the field's map path, so a ciphertext
moved to another field or another kind of record fails its tag; the key id names one client's data key,
so a ciphertext moved to another client's record is refused before any decryption is tried. The
plaintext is the field's JSON, so numbers, objects and lists come back as they went in.
"""

from __future__ import annotations

import binascii
import os
from typing import Any

import orjson
import pybase64
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "fg1."
VERSION = 1
ALG_AES256_GCM = 1
KEY_ID_BYTES = 16
NONCE_BYTES = 12
HEADER_BYTES = 2 + KEY_ID_BYTES
_MIN_BYTES = HEADER_BYTES + NONCE_BYTES + 16
HEAD_CHARS = 24  # base64 characters of the 18-byte header


class EnvelopeError(Exception):
    """A ciphertext that cannot be opened: the reason is safe to audit (it never holds the value)."""


Envelope = tuple[bytes, bytes, bytes, bytes]
"""A parsed ciphertext: (header, key id, nonce, ciphertext and tag). A plain tuple: one is made per field
opened, and a NamedTuple costs half as much again as the base64 decode."""


def is_sealed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def associated_where(resource: str, path: str) -> bytes:
    """The part of the associated data that names where a ciphertext belongs (it follows the header)."""
    return b"\x00%b\x00%b" % (resource.encode(), path.encode())


def associated_data(header: bytes, resource: str, path: str) -> bytes:
    return header + associated_where(resource, path)


def seal(aead: AESGCM, key_id: bytes, value: Any, resource: str, path: str) -> str:
    header = bytes((VERSION, ALG_AES256_GCM)) + key_id
    nonce = os.urandom(NONCE_BYTES)
    sealed = aead.encrypt(nonce, orjson.dumps(value), associated_data(header, resource, path))
    return PREFIX + pybase64.urlsafe_b64encode(header + nonce + sealed).rstrip(b"=").decode()


def parse(text: str) -> Envelope:
    """Split a ciphertext into its parts; refuse unknown versions and algorithms."""
    try:  # SIMD base64 (pybase64): the stdlib decoder costs more than the AES-GCM decryption itself
        body = text[len(PREFIX):]
        if len(body) % 4:
            body += "=" * (-len(body) % 4)
        raw = pybase64.b64decode(body, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError("malformed ciphertext") from None
    if len(raw) < _MIN_BYTES:
        raise EnvelopeError("malformed ciphertext")
    if raw[0] != VERSION:
        raise EnvelopeError("unknown envelope version")
    if raw[1] != ALG_AES256_GCM:
        raise EnvelopeError("unknown algorithm")
    return raw[:HEADER_BYTES], raw[2:HEADER_BYTES], raw[HEADER_BYTES:HEADER_BYTES + NONCE_BYTES], \
        raw[HEADER_BYTES + NONCE_BYTES:]


def open_sealed(aead: AESGCM, envelope: Envelope, resource: str, path: str) -> Any:
    return open_where(aead, envelope, associated_where(resource, path))


def open_where(aead: AESGCM, envelope: Envelope, where: bytes) -> Any:
    """Decrypt and decode, `where` being `associated_where(resource, path)` (callers precompute it)."""
    header, _, nonce, sealed = envelope
    try:
        plain = aead.decrypt(nonce, sealed, header + where)
    except InvalidTag:
        raise EnvelopeError("authentication failed (tampered, or moved to another field)") from None
    return orjson.loads(plain)


def key_id_of(text: str) -> bytes | None:
    """The key id alone, for fetching keys before a response is read."""
    return key_id_in_head(text[len(PREFIX):len(PREFIX) + HEAD_CHARS].encode())


def key_id_in_head(head: bytes) -> bytes | None:
    """The key id from the first 24 base64url characters after the prefix (None if they are not that)."""
    try:
        raw = pybase64.b64decode(head, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw[2:HEADER_BYTES] if len(raw) == HEADER_BYTES else None

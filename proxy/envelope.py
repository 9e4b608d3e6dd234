"""The field ciphertext: text that fits the CRM's string columns and says which key opens it.

    fg1.<base64url(version | algorithm | key id (16 B) | nonce (12 B) | AES-256-GCM ciphertext and tag)>

The associated data is the 18-byte header plus the resource and the field's map path, so a ciphertext
moved to another field or another kind of record fails its tag; the key id names one client's data key,
so a ciphertext moved to another client's record is refused before any decryption is tried. The
plaintext is the field's JSON, so numbers, objects and lists come back as they went in.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any, NamedTuple

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "fg1."
VERSION = 1
ALG_AES256_GCM = 1
KEY_ID_BYTES = 16
NONCE_BYTES = 12
HEADER_BYTES = 2 + KEY_ID_BYTES
_MIN_BYTES = HEADER_BYTES + NONCE_BYTES + 16


class EnvelopeError(Exception):
    """A ciphertext that cannot be opened: the reason is safe to audit (it never holds the value)."""


class Envelope(NamedTuple):
    """A parsed ciphertext (a tuple: made once per field opened, so it must be cheap)."""

    header: bytes  # version | algorithm | key id
    key_id: bytes
    nonce: bytes
    sealed: bytes  # ciphertext and tag


def is_sealed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


_WHERE: dict[tuple[str, str], bytes] = {}
_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


def associated_data(header: bytes, resource: str, path: str) -> bytes:
    where = _WHERE.get((resource, path))
    if where is None:
        where = b"\x00%b\x00%b" % (resource.encode(), path.encode())
        if len(_WHERE) < 10_000:
            _WHERE[(resource, path)] = where
    return header + where


def seal(aead: AESGCM, key_id: bytes, value: Any, resource: str, path: str) -> str:
    header = bytes((VERSION, ALG_AES256_GCM)) + key_id
    nonce = os.urandom(NONCE_BYTES)
    sealed = aead.encrypt(nonce, orjson.dumps(value), associated_data(header, resource, path))
    return PREFIX + base64.urlsafe_b64encode(header + nonce + sealed).rstrip(b"=").decode()


def parse(text: str) -> Envelope:
    """Split a ciphertext into its parts; refuse unknown versions and algorithms."""
    body = text[len(PREFIX):]
    try:  # base64url by hand: base64.urlsafe_b64decode costs more than the AES-GCM decryption itself
        raw = binascii.a2b_base64(body.encode().translate(_TO_STANDARD) + b"=" * (-len(body) % 4), strict_mode=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError("malformed ciphertext") from None
    if len(raw) < _MIN_BYTES:
        raise EnvelopeError("malformed ciphertext")
    if raw[0] != VERSION:
        raise EnvelopeError("unknown envelope version")
    if raw[1] != ALG_AES256_GCM:
        raise EnvelopeError("unknown algorithm")
    header = raw[:HEADER_BYTES]
    return Envelope(header, raw[2:HEADER_BYTES], raw[HEADER_BYTES:HEADER_BYTES + NONCE_BYTES],
                    raw[HEADER_BYTES + NONCE_BYTES:])


def open_sealed(aead: AESGCM, envelope: Envelope, resource: str, path: str) -> Any:
    try:
        plain = aead.decrypt(envelope.nonce, envelope.sealed, associated_data(envelope.header, resource, path))
    except InvalidTag:
        raise EnvelopeError("authentication failed (tampered, or moved to another field)") from None
    return orjson.loads(plain)


def key_id_of(text: str) -> bytes | None:
    """The key id alone (the first 24 base64 characters), for fetching keys before a response is read."""
    try:
        head = base64.urlsafe_b64decode(text[len(PREFIX):len(PREFIX) + 24])
    except (binascii.Error, ValueError):
        return None
    return head[2:HEADER_BYTES] if len(head) == HEADER_BYTES else None

"""The field ciphertext: text that fits the CRM's string columns and says which key opens it.

    fg1.<base64url(version | algorithm | key id (16 B) | nonce (12 B) | AES-256-GCM ciphertext and tag)>

The associated data is the 18-byte header, the resource and the field's map path, the field's class
as it was sealed (version 2), and the record's id where the CRM's id is stable and known when sealing
(version 3: updates and `encrypt-existing`; a record's first write has no id yet). So a ciphertext moved
to another field or kind of record fails its tag; read under another class (a flag flipped at the CRM:
`third_party` turned off to show a third party's letter to the client) it fails; replayed into another
record of the same client and field it fails when bound to its record. The key id names one client's
data key, so a ciphertext moved to another client's record is refused before any decryption is tried.
Version 1 (resource and path only) is still opened, for what was sealed before. The plaintext is the
field's JSON, so numbers, objects and lists come back as they went in.
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
VERSION = 1  # associated data: resource, path
VERSION_CLASS = 2  # ... and the field's class
VERSION_RECORD = 3  # ... and the record's id
VERSIONS = frozenset({VERSION, VERSION_CLASS, VERSION_RECORD})
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


def associated_class(where: bytes, field_class: str) -> bytes:
    """`associated_where` with the class the field is sealed as (callers precompute it per field)."""
    return b"%b\x00%b" % (where, field_class.encode())


def record_ref(record_id: Any) -> bytes | None:
    """A record's id as it is bound into a ciphertext: the same for 7 and "7"; None when there is none."""
    if record_id is None or isinstance(record_id, (bool, dict, list)) or record_id == "":
        return None
    return str(record_id).encode()


def seal(aead: AESGCM, key_id: bytes, value: Any, resource: str, path: str, field_class: str,
         record_id: bytes | None = None) -> str:
    version = VERSION_CLASS if record_id is None else VERSION_RECORD
    header = bytes((version, ALG_AES256_GCM)) + key_id
    nonce = os.urandom(NONCE_BYTES)
    bound = associated_class(associated_where(resource, path), field_class)
    if record_id is not None:
        bound += b"\x00" + record_id
    sealed = aead.encrypt(nonce, orjson.dumps(value), header + bound)
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
    if raw[0] not in VERSIONS:
        raise EnvelopeError("unknown envelope version")
    if raw[1] != ALG_AES256_GCM:
        raise EnvelopeError("unknown algorithm")
    return raw[:HEADER_BYTES], raw[2:HEADER_BYTES], raw[HEADER_BYTES:HEADER_BYTES + NONCE_BYTES], \
        raw[HEADER_BYTES + NONCE_BYTES:]


def open_sealed(aead: AESGCM, envelope: Envelope, resource: str, path: str, field_class: str,
                record_id: bytes | None = None) -> Any:
    where = associated_where(resource, path)
    return open_where(aead, envelope, where, associated_class(where, field_class), record_id)


def open_where(aead: AESGCM, envelope: Envelope, where: bytes, classed: bytes, record_id: bytes | None) -> Any:
    """Decrypt and decode: `where` is `associated_where(resource, path)`, `classed` the same with the class
    the field is read as (`associated_class`), `record_id` the record's (`record_ref`); the envelope's
    version says which of them its tag covers."""
    header, _, nonce, sealed = envelope
    version = header[0]
    if version == VERSION_RECORD:
        if record_id is None:
            raise EnvelopeError("bound to its record, and the record has no id")
        bound = classed + b"\x00" + record_id
    else:
        bound = classed if version == VERSION_CLASS else where
    try:
        plain = aead.decrypt(nonce, sealed, header + bound)
    except InvalidTag:
        raise EnvelopeError("authentication failed (tampered, moved to another field or record, or read "
                            "under another class)") from None
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

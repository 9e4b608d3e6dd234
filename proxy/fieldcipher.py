"""Field encryption on the request path: seal on the way to the CRM, open only for `clear`.

Opening checks, in order: the envelope's version and algorithm are known; the key is in the keystore
and not destroyed; the key belongs to the record's client and to the field class's key scope; the tag
verifies against this resource and path. Any failure removes the field and is reported for the audit
record; there is never a plaintext fallback or an error page carrying the ciphertext.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.audit import Disclosure
from proxy.envelope import EnvelopeError, key_id_in_head, open_where, parse, seal
from proxy.fieldmap import FieldClass, Node, Resource
from proxy.kek import KekError
from proxy.keyring import KeyRing, OpenKey
from proxy.redact import CipherFailure

_SEALED_IN_BODY = re.compile(rb'"fg1\.([A-Za-z0-9_-]{24})')  # the header: version, algorithm, key id


class FieldCipher:
    """One request's opener: each (key, client, scope) is checked once, then every field it opens costs
    a base64 decode and an AES-GCM decryption."""

    def __init__(self, ring: KeyRing, classes: Mapping[str, FieldClass]) -> None:
        self.ring = ring
        self.classes = classes
        self._granted: dict[tuple[bytes, str | None, str], AESGCM | str] = {}  # the AEAD, or why not

    async def prefetch(self, body: bytes) -> None:
        """Fetch the keystore rows a response will need, in one query, before it is rewritten."""
        if b'"fg1.' not in body:
            return
        heads = set(_SEALED_IN_BODY.findall(body))  # a list repeats a client's key in every row
        await self.ring.prefetch(k for h in heads if (k := key_id_in_head(h)) is not None)

    def open(self, value: str, client_id: str | None, scope: str, where: bytes, d: Disclosure) -> Any:
        """The field's value; `scope` is its class's key scope, `where` its `envelope.associated_where`."""
        try:
            envelope = parse(value)
        except EnvelopeError as exc:
            raise CipherFailure(str(exc)) from None
        key_id = envelope[1]
        grant = self._granted.get((key_id, client_id, scope))
        if grant is None:
            grant = self._granted[(key_id, client_id, scope)] = self._grant(key_id, client_id, scope, d)
        if isinstance(grant, str):
            raise CipherFailure(grant)
        try:
            return open_where(grant, envelope, where)
        except EnvelopeError as exc:
            raise CipherFailure(str(exc)) from None

    def _grant(self, key_id: bytes, client_id: str | None, scope: str, d: Disclosure) -> AESGCM | str:
        """The key's AEAD if it may open this client's fields of this scope; else the reason, for the audit."""
        try:
            opened = self.ring.opened(key_id)
        except KekError:
            return "key-encryption key unavailable"
        if opened is None:
            return "unknown or destroyed key"
        d.key_ids.add(opened.key.hex_id)
        key = opened.key
        if key.client_id is None or key.client_id != client_id:
            return "key belongs to another client"
        if not scope or key.scope != scope:
            return "key of another scope"
        return opened.aead

    def scopes(self, written: set[str]) -> set[str]:
        return {s for c in written if (s := self.classes[c].key_scope) is not None}


def seal_fields(resource: Resource, body: dict[str, Any], classes: Mapping[str, FieldClass],
                keys: Mapping[str, OpenKey]) -> dict[str, Any]:
    """Replace the value of every field of an encrypted class with its ciphertext (in place)."""
    assert resource.root.children is not None
    _seal_object(resource.root.children, body, body, resource.name, classes, keys)
    return body


def _seal_object(children: dict[str, Node], value: dict[str, Any], record: dict[str, Any], resource: str,
                 classes: Mapping[str, FieldClass], keys: Mapping[str, OpenKey]) -> None:
    for key, item in list(value.items()):
        child = children.get(key)
        if child is not None:
            value[key] = _seal_node(child, item, record, resource, classes, keys)


def _seal_node(node: Node, value: Any, record: dict[str, Any], resource: str, classes: Mapping[str, FieldClass],
               keys: Mapping[str, OpenKey]) -> Any:
    if node.spec is not None:
        scope = classes[node.spec.class_for(record)].key_scope
        if scope is None or value is None:
            return value
        opened = keys[scope]
        return seal(opened.aead, opened.key.key_id, value, resource, node.spec.path)
    if node.children is not None and isinstance(value, dict):
        _seal_object(node.children, value, record, resource, classes, keys)
        return value
    if node.items is not None and isinstance(value, list):
        return [_seal_node(node.items, v, record, resource, classes, keys) for v in value]
    return value

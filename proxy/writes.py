"""The request half of the pipeline: a write is checked field by field before anything is forwarded.

A field the map does not know is refused (422), a field whose class the caller's role may not write
for this client is refused (403); either way the CRM never sees the request. `PUT` replaces the whole
record, so it needs write on every class of the resource. Fields of encrypted classes are sealed
with the client's data keys on the way (`seal_fields`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.errors import GatewayError
from proxy.keys import OpenKey, seal
from proxy.policy import FieldClass, Node, Resource, View


class WriteRefused(GatewayError):
    def __init__(self, status: int, message: str, fields: list[str]) -> None:
        super().__init__(status, message)
        self.fields = fields


def check_write(
    resource: Resource, body: dict[str, Any], view: View, *, replace: bool
) -> tuple[dict[str, Any], set[str]]:
    """Return the body to forward and the classes it writes, or raise naming the first bad fields."""
    unknown: list[str] = []
    refused: list[str] = []
    written: set[str] = set()
    assert resource.root.children is not None
    out = _object(resource.root.children, body, body, view, "", unknown, refused, written)
    if unknown:
        raise WriteRefused(422, f"unknown field: {', '.join(sorted(unknown)[:5])}", sorted(unknown))
    if refused:
        raise WriteRefused(403, f"not allowed to write: {', '.join(sorted(refused)[:5])}", sorted(refused))
    if replace:
        missing = sorted(c for c in resource.classes if c not in view.writable)
        if missing:
            raise WriteRefused(403, f"a full replace needs write on every class; not allowed: {', '.join(missing)}",
                               missing)
    return out, written


def _object(
    children: dict[str, Node],
    value: dict[str, Any],
    record: dict[str, Any],
    view: View,
    prefix: str,
    unknown: list[str],
    refused: list[str],
    written: set[str],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        child = children.get(key)
        path = prefix + str(key)
        if child is None:
            unknown.append(path)
            continue
        out[key] = _node(child, item, record, view, path, unknown, refused, written)
    return out


def _node(
    node: Node,
    value: Any,
    record: dict[str, Any],
    view: View,
    path: str,
    unknown: list[str],
    refused: list[str],
    written: set[str],
) -> Any:
    if node.spec is not None:
        cls = node.spec.class_for(record)
        if cls not in view.writable:
            refused.append(f"{path} ({cls})")
            return value
        written.add(cls)
        return value
    if node.children is not None:
        if not isinstance(value, dict):
            unknown.append(path)
            return value
        return _object(node.children, value, record, view, path + ".", unknown, refused, written)
    if node.items is not None:
        if not isinstance(value, list):
            unknown.append(path)
            return value
        return [_node(node.items, v, record, view, path + "[]", unknown, refused, written) for v in value]
    unknown.append(path)
    return value


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

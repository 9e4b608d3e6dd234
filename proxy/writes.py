"""The request half of the pipeline: a write is checked field by field before anything is forwarded.

A field the map does not know is refused (422), a field whose class the caller's role may not write
for this client is refused (403); either way the CRM never sees the request. `PUT` replaces the whole
record, so it needs write on every class of the resource. Fields of encrypted classes are sealed
with the client's data keys on the way (`seal_fields`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from proxy.errors import GatewayError
from proxy.keys import OpenKey, seal
from proxy.policy import FieldClass, Node, Resource, View


class WriteRefused(GatewayError):
    def __init__(self, status: int, message: str, fields: list[str]) -> None:
        super().__init__(status, message)
        self.fields = fields


@dataclass(slots=True)
class Checked:
    """What a write body writes, once every field of it has been allowed."""

    classes: set[str] = field(default_factory=set)  # field classes written
    paths: list[str] = field(default_factory=list)  # map paths written, for the audit record
    flags: list[str] = field(default_factory=list)  # flags set, each of which reclassifies other fields


def check_write(resource: Resource, body: dict[str, Any], view: View, *, replace: bool,
                stored: dict[str, Any] | None = None) -> Checked:
    """Allow every field of the body under `view`, or raise naming the first bad fields.

    A field the map does not know is refused (422); a field whose class the view may not write is refused
    (403); so is a flag (a field that decides other fields' class, `third_party` on a letter) unless the
    view may write every class it can select: flipping it is a way to release what it guards. A list is
    replaced whole by every CRM, so writing one needs write on every class its items hold. `stored` is the
    record as the CRM holds it, when read: flags the body leaves alone keep deciding as they do there."""
    walk = _Walk(view)
    assert resource.root.children is not None
    for path in resource.gateway_set:
        if path in body:
            walk.refused.append(f"{path} (set by the gateway)")
    walk.object(resource.root.children, {k: v for k, v in body.items() if k not in resource.gateway_set},
                {**(stored or {}), **body}, "")
    for flag, selectable in resource.flags.items():
        if flag in body:
            walk.flags.append(flag)
            missing = sorted(selectable - view.writable)
            if missing:
                walk.refused.append(f"{flag} (decides the class of other fields; needs write on {', '.join(missing)})")
    if walk.unknown:
        raise WriteRefused(422, f"unknown field: {', '.join(sorted(walk.unknown)[:5])}", sorted(walk.unknown))
    if walk.refused:
        refused = sorted(set(walk.refused))
        raise WriteRefused(403, f"not allowed to write: {', '.join(refused[:5])}", refused)
    if replace:
        missing = sorted(c for c in resource.classes if c not in view.writable)
        if missing:
            raise WriteRefused(403, f"a full replace needs write on every class; not allowed: {', '.join(missing)}",
                               missing)
    return Checked(walk.classes, sorted(set(walk.paths)), walk.flags)


class _Walk:
    def __init__(self, view: View) -> None:
        self.view = view
        self.unknown: list[str] = []
        self.refused: list[str] = []
        self.classes: set[str] = set()
        self.paths: list[str] = []
        self.flags: list[str] = []

    def object(self, children: dict[str, Node], value: dict[str, Any], record: dict[str, Any], prefix: str) -> None:
        for key, item in value.items():
            child = children.get(key)
            path = prefix + str(key)
            if child is None:
                self.unknown.append(path)
            else:
                self.node(child, item, record, path)

    def node(self, node: Node, value: Any, record: dict[str, Any], path: str) -> None:
        if node.spec is not None:
            cls = node.spec.class_for(record)
            if cls not in self.view.writable:
                self.refused.append(f"{path} ({cls})")
            else:
                self.classes.add(cls)
                self.paths.append(node.spec.path)
        elif node.children is not None:
            if isinstance(value, dict):
                self.object(node.children, value, record, path + ".")
            else:
                self.unknown.append(path)
        elif node.items is not None:
            if isinstance(value, list):
                missing = sorted(_classes(node.items) - self.view.writable)
                if missing:  # the stored list goes, items the caller may not write with it
                    self.refused.append(f"{path}[] (a list is replaced whole; needs write on {', '.join(missing)})")
                for item in value:
                    self.node(node.items, item, record, path + "[]")
            else:
                self.unknown.append(path)
        else:
            self.unknown.append(path)


def _classes(node: Node) -> set[str]:
    """Every class a subtree of the map can hold."""
    if node.spec is not None:
        return {node.spec.field_class, node.spec.flag_class or node.spec.field_class}
    found: set[str] = set()
    for child in (node.children or {}).values():
        found |= _classes(child)
    if node.items is not None:
        found |= _classes(node.items)
    return found


def fill_gateway_set(resource: Resource, body: dict[str, Any], user: str, now: datetime) -> list[str]:
    """On create, the fields the gateway fills (after `check_write` has refused any the caller gave)."""
    values = {"user": user, "now": now.isoformat(timespec="seconds")}
    for path, source in resource.gateway_set.items():
        body[path] = values[source]
    return sorted(resource.gateway_set)


def needs_stored(merge: str, body: dict[str, Any]) -> bool:
    """Whether a PATCH must be merged into the stored record here before it goes to the CRM."""
    return merge == "replace" or (merge == "shallow" and any(isinstance(v, dict) for v in body.values()))


def merged(merge: str, stored: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """What to send so that the CRM changes exactly the paths the caller gave, and nothing else.

    `shallow`: a CRM that replaces each top-level value would drop the parts of a nested object the body
    leaves out (admin patching `contact.email` would delete the phone, which a counsellor may not even
    write), so each nested object goes merged into the stored one. `replace`: the whole stored record, with
    the body merged in. `deep`: the CRM merges nested objects itself; the body goes as it is."""
    if merge == "deep":
        return body
    if merge == "replace":
        return _deep(stored, body)
    return {k: _deep(stored[k], v) if isinstance(v, dict) and isinstance(stored.get(k), dict) else v
            for k, v in body.items()}


def _deep(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in patch.items():
        out[key] = _deep(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def seal_fields(resource: Resource, body: dict[str, Any], classes: Mapping[str, FieldClass],
                keys: Mapping[str, OpenKey], stored: dict[str, Any] | None = None,
                record_id: bytes | None = None) -> dict[str, Any]:
    """Replace the value of every field of an encrypted class with its ciphertext (in place), bound to the
    class it is written as (flags decide as `check_write` saw them: the body's, else the stored record's)
    and, when known, to the record's id."""
    assert resource.root.children is not None
    _Sealer(resource.name, classes, keys, {**(stored or {}), **body}, record_id).object(resource.root.children, body)
    return body


class _Sealer:
    def __init__(self, resource: str, classes: Mapping[str, FieldClass], keys: Mapping[str, OpenKey],
                 record: dict[str, Any], record_id: bytes | None) -> None:
        self.resource, self.classes, self.keys, self.record, self.record_id = resource, classes, keys, record, record_id

    def object(self, children: dict[str, Node], value: dict[str, Any]) -> None:
        for key, item in list(value.items()):
            child = children.get(key)
            if child is not None:
                value[key] = self.node(child, item)

    def node(self, node: Node, value: Any) -> Any:
        if node.spec is not None:
            field_class = node.spec.class_for(self.record)
            scope = self.classes[field_class].key_scope
            if scope is None or value is None:
                return value
            opened = self.keys[scope]
            return seal(opened.aead, opened.key.key_id, value, self.resource, node.spec.path, field_class,
                        self.record_id)
        if node.children is not None and isinstance(value, dict):
            self.object(node.children, value)
            return value
        if node.items is not None and isinstance(value, list):
            return [self.node(node.items, v) for v in value]
        return value


@dataclass(frozen=True, slots=True)
class Reclassed:
    """A stored field whose class a flag in the body changes: its ciphertext, bound to the old class, is
    opened and sealed again as the new one, or it could never be read again (and the flag would be a way
    to make a field unreadable)."""

    path: str
    value: Any
    before: str
    after: str


def reclassified(resource: Resource, stored: dict[str, Any], body: dict[str, Any]) -> list[Reclassed]:
    """The stored fields, not written by the body, whose class changes with the flags the body sets."""
    if not any(flag in body for flag in resource.flags):
        return []
    after_record = {**stored, **body}
    found: list[Reclassed] = []
    for spec in resource.specs:
        if spec.flag is None or spec.flag not in body:
            continue
        before, after = spec.class_for(stored), spec.class_for(after_record)
        if before == after or _at(body, spec.path) is not _MISSING:
            continue
        value = _at(stored, spec.path)
        if value is _MISSING or value is None:
            continue
        if "[]" in spec.path:
            raise WriteRefused(409, f"{spec.flag} changes the class of {spec.path}, inside a list: send the list "
                                    "again with the flag", [spec.flag])
        found.append(Reclassed(spec.path, value, before, after))
    return found


_MISSING = object()


def _at(record: dict[str, Any], path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def put_at(record: dict[str, Any], path: str, value: Any) -> None:
    """Set a map path (without lists) in a body, making the objects on the way."""
    *parents, last = path.split(".")
    for part in parents:
        record = record.setdefault(part, {})
    record[last] = value

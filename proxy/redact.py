"""The response half of the pipeline: each CRM record rewritten for one caller.

For every record: find its client, the caller's relations to that client, and the compiled `View`
for (active role, relations); then walk the record once against the resource's classification tree.
`clear` keeps the value (decrypting it if it is a ciphertext), `pseudonym` puts the client's
pseudonym in its place, `mask` reduces it, `remove` drops it. A path the map does not classify is
removed, a row the caller may see nothing of is dropped, and a ciphertext that fails to open is
removed and reported, never shown.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from proxy.audit import Disclosure
from proxy.decision import DecisionTable, Outcome, Relation, View
from proxy.fieldmap import FieldSpec, Node, Resource
from proxy.masks import MASKS

_DROP = object()


class FieldCipher(Protocol):
    """Opens field ciphertexts for callers whose outcome is `clear` (see proxy.crypto)."""

    def is_ciphertext(self, value: Any) -> bool: ...

    def open(self, value: str, client_id: str | None, resource: str, path: str, field_class: str,
             d: Disclosure) -> Any: ...


class CipherFailure(Exception):
    """A ciphertext that cannot be opened for this record (bad tag, foreign key, destroyed key...)."""


RelationsOf = Callable[[str], Relation]
Observe = Callable[[Resource, dict[str, Any]], None]


class Redactor:
    """Rewrites the records of one response for one caller; gathers what was disclosed."""

    def __init__(
        self,
        table: DecisionTable,
        role: str,
        relations_of: RelationsOf,
        pseudonym: Callable[[str], str | None],
        disclosure: Disclosure,
        cipher: FieldCipher | None = None,
        observe: Observe | None = None,
    ) -> None:
        self.table = table
        self.role = role
        self.relations_of = relations_of
        self.pseudonym = pseudonym
        self.d = disclosure
        self.cipher = cipher
        self.observe = observe
        self.views: dict[Relation, View] = {}
        self._visible: dict[tuple[Relation, str], bool] = {}

    def client_of(self, resource: Resource, record: dict[str, Any]) -> str | None:
        if resource.client_field is None:
            return None
        value = record.get(resource.client_field)
        if value is None or isinstance(value, (dict, list, bool)):
            return None
        return str(value)

    def view_for(self, client_id: str | None) -> View:
        rels = self.relations_of(client_id) if client_id is not None else Relation.ANY
        view = self.views.get(rels)
        if view is None:
            found = self.table.view(self.role, rels)
            if found is None:  # unknown role: nothing
                found = View(self.role, rels, {}, frozenset(), frozenset())
            view = self.views[rels] = found
        if client_id is not None:
            self.d.clients[client_id] = rels
        return view

    def visible(self, view: View, resource: Resource) -> bool:
        key = (view.relations, resource.name)
        seen = self._visible.get(key)
        if seen is None:
            seen = self._visible[key] = view.shows(resource.record_class)
        return seen

    def record(self, resource: Resource, record: dict[str, Any]) -> dict[str, Any] | None:
        """The record as this caller may see it, or None when they may see nothing of it."""
        if self.observe is not None:
            self.observe(resource, record)
        client_id = self.client_of(resource, record)
        view = self.view_for(client_id)
        if not self.visible(view, resource):
            return None
        assert resource.root.children is not None
        return self._object(resource.root.children, record, view, record, client_id, resource.name, "")

    def rows(self, resource: Resource, rows: list[Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for row in rows:
            kept = self.record(resource, row) if isinstance(row, dict) else None
            if kept is None:
                self.d.dropped_rows += 1
            else:
                out.append(kept)
        return out

    def _object(
        self,
        children: dict[str, Node],
        value: dict[str, Any],
        view: View,
        record: dict[str, Any],
        client_id: str | None,
        resource: str,
        prefix: str,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, item in value.items():
            child = children.get(key)
            if child is None:
                self.d.unclassified.add(prefix + str(key))
                continue
            kept = self._node(child, item, view, record, client_id, resource, prefix + key)
            if kept is not _DROP:
                out[key] = kept
        return out

    def _node(
        self,
        node: Node,
        value: Any,
        view: View,
        record: dict[str, Any],
        client_id: str | None,
        resource: str,
        path: str,
    ) -> Any:
        if node.spec is not None:
            return self._leaf(node.spec, value, view, record, client_id, resource)
        if node.children is not None:
            if not isinstance(value, dict):
                self.d.unclassified.add(path)  # not the shape the map expects: fail closed
                return _DROP
            out = self._object(node.children, value, view, record, client_id, resource, path + ".")
            return out if out or not value else _DROP
        if node.items is not None:
            if not isinstance(value, list):
                self.d.unclassified.add(path)
                return _DROP
            items = [self._node(node.items, v, view, record, client_id, resource, path + "[]") for v in value]
            kept = [v for v in items if v is not _DROP]
            return kept if kept or not value else _DROP
        return _DROP

    def _leaf(
        self,
        spec: FieldSpec,
        value: Any,
        view: View,
        record: dict[str, Any],
        client_id: str | None,
        resource: str,
    ) -> Any:
        cls = spec.class_for(record) if spec.flag is not None else spec.field_class
        decided = view.classes.get(cls)
        outcome = decided.outcome if decided is not None else Outcome.REMOVE
        sealed = type(value) is str and value.startswith("fg1.") and self.cipher is not None
        if outcome is Outcome.CLEAR:
            if sealed:
                assert self.cipher is not None
                try:
                    value = self.cipher.open(value, client_id, resource, spec.path, cls, self.d)
                except CipherFailure as exc:
                    self.d.failures.add(f"{resource}.{spec.path}: {exc}")
                    self.d.note(Outcome.REMOVE, cls, spec.path)
                    return _DROP
            self.d.note(Outcome.CLEAR, cls, spec.path)
            return value
        if outcome is Outcome.PSEUDONYM and spec.pseudonym and client_id is not None:
            stand_in = self.pseudonym(client_id)
            if stand_in is not None:
                self.d.note(Outcome.PSEUDONYM, cls, spec.path)
                return stand_in
        if outcome is Outcome.MASK and spec.mask is not None and not sealed:
            masked = MASKS[spec.mask](value)
            if masked is not None:
                self.d.note(Outcome.MASK, cls, spec.path)
                return masked
        self.d.note(Outcome.REMOVE, cls, spec.path)
        return _DROP


def deciding_rules(views: dict[Relation, View], d: Disclosure) -> set[str]:
    """The policy rows behind what was disclosed or refused, for the audit record."""
    rules: set[str] = set()
    for view in views.values():
        for outcome, by_class in d.fields.items():
            for cls in by_class:
                decided = view.classes.get(cls)
                if decided is None:
                    continue
                if decided.outcome is outcome and decided.rule is not None:
                    rules.add(decided.rule.source)
                if outcome is Outcome.REMOVE and decided.denied_by is not None:
                    rules.add(decided.denied_by.source)
    return rules

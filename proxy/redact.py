"""The response half of the pipeline: each CRM record rewritten for one caller.

For every record: find its client, the caller's relations to that client, and the compiled `View`
for (active role, relations); then walk the record once against a `Plan`: the resource's
classification tree with that view's outcome already decided at every leaf. `clear` keeps the value
(decrypting it if it is a ciphertext), `pseudonym` puts the client's pseudonym in its place, `mask`
reduces it, `remove` drops it. A path the map does not classify is removed, a row the caller may see
nothing of is dropped, and a ciphertext that fails to open is removed and reported, never shown.

Plans are compiled once per (resource, role, relations) and kept with the policy bundle, so the walk
over a row does no policy work at all: one dictionary lookup and one set insertion per field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.audit import AuditRecord
from proxy.keys import CipherFailure, FieldCipher, associated_class, associated_where, record_ref
from proxy.masks import MASKS, Mask
from proxy.policy import (
    DecisionTable,
    FieldClass,
    FieldSpec,
    Node,
    Outcome,
    PolicyBundle,
    Relation,
    Resource,
    View,
)


class Note:
    """One (outcome, field class, path) a response disclosed. Compared by identity: the redaction plans
    make each once, so noting it per row is a set insertion with no hashing of strings or enums."""

    __slots__ = ("field_class", "outcome", "path")

    def __init__(self, outcome: Outcome, field_class: str, path: str) -> None:
        self.outcome = outcome
        self.field_class = field_class
        self.path = path


_NOTES: dict[tuple[Outcome, str, str], Note] = {}


def note_of(outcome: Outcome, field_class: str, path: str) -> Note:
    """The one `Note` for these names (paths come from the field map, so there are few of them)."""
    found = _NOTES.get((outcome, field_class, path))
    if found is None:
        if len(_NOTES) > 100_000:
            _NOTES.clear()
        found = _NOTES[(outcome, field_class, path)] = Note(outcome, field_class, path)
    return found


@dataclass(slots=True)
class Disclosure:
    """What one response revealed, gathered while it is rewritten."""

    notes: set[Note] = field(default_factory=set)
    unclassified: set[str] = field(default_factory=set)
    clients: dict[str, Relation] = field(default_factory=dict)
    dropped_rows: int = 0
    key_ids: set[str] = field(default_factory=set)
    failures: set[str] = field(default_factory=set)  # "session_note.body: key belongs to another client"

    def note(self, outcome: Outcome, field_class: str, path: str) -> None:
        self.notes.add(note_of(outcome, field_class, path))

    def into(self, record: AuditRecord, summary: Summary, pseudonyms: Mapping[str, str]) -> None:
        """What the response disclosed, by name, into its audit record (clients by pseudonym)."""
        record.shown = summary.shown
        record.pseudonymised = summary.pseudonymised
        record.masked = summary.masked
        record.removed = summary.removed
        record.rules = summary.rules
        record.unclassified = sorted(self.unclassified)
        record.clients = sorted({pseudonyms.get(c, "unresolved") for c in self.clients})
        record.relations = sorted({_LABELS[r] for r in set(self.clients.values())})
        record.rows_dropped = self.dropped_rows
        record.key_ids = sorted(self.key_ids)
        record.decrypt_failures = sorted(self.failures)


@dataclass(frozen=True, slots=True)
class Summary:
    """What a set of notes comes to in an audit record: class -> sorted paths per outcome, and the rules
    that decided. Summaries are cached and shared between records, so nothing may change one."""

    shown: dict[str, list[str]]
    pseudonymised: dict[str, list[str]]
    masked: dict[str, list[str]]
    removed: dict[str, list[str]]
    rules: list[str]

    @classmethod
    def of(cls, notes: Iterable[Note], rules: Iterable[str]) -> Summary:
        gathered: dict[Outcome, dict[str, set[str]]] = {o: {} for o in Outcome}
        for n in notes:
            gathered[n.outcome].setdefault(n.field_class, set()).add(n.path)
        done = {o: {c: sorted(p) for c, p in sorted(by_class.items())} for o, by_class in gathered.items()}
        return cls(done[Outcome.CLEAR], done[Outcome.PSEUDONYM], done[Outcome.MASK], done[Outcome.REMOVE],
                   sorted(rules))


_LABELS = {r: r.label for r in (Relation(bits) for bits in range(1 << len(Relation)))}


_DROP = object()
_SEALED = "fg1."

# What a step does. Leaves carry the outcome their class has in the plan's view; the others recurse.
# SCRUB is CLEAR for a view that does not identify the client: the client's names leave the text.
CLEAR, PSEUDONYM, MASK, REMOVE, OBJECT, ARRAY, NOTHING, SCRUB = range(8)
_KIND = {Outcome.CLEAR: CLEAR, Outcome.PSEUDONYM: PSEUDONYM, Outcome.MASK: MASK, Outcome.REMOVE: REMOVE}


class Step:
    """One node of a plan: what to do with the value found at one path, for one view."""

    __slots__ = ("alt", "children", "classed", "field_class", "flag", "items", "kind", "mask", "note", "path",
                 "removed", "scope", "where")

    def __init__(self, kind: int, path: str, field_class: str = "", outcome: Outcome = Outcome.REMOVE,
                 mask: Mask | None = None, scope: str = "", where: bytes = b"") -> None:
        self.kind = kind
        self.path = path  # a leaf's map path (the AAD of its ciphertext); an object's prefix for its children
        self.field_class = field_class
        self.note = note_of(outcome, field_class, path)  # what the leaf discloses when it does what its kind says
        self.removed = note_of(Outcome.REMOVE, field_class, path)  # ... and when it falls back to removing
        self.mask = mask
        self.scope = scope  # the key scope of an encrypted class ("" if the class is not encrypted)
        self.where = where  # resource and path, as a ciphertext's associated data names them
        self.classed = associated_class(where, field_class)  # ... and the class the field is read as
        self.flag: str | None = None  # a record field that, unless exactly false, swaps this step for `alt`
        self.alt: Step = self
        self.children: dict[str, Step] | None = None
        self.items: Step | None = None


UNNAMED = "[client]"  # the client's name in a text whose record does not link to them (anonymised feedback)


class Plan:
    """A resource's classification tree compiled against one view."""

    __slots__ = ("resource", "root", "stand_in", "unlinkable", "view", "visible")

    def __init__(self, resource: Resource, view: View, classes: Mapping[str, FieldClass],
                 anonymous: bool = False) -> None:
        self.resource = resource
        self.view = view
        self.visible = view.shows(resource.record_class)
        assert resource.root.children is not None
        self.root = _Compiler(resource, view, classes, anonymous).children(resource.root.children, "")
        linked = resource.client_field is not None and self.root.get(resource.client_field) is not None and \
            self.root[resource.client_field].kind != REMOVE
        self.stand_in = None if linked else UNNAMED  # None: the client's pseudonym stands in for their name
        # records shown without whom they are about (anonymised feedback): never served per client
        self.unlinkable = self.visible and resource.client_field is not None and not linked


class _Compiler:
    def __init__(self, resource: Resource, view: View, classes: Mapping[str, FieldClass], anonymous: bool) -> None:
        self.resource = resource.name
        self.client_field = resource.client_field
        self.view = view
        self.classes = classes
        self.anonymous = anonymous  # the view pseudonymises the client: no CRM id, no name, anywhere

    def leaf(self, spec: FieldSpec, field_class: str) -> Step:
        outcome = self.view.outcome(field_class)
        if self.anonymous and spec.path == self.client_field and outcome is not Outcome.REMOVE:
            outcome = Outcome.PSEUDONYM  # the client's CRM id links records to the client: their pseudonym instead
        elif outcome is Outcome.PSEUDONYM and not spec.pseudonym:
            outcome = Outcome.REMOVE
        if outcome is Outcome.MASK and spec.mask is None:
            outcome = Outcome.REMOVE
        known = self.classes.get(field_class)
        kind = SCRUB if self.anonymous and outcome is Outcome.CLEAR else _KIND[outcome]
        return Step(kind, spec.path, field_class, outcome,
                    MASKS[spec.mask] if outcome is Outcome.MASK and spec.mask is not None else None,
                    scope=(known.key_scope or "") if known is not None else "",
                    where=associated_where(self.resource, spec.path))

    def step(self, node: Node, path: str) -> Step:
        spec = node.spec
        if spec is not None:
            step = self.leaf(spec, spec.field_class)
            if spec.flag is not None:
                step.flag = spec.flag
                step.alt = self.leaf(spec, spec.flag_class or spec.field_class)
            return step
        if node.children is not None:
            step = Step(OBJECT, path + ".")
            step.children = self.children(node.children, path + ".")
        elif node.items is not None:
            step = Step(ARRAY, path)
            step.items = self.step(node.items, path + "[]")
        else:
            return Step(NOTHING, path)
        if not _shows(step):  # an object or list the view shows nothing of: gone, even empty (`[]` says "none")
            return Step(REMOVE, path, _first_class(node), Outcome.REMOVE)
        return step

    def children(self, children: dict[str, Node], prefix: str) -> dict[str, Step]:
        return {key: self.step(node, prefix + key) for key, node in children.items()}


def _shows(step: Step) -> bool:
    """Whether anything under a step can be shown."""
    if step.kind in (OBJECT, ARRAY):
        return any(_shows(s) for s in (step.children or {}).values()) or (step.items is not None and _shows(step.items))
    return step.kind not in (REMOVE, NOTHING) or step.alt.kind not in (REMOVE, NOTHING)


def _first_class(node: Node) -> str:
    if node.spec is not None:
        return node.spec.field_class
    for child in [*(node.children or {}).values(), *([node.items] if node.items else [])]:
        return _first_class(child)
    return ""


class Plans:
    """One bundle's compiled redaction: a plan per (resource, role, relations) and the audit summary of
    each set of notes a response produced, both made on first use. A new bundle starts a new `Plans`."""

    def __init__(self, classes: Mapping[str, FieldClass], identifying: frozenset[str] = frozenset()) -> None:
        self.classes = classes
        self.identifying = identifying  # see FieldMap.identifying
        self._anonymous: dict[tuple[str, Relation], bool] = {}
        self._plans: dict[tuple[str, str, Relation], Plan] = {}
        self._summaries: dict[tuple[str, frozenset[Relation], frozenset[Note]], Summary] = {}

    @classmethod
    def of(cls, bundle: PolicyBundle) -> Plans:
        """The bundle's plans, kept with it: made on its first request, gone with it."""
        found = bundle.memo.get(cls)
        if found is None:
            found = bundle.memo[cls] = cls(bundle.fieldmap.classes, bundle.fieldmap.identifying)
        return found

    def anonymous(self, view: View) -> bool:
        """Whether the view pseudonymises the client: then no field may identify them (their CRM id, their
        names in free text), whatever class it has."""
        key = (view.role, view.relations)
        found = self._anonymous.get(key)
        if found is None:
            found = self._anonymous[key] = any(view.outcome(c) is Outcome.PSEUDONYM for c in self.identifying)
        return found

    def plan(self, resource: Resource, view: View) -> Plan:
        key = (resource.name, view.role, view.relations)
        plan = self._plans.get(key)
        if plan is None or plan.view is not view:
            plan = self._plans[key] = Plan(resource, view, self.classes,
                                           resource.client_field is not None and self.anonymous(view))
        return plan

    def summary(self, role: str, views: dict[Relation, View], d: Disclosure) -> Summary:
        key = (role, frozenset(views), frozenset(d.notes))
        found = self._summaries.get(key)
        if found is None:
            if len(self._summaries) >= 4096:
                self._summaries.clear()
            found = self._summaries[key] = Summary.of(d.notes, deciding_rules(views, d.notes))
        return found


RelationsOf = Callable[[str], Relation]
Observe = Callable[[Resource, dict[str, Any]], bool]  # True: the record changed a relation fact


class Redactor:
    """Rewrites the records of one response for one caller; gathers what was disclosed."""

    def __init__(
        self,
        table: DecisionTable,
        role: str,
        relations_of: RelationsOf,
        pseudonym: Callable[[str], str | None],
        disclosure: Disclosure,
        plans: Plans,
        cipher: FieldCipher | None = None,
        observe: Observe | None = None,
        names: Callable[[str], re.Pattern[str] | None] | None = None,
    ) -> None:
        self.names = names or (lambda _client: None)  # the client's names, to scrub; None: not known
        self.table = table
        self.role = role
        self.relations_of = relations_of
        self.pseudonym = pseudonym
        self.d = disclosure
        self.cipher = cipher
        self.observe = observe
        self.plans = plans  # the bundle's: shared by all its requests
        self.views: dict[Relation, View] = {}
        self._relations: dict[str, Relation] = {}
        self._record: dict[str, Any] = {}
        self._client: str | None = None
        self._record_id: bytes | None = None  # the record's stable id, as its ciphertexts may be bound to it
        self._resource = ""
        self._stand_in: str | None = None
        self.unlinked = False  # a row was shown by an unlinkable plan: a list of them is shuffled

    def client_of(self, resource: Resource, record: dict[str, Any]) -> str | None:
        if resource.client_field is None:
            return None
        value = record.get(resource.client_field)
        if value is None or isinstance(value, (dict, list, bool)):
            return None
        return str(value)

    def view_for(self, client_id: str | None) -> View:
        if client_id is None:
            rels = Relation.ANY
        elif (known := self._relations.get(client_id)) is not None:
            rels = known
        else:
            rels = self._relations[client_id] = self.d.clients[client_id] = self.relations_of(client_id)
        view = self.views.get(rels)
        if view is None:
            found = self.table.view(self.role, rels)
            if found is None:  # unknown role: nothing
                found = View(self.role, rels, {}, frozenset(), frozenset())
            view = self.views[rels] = found
        return view

    def visible(self, view: View, resource: Resource) -> bool:
        return self.plans.plan(resource, view).visible

    def summary(self) -> Summary:
        """What this response disclosed and which rules decided it, for the audit record."""
        return self.plans.summary(self.role, self.views, self.d)

    def record(self, resource: Resource, record: dict[str, Any]) -> dict[str, Any] | None:
        """The record as this caller may see it, or None when they may see nothing of it."""
        if self.observe is not None and self.observe(resource, record):
            self._relations.clear()  # the CRM just moved a client: decide on the new facts
        client_id = self.client_of(resource, record)
        plan = self.plans.plan(resource, self.view_for(client_id))
        if not plan.visible:
            return None
        self._record, self._client, self._resource, self._stand_in = record, client_id, resource.name, plan.stand_in
        self._record_id = record_ref(record.get(resource.record_id)) if resource.record_id is not None else None
        self.unlinked = self.unlinked or plan.unlinkable
        return self._object(plan.root, record, "")

    def rows(self, resource: Resource, rows: list[Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for row in rows:
            kept = self.record(resource, row) if isinstance(row, dict) else None
            if kept is None:
                self.d.dropped_rows += 1
            else:
                out.append(kept)
        return out

    def _object(self, steps: dict[str, Step], value: dict[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        notes = self.d.notes
        for key, item in value.items():
            step = steps.get(key)
            if step is None:
                self.d.unclassified.add(prefix + str(key))
                continue
            if step.flag is not None and self._record.get(step.flag) is not False:
                step = step.alt
            if step.kind == CLEAR and not (type(item) is str and item.startswith(_SEALED)):
                notes.add(step.note)  # the common case, kept inline
                out[key] = item
                continue
            kept = self._value(step, item)
            if kept is not _DROP:
                out[key] = kept
        return out

    def _value(self, step: Step, value: Any) -> Any:
        kind = step.kind
        d = self.d
        if kind == CLEAR:  # here only with a ciphertext
            if self.cipher is not None:
                try:
                    value = self.cipher.open(value, self._client, step.scope, step.where, step.classed,
                                             self._record_id, d.key_ids)
                except CipherFailure as exc:
                    d.failures.add(f"{self._resource}.{step.path}: {exc}")
                    d.notes.add(step.removed)
                    return _DROP
            d.notes.add(step.note)
            return value
        if kind == SCRUB:
            if type(value) is str and value.startswith(_SEALED) and self.cipher is not None:
                try:
                    value = self.cipher.open(value, self._client, step.scope, step.where, step.classed,
                                             self._record_id, d.key_ids)
                except CipherFailure as exc:
                    d.failures.add(f"{self._resource}.{step.path}: {exc}")
                    d.notes.add(step.removed)
                    return _DROP
            if type(value) is str:
                names = self.names(self._client) if self._client is not None else None
                stand_in = self._stand_in or (self.pseudonym(self._client) if self._client is not None else None)
                if names is None or stand_in is None:  # names not known: the text is not shown
                    d.notes.add(step.removed)
                    return _DROP
                value = names.sub(stand_in, value)
            d.notes.add(step.note)
            return value
        if kind == PSEUDONYM and self._client is not None:
            stand_in = self.pseudonym(self._client)
            if stand_in is not None:
                d.notes.add(step.note)
                return stand_in
        elif kind == MASK and not (type(value) is str and value.startswith(_SEALED)):
            assert step.mask is not None
            masked = step.mask(value)
            if masked is not None:
                d.notes.add(step.note)
                return masked
        elif kind == OBJECT:
            if not isinstance(value, dict):
                d.unclassified.add(step.path[:-1])  # not the shape the map expects: fail closed
                return _DROP
            assert step.children is not None
            out = self._object(step.children, value, step.path)
            return out if out or not value else _DROP
        elif kind == ARRAY:
            if not isinstance(value, list):
                d.unclassified.add(step.path)
                return _DROP
            assert step.items is not None
            items = step.items
            kept = [v for v in (self._item(items, v) for v in value) if v is not _DROP]
            return kept if kept or not value else _DROP
        elif kind == NOTHING:
            return _DROP
        d.notes.add(step.removed)
        return _DROP

    def _item(self, step: Step, value: Any) -> Any:
        if step.flag is not None and self._record.get(step.flag) is not False:
            step = step.alt
        if step.kind == CLEAR and not (type(value) is str and value.startswith(_SEALED)):
            self.d.notes.add(step.note)
            return value
        return self._value(step, value)


def deciding_rules(views: dict[Relation, View], notes: Iterable[Note]) -> set[str]:
    """The policy rows behind what was disclosed or refused, for the audit record."""
    rules: set[str] = set()
    decided_classes = {(n.outcome, n.field_class) for n in notes}
    for view in views.values():
        for outcome, cls in decided_classes:
            decided = view.classes.get(cls)
            if decided is None:
                continue
            if decided.outcome is outcome and decided.rule is not None:
                rules.add(decided.rule.source)
            if outcome is Outcome.REMOVE and decided.denied_by is not None:
                rules.add(decided.denied_by.source)
    return rules

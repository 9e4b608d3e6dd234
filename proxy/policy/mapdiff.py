"""How two field maps differ, for the officer's review and for the reload's safety checks.

The decision table says what each class shows; the field map says which paths are in a class, which
classes are sealed before they reach the CRM, and which routes exist (public ones included). A review
that saw only the table would miss a path moved to a weaker class, a class that stops being encrypted,
or a route served without identity, so `policy diff` reports these too, and a reload refuses the ones
that would lose data or silently write plaintext.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import StrEnum

from proxy.policy.decision import ALL_RELATION_SETS, DecisionTable, Outcome, Relation
from proxy.policy.fieldmap import FieldClass, FieldMap, FieldSpec, Resource


class Weight(StrEnum):
    """How a reviewer should read a change."""

    WEAKER = "weaker"  # more may be shown, sent in the clear or served: look first
    STRONGER = "stronger"
    CHANGED = "changed"


@dataclass(frozen=True, slots=True)
class MapChange:
    weight: Weight
    what: str  # "class clinical_notes", "session_note.body", "route GET /health"
    change: str  # one sentence

    def as_row(self) -> tuple[str, str, str]:
        return (self.weight.value, self.what, self.change)


def fieldmap_diff(old: FieldMap, new: FieldMap, tables: tuple[DecisionTable, DecisionTable] | None = None
                  ) -> list[MapChange]:
    """Every difference in classes, resources, paths, routes, list format and relation sources. With both
    decision tables, a path moved to another class says which roles now see more of it."""
    out: list[MapChange] = []
    for name in sorted(old.classes.keys() | new.classes.keys()):
        out += _class_changes(name, old.classes.get(name), new.classes.get(name))
    for name in sorted(old.resources.keys() | new.resources.keys()):
        out += _resource_changes(name, old.resources.get(name), new.resources.get(name), tables)
    before = {(r.method, r.template): r for r in old.routes}
    after = {(r.method, r.template): r for r in new.routes}
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key), after.get(key)
        what = f"route {key[0]} {key[1]}"
        if a is None and b is not None:
            served = "served WITHOUT IDENTITY" if b.public else f"for {b.resource}"
            out.append(MapChange(Weight.WEAKER, what, f"added, {served}"))
        elif b is None and a is not None:
            out.append(MapChange(Weight.STRONGER, what, "removed: refused from now on"))
        elif a is not None and b is not None:
            if a.public != b.public:
                out.append(MapChange(Weight.WEAKER if b.public else Weight.STRONGER, what,
                                     "now served without identity" if b.public else "now needs a token"))
            for name in ("resource", "shape", "filter_param", "query", "opaque_field", "locate", "merge"):
                if getattr(a, name) != getattr(b, name):
                    out.append(MapChange(Weight.CHANGED, what, f"{name}: {getattr(a, name)!s} -> {getattr(b, name)!s}"))
    out += _attribute_changes("list_format", old.list_format, new.list_format)
    out += _attribute_changes("relations", old.relations, new.relations)
    return out


def unsafe_for_reload(old: FieldMap, new: FieldMap) -> list[str]:
    """Changes a running gateway refuses to take up: a class that stops being encrypted without saying so
    (`plaintext: <reason>` on the class), and a class moved to another key scope (what was sealed under
    the old scope could no longer be opened)."""
    problems: list[str] = []
    for name, before in sorted(old.classes.items()):
        after = new.classes.get(name)
        if before.key_scope is None or after is None:
            continue
        if after.key_scope is None and not after.plaintext:
            problems.append(f"class {name} would stop being encrypted: new writes would reach the CRM in plaintext; "
                            f"if that is meant, say why on the class (plaintext: \"<reason>\")")
        elif after.key_scope is not None and after.key_scope != before.key_scope:
            problems.append(f"class {name} would move from key scope {before.key_scope} to {after.key_scope}: what "
                            "was sealed under the old scope could no longer be opened")
    for name, resource in sorted(old.resources.items()):
        moved = new.resources.get(name)
        if moved is None:
            continue
        kept = {s.path: s for s in moved.specs}
        for spec in resource.specs:
            now = kept.get(spec.path)
            was, will = old.classes[spec.field_class], new.classes.get(now.field_class) if now else None
            if was.key_scope and will is not None and will.key_scope is None and not will.plaintext:
                problems.append(f"{name}.{spec.path} would move from encrypted class {was.name} to {will.name}, "
                                "which is not encrypted: new writes would reach the CRM in plaintext")
    return problems


def _class_changes(name: str, a: FieldClass | None, b: FieldClass | None) -> list[MapChange]:
    what = f"class {name}"
    if a is None and b is not None:
        sealed = f", encrypted ({b.key_scope})" if b.key_scope else ""
        return [MapChange(Weight.CHANGED, what, f"added, label {b.label}{sealed}")]
    if b is None and a is not None:
        return [MapChange(Weight.CHANGED, what, "removed")]
    assert a is not None and b is not None
    out = []
    if a.key_scope != b.key_scope:
        if b.key_scope is None:
            out.append(MapChange(Weight.WEAKER, what, "STOPS BEING ENCRYPTED: new writes reach the CRM in plaintext"
                                 + (f" ({b.plaintext})" if b.plaintext else "")))
        elif a.key_scope is None:
            out.append(MapChange(Weight.STRONGER, what, f"now encrypted ({b.key_scope}) on write"))
        else:
            out.append(MapChange(Weight.CHANGED, what, f"key scope {a.key_scope} -> {b.key_scope}"))
    if a.label != b.label:
        order = "NRV"
        out.append(MapChange(Weight.WEAKER if order.index(b.label) < order.index(a.label) else Weight.STRONGER,
                             what, f"label {a.label} -> {b.label}"))
    if a.withheld_from_subject != b.withheld_from_subject:
        if not b.withheld_from_subject:
            out.append(MapChange(Weight.WEAKER, what, "now GIVEN TO THE CLIENT in a subject access export"))
        elif not a.withheld_from_subject:
            out.append(MapChange(Weight.STRONGER, what,
                                 f"now withheld from subject access ({b.withheld_from_subject})"))
        else:
            out.append(MapChange(Weight.CHANGED, what, f"withheld from subject access: {b.withheld_from_subject}"))
    if a.portable != b.portable:
        out.append(MapChange(Weight.CHANGED, what, "now in the client's portable copy" if b.portable
                             else "no longer in the client's portable copy"))
    return out


def _resource_changes(name: str, a: Resource | None, b: Resource | None,
                      tables: tuple[DecisionTable, DecisionTable] | None) -> list[MapChange]:
    if a is None and b is not None:
        return [MapChange(Weight.CHANGED, f"resource {name}", f"added ({len(b.specs)} paths)")]
    if b is None and a is not None:
        return [MapChange(Weight.STRONGER, f"resource {name}", "removed: its routes are refused")]
    assert a is not None and b is not None
    out = []
    for attr in ("client_field", "record_class"):
        if getattr(a, attr) != getattr(b, attr):
            out.append(MapChange(Weight.CHANGED, f"resource {name}",
                                 f"{attr}: {getattr(a, attr)} -> {getattr(b, attr)}"))
    before = {s.path: s for s in a.specs}
    after = {s.path: s for s in b.specs}
    for path in sorted(before.keys() | after.keys()):
        out += _spec_changes(f"{name}.{path}", before.get(path), after.get(path), tables)
    return out


def _gainers(tables: tuple[DecisionTable, DecisionTable], was: str, now: str) -> list[str]:
    """Roles that, under some relation set, get more of a path moved from class `was` to `now`."""
    old, new = tables
    reveal = list(Outcome)  # most revealing first
    found = set()
    for role in new.roles:
        for rels in ALL_RELATION_SETS:
            before = old.view(role, rels) if role in old.roles else None
            after = new.view(role, rels)
            a = before.outcome(was) if before is not None else Outcome.REMOVE
            b = after.outcome(now) if after is not None else Outcome.REMOVE
            if reveal.index(b) < reveal.index(a):
                found.add(f"{role} ({rels.label}: {a.value} -> {b.value})" if rels != Relation.ANY
                          else f"{role} ({a.value} -> {b.value})")
    by_role: dict[str, str] = {}
    for item in sorted(found, key=len):  # the shortest (fewest relations) per role
        by_role.setdefault(item.split(" ", 1)[0], item)
    return [by_role[r] for r in sorted(by_role)]


def _spec_changes(what: str, a: FieldSpec | None, b: FieldSpec | None,
                  tables: tuple[DecisionTable, DecisionTable] | None = None) -> list[MapChange]:
    if a is None and b is not None:
        return [MapChange(Weight.WEAKER, what, f"now classified {b.field_class} (was unknown: removed for everyone)")]
    if b is None and a is not None:
        return [MapChange(Weight.STRONGER, what, f"no longer classified (was {a.field_class}): removed for everyone")]
    assert a is not None and b is not None
    out = []
    if a.field_class != b.field_class:
        gainers = _gainers(tables, a.field_class, b.field_class) if tables is not None else []
        seen = f": now shown more to {', '.join(gainers)}" if gainers else ""
        out.append(MapChange(Weight.WEAKER if gainers else Weight.CHANGED, what,
                             f"reclassified {a.field_class} -> {b.field_class}{seen}"))
    for attr in ("pseudonym", "mask", "flag", "flag_class", "set_by_gateway", "client_name"):
        x, y = getattr(a, attr), getattr(b, attr)
        if x != y:
            weaker = attr in ("pseudonym", "mask", "client_name", "flag") and not y
            out.append(MapChange(Weight.WEAKER if weaker else Weight.CHANGED, what, f"{attr}: {x} -> {y}"))
    return out


def _attribute_changes(section: str, a: object, b: object) -> list[MapChange]:
    return [MapChange(Weight.CHANGED, section, f"{f.name}: {getattr(a, f.name)!s} -> {getattr(b, f.name)!s}")
            for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)]  # type: ignore[arg-type]

"""The security officer's review tools over a compiled bundle: diff and explain.

`diff` compares two compiled tables on every (role, relation, class, action), so a review sees exactly
what each role gains and loses. `explain` says, for each field of a route (or one class), which rule and
relation decided it, and for a refusal why: no rule, not on the caseload (a rule needs a relation the
caller does not hold), an explicit deny, or a purpose of use the role may not act for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from proxy.policy.decision import ALL_RELATION_SETS, RELATIONS, Action, DecisionTable, Effect, Outcome, Relation, Rule
from proxy.policy.fieldmap import FieldMap
from proxy.policy.mapdiff import MapChange, Weight

SINGLE_RELATIONS: tuple[Relation, ...] = tuple(r for r in RELATIONS)


# ---------------------------------------------------------------------------------------------- diff
@dataclass(frozen=True, slots=True)
class Change:
    role: str
    relation: str
    field_class: str
    action: str
    gained: bool
    rule: str  # the rule behind the new state (gain) or the old one (loss)


def diff(old: DecisionTable, new: DecisionTable) -> list[Change]:
    """Every (role, relation set, class, action) whose allow changes. Sets are compared whole (deny
    overrides allow across the relations held, so caseload+supervision can differ from both alone), and a
    change is reported at the smallest sets it appears under: a gain under `any` shows once, under any."""
    found: dict[tuple[str, str, str, bool], list[tuple[Relation, str]]] = {}
    classes = sorted({k[2] for k in old.grants} | {k[2] for k in new.grants})
    for role in sorted(old.roles | new.roles):
        for rels in ALL_RELATION_SETS:
            for cls in classes:
                for action in Action:
                    before = old.allows(role, rels, cls, action) if role in old.roles else False
                    after = new.allows(role, rels, cls, action) if role in new.roles else False
                    if before == after:
                        continue
                    decided = (new if after else old).decided(role, rels, cls, action)[1]
                    found.setdefault((role, cls, action.value, after), []).append(
                        (rels, str(decided) if decided else ""))
    changes: list[Change] = []
    for (who, cls, act, gained), where in found.items():
        sets = [r for r, _ in where]
        for rels, why in where:
            if not any(other != rels and other & rels == other for other in sets):  # no smaller set has it
                changes.append(Change(who, rels.label, cls, act, gained, why))
    return sorted(changes, key=lambda c: (c.role, c.field_class, c.action, c.relation))


def purpose_diff(old: DecisionTable, new: DecisionTable) -> list[tuple[str, str, bool]]:
    out = []
    for role in sorted(old.roles | new.roles):
        before, after = old.purposes.get(role, frozenset()), new.purposes.get(role, frozenset())
        out += [(role, p, True) for p in sorted(after - before)] + [(role, p, False) for p in sorted(before - after)]
    return out


def render_diff(changes: list[Change], purposes: list[tuple[str, str, bool]], markdown: bool,
                mapped: Sequence[MapChange] = ()) -> str:
    """The access review: what each role gains and loses, then what changed in the field map (paths moved,
    classes no longer encrypted, routes added; the weaker changes first)."""
    parts = [_render_access(changes, purposes, markdown)]
    if mapped:
        ordered = sorted(mapped, key=lambda m: (m.weight is not Weight.WEAKER, m.what))
        weaker = sum(m.weight is Weight.WEAKER for m in mapped)
        title = f"**Field map:** {len(mapped)} changes, {weaker} weaker." if markdown else "Field map:"
        parts.append(_table(("change", "what", "how"), [m.as_row() for m in ordered], markdown, title))
    return "\n\n".join(parts)


def _render_access(changes: list[Change], purposes: list[tuple[str, str, bool]], markdown: bool) -> str:
    if not changes and not purposes:
        return "No change in what any role may see or do." if not markdown else "_No change in access._"
    rows = [("gains" if c.gained else "loses", c.role, c.relation, c.field_class, c.action, c.rule) for c in changes]
    rows += [("gains" if g else "loses", role, "-", f"purpose {p}", "act for", "") for role, p, g in purposes]
    head = ("change", "role", "relation", "class", "action", "rule")
    gains = sum(1 for r in rows if r[0] == "gains")
    if not markdown:
        return _table(head, rows, markdown, "")
    rows = [("**gains**" if r[0] == "gains" else "loses", *r[1:5], f"`{r[5]}`" if r[5] else "") for r in rows]
    return _table(head, rows, markdown, f"**Access review:** {gains} gained, {len(rows) - gains} lost.")


def _table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]], markdown: bool, title: str) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return (title + "\n\n" if title else "") + "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    body = "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows])
    return (title + "\n" if title else "") + body


# ---------------------------------------------------------------------------------------------- explain
@dataclass(frozen=True, slots=True)
class Explanation:
    path: str
    field_class: str
    outcome: str
    rule: str | None
    relation: str | None
    reason: str

    def as_dict(self) -> dict[str, str | None]:
        return {"path": self.path, "class": self.field_class, "outcome": self.outcome, "rule": self.rule,
                "relation": self.relation, "reason": self.reason}


def explain_class(table: DecisionTable, role: str, relations: Relation, purpose: str | None, field_class: str,
                  path: str = "") -> Explanation:
    """One class for one role, relation set and purpose, with the reason in words."""
    if role not in table.roles:
        return Explanation(path, field_class, "remove", None, None, f"role {role!r} is not known to the policy")
    if purpose is not None and not table.purpose_allowed(role, purpose):
        allowed = ", ".join(sorted(table.purposes.get(role, frozenset()))) or "none"
        return Explanation(path, field_class, "remove", None, None,
                           f"purpose of use {purpose} is not allowed for role {role} (allowed: {allowed})")
    view = table.view(role, relations)
    decided = view.classes.get(field_class) if view is not None else None
    if decided is None:
        return Explanation(path, field_class, "remove", None, None, f"class {field_class!r} is not declared")
    if decided.outcome is not Outcome.REMOVE:
        rule = decided.rule
        return Explanation(path, field_class, decided.outcome.value, str(rule) if rule else None,
                           rule.relation.label if rule else None,
                           f"allowed by {rule.source} through relation {rule.relation.label}" if rule else "allowed")
    if decided.denied_by is not None:
        d = decided.denied_by
        return Explanation(path, field_class, "remove", str(d), d.relation.label, f"explicit deny at {d.source}")
    needed = []
    for (r, rel, cls, action), (effect, rule) in table.grants.items():
        if r == role and cls == field_class and effect is Effect.ALLOW and action in (
                Action.READ, Action.PSEUDO, Action.MASK) and rel not in relations:
            needed.append(rule)
    if needed:
        first = min(needed, key=_written_order)
        rels = sorted({r.relation.label for r in needed})
        holds = relations.label
        what = "not on the caseload" if "caseload" in rels else f"no {' or '.join(rels)} relation"
        return Explanation(path, field_class, "remove", None, None,
                           f"{what}: {first.source} grants {role} {field_class} only through {' or '.join(rels)}; "
                           f"the caller holds {holds}")
    return Explanation(path, field_class, "remove", None, None, f"no rule gives {role} {field_class}")


def explain_resource(table: DecisionTable, fieldmap: FieldMap, resource_name: str, role: str, relations: Relation,
                     purpose: str | None) -> list[Explanation]:
    resource = fieldmap.resources[resource_name]
    out = []
    for spec in resource.specs:
        out.append(explain_class(table, role, relations, purpose, spec.field_class, spec.path))
        if spec.flag_class:
            alt = explain_class(table, role, relations, purpose, spec.flag_class, spec.path)
            out.append(Explanation(spec.path + f" (when {spec.flag} is set)", alt.field_class, alt.outcome, alt.rule,
                                   alt.relation, alt.reason))
    return out


def explain_action(table: DecisionTable, role: str, relations: Relation, purpose: str | None, field_class: str,
                   action: Action, path: str = "") -> Explanation:
    """A write, create or delete decision on one class, with the reason in the same words as for reads."""
    if role not in table.roles:
        return Explanation(path, field_class, "deny", None, None, f"role {role!r} is not known to the policy")
    if purpose is not None and not table.purpose_allowed(role, purpose):
        return Explanation(path, field_class, "deny", None, None,
                           f"purpose of use {purpose} is not allowed for role {role}")
    held = [table.grants.get((role, rel, field_class, action)) for rel in RELATIONS if rel in relations]
    denied = next((hit[1] for hit in held if hit is not None and hit[0] is Effect.DENY), None)
    if denied is not None:
        return Explanation(path, field_class, "deny", str(denied), denied.relation.label,
                           f"explicit deny at {denied.source}")
    allowed = next((hit[1] for hit in held if hit is not None and hit[0] is Effect.ALLOW), None)
    if allowed is not None:
        return Explanation(path, field_class, "allow", str(allowed), allowed.relation.label,
                           f"allowed by {allowed.source} through relation {allowed.relation.label}")
    needed = sorted((rule for (r, rel, cls, act), (effect, rule) in table.grants.items()
                     if r == role and cls == field_class and act is action and effect is Effect.ALLOW),
                    key=lambda rule: rule.source)
    if needed:
        rels = sorted({r.relation.label for r in needed})
        return Explanation(path, field_class, "deny", None, None,
                           f"{needed[0].source} allows {role} to {action} {field_class} only through "
                           f"{' or '.join(rels)}; the caller holds {relations.label}")
    return Explanation(path, field_class, "deny", None, None, f"no rule lets {role} {action} {field_class}")


def explain_write(table: DecisionTable, fieldmap: FieldMap, resource_name: str, method: str, role: str,
                  relations: Relation, purpose: str | None) -> list[Explanation]:
    """What a POST, PATCH or PUT may write, field by field: `create` on the record class first for a POST, every
    class for a PUT; a flag needs write on every class it selects; fields the gateway sets are nobody's."""
    resource = fieldmap.resources[resource_name]
    out: list[Explanation] = []
    if method == "POST":
        out.append(explain_action(table, role, relations, purpose, resource.record_class, Action.CREATE,
                                  f"(a new {resource.name} record)"))
    flags = resource.flags
    for spec in resource.specs:
        if spec.set_by_gateway is not None:
            out.append(Explanation(spec.path, spec.field_class, "deny", None, None,
                                   f"set by the gateway ({spec.set_by_gateway}); no caller writes it"))
            continue
        for cls in sorted({spec.field_class, spec.flag_class or spec.field_class}):
            label = spec.path if cls == spec.field_class else f"{spec.path} (when {spec.flag} is set)"
            out.append(explain_action(table, role, relations, purpose, cls, Action.WRITE, label))
        if spec.path in flags:
            selects = [explain_action(table, role, relations, purpose, c, Action.WRITE)
                       for c in sorted(flags[spec.path])]
            refused = [e.field_class for e in selects if e.outcome != "allow"]
            out.append(Explanation(f"{spec.path} (as a flag)", spec.field_class, "deny" if refused else "allow", None,
                                   None, f"setting it reclassifies other fields: needs write on {', '.join(refused)}"
                                   if refused else "may reclassify: write on every class it selects"))
    return out


def render_explanations(items: list[Explanation], visible: bool, resource: str, record_class: str) -> str:
    head = (f"{resource} records are {'visible' if visible else 'NOT visible'} "
            f"(record class {record_class})")
    width = max((len(e.path) for e in items), default=4)
    lines = [head, ""]
    for e in items:
        lines.append(f"  {e.path.ljust(width)}  {e.field_class:<16} {e.outcome:<9} {e.reason}")
    return "\n".join(lines)


def render_writes(items: list[Explanation]) -> str:
    width = max((len(e.path) for e in items), default=4)
    return "\n".join(f"  {e.path.ljust(width)}  {e.field_class:<16} {e.outcome:<6} {e.reason}" for e in items)


def _written_order(rule: Rule) -> tuple[str, int]:
    """Where a rule was written, in file order (policy.csv:38 before policy.csv:134)."""
    file, _, line = rule.source.rpartition(":")
    return (file, int(line)) if line.isdigit() else (rule.source, 0)

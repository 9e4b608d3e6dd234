"""The decision vocabulary and the compiled decision table.

Casbin is the security officers' language; this module is what a request consults. A decision is a
dictionary lookup keyed by (active role, relations held to the client), giving every field class its
`Outcome`. The table is built from the policy rows by `proxy.policy.bundle` and proved equal to Casbin's
`enforce` on the whole request matrix before it is used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum, IntFlag, StrEnum

import orjson


class Outcome(StrEnum):
    """What the caller gets of one field, from most to least revealing."""

    CLEAR = "clear"
    PSEUDONYM = "pseudonym"
    MASK = "mask"
    REMOVE = "remove"


class Action(StrEnum):
    """Policy actions. The three read levels map to outcomes; create, write and delete guard changes.

    `create` is asked of a new record's record class, under the relations the new record gives the caller
    (a client registered onto one's own caseload is `caseload`); `write` of every class a change writes,
    under the relations held to the client (and, for a move, to where it moves)."""

    READ = "read"
    PSEUDO = "pseudo"
    MASK = "mask"
    CREATE = "create"
    WRITE = "write"
    DELETE = "delete"


READ_LEVELS: tuple[tuple[Action, Outcome], ...] = (
    (Action.READ, Outcome.CLEAR),
    (Action.PSEUDO, Outcome.PSEUDONYM),
    (Action.MASK, Outcome.MASK),
)


class Relation(IntFlag):
    """How the caller stands to a client. `ANY` is always held; the others come from the CRM's facts."""

    ANY = 1
    CASELOAD = 2
    SUPERVISION = 4
    COVER = 8
    SELF = 16
    BREAKGLASS = 32  # an emergency grant the caller declared for this one client (breakglass.yaml)

    @classmethod
    def parse(cls, name: str) -> Relation:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown relation {name!r}") from None

    @property
    def label(self) -> str:
        """Lower-case names joined with '+', as the policy files spell them."""
        return "+".join(r.name.lower() for r in Relation if r in self and r.name) or "none"


RELATIONS: tuple[Relation, ...] = tuple(Relation)
ALL_RELATION_SETS: tuple[Relation, ...] = tuple(
    Relation(Relation.ANY | bits << 1) for bits in range(1 << (len(RELATIONS) - 1))
)
"""Every relation set a request can carry: ANY plus any subset of the other five (32 sets)."""


class Effect(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


# HL7 v3 PurposeOfUse codes the gateway accepts in tokens.
PURPOSES: frozenset[str] = frozenset(
    {"TREAT", "ETREAT", "HOPERAT", "HPAYMT", "HRESCH", "PATRQT", "HLEGAL", "PUBHLTH", "HMARKT", "COVERAGE"}
)


@dataclass(frozen=True, slots=True)
class Rule:
    """One policy row, remembered with where it was written so audits and explanations can cite it."""

    role: str
    relation: Relation
    field_class: str
    action: Action
    effect: Effect
    source: str  # "policy.csv:12"

    def __str__(self) -> str:
        return f"{self.source} p, {self.role}, {self.relation.label}, {self.field_class}, {self.action}, {self.effect}"


@dataclass(frozen=True, slots=True)
class ClassDecision:
    """The outcome of one field class, with the rule that decided it (None: no rule matched)."""

    outcome: Outcome
    rule: Rule | None
    denied_by: Rule | None = None


@dataclass(frozen=True, slots=True)
class View:
    """Everything a role may do with one client's record, given the relations it holds to that client."""

    role: str
    relations: Relation
    classes: Mapping[str, ClassDecision]
    writable: frozenset[str]
    deletable: frozenset[str]
    creatable: frozenset[str] = frozenset()

    def outcome(self, field_class: str) -> Outcome:
        """Unknown classes are removed: fail closed."""
        decided = self.classes.get(field_class)
        return decided.outcome if decided is not None else Outcome.REMOVE

    def shows(self, field_class: str) -> bool:
        """Whether the class appears in any form (a record is visible when its record class shows)."""
        return self.outcome(field_class) is not Outcome.REMOVE


@dataclass(slots=True)
class DecisionTable:
    """The compiled policy: views by (role, relation set) and allowed purposes by role."""

    views: dict[tuple[str, Relation], View]
    purposes: dict[str, frozenset[str]]
    grants: dict[tuple[str, Relation, str, Action], tuple[Effect, Rule]] = field(default_factory=dict)
    relational: frozenset[str] = frozenset()  # roles for whom some relation changes some outcome

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(self.purposes)

    def view(self, role: str, relations: Relation) -> View | None:
        return self.views.get((role, relations))

    def decided(self, role: str, relations: Relation, field_class: str, action: Action
                ) -> tuple[Effect | None, Rule | None]:
        """The effect and the rule that decided it (deny overrides allow across the relations held)."""
        return _combine(self.grants, role, relations, field_class, action)

    def allows(self, role: str, relations: Relation, field_class: str, action: Action) -> bool:
        """The allow/deny of one (role, relations, class, action) as Casbin's effect would combine it."""
        return _combine(self.grants, role, relations, field_class, action)[0] is Effect.ALLOW

    def purpose_allowed(self, role: str, purpose: str) -> bool:
        return purpose in self.purposes.get(role, frozenset())

    def needs_relations(self, role: str) -> bool:
        """Whether what this role may do depends on how it stands to the client (else facts do not matter)."""
        return role in self.relational

    def digest(self) -> str:
        """A hash of what was compiled, independent of set order: a proof is remembered for the table the
        compiler made, so a change to the compiler (same files, new table) is proved again."""
        return hashlib.sha256(orjson.dumps(_canonical(
            [self.views, self.purposes, self.grants, self.relational]), option=orjson.OPT_SORT_KEYS)).hexdigest()


def _canonical(value: object) -> object:
    if isinstance(value, Enum):
        return f"{type(value).__name__}:{value.value}"
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return sorted(([_canonical(k), _canonical(v)] for k, v in value.items()), key=repr)
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(v) for v in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def _combine(
    grants: Mapping[tuple[str, Relation, str, Action], tuple[Effect, Rule]],
    role: str,
    relations: Relation,
    field_class: str,
    action: Action,
) -> tuple[Effect | None, Rule | None]:
    """Deny overrides allow across every relation held, exactly as the model's policy_effect says."""
    allowed: Rule | None = None
    for rel in RELATIONS:
        if rel not in relations:
            continue
        hit = grants.get((role, rel, field_class, action))
        if hit is None:
            continue
        effect, rule = hit
        if effect is Effect.DENY:
            return Effect.DENY, rule
        allowed = allowed or rule
    return (Effect.ALLOW, allowed) if allowed else (None, None)


def build_table(
    grants: Mapping[tuple[str, Relation, str, Action], tuple[Effect, Rule]],
    roles: Iterable[str],
    classes: Iterable[str],
    purposes: Mapping[str, frozenset[str]],
) -> DecisionTable:
    """Precompute a `View` for every role and relation set: the request path never combines rules."""
    class_list = sorted(set(classes))
    role_list = sorted(set(roles))
    views: dict[tuple[str, Relation], View] = {}
    for role in role_list:
        for rels in ALL_RELATION_SETS:
            decided: dict[str, ClassDecision] = {}
            for cls in class_list:
                denied: Rule | None = None
                decision = ClassDecision(Outcome.REMOVE, None)
                for action, outcome in READ_LEVELS:
                    effect, rule = _combine(grants, role, rels, cls, action)
                    if effect is Effect.ALLOW:
                        decision = ClassDecision(outcome, rule, denied)
                        break
                    if effect is Effect.DENY and denied is None:
                        denied = rule
                else:
                    decision = ClassDecision(Outcome.REMOVE, None, denied)
                decided[cls] = decision
            writable = frozenset(
                c for c in class_list if _combine(grants, role, rels, c, Action.WRITE)[0] is Effect.ALLOW
            )
            deletable = frozenset(
                c for c in class_list if _combine(grants, role, rels, c, Action.DELETE)[0] is Effect.ALLOW
            )
            creatable = frozenset(
                c for c in class_list if _combine(grants, role, rels, c, Action.CREATE)[0] is Effect.ALLOW
            )
            views[(role, rels)] = View(role, rels, decided, writable, deletable, creatable)
    relational = frozenset(role for role in role_list if any(
        _differs(views[(role, rels)], views[(role, Relation.ANY)]) for rels in ALL_RELATION_SETS))
    return DecisionTable(views, {r: purposes.get(r, frozenset()) for r in role_list}, dict(grants), relational)


def _differs(a: View, b: View) -> bool:
    return (a.writable != b.writable or a.deletable != b.deletable or a.creatable != b.creatable
            or any(a.outcome(c) is not b.outcome(c) for c in a.classes))

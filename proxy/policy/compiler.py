"""Compiling the Casbin rows into the decision table, and proving the table equal to Casbin.

The table folds role inheritance and deny-override into one lookup per (role, relation set, class,
action). The proof then asks pycasbin itself, through `enforcer.enforce`, about every such request and
every (role, purpose): only a table that agrees everywhere is ever used.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import casbin
from casbin.persist.adapter import Adapter, load_policy_line

from proxy.policy.decision import (
    ALL_RELATION_SETS,
    PURPOSES,
    RELATIONS,
    Action,
    DecisionTable,
    Effect,
    Relation,
    Rule,
    build_table,
)
from proxy.policy.lint import Finding, ParsedPolicy, PolicyError, RoleLink, Severity


def ancestors(role: str, links: Iterable[RoleLink]) -> set[str]:
    """The role and every role it inherits through g rows."""
    parents: dict[str, list[str]] = {}
    for link in links:
        parents.setdefault(link.role, []).append(link.parent)
    found, stack = set(), [role]
    while stack:
        r = stack.pop()
        if r not in found:
            found.add(r)
            stack.extend(parents.get(r, []))
    return found


def compile_table(parsed: ParsedPolicy, classes: Iterable[str]) -> DecisionTable:
    """Fold the rows into (role, relation, class, action) -> effect, with inheritance and deny-override."""
    roles = {r.role for r in parsed.rules} | {p.role for p in parsed.purposes}
    roles |= {link.role for link in parsed.links} | {link.parent for link in parsed.links}
    grants: dict[tuple[str, Relation, str, Action], tuple[Effect, Rule]] = {}
    purposes: dict[str, frozenset[str]] = {}
    for role in roles:
        inherited = ancestors(role, parsed.links)
        for rule in parsed.rules:
            if rule.role not in inherited:
                continue
            key = (role, rule.relation, rule.field_class, rule.action)
            held = grants.get(key)
            if held is None or (rule.effect is Effect.DENY and held[0] is Effect.ALLOW):
                grants[key] = (rule.effect, rule)
        purposes[role] = frozenset(p.purpose for p in parsed.purposes if p.role in inherited)
    return build_table(grants, roles, classes, purposes)


class _TextAdapter(Adapter):  # type: ignore[misc]
    """Feeds Casbin the same bytes the gateway parsed, line by line as its file adapter does."""

    def __init__(self, text: str) -> None:
        self._text = text

    def load_policy(self, model: Any) -> None:
        for line in self._text.splitlines():
            load_policy_line(line.strip(), model)

    def save_policy(self, model: Any) -> bool:
        return False  # never rewrite the officers' file (it would drop their comments)


def casbin_enforcer(model_text: str, policy_text: str) -> Any:
    model = casbin.Enforcer.new_model(text=model_text)
    enforcer = casbin.Enforcer(model, _TextAdapter(policy_text))
    enforcer.enable_auto_save(False)
    return enforcer


def probe_client(relations: Relation) -> str:
    return f"c:probe:{int(relations)}"


def prove(table: DecisionTable, model_text: str, policy_text: str, classes: Iterable[str]) -> int:
    """Check the compiled table against Casbin on the whole request matrix; return the checks made.

    The gateway passes the caller's active role as `sub` and states the relations it holds to the
    client as g2 facts (client, relation:role); every combination is enumerated here.
    """
    try:
        enforcer = casbin_enforcer(model_text, policy_text)
        for role in table.roles:
            for rels in ALL_RELATION_SETS:
                for rel in RELATIONS:
                    if rel is not Relation.ANY and rel in rels:
                        enforcer.add_named_grouping_policy("g2", probe_client(rels), f"{rel.label}:{role}")
        ctx = enforcer.new_enforce_context("2")
    except Exception as exc:
        raise PolicyError([Finding("model.conf", None, Severity.ERROR,
                                   f"Casbin cannot load the model and policy: {type(exc).__name__}: {exc}")]) from None
    checks = 0
    mismatches: list[Finding] = []
    class_list = sorted(set(classes))
    try:
        for role in sorted(table.roles):
            for rels in ALL_RELATION_SETS:
                cli = probe_client(rels)
                for cls in class_list:
                    for action in Action:
                        expected = table.allows(role, rels, cls, action)
                        actual = bool(enforcer.enforce(role, cli, cls, action.value))
                        checks += 1
                        if expected != actual and len(mismatches) < 10:
                            mismatches.append(Finding("model.conf", None, Severity.ERROR,
                                f"Casbin says {'allow' if actual else 'deny'} but the compiled table says "
                                f"{'allow' if expected else 'deny'} for ({role}, {rels.label}, {cls}, {action})",
                                "the model must keep the meaning FieldGuard compiles; see the comments in it"))
            for purpose in sorted(PURPOSES):
                expected = table.purpose_allowed(role, purpose)
                actual = bool(enforcer.enforce(ctx, role, purpose))
                checks += 1
                if expected != actual and len(mismatches) < 10:
                    mismatches.append(Finding("model.conf", None, Severity.ERROR,
                        f"Casbin and the compiled table disagree on purpose {purpose} for role {role}"))
    except Exception as exc:
        raise PolicyError([Finding("model.conf", None, Severity.ERROR,
                                   f"Casbin failed while proving the policy: {type(exc).__name__}: {exc}")]) from None
    if mismatches:
        raise PolicyError(mismatches)
    return checks

"""Linting of the bundle: every way pycasbin 2.8 accepts a broken file silently, and coverage warnings.

pycasbin drops rows of undeclared types, keeps rows of the wrong width until a request reaches them,
turns `read  # note` into a token that never matches, and renames model tokens after an inline
comment. These checks run before anything is compiled; errors keep the old policy in force.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from proxy.policy.decision import PURPOSES, Action, DecisionTable, Effect, Outcome, Relation, Rule
from proxy.policy.fieldmap import ANONYMOUS, FieldMap


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Finding:
    file: str
    line: int | None
    severity: Severity
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        text = f"{where}: {self.severity}: {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text


class PolicyError(Exception):
    """The bundle cannot be used; `findings` say where and why."""

    def __init__(self, findings: list[Finding]) -> None:
        super().__init__("; ".join(str(f) for f in findings[:5]))
        self.findings = findings


@dataclass(frozen=True, slots=True)
class PurposeRow:
    role: str
    purpose: str
    source: str


@dataclass(frozen=True, slots=True)
class RoleLink:
    role: str
    parent: str
    source: str


@dataclass(slots=True)
class ParsedPolicy:
    rules: list[Rule]
    purposes: list[PurposeRow]
    links: list[RoleLink]
    findings: list[Finding]


ROW_WIDTH = {"p": 5, "p2": 2, "g": 2}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
MAX_ROLE_DEPTH = 9  # pycasbin answers false past 10 hops (max_hierarchy_level); stay well inside


def parse_policy(text: str, classes: Iterable[str], file: str = "policy.csv") -> ParsedPolicy:
    """Parse policy.csv the way Casbin's file adapter does, and report every silent pitfall."""
    known_classes = frozenset(classes)
    out = ParsedPolicy([], [], [], [])

    def error(line: int, message: str, hint: str = "") -> None:
        out.findings.append(Finding(file, line, Severity.ERROR, message, hint))

    seen: dict[tuple[str, ...], int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "#" in line:
            error(number, "a comment after a rule makes its last token never match",
                  "put comments on their own line, starting with #")
            continue
        if any(c in line for c in "[]()\"'"):
            error(number, "brackets, parentheses and quotes are not allowed in rows",
                  "pycasbin nests on them and can merge or crash on rows")
            continue
        tokens = [t.strip() for t in line.split(",")]
        ptype, fields = tokens[0], tokens[1:]
        if ptype not in ROW_WIDTH:
            error(number, f"unknown row type {ptype!r}; Casbin would drop this row silently",
                  "use p (field rule), p2 (purpose of use) or g (role inherits role)")
            continue
        if len(fields) != ROW_WIDTH[ptype]:
            error(number, f"{ptype} row has {len(fields)} values, expected {ROW_WIDTH[ptype]}",
                  {"p": "p, role, relation, class, action, allow|deny",
                   "p2": "p2, role, PURPOSE", "g": "g, role, inherited_role"}[ptype])
            continue
        if any(not f for f in fields):
            error(number, "empty value in row")
            continue
        key = (ptype, *fields)
        if key in seen:
            out.findings.append(Finding(file, number, Severity.WARNING, f"duplicate of line {seen[key]}"))
            continue
        seen[key] = number
        source = f"{file}:{number}"
        if ptype == "p":
            _parse_rule(fields, source, number, known_classes, out)
        elif ptype == "p2":
            role, purpose = fields
            if not _NAME.match(role):
                error(number, f"bad role name {role!r}", "lower-case letters, digits and _")
            elif purpose not in PURPOSES:
                error(number, f"unknown purpose of use {purpose!r}", f"one of {', '.join(sorted(PURPOSES))}")
            else:
                out.purposes.append(PurposeRow(role, purpose, source))
        else:
            role, parent = fields
            if not (_NAME.match(role) and _NAME.match(parent)):
                error(number, "g rows link role names (lower-case letters, digits and _)",
                      "users get roles from their token, never from policy.csv")
            elif role == parent:
                error(number, "a role cannot inherit itself")
            else:
                out.links.append(RoleLink(role, parent, source))
    if not out.rules and not out.findings:
        out.findings.append(Finding(file, None, Severity.ERROR, "no rules: every request would be refused",
                                    "a file emptied by accident is refused, so the policy in force stays"))
    _check_roles(out, file)
    return out


def _parse_rule(
    fields: list[str], source: str, number: int, classes: frozenset[str], out: ParsedPolicy
) -> None:
    role, relation, cls, action, effect = fields
    problems: list[tuple[str, str]] = []
    if not _NAME.match(role):
        problems.append((f"bad role name {role!r}", "lower-case letters, digits and _"))
    rel: Relation | None = None
    try:
        rel = Relation.parse(relation)
    except ValueError:
        problems.append((f"unknown relation {relation!r}",
                         "one of " + ", ".join(r.name.lower() for r in Relation if r.name)))
    if cls not in classes:
        problems.append((f"unknown field class {cls!r}", "classes are declared in fields.yaml"))
    if action not in {a.value for a in Action}:
        problems.append((f"unknown action {action!r}", "one of " + ", ".join(a.value for a in Action)))
    if effect not in {e.value for e in Effect}:
        problems.append((f"unknown effect {effect!r}", "allow or deny"))
    for message, hint in problems:
        out.findings.append(Finding(source.split(":")[0], number, Severity.ERROR, message, hint))
    if not problems and rel is not None:
        out.rules.append(Rule(role, rel, cls, Action(action), Effect(effect), source))


def _check_roles(out: ParsedPolicy, file: str) -> None:
    with_purpose = {p.role for p in out.purposes}
    parents: dict[str, list[str]] = {}
    for link in out.links:
        parents.setdefault(link.role, []).append(link.parent)
    for rule in out.rules:
        if rule.role == ANONYMOUS:
            continue  # public routes' caller: no token, no purpose; its rows decide those routes only
        if rule.role not in with_purpose and not _inherits_purpose(rule.role, parents, with_purpose):
            line = int(rule.source.rsplit(":", 1)[1])
            out.findings.append(Finding(file, line, Severity.ERROR,
                                        f"role {rule.role!r} has no purpose of use, so no request can use it",
                                        f"add 'p2, {rule.role}, TREAT' (or its purpose), or fix a typo"))
    for link in out.links:
        depth = _depth(link.role, parents, set())
        line = int(link.source.rsplit(":", 1)[1])
        if depth < 0:
            out.findings.append(Finding(file, line, Severity.ERROR, f"role inheritance cycle through {link.role!r}"))
        elif depth > MAX_ROLE_DEPTH:
            out.findings.append(Finding(file, line, Severity.ERROR,
                                        f"role chain from {link.role!r} is {depth} links long",
                                        "pycasbin silently answers false past 10 links"))


def _inherits_purpose(role: str, parents: Mapping[str, list[str]], with_purpose: set[str]) -> bool:
    stack, seen = [role], set()
    while stack:
        r = stack.pop()
        if r in with_purpose:
            return True
        if r not in seen:
            seen.add(r)
            stack.extend(parents.get(r, []))
    return False


def _depth(role: str, parents: Mapping[str, list[str]], path: set[str]) -> int:
    if role in path:
        return -1
    deepest = 0
    for parent in parents.get(role, []):
        d = _depth(parent, parents, path | {role})
        if d < 0:
            return -1
        deepest = max(deepest, d + 1)
    return deepest


_SECTION = re.compile(r"^\[(\w+)\]$")


def lint_model(text: str, file: str = "model.conf") -> list[Finding]:
    """The model pitfalls pycasbin does not report: inline comments and conditional role links."""
    findings: list[Finding] = []
    section = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if m := _SECTION.match(line):
            section = m.group(1)
            continue
        if "#" in line:
            findings.append(Finding(file, number, Severity.ERROR,
                                    "a comment after a definition renames its last token",
                                    "put comments on their own line"))
        if section == "role_definition" and "(" in line:
            findings.append(Finding(file, number, Severity.ERROR,
                                    "conditional role links make every plain g() check false in pycasbin 2.8",
                                    "FieldGuard keeps expiring grants (cover, break-glass) itself"))
    return findings


# ------------------------------------------------------------------------------------- bundle coverage
def coverage_warnings(fieldmap: FieldMap, table: DecisionTable, rules: Iterable[Rule]) -> list[Finding]:
    """What a bundle says that can never matter, or leaves to chance: warnings, never errors."""
    found: list[Finding] = []
    mentioned = {r.field_class for r in rules}
    for name in fieldmap.classes:
        if name not in mentioned:
            found.append(Finding("fields.yaml", None, Severity.WARNING, f"class {name!r} is named by no rule",
                                 "every field of it is removed for every role; remove the class or add rules"))
    visible = {c for v in table.views.values() for c, d in v.classes.items() if d.outcome is not Outcome.REMOVE}
    for resource in fieldmap.resources.values():
        for spec in resource.specs:
            classes = {spec.field_class} | ({spec.flag_class} if spec.flag_class else set())
            if not classes & visible:
                found.append(Finding("fields.yaml", spec.line, Severity.WARNING,
                                     f"{resource.name}.{spec.path} ({spec.field_class}) is shown to no role",
                                     "it is always removed: expected?"))
        if resource.client_field is None and any(
            d.rule is not None and d.rule.relation is not Relation.ANY
            for v in table.views.values() for c, d in v.classes.items() if c in resource.classes
        ):
            found.append(Finding("fields.yaml", None, Severity.WARNING,
                                 f"resource {resource.name} has no client field, but rules grant its classes "
                                 "through a relation", "its records are decided under relation any only"))
    for route in fieldmap.routes:
        res = fieldmap.resources.get(route.resource)
        if (res is not None and res.client_field is not None and route.shape.value == "list"
                and route.filter_param is None and route.client_param is None):
            found.append(Finding("fields.yaml", line_of_source(route.source), Severity.WARNING,
                                 f"list route {route.method} {route.template} has no client filter",
                                 "rows the caller may not see are fetched and dropped; add filter: "
                                 f"{res.client_field}"))
    return found


def line_of_source(source: str) -> int | None:
    tail = source.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None

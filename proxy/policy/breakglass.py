"""Break-glass rules: who may open a client they have no relation to in an emergency, why, and for how long.

`policies/breakglass.yaml` is the officers' file. Each reason is coded (a reason list the service chose,
mapped to an HL7 purpose of use, ETREAT for an emergency), the roles that may ask are listed, a grant is
time-boxed (a default and a maximum, in minutes), and every use must be reviewed within `review_days`.
Which classes a grant opens is not said here: policy.csv says it, with rows under the relation
`breakglass`, in the officers' one language for what is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.policy.yamlfile import MapError, line_of, load_rules

FILE = "breakglass.yaml"
PURPOSES = frozenset({"ETREAT", "TREAT", "HOPERAT"})
_KEYS = {"reasons", "roles", "default_minutes", "max_minutes", "review_days", "min_justification_chars"}


@dataclass(frozen=True, slots=True)
class Reason:
    """One coded reason a practitioner may give (`risk_to_self`, `child_safeguarding`, ...)."""

    code: str
    label: str
    purpose: str  # the purpose of use the grant's requests carry


@dataclass(frozen=True, slots=True)
class BreakGlassRules:
    reasons: dict[str, Reason]
    roles: frozenset[str]  # the roles that may ask
    default_minutes: int = 60
    max_minutes: int = 60
    review_days: int = 5  # a use unreviewed for longer is overdue (counted in /metrics and /readyz)
    min_justification_chars: int = 20  # the free text beside the code: a code alone is not a reason

    def minutes(self, asked: int | None) -> int:
        """The grant's length: the default, or what was asked, never past the maximum."""
        return self.default_minutes if asked is None else max(1, min(asked, self.max_minutes))


NONE = BreakGlassRules({}, frozenset())  # no file: nobody may break the glass


def parse_breakglass(text: str, file: str = FILE) -> BreakGlassRules:
    """The rules, or a `MapError` naming the line of the first thing wrong (an unknown key, a reason with no
    label, a purpose that is not an emergency's, a default above the maximum)."""
    doc = load_rules(text, file, _KEYS)
    if doc is None:
        return NONE
    reasons = _reasons(doc.get("reasons"), line_of(doc, "reasons"), file)
    roles = doc.get("roles") or []
    if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
        raise MapError(line_of(doc, "roles"), "roles must be a list of role names", file)
    numbers = {k: _positive(doc, k, file) for k in ("default_minutes", "max_minutes", "review_days",
                                                    "min_justification_chars") if k in doc}
    rules = BreakGlassRules(reasons, frozenset(roles), **numbers)
    if rules.default_minutes > rules.max_minutes:
        raise MapError(line_of(doc, "default_minutes"), "default_minutes is above max_minutes", file)
    if rules.roles and not rules.reasons:
        raise MapError(line_of(doc, "roles"), "roles may ask, but no reason is listed", file)
    return rules


def _reasons(value: Any, line: int | None, file: str) -> dict[str, Reason]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MapError(line, "reasons must map a code to {label, purpose}", file)
    out: dict[str, Reason] = {}
    for code, spec in value.items():
        at = line_of(value, code)
        if not isinstance(code, str) or not code.replace("_", "").isalnum():
            raise MapError(at, f"reason code {code!r} must be letters, digits and _", file)
        if not isinstance(spec, dict) or set(spec) - {"label", "purpose"} or not str(spec.get("label", "")).strip():
            raise MapError(at, f"reason {code} needs a label (and may name a purpose)", file)
        purpose = str(spec.get("purpose", "ETREAT"))
        if purpose not in PURPOSES:
            raise MapError(at, f"reason {code}: purpose {purpose} is not one of {', '.join(sorted(PURPOSES))}", file)
        out[code] = Reason(code, str(spec["label"]).strip(), purpose)
    return out


def _positive(doc: dict[str, Any], key: str, file: str) -> int:
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MapError(line_of(doc, key), f"{key} must be a whole number above 0", file)
    return value

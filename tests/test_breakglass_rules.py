"""The officers' break-glass file: the shipped one loads, and every mistake is refused at its line.
(The workflow through the gateway lands with the rest of issue 9; this is its rule file.)"""

from __future__ import annotations

import pytest

from proxy.policy.breakglass import NONE, parse_breakglass
from proxy.policy.yamlfile import MapError
from tests.conftest import REPO


def test_the_shipped_rules_load() -> None:
    rules = parse_breakglass((REPO / "policies" / "breakglass.yaml").read_text())
    assert {"risk_to_self", "child_safeguarding", "adult_safeguarding"} <= rules.reasons.keys()
    assert all(r.purpose == "ETREAT" for r in rules.reasons.values())
    assert "admin" not in rules.roles and "counsellor" in rules.roles
    assert (rules.minutes(None), rules.minutes(500), rules.minutes(15)) == (60, 60, 15)


def test_no_file_lets_nobody_break_the_glass() -> None:
    assert parse_breakglass("") is NONE and not NONE.roles


@pytest.mark.parametrize(("text", "line", "message"), [
    ("reasons: {}\nroles: [counsellor]\nmax_hours: 4\n", 3, "unknown key 'max_hours'"),
    ("reasons:\n  risk: {purpose: ETREAT}\nroles: [counsellor]\n", 2, "reason risk needs a label"),
    ("reasons:\n  risk: {label: Risk, purpose: HRESCH}\n", 2, "purpose HRESCH is not one of"),
    ("reasons:\n  risk: {label: Risk}\ndefault_minutes: 90\nmax_minutes: 60\n", 3, "default_minutes is above"),
    ("reasons:\n  risk: {label: Risk}\nmax_minutes: 0\n", 3, "max_minutes must be a whole number above 0"),
    ("roles: [counsellor]\n", 1, "roles may ask, but no reason is listed"),
    ("reasons:\n  risk: {label: Risk}\nroles: counsellor\n", 3, "roles must be a list"),
])
def test_mistakes_are_refused_at_their_line(text: str, line: int, message: str) -> None:
    with pytest.raises(MapError) as caught:
        parse_breakglass(text)
    assert caught.value.line == line and message in str(caught.value)

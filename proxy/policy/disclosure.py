"""Disclosure rules: on what bases a client's records may be released outside the service, and how.

`policies/disclosure.yaml` is the officers' file: the bases a grant may rest on (a court order, a
safeguarding referral, the client's consent, ...), whether each needs a second person's approval before
export and whether it needs a recorded consent; the requests that are refused with a reason (a
solicitor's letter); the exemptions under which the client is not told (the Terrorism Act, the Proceeds
of Crime Act); who may approve; how long a grant may run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.policy.yamlfile import MapError, line_of, load_rules

FILE = "disclosure.yaml"
_KEYS = {"bases", "refused", "notify_exempt", "approvers", "max_days"}


@dataclass(frozen=True, slots=True)
class Basis:
    code: str
    label: str
    approval: bool = True  # a second person approves before export
    consent: bool = False  # rests on a recorded consent of the client


@dataclass(frozen=True, slots=True)
class DisclosureRules:
    bases: dict[str, Basis]
    refused: dict[str, str]  # asked-for basis -> why it is not one
    notify_exempt: dict[str, str]  # exemption -> the law that makes telling the client an offence
    approvers: frozenset[str]
    max_days: int = 365


NONE = DisclosureRules({}, {}, {}, frozenset())  # no file: nothing may be disclosed


def parse_disclosure(text: str, file: str = FILE) -> DisclosureRules:
    """The rules, or a `MapError` naming the line of the first thing wrong."""
    doc = load_rules(text, file, _KEYS)
    if doc is None:
        return NONE
    bases = _bases(doc.get("bases"), line_of(doc, "bases"), file)
    refused = _texts(doc, "refused", file)
    exempt = _texts(doc, "notify_exempt", file)
    both = sorted(set(refused) & set(bases))
    if both:
        raise MapError(line_of(doc, "refused"), f"{both[0]} is both a basis and refused", file)
    approvers = doc.get("approvers") or []
    if not isinstance(approvers, list) or not all(isinstance(r, str) and r for r in approvers):
        raise MapError(line_of(doc, "approvers"), "approvers must be a list of role names", file)
    if any(b.approval for b in bases.values()) and not approvers:
        raise MapError(line_of(doc, "approvers"), "a basis needs approval, but no approver role is listed", file)
    max_days = doc.get("max_days", 365)
    if isinstance(max_days, bool) or not isinstance(max_days, int) or max_days < 1:
        raise MapError(line_of(doc, "max_days"), "max_days must be a whole number above 0", file)
    return DisclosureRules(bases, refused, exempt, frozenset(approvers), max_days)


def _bases(value: Any, line: int | None, file: str) -> dict[str, Basis]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MapError(line, "bases must map a code to {label, approval, consent}", file)
    out: dict[str, Basis] = {}
    for code, spec in value.items():
        at = line_of(value, code)
        if not isinstance(code, str) or not code.replace("_", "").isalnum():
            raise MapError(at, f"basis code {code!r} must be letters, digits and _", file)
        if not isinstance(spec, dict) or set(spec) - {"label", "approval", "consent"} \
                or not str(spec.get("label", "")).strip():
            raise MapError(at, f"basis {code} needs a label (and may say approval, consent)", file)
        flags = {k: spec[k] for k in ("approval", "consent") if k in spec}
        if not all(isinstance(v, bool) for v in flags.values()):
            raise MapError(at, f"basis {code}: approval and consent are true or false", file)
        out[code] = Basis(code, str(spec["label"]).strip(), **flags)
    return out


def _texts(doc: dict[str, Any], key: str, file: str) -> dict[str, str]:
    value = doc.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                              for k, v in value.items()):
        raise MapError(line_of(doc, key), f"{key} must map a code to the reason, in words", file)
    return {k: v.strip() for k, v in value.items()}

"""Masks: the reduced forms a field can take when policy allows `mask` but not `read`.

Each mask maps a value to a less identifying one, or to None when the value has no safe reduced
form (then the field is removed). Masks never raise: bad input means less is shown.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date
from typing import Any

Mask = Callable[[Any], Any]

# ASCII digits only: \d also matches full-width and other scripts' digits, which int() reads as numbers
_DATE = re.compile(r"^([0-9]{4})-([0-9]{2})-([0-9]{2})")
_POSTCODE = re.compile(r"^\s*([A-Za-z]{1,2}[0-9][A-Za-z0-9]?)\s*[0-9][A-Za-z]{2}\s*$")
_DOMAIN = re.compile(r"[\w-]+(?:\.[\w-]+)*")  # a host name, internationalised ones too
_DIGITS = frozenset("0123456789")


def year(value: Any) -> str | None:
    """'1987-04-12' -> '1987': enough for age-group analysis, not enough to identify."""
    m = _DATE.match(value) if isinstance(value, str) else None
    return m.group(1) if m else None


def month(value: Any) -> str | None:
    """'2026-03-14T10:00' -> '2026-03'."""
    m = _DATE.match(value) if isinstance(value, str) else None
    return f"{m.group(1)}-{m.group(2)}" if m else None


def age_band(value: Any, today: date | None = None) -> str | None:
    """A date of birth -> '30-39' (ten-year band; '90+' above)."""
    m = _DATE.match(value) if isinstance(value, str) else None
    if not m:
        return None
    today = today or date.today()
    born = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    age = today.year - born[0] - ((today.month, today.day) < born[1:])
    if age < 0:
        return None
    if age >= 90:
        return "90+"
    low = age // 10 * 10
    return f"{low}-{low + 9}"


def initials(value: Any) -> str | None:
    """'Jane Smith' -> 'J.S.'."""
    if not isinstance(value, str) or not value.strip():
        return None
    return "".join(part[0].upper() + "." for part in value.split() if part[0].isalpha()) or None


def postcode_district(value: Any) -> str | None:
    """'SW1A 1AA' -> 'SW1A' (the outward code)."""
    m = _POSTCODE.match(value) if isinstance(value, str) else None
    return m.group(1).upper() if m else None


def email_domain(value: Any) -> str | None:
    """'jane@example.org' -> '*@example.org'."""
    if isinstance(value, str) and value.count("@") == 1:
        domain = value.split("@", 1)[1].strip()
        # only a host name: whatever else follows the @ (a name, a phone number, a second line) is not shown
        return f"*@{domain}" if len(domain) <= 253 and _DOMAIN.fullmatch(domain) else None
    return None


def last4(value: Any) -> str | None:
    """'07700 900123' -> '*******0123'."""
    if not isinstance(value, str):
        return None
    digits = [c for c in value if c in _DIGITS]
    return "*" * max(len(digits) - 4, 0) + "".join(digits[-4:]) if len(digits) >= 6 else None


def present(value: Any) -> bool | None:
    """Only whether the field holds something (e.g. 'an agreement exists')."""
    return value not in (None, "", [], {})


MASKS: dict[str, Mask] = {
    "year": year,
    "month": month,
    "age_band": age_band,
    "initials": initials,
    "postcode_district": postcode_district,
    "email_domain": email_domain,
    "last4": last4,
    "present": present,
}

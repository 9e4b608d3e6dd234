"""Table tests for every mask in `proxy.masks.MASKS`, on ordinary and on hostile input.

The contract (masks.py): a mask maps a value to a less identifying one, or to None when there is no
safe reduced form; it never raises. Outputs are asserted exactly. Cases made with `was_unsafe` are
the defects these tables found (each reason says what the mask did and how it was fixed).
Cases named "shape-only" pin what the masks do today: they check a date's shape, not the calendar,
so '1987-13-45' still has a year (that reveals nothing, so it is not treated as a defect here).
"""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from proxy.masks import MASKS, age_band

TODAY = date(2026, 3, 1)  # age_band is asked with this `today` so the bands do not move with the calendar
LONG = 100_000

UNICODE_DIGITS = ("`\\d` in _DATE/_POSTCODE (and str.isdigit in last4) accepted any Unicode digit, so non-ASCII "
                  "digits passed into the output; fixed: [0-9] in both regexes, ASCII digits in last4")
EMAIL_TAIL = ("email_domain passed everything after the '@' through, so text after the domain (a name, a phone "
              "number) was shown; fixed: None unless what follows the '@' is a host name")


def was_unsafe(value: Any, expected: Any, reason: str, id: str) -> Any:
    """A case the mask got wrong before these tables: the safe output, asserted like any other."""
    return pytest.param(value, expected, id=f"{id} (was: {reason[:40]})")


def wide(text: str) -> str:
    """ASCII letters and digits as their full-width forms (U+FF10 onwards), other characters kept."""
    return "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isalnum() else c for c in text)


def arabic(text: str) -> str:
    """ASCII digits as Arabic-Indic digits ('1987' -> '١٩٨٧')."""
    return "".join(chr(ord(c) - ord("0") + 0x660) if c in "0123456789" else c for c in text)


def same(got: Any, expected: Any) -> bool:
    """Equal and of the same type (True is not 1, None is not False)."""
    return type(got) is type(expected) and got == expected


# ---------------------------------------------------------------------------------------------- year
@pytest.mark.parametrize(("value", "expected"), [
    pytest.param("1987-04-12", "1987", id="date"),
    pytest.param("2026-03-14T10:00:00Z", "2026", id="datetime"),
    pytest.param("1987-04-12 ", "1987", id="trailing-space"),
    pytest.param("1987-04-12\nJane Smith", "1987", id="newline-then-name-only-year-shown"),
    pytest.param("1987-04-12" + "x" * LONG, "1987", id="long-tail"),
    pytest.param("1987-13-45", "1987", id="impossible-month-day-shape-only"),
    pytest.param("87-04-12", None, id="two-digit-year"),
    pytest.param("1987/04/12", None, id="slashes"),
    pytest.param(" 1987-04-12", None, id="leading-space"),
    pytest.param("\x001987-04-12", None, id="leading-nul"),
    pytest.param("1987", None, id="year-alone"),
    pytest.param("1" * LONG, None, id="long-digits"),
    pytest.param("", None, id="empty"),
    pytest.param(" \t\n", None, id="whitespace"),
    was_unsafe(wide("1987-04-12"), None, UNICODE_DIGITS, id="full-width-digits"),
    was_unsafe(arabic("1987-04-12"), None, UNICODE_DIGITS, id="arabic-indic-digits"),
])
def test_year(value: Any, expected: Any) -> None:
    assert same(MASKS["year"](value), expected)


# --------------------------------------------------------------------------------------------- month
@pytest.mark.parametrize(("value", "expected"), [
    pytest.param("2026-03-14T10:00", "2026-03", id="datetime"),
    pytest.param("1987-04-12", "1987-04", id="date"),
    pytest.param("2026-03-14\x00secret", "2026-03", id="nul-tail"),
    pytest.param("1987-13-45", "1987-13", id="impossible-month-shape-only"),
    pytest.param("2026-03", None, id="no-day"),
    pytest.param("March 2026", None, id="words"),
    pytest.param("", None, id="empty"),
    was_unsafe(wide("2026-03-14"), None, UNICODE_DIGITS, id="full-width-digits"),
])
def test_month(value: Any, expected: Any) -> None:
    assert same(MASKS["month"](value), expected)


# ------------------------------------------------------------------------------------------ age_band
@pytest.mark.parametrize(("value", "expected"), [
    pytest.param("1987-04-12", "30-39", id="ordinary"),
    pytest.param("2026-03-01", "0-9", id="born-today"),
    pytest.param("2016-03-02", "0-9", id="nine-day-before-ten"),
    pytest.param("2016-03-01", "10-19", id="ten-today"),
    pytest.param("1986-03-02", "30-39", id="day-before-40"),
    pytest.param("1986-03-01", "40-49", id="forty-today"),
    pytest.param("1936-03-02", "80-89", id="89-day-before-90"),
    pytest.param("1936-03-01", "90+", id="90-today"),
    pytest.param("1926-03-01", "90+", id="100"),
    pytest.param("2026-03-02", None, id="future-by-a-day"),
    pytest.param("2031-01-01", None, id="future"),
    pytest.param("2026-02-30", "0-9", id="feb-30-shape-only"),
    pytest.param("1987-13-45", "30-39", id="impossible-month-shape-only"),
    pytest.param("87-04-12", None, id="two-digit-year"),
    pytest.param("", None, id="empty"),
    was_unsafe(wide("1987-04-12"), None, UNICODE_DIGITS, id="full-width-digits"),
])
def test_age_band(value: Any, expected: Any) -> None:
    assert same(age_band(value, today=TODAY), expected)


def test_age_band_through_masks_uses_today_and_still_fails_closed() -> None:
    assert MASKS["age_band"]("1900-01-01") == "90+"
    assert MASKS["age_band"]("9999-01-01") is None


# ------------------------------------------------------------------------------------------ initials
@pytest.mark.parametrize(("value", "expected"), [
    pytest.param("Jane Smith", "J.S.", id="ordinary"),
    pytest.param("  Jane   Smith  ", "J.S.", id="odd-spacing"),
    pytest.param("Mary-Jane O'Brien", "M.O.", id="hyphen-apostrophe"),
    pytest.param("Jane", "J.", id="one-word"),
    pytest.param("Jane\nSmith", "J.S.", id="newline-separates"),
    pytest.param("Jane\u00a0Smith", "J.S.", id="nbsp-separates"),
    pytest.param("Jane\x00Smith", "J.", id="nul-is-not-a-separator"),
    pytest.param("E\u0301mile Zola", "E.Z.", id="combining-accent-dropped"),
    pytest.param("\u0301\u0301\u0301", None, id="combining-marks-only"),
    pytest.param(wide("Jane Smith"), wide("J.S."), id="full-width-letters-one-each"),
    pytest.param("مريم أحمد", "م.أ.", id="rtl-arabic"),
    pytest.param("\u202eJane Smith", "S.", id="rtl-override-glued-to-first-word"),
    pytest.param("\U0001f600 Smith", "S.", id="emoji-word-skipped"),
    pytest.param("123 456", None, id="digits-only"),
    pytest.param("a " * (LONG // 2), "A." * (LONG // 2), id="long"),
    pytest.param("", None, id="empty"),
    pytest.param(" \t\n", None, id="whitespace"),
    pytest.param("\u00a0\u2003\u3000", None, id="unicode-whitespace"),
])
def test_initials(value: Any, expected: Any) -> None:
    assert same(MASKS["initials"](value), expected)


# --------------------------------------------------------------------------------- postcode_district
@pytest.mark.parametrize(("value", "expected"), [
    pytest.param("SW1A 1AA", "SW1A", id="ordinary"),
    pytest.param("SW1A1AA", "SW1A", id="no-space"),
    pytest.param("  sw1a   1aa  ", "SW1A", id="odd-spacing"),
    pytest.param("SW1A\t1AA\n", "SW1A", id="tab-and-newline"),
    pytest.param("SW1A\u00a01AA", "SW1A", id="nbsp"),
    pytest.param("M1 1AE", "M1", id="A9"),
    pytest.param("DN55 1PT", "DN55", id="AA99"),
    pytest.param("EC1A1BB", "EC1A", id="AA9A-no-space"),
    pytest.param("SW11AA", "SW1", id="ambiguous-no-space"),
    pytest.param("SW1A", None, id="outward-only"),
    pytest.param("SW1A 1A", None, id="short-inward"),
    pytest.param("SW1A-1AA", None, id="hyphen"),
    pytest.param("SW1A 1AA, London", None, id="trailing-text"),
    pytest.param("SW1A 1AA\x00", None, id="trailing-nul"),
    pytest.param("GIR 0AA", None, id="girobank-not-matched"),
    pytest.param(wide("SW") + "1A 1AA", None, id="full-width-letters"),
    pytest.param(" " * LONG, None, id="long-whitespace"),
    pytest.param("", None, id="empty"),
    was_unsafe("SW" + wide("1") + "A 1AA", None, UNICODE_DIGITS, id="full-width-digit-in-outward-code"),
    was_unsafe("SW1A " + wide("1") + "AA", None, UNICODE_DIGITS, id="full-width-digit-in-inward-code"),
])
def test_postcode_district(value: Any, expected: Any) -> None:
    assert same(MASKS["postcode_district"](value), expected)


# -------------------------------------------------------------------------------------- email_domain
@pytest.mark.parametrize(("value", "expected"), [
    pytest.param("jane@example.org", "*@example.org", id="ordinary"),
    pytest.param("JANE@EXAMPLE.ORG", "*@EXAMPLE.ORG", id="upper-case-kept"),
    pytest.param("jane@example.org   ", "*@example.org", id="trailing-spaces"),
    pytest.param("jane@ example.org", "*@example.org", id="space-after-at"),
    pytest.param("jane.smith+tag@mail.example.co.uk", "*@mail.example.co.uk", id="subdomains"),
    pytest.param("@example.org", "*@example.org", id="empty-local-part"),
    pytest.param("jane@bücher.de", "*@bücher.de", id="idn-domain"),
    pytest.param("x" * LONG + "@example.org", "*@example.org", id="long-local-part"),
    pytest.param("jane.example.org", None, id="no-at"),
    pytest.param("jane@smith@example.org", None, id="two-ats"),
    pytest.param("jane@", None, id="no-domain"),
    pytest.param("jane@ \t", None, id="blank-domain"),
    pytest.param("", None, id="empty"),
    was_unsafe("jane@example.org (Jane Smith, 07700 900123)", None, EMAIL_TAIL, id="comment-after-domain"),
    was_unsafe("jane@example.org\nJane Smith", None, EMAIL_TAIL, id="newline-then-name"),
    was_unsafe("jane@example.org\x00Jane Smith", None, EMAIL_TAIL, id="nul-then-name"),
])
def test_email_domain(value: Any, expected: Any) -> None:
    assert same(MASKS["email_domain"](value), expected)


# --------------------------------------------------------------------------------------------- last4
@pytest.mark.parametrize(("value", "expected"), [
    pytest.param("07700 900123", "*******0123", id="ordinary"),
    pytest.param("(020) 7946-0018", "*******0018", id="punctuation"),
    pytest.param("07700\n900\x00123", "*******0123", id="newline-and-nul"),
    pytest.param("123456", "**3456", id="six-digits"),
    pytest.param("12345", None, id="five-digits"),
    pytest.param("12 34", None, id="four-digits"),
    pytest.param("0770-090-0123 ext 5", "********1235", id="extension-digits-count"),
    pytest.param("1" * LONG, "*" * (LONG - 4) + "1111", id="long"),
    pytest.param("no phone", None, id="no-digits"),
    pytest.param("", None, id="empty"),
    was_unsafe(wide("07700 900123"), None, UNICODE_DIGITS, id="full-width-digits"),
])
def test_last4(value: Any, expected: Any) -> None:
    assert same(MASKS["last4"](value), expected)


# ------------------------------------------------------------------------------------------- present
@pytest.mark.parametrize(("value", "expected"), [
    pytest.param(None, False, id="none"),
    pytest.param("", False, id="empty-string"),
    pytest.param([], False, id="empty-list"),
    pytest.param({}, False, id="empty-dict"),
    pytest.param("agreement.pdf", True, id="string"),
    pytest.param(" ", True, id="whitespace-is-something"),
    pytest.param(0, True, id="zero"),
    pytest.param(False, True, id="false-is-something"),
    pytest.param([None], True, id="list-of-none"),
    pytest.param({"a": None}, True, id="dict"),
    pytest.param(b"", True, id="empty-bytes-not-json"),
])
def test_present(value: Any, expected: Any) -> None:
    assert same(MASKS["present"](value), expected)


# ---------------------------------------------------------------------------------- across all masks
NOT_STRINGS: list[Any] = [None, 0, 1987, 19870412, -1, 1.5, float("inf"), float("nan"), True, False, [],
                          ["1987-04-12"], {}, {"value": "jane@example.org"}, b"1987-04-12", bytearray(b"SW1A 1AA"),
                          date(1987, 4, 12), ("Jane", "Smith")]

# Non-empty strings that identify someone (or could): a mask must reduce them or give None, never echo them.
IDENTIFYING = ["Jane Smith", "jane@example.org", "1987-04-12", "SW1A 1AA", "07700 900123", "  Jane Smith  ",
               "Jane\nSmith", "Jane\x00Smith", "jane@example.org\n", wide("Jane Smith"), wide("1987-04-12"),
               wide("07700 900123"), "مريم أحمد", "\u202eJane Smith", "E\u0301mile Zola", "Jane\u00a0Smith 😀",
               "1987-04-12T10:00 Jane Smith SW1A 1AA", "Jane " * 20_000, "1" * LONG, "@" * LONG,
               "jane@" + "x" * LONG]

HOSTILE: list[Any] = [*NOT_STRINGS, *IDENTIFYING, "", " ", "\x00", "\u3000", "1987-13-45", "2026-02-30", "87-04-12",
                      "a@b@c", "@", "12345"]

STRING_MASKS = sorted(set(MASKS) - {"present"})


@pytest.mark.parametrize("name", STRING_MASKS)
def test_string_masks_give_none_for_anything_not_a_string(name: str) -> None:
    mask = MASKS[name]
    for value in NOT_STRINGS:
        assert mask(value) is None, (name, value)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_masks_never_raise_and_never_echo_identifying_input(name: str) -> None:
    mask = MASKS[name]
    for value in HOSTILE:
        got = mask(value)  # must not raise
        if name == "present":
            assert type(got) is bool, value
            continue
        assert got is None or type(got) is str, (value, got)
        if isinstance(value, str) and value.strip():
            assert got != value, f"{name} echoed {value[:40]!r}"


def test_every_mask_is_covered() -> None:
    assert set(MASKS) == {"year", "month", "age_band", "initials", "postcode_district", "email_domain", "last4",
                          "present"}

"""What auditors, data-protection officers and clients ask of the trail: queries, the "who accessed my
record" report (the exports to other systems are `proxy.audit.exports`).

A view reads what is stored, and what is stored may have been edited by hand (sqlite3 keeps a Python str
as TEXT where the writer stored a BLOB, and the text need not even be JSON): a body that is not a JSON
object is left out and counted, never a traceback, and every view says when the trail does not verify
(`Integrity`, from the same verification as `fieldguard audit verify`)."""

from __future__ import annotations

import html
import json
import re
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.audit.exports import names_in
from proxy.audit.stores import AuditStore, is_shared
from proxy.audit.trail import connect
from proxy.config import Settings

if TYPE_CHECKING:
    from proxy.audit.verify import Verdict


# ---------------------------------------------------------------------------------------------- reading
def parse(body: object) -> dict[str, Any] | None:
    """A stored body as the record it should be, or None when it is not one: bytes (as the gateway writes
    them) or text (as sqlite3 stores a str written by hand), holding a JSON object."""
    if isinstance(body, memoryview):
        body = bytes(body)
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(body, str):
        return None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


@dataclass(slots=True)
class Found:
    """The records a view read, and the sequence numbers of those it could not read (left out, and said)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)


def _rows(store: AuditStore) -> Iterator[tuple[int, object, object]]:
    if is_shared(store):
        from proxy.audit.pgverify import shared_rows

        yield from shared_rows(str(store))
        return
    conn = connect(Path(store), readonly=True)
    try:
        yield from conn.execute("SELECT seq, recorded_at, body FROM audit_records ORDER BY seq")
    finally:
        conn.close()


def all_records(store: AuditStore, unreadable: list[int]) -> Iterator[dict[str, Any]]:
    """Every readable record in order; the sequence number of each unreadable one is appended to `unreadable`."""
    for seq, _at, body in _rows(store):
        record = parse(body)
        if record is None:
            unreadable.append(int(seq))
        else:
            yield record


@dataclass(frozen=True, slots=True)
class Query:
    pseudonym: str | None = None  # the client, already resolved from their CRM id through the keystore
    user: str | None = None
    role: str | None = None
    purpose: str | None = None
    since: str | None = None  # ISO 8601
    until: str | None = None
    outcome: str | None = None  # allowed | denied | error | dry-run | break-glass
    limit: int = 1000


def query(store: AuditStore, q: Query) -> Found:
    """Matching records in order, at most `q.limit`. Every record is read (it is checked whether it can be),
    so the unreadable ones of the whole trail are counted, not only those before the limit.
    Raises ValueError for a `since` or `until` that is not ISO 8601."""
    since = datetime.fromisoformat(q.since).timestamp() if q.since is not None else None
    until = datetime.fromisoformat(q.until).timestamp() if q.until is not None else None
    user = q.user if q.user is None or q.user.startswith("u:") else f"u:{q.user}"
    found = Found()
    amended: dict[str, str] = {}  # request id -> the record saying its response was withheld after all
    for seq, recorded_at, body in _rows(store):
        record = parse(body)
        if record is None:
            found.unreadable.append(int(seq))
            continue
        if isinstance(record.get("amends"), str):
            amended[record["amends"]] = str(record.get("request_id"))
        if len(found.records) >= q.limit:
            continue
        at = recorded_at if isinstance(recorded_at, int | float) else None
        if since is not None and (at is None or at < since):
            continue
        if until is not None and (at is None or at >= until):
            continue
        if q.pseudonym is not None and not _names_client(record.get("clients"), q.pseudonym):
            continue
        if any(want is not None and record.get(key) != want
               for key, want in (("user", user), ("role", q.role), ("purpose", q.purpose))):
            continue
        if q.outcome == "break-glass":
            if record.get("break_glass") is None:
                continue
        elif q.outcome is not None and record.get("outcome") != q.outcome:
            continue
        found.records.append(record)
    for record in found.records:  # a view's own field: the stored record is left as it was committed
        if record.get("request_id") in amended:
            record["amended_by"] = amended[record["request_id"]]
    return found


def _names_client(clients: object, pseudonym: str) -> bool:
    return pseudonym in clients if isinstance(clients, list) else clients == pseudonym


# ---------------------------------------------------------------------------------------------- integrity
@dataclass(frozen=True, slots=True)
class Integrity:
    """What `fieldguard audit verify` says of the trail a view was made from. A view of a trail that does
    not verify says so, with the first bad record, wherever it goes (stderr, the table, the report)."""

    ok: bool
    problems: tuple[str, ...] = ()
    first_bad: int | None = None
    records: int = 0  # in the trail
    verified: int = 0  # in order, up to the first bad one
    unsigned: str | None = None  # intact, but not covered to its end by a recent signed checkpoint: why

    def warnings(self, unreadable: Sequence[int] = ()) -> list[str]:
        out: list[str] = []
        if self.unsigned is not None:
            out.append(f"the audit trail is not verified to its end: {self.unsigned}")
        if not self.ok:
            text = "the audit trail does not verify: " + (self.problems[0] if self.problems else "unknown problem")
            if self.first_bad is not None:
                text += (f"; record {self.first_bad} and every record after it are unverified, so what follows "
                         f"may not be what was recorded")
            out.append(text + " (`fieldguard audit verify` says more)")
        if unreadable:
            shown = ", ".join(str(s) for s in unreadable[:10]) + (", ..." if len(unreadable) > 10 else "")
            few = len(unreadable) == 1
            out.append(f"{len(unreadable)} record{'' if few else 's'} of the trail could not be read (not a JSON "
                       f"record) and {'is' if few else 'are'} left out: {shown}")
        return out

    def as_dict(self, unreadable: Sequence[int] = ()) -> dict[str, Any]:
        return {"verified": self.ok and self.unsigned is None, "records": self.records,
                "verified_records": self.verified, "first_bad_record": self.first_bad,
                "problems": list(self.problems), "unsigned": self.unsigned, "unreadable_records": list(unreadable)}


def tail_pending(verdict: Verdict, settings: Settings) -> bool:
    """True when the unsigned tail is what a running gateway leaves between checkpoints: the last checkpoint
    is at most two intervals old and the tail no longer than one. Anything older is a trail whose later
    checkpoints are gone (or a gateway killed before its last), and is reported as such."""
    if not verdict.unanchored or not verdict.last_checkpoint_time:
        return False
    try:
        signed = datetime.fromisoformat(verdict.last_checkpoint_time)
    except ValueError:
        return False
    age = (datetime.now(UTC) - signed).total_seconds()
    audit = settings.audit
    return -5.0 <= age <= 2 * audit.checkpoint_seconds + 5.0 and verdict.unanchored <= audit.checkpoint_every


def integrity_of(settings: Settings, store: AuditStore, public_key: Path | None) -> Integrity:
    """The verification `audit verify` does (without --anchor), for a view to say when its trail does not
    verify (an edit, a gap, a bad signature: named), or is intact but not signed to its end (said apart, since
    a running gateway's first records wait a few seconds for theirs). A key that cannot be read is said too,
    rather than the view refused."""
    from proxy.audit.checkpoints import load_public, public_path
    from proxy.audit.stores import verify_store

    key_file = public_key or public_path(settings.keys.in_dir(settings.audit.signing_key))
    try:
        public = load_public(key_file)
    except ValueError as exc:  # one sentence saying what the file holds instead
        return Integrity(ok=False, problems=(f"it could not be checked: {exc}; pass --public-key with the "
                                             "checkpoint key you were given",))
    except OSError as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return Integrity(ok=False, problems=(f"it could not be checked: {key_file} is not a readable Ed25519 "
                                             f"public key ({why}); pass --public-key",))
    verdict = verify_store(store, public)
    unsigned = None
    if verdict.ok and verdict.total == 0:
        unsigned = "the trail holds no record (an emptied store looks like this)"
    elif verdict.ok and verdict.unanchored and not tail_pending(verdict, settings):
        unsigned = (f"records {verdict.last_checkpoint + 1} to {verdict.records} are covered by no recent signed "
                    "checkpoint: `fieldguard audit verify` fails on them until the gateway signs them (a running "
                    "one does within seconds), since a trail re-linked with its checkpoints deleted looks the same")
    return Integrity(ok=verdict.ok, problems=tuple(verdict.problems), first_bad=verdict.first_bad,
                     records=verdict.total, verified=verdict.records, unsigned=unsigned)


# ---------------------------------------------------------------------------------------------- the table
TABLE_COLUMNS = ("seq", "at (UTC)", "user", "role", "method", "route", "status", "outcome", "clients")
TABLE_WIDTH = 120  # what a terminal shows without wrapping; `--format json` has everything
_WIDEST = (8, 19, 16, 16, 6, 36, 6, 8, 24)  # a cell longer ends in an ellipsis
# when the table is still too wide, these give way in this order, each down to its narrowest
_GIVE_WAY = ((8, 12), (2, 10), (3, 10), (5, 18))
_GAP = " "


def table(records: list[dict[str, Any]], warnings: Sequence[str] = ()) -> str:
    """The records as a table no wider than TABLE_WIDTH: cells too long end in an ellipsis, several clients
    show as the first and how many more, a route's ids as {…}; warnings come first, wrapped to the width."""
    rows = [[_printable(c) for c in _row(r)] for r in records]
    widths = [min(top, max([len(h), *(len(row[i]) for row in rows)]))
              for i, (h, top) in enumerate(zip(TABLE_COLUMNS, _WIDEST, strict=True))]
    for column, narrowest in _GIVE_WAY:
        over = sum(widths) + len(_GAP) * (len(widths) - 1) - TABLE_WIDTH
        if over <= 0:
            break
        widths[column] = max(narrowest, widths[column] - over)
    lines = [piece for w in warnings for piece in textwrap.wrap(f"WARNING: {w}", TABLE_WIDTH, subsequent_indent="  ")]
    lines.append(_GAP.join(_fit(h, w) for h, w in zip(TABLE_COLUMNS, widths, strict=True)).rstrip())
    last = len(TABLE_COLUMNS) - 1  # clients: "P-... +2" keeps its count when the pseudonym is shortened
    lines += [_GAP.join(_fit(v, w, i == last) for i, (v, w) in enumerate(zip(row, widths, strict=True))).rstrip()
              for row in rows]
    return "\n".join(lines)


def _row(r: dict[str, Any]) -> list[str]:
    clients = r.get("clients")
    if isinstance(clients, list):
        names = [str(c) for c in clients]
        who = (names[0] + (f" +{len(names) - 1}" if len(names) > 1 else "")) if names else ""
    else:
        who = _cell(clients)
    route = _cell(r.get("route"))
    if r.get("method") != "CLI":
        route = _ROUTE_PARAM.sub("{\N{HORIZONTAL ELLIPSIS}}", route)
    return [_cell(r.get("seq")), _moment(r.get("time")), _cell(r.get("user")).removeprefix("u:"),
            _cell(r.get("role")), _cell(r.get("method")), route, _cell(503 if r.get("amended_by") else r.get("status")),
            "withheld" if r.get("amended_by") else _cell(r.get("outcome")), who]


_ROUTE_PARAM = re.compile(r"\{[^}]*\}")  # /clients/{client_id:int}/letters is shown as /clients/{…}/letters


def _moment(value: object) -> str:
    try:
        at = datetime.fromisoformat(str(value))
    except ValueError:
        return _cell(value)
    if at.tzinfo is None:
        return _cell(value)
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)


def _printable(text: str) -> str:
    """No control characters reach the auditor's terminal (a hand-edited record could hold escapes)."""
    return "".join(ch if ch.isprintable() else "\N{REPLACEMENT CHARACTER}" for ch in text)


def _fit(text: str, width: int, keep_count: bool = False) -> str:
    if len(text) <= width:
        return text.ljust(width)
    more = _MORE.search(text) if keep_count else None
    if more is not None and width > len(more.group()) + 1:
        room = width - len(more.group()) - 1
        return text[:min(room, more.start())] + "\N{HORIZONTAL ELLIPSIS}" + more.group()
    return text[:width - 1] + "\N{HORIZONTAL ELLIPSIS}"


_MORE = re.compile(r" \+\d+$")


# ---------------------------------------------------------------------------------------------- report
def access_report(records: list[dict[str, Any]], pseudonym: str, integrity: Integrity | None = None,
                  unreadable: Sequence[int] = ()) -> dict[str, Any]:
    """Who saw the client's record, when, why and what: for a subject access request. `trail` and
    `warnings` say whether the trail it was made from verifies, and what could not be read."""
    entries = []
    disclosures = []
    for r in records:
        if r.get("amends") is not None:
            continue  # said on the record it amends
        released = r.get("disclosure")
        if isinstance(released, dict) and released.get("exemption"):
            continue  # telling the client would be an offence (the Terrorism Act, POCA): left out of their report
        if isinstance(released, dict) and r.get("route") == "disclose export" and r.get("outcome") == "allowed":
            disclosures.append({"when": r.get("time"), "to": released.get("recipient"),
                                "basis": released.get("basis"), "reference": released.get("reference"),
                                "classes": released.get("classes"), "by": r.get("user"),
                                "approved_by": released.get("approved_by")})
            continue  # a release, not an access: listed with the disclosures
        if isinstance(released, dict) and released.get("basis") == "breakglass" and r.get("outcome") == "allowed":
            disclosures.append({"when": r.get("time"), "to": released.get("recipient"), "basis": "breakglass",
                                "reference": released.get("reason"), "classes": released.get("classes"),
                                "by": r.get("user"), "approved_by": None})  # an emergency: reviewed after
        if r.get("amended_by") is not None:  # committed after its time-out: the caller got 503 and nothing
            r = {**r, "outcome": "withheld", "shown": {}, "pseudonymised": {}, "masked": {}}
        entries.append({
            "when": r.get("time"), "who": r.get("user"), "role": r.get("role"), "why": r.get("purpose"),
            "action": f"{r.get('method')} {r.get('route')}", "outcome": r.get("outcome"),
            "shown": sorted(names_in(r.get("shown"))), "pseudonymised": sorted(names_in(r.get("pseudonymised"))),
            "masked": sorted(names_in(r.get("masked"))), "withheld": sorted(names_in(r.get("removed"))),
            "break_glass": r.get("break_glass"), "disclosed_to": (released or {}).get("recipient"),
        })
    check = integrity or Integrity(ok=True)
    return {"client": pseudonym, "accesses": entries, "count": len(entries), "disclosures": disclosures,
            "trail": check.as_dict(unreadable), "warnings": check.warnings(unreadable)}


def report_html(report: dict[str, Any]) -> str:
    e = html.escape
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in (
            a["when"], a["who"], a["role"], a["why"], a["action"], a["outcome"], ", ".join(a["shown"]) or "-",
            ", ".join(a["pseudonymised"] + a["masked"]) or "-")) + "</tr>"
        for a in report["accesses"])
    disclosed = "\n".join(
        "<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in (
            d["when"], d["to"], d["basis"], d["reference"], ", ".join(d["classes"] or []), d["by"],
            d["approved_by"] or "-")) + "</tr>"
        for d in report.get("disclosures") or [])
    warnings = "\n".join(f'<p class="warning" role="alert"><strong>Warning:</strong> {e(w)}</p>'
                         for w in report.get("warnings") or [])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Who accessed this record</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px;text-align:left}}.warning{{border:2px solid #b00;background:#fee;padding:8px}}</style></head><body>
<h1>Who accessed this record</h1>
{warnings}
<p>Client reference {e(report["client"])}: {report["count"]} recorded accesses. Each line says who (user and
role), when, why (purpose of use), what they did and which kinds of information they were shown.</p>
<table><tr><th>When</th><th>Who</th><th>Role</th><th>Why</th><th>Action</th><th>Outcome</th>
<th>Shown</th><th>Shown in reduced form</th></tr>
{rows}
</table>
<h2>Released outside the service</h2>
<p>{len(report.get("disclosures") or [])} disclosure(s): to whom, on what basis, what.</p>
<table><tr><th>When</th><th>To</th><th>Basis</th><th>Reference</th><th>What</th><th>By</th><th>Approved by</th></tr>
{disclosed}
</table></body></html>
"""

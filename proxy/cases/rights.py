"""The clients' rights as cases: requests (subject access, portability, rectification, erasure) with their
statutory dates, legal holds, and the events retention runs from (a case closed, a death, a supervision
session). A mixin of `CasesStore`: the same file and connection as the other workflows."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

RIGHTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS rights_requests (
    request_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    client_id TEXT NOT NULL,
    pseudonym TEXT NOT NULL,
    received TEXT NOT NULL,
    due TEXT NOT NULL,
    reference TEXT NOT NULL,
    recorded_by TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    detail TEXT NOT NULL,
    status TEXT NOT NULL,
    closed_by TEXT,
    closed_at REAL,
    outcome TEXT
);
CREATE INDEX IF NOT EXISTS rights_requests_open ON rights_requests (status, due);
CREATE TABLE IF NOT EXISTS holds (
    client_id TEXT PRIMARY KEY,
    pseudonym TEXT NOT NULL,
    reason TEXT NOT NULL,
    held_by TEXT NOT NULL,
    held_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS client_events (
    client_id TEXT NOT NULL,
    event TEXT NOT NULL,
    on_date TEXT NOT NULL,
    recorded_by TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (client_id, event)
);
CREATE TABLE IF NOT EXISTS supervision_sessions (
    counsellor TEXT NOT NULL,
    on_date TEXT NOT NULL,
    recorded_by TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (counsellor, on_date)
);
"""

KINDS = ("access", "portability", "rectification", "erasure")
OPEN = ("open", "awaiting approval", "approved")
_OPEN_MARKS = ", ".join("?" * len(OPEN))


@dataclass(frozen=True, slots=True)
class RightsRequest:
    """A client's request under UK GDPR Arts. 15-20, from receipt to its answer."""

    request_id: str
    kind: str  # access | portability | rectification | erasure
    client_id: str
    pseudonym: str
    received: str  # ISO date the service received it
    due: str  # ISO date the answer is owed by
    reference: str  # the service's own reference (a letter, a ticket)
    recorded_by: str
    recorded_at: float
    detail: dict[str, Any] = field(default_factory=dict)
    status: str = "open"  # open | awaiting approval | approved | completed | refused
    closed_by: str | None = None
    closed_at: float | None = None
    outcome: str | None = None

    @property
    def is_open(self) -> bool:
        return self.status in OPEN


def _request(row: tuple[Any, ...]) -> RightsRequest:
    values = list(row)
    values[9] = json.loads(values[9])
    return RightsRequest(*values)


# the statements are built from these constants and placeholders only; every value is a bound parameter
_COLUMNS = ("request_id, kind, client_id, pseudonym, received, due, reference, recorded_by, recorded_at, detail, "
            "status, closed_by, closed_at, outcome")


class RightsCases:
    """The rights tables' statements; `CasesStore` supplies `_all` and `_run` on its connection."""

    async def _all(self, sql: str, args: Iterable[object] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    async def _run(self, sql: str, args: Iterable[object] = ()) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------ requests
    async def record_request(self, r: RightsRequest) -> None:
        await self._run(f"INSERT INTO rights_requests ({_COLUMNS}) VALUES ({', '.join('?' * 14)})",  # noqa: S608
                        (r.request_id, r.kind, r.client_id, r.pseudonym, r.received, r.due, r.reference,
                         r.recorded_by, r.recorded_at, json.dumps(r.detail), r.status, r.closed_by, r.closed_at,
                         r.outcome))

    async def request(self, request_id: str) -> RightsRequest | None:
        rows = await self._all(f"SELECT {_COLUMNS} FROM rights_requests WHERE request_id = ?",  # noqa: S608
                               (request_id,))
        return _request(rows[0]) if rows else None

    async def requests(self, *, kind: str | None = None, client_id: str | None = None,
                       open_only: bool = False) -> list[RightsRequest]:
        sql = f"SELECT {_COLUMNS} FROM rights_requests WHERE 1 = 1"  # noqa: S608
        args: list[object] = []
        if kind is not None:
            sql, args = sql + " AND kind = ?", [*args, kind]
        if client_id is not None:
            sql, args = sql + " AND client_id = ?", [*args, client_id]
        if open_only:
            sql += f" AND status IN ({_OPEN_MARKS})"
            args += list(OPEN)
        return [_request(r) for r in await self._all(sql + " ORDER BY due, recorded_at", args)]

    async def update_request(self, request_id: str, status: str, *, detail: dict[str, Any] | None = None,
                             closed_by: str | None = None, closed_at: float | None = None,
                             outcome: str | None = None, due: str | None = None) -> bool:
        """Move an open request on; False if it was not open (closed meanwhile by someone else)."""
        sets, args = ["status = ?"], list[object]([status])
        for column, value in (("closed_by", closed_by), ("closed_at", closed_at), ("outcome", outcome), ("due", due)):
            if value is not None:
                sets.append(f"{column} = ?")
                args.append(value)
        if detail is not None:
            sets.append("detail = ?")
            args.append(json.dumps(detail))
        return await self._run(f"UPDATE rights_requests SET {', '.join(sets)} WHERE request_id = ? "  # noqa: S608
                               f"AND status IN ({_OPEN_MARKS})", (*args, request_id, *OPEN)) == 1

    async def overdue_requests(self, today: str) -> int:
        rows = await self._all(f"SELECT COUNT(*) FROM rights_requests WHERE due < ? AND status IN ({_OPEN_MARKS})",  # noqa: S608
                               (today, *OPEN))
        return int(rows[0][0])

    # ------------------------------------------------------------------ legal holds
    async def hold(self, client_id: str, pseudonym: str, reason: str, by: str, now: float) -> bool:
        return await self._run("INSERT OR IGNORE INTO holds (client_id, pseudonym, reason, held_by, held_at) "
                               "VALUES (?, ?, ?, ?, ?)", (client_id, pseudonym, reason, by, now)) == 1

    async def release_hold(self, client_id: str) -> bool:
        return await self._run("DELETE FROM holds WHERE client_id = ?", (client_id,)) == 1

    async def holds(self) -> dict[str, dict[str, Any]]:
        rows = await self._all("SELECT client_id, pseudonym, reason, held_by, held_at FROM holds")
        return {r[0]: {"pseudonym": r[1], "reason": r[2], "by": r[3], "at": r[4]} for r in rows}

    # ------------------------------------------------------------------ what retention runs from
    async def record_event(self, client_id: str, event: str, on_date: str, by: str, now: float) -> bool:
        """One event of a kind per client (a death, a case closed): False if it was recorded already."""
        return await self._run("INSERT OR IGNORE INTO client_events (client_id, event, on_date, recorded_by, "
                               "recorded_at) VALUES (?, ?, ?, ?, ?)", (client_id, event, on_date, by, now)) == 1

    async def events(self, client_id: str | None = None) -> dict[str, dict[str, str]]:
        """client id -> event -> ISO date."""
        sql, args = "SELECT client_id, event, on_date FROM client_events", tuple[str, ...]()
        if client_id is not None:
            sql, args = sql + " WHERE client_id = ?", (client_id,)
        out: dict[str, dict[str, str]] = {}
        for cid, event, on in await self._all(sql, args):
            out.setdefault(cid, {})[event] = on
        return out

    async def record_supervision(self, counsellor: str, on_date: str, by: str, now: float) -> bool:
        return await self._run("INSERT OR IGNORE INTO supervision_sessions (counsellor, on_date, recorded_by, "
                               "recorded_at) VALUES (?, ?, ?, ?)", (counsellor, on_date, by, now)) == 1

    async def supervision_sessions(self) -> dict[str, list[str]]:
        """counsellor -> the dates of their supervision sessions, in order."""
        out: dict[str, list[str]] = {}
        for who, on in await self._all("SELECT counsellor, on_date FROM supervision_sessions ORDER BY on_date"):
            out.setdefault(who, []).append(on)
        return out

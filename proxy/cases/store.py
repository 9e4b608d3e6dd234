"""The cases store: break-glass grants, their reviews and the alerts owed for them, disclosures, consents,
restrictions and (`proxy.cases.rights`) the clients' requests, holds and retention events, beside the gateway.

SQLite by default (WAL, synchronous=FULL), one file every gateway and command of a deployment shares,
as they share the keystore. The trail holds the tamper-evident account of each step (every grant, use,
review and alert is an audit record); this store holds the state the workflows run on: which grants are
open, which uses wait for review, which alerts are still to be delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from proxy.cases.rights import RIGHTS_SCHEMA, RightsCases
from proxy.secretfile import private_dir

_SCHEMA = """
CREATE TABLE IF NOT EXISTS breakglass (
    grant_id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    role TEXT NOT NULL,
    client_id TEXT NOT NULL,
    pseudonym TEXT NOT NULL,
    reason TEXT NOT NULL,
    purpose TEXT NOT NULL,
    justification TEXT NOT NULL,
    classes TEXT NOT NULL,
    policy TEXT NOT NULL,
    opened_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    review_due REAL NOT NULL,
    ended_at REAL,
    ended_by TEXT
);
CREATE INDEX IF NOT EXISTS breakglass_open ON breakglass (expires_at);
CREATE INDEX IF NOT EXISTS breakglass_user ON breakglass (user, client_id);
CREATE TABLE IF NOT EXISTS reviews (
    grant_id TEXT PRIMARY KEY REFERENCES breakglass (grant_id),
    reviewer TEXT NOT NULL,
    role TEXT NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('justified', 'unjustified')),
    note TEXT NOT NULL,
    signed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS alerts (
    alert_id TEXT PRIMARY KEY,
    grant_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    delivered_at REAL,
    given_up_at REAL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS alerts_due ON alerts (delivered_at, given_up_at, next_at);
CREATE TABLE IF NOT EXISTS consents (
    consent_id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    pseudonym TEXT NOT NULL,
    classes TEXT NOT NULL,
    recipient TEXT NOT NULL,
    purpose TEXT NOT NULL,
    form TEXT NOT NULL,
    evidence_sha256 TEXT NOT NULL,
    recorded_by TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    valid_until REAL NOT NULL,
    withdrawn_at REAL,
    withdrawn_by TEXT,
    withdrawn_reason TEXT
);
CREATE TABLE IF NOT EXISTS disclosures (
    grant_id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    pseudonym TEXT NOT NULL,
    recipient TEXT NOT NULL,
    basis TEXT NOT NULL,
    reference TEXT NOT NULL,
    classes TEXT NOT NULL,
    date_from TEXT,
    date_until TEXT,
    expires_at REAL NOT NULL,
    notify INTEGER NOT NULL,
    exemption TEXT,
    consent_id TEXT REFERENCES consents (consent_id),
    granted_by TEXT NOT NULL,
    granted_at REAL NOT NULL,
    needs_approval INTEGER NOT NULL,
    approved_by TEXT,
    approved_at REAL,
    revoked_at REAL,
    revoked_reason TEXT
);
CREATE TABLE IF NOT EXISTS restrictions (
    client_id TEXT PRIMARY KEY,
    pseudonym TEXT NOT NULL,
    reason TEXT NOT NULL,
    restricted_by TEXT NOT NULL,
    restricted_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    release_id TEXT PRIMARY KEY,
    grant_id TEXT NOT NULL REFERENCES disclosures (grant_id),
    released_by TEXT NOT NULL,
    released_at REAL NOT NULL,
    records TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    html_sha256 TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class GrantRow:
    """One break-glass grant as stored. `justification` is sealed under the client's key where the
    deployment encrypts: it is the practitioner's words about the client, and is shredded with them."""

    grant_id: str
    user: str  # "u:alice", as audit records name callers
    role: str
    client_id: str
    pseudonym: str
    reason: str  # the coded reason (breakglass.yaml)
    purpose: str
    justification: str
    classes: tuple[str, ...]
    policy: str  # the bundle hash it was granted under
    opened_at: float
    expires_at: float
    review_due: float
    ended_at: float | None = None
    ended_by: str | None = None

    def open_at(self, now: float) -> bool:
        return self.opened_at <= now < self.expires_at and self.ended_at is None

    @property
    def closes_at(self) -> float:
        """When the grant stopped (or will stop) opening the client."""
        return min(self.expires_at, self.ended_at) if self.ended_at is not None else self.expires_at


@dataclass(frozen=True, slots=True)
class Review:
    grant_id: str
    reviewer: str
    role: str
    decision: str  # justified | unjustified
    note: str
    signed_at: float


@dataclass(frozen=True, slots=True)
class Alert:
    alert_id: str
    grant_id: str
    payload: dict[str, Any]
    attempts: int


@dataclass(frozen=True, slots=True)
class Consent:
    """The client's informed, written consent, as data: what, to whom, why, until when, and the evidence's hash."""

    consent_id: str
    client_id: str
    pseudonym: str
    classes: tuple[str, ...]
    recipient: str
    purpose: str
    form: str
    evidence_sha256: str
    recorded_by: str
    recorded_at: float
    valid_until: float
    withdrawn_at: float | None = None
    withdrawn_by: str | None = None
    withdrawn_reason: str | None = None

    def in_force(self, now: float) -> bool:
        return self.withdrawn_at is None and self.recorded_at <= now < self.valid_until


@dataclass(frozen=True, slots=True)
class DisclosureGrant:
    """What may be released of one client: to whom, on what basis, which classes, of which dates."""

    grant_id: str
    client_id: str
    pseudonym: str
    recipient: str
    basis: str
    reference: str
    classes: tuple[str, ...]
    date_from: str | None
    date_until: str | None
    expires_at: float
    notify: bool
    exemption: str | None
    consent_id: str | None
    granted_by: str
    granted_at: float
    needs_approval: bool
    approved_by: str | None = None
    approved_at: float | None = None
    revoked_at: float | None = None
    revoked_reason: str | None = None

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if now >= self.expires_at:
            return "expired"
        if self.needs_approval and self.approved_by is None:
            return "awaiting approval"
        return "approved"


@dataclass(frozen=True, slots=True)
class Release:
    release_id: str
    grant_id: str
    released_by: str
    released_at: float
    records: dict[str, list[str]]  # resource -> record ids released
    sha256: str
    html_sha256: str


_CONSENT = ("consent_id, client_id, pseudonym, classes, recipient, purpose, form, evidence_sha256, recorded_by, "
            "recorded_at, valid_until, withdrawn_at, withdrawn_by, withdrawn_reason")
_DISCLOSURE = ("grant_id, client_id, pseudonym, recipient, basis, reference, classes, date_from, date_until, "
               "expires_at, notify, exemption, consent_id, granted_by, granted_at, needs_approval, approved_by, "
               "approved_at, revoked_at, revoked_reason")


def _consent(row: tuple[Any, ...]) -> Consent:
    values = list(row)
    values[3] = tuple(json.loads(values[3]))
    return Consent(*values)


def _disclosure(row: tuple[Any, ...]) -> DisclosureGrant:
    values = list(row)
    values[6] = tuple(json.loads(values[6]))
    values[10], values[15] = bool(values[10]), bool(values[15])
    return DisclosureGrant(*values)


class AlreadySigned(Exception):
    """A review is signed once; a second opinion is a note in the incident process, not a new verdict."""


_GRANT = ("grant_id, user, role, client_id, pseudonym, reason, purpose, justification, classes, policy, "
          "opened_at, expires_at, review_due, ended_at, ended_by")


def _grant(row: tuple[Any, ...]) -> GrantRow:
    values = list(row)
    values[8] = tuple(json.loads(values[8]))
    return GrantRow(*values)


class CasesStore(RightsCases):
    """One aiosqlite connection shared by a process's coroutines; every statement holds the lock."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> CasesStore:
        await asyncio.to_thread(_prepare, path)
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA busy_timeout=5000")
        await db.executescript(_SCHEMA + RIGHTS_SCHEMA)
        return cls(db)

    async def close(self) -> None:
        await self._db.close()

    async def _all(self, sql: str, args: Iterable[object] = ()) -> list[tuple[Any, ...]]:
        async with self._lock, self._db.execute(sql, tuple(args)) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def _run(self, sql: str, args: Iterable[object] = ()) -> int:
        async with self._lock, self._db.execute(sql, tuple(args)) as cur:
            return int(cur.rowcount)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")

    # ------------------------------------------------------------------ grants
    async def open_grant(self, grant: GrantRow, alert: Alert | None) -> GrantRow | None:
        """Store a grant (and the alert owed for it) unless the same user already holds an open one for the
        same client: then that one is returned, and nothing is stored. Grants are not stacked."""
        async with self._transaction():
            async with self._db.execute(
                f"SELECT {_GRANT} FROM breakglass WHERE user = ? AND client_id = ? AND ended_at IS NULL "  # noqa: S608
                "AND expires_at > ?", (grant.user, grant.client_id, grant.opened_at)) as cur:
                held = await cur.fetchone()
            if held is not None:
                return _grant(tuple(held))
            await self._db.execute(
                f"INSERT INTO breakglass ({_GRANT}) VALUES ({','.join('?' * 15)})",  # noqa: S608
                (grant.grant_id, grant.user, grant.role, grant.client_id, grant.pseudonym, grant.reason,
                 grant.purpose, grant.justification, json.dumps(list(grant.classes)), grant.policy,
                 grant.opened_at, grant.expires_at, grant.review_due, None, None))
            if alert is not None:
                await self._db.execute(
                    "INSERT INTO alerts (alert_id, grant_id, payload, created_at, next_at) VALUES (?, ?, ?, ?, ?)",
                    (alert.alert_id, alert.grant_id, json.dumps(alert.payload), grant.opened_at, grant.opened_at))
        return None

    async def end_grant(self, grant_id: str, by: str, now: float, holder: str | None = None) -> bool:
        """End a grant early (its holder is done, or a reviewer found it unjustified); True if it was open.
        With `holder`, only if the grant is theirs."""
        return await self._run("UPDATE breakglass SET ended_at = ?, ended_by = ? WHERE grant_id = ? "
                               "AND (? IS NULL OR user = ?) AND ended_at IS NULL AND expires_at > ?",
                               (now, by, grant_id, holder, holder, now)) == 1

    async def open_grants(self, now: float) -> list[GrantRow]:
        return [_grant(r) for r in await self._all(
            f"SELECT {_GRANT} FROM breakglass WHERE ended_at IS NULL AND expires_at > ? "  # noqa: S608
            "ORDER BY opened_at", (now,))]

    async def grant(self, grant_id: str) -> GrantRow | None:
        rows = await self._all(f"SELECT {_GRANT} FROM breakglass WHERE grant_id = ?", (grant_id,))  # noqa: S608
        return _grant(rows[0]) if rows else None

    async def grants(self, *, unreviewed: bool = False, client_id: str | None = None,
                     limit: int = 1000) -> list[tuple[GrantRow, Review | None]]:
        """Grants newest first, each with its review (None: waiting for one)."""
        where, args = [], []
        if unreviewed:
            where.append("r.grant_id IS NULL")
        if client_id is not None:
            where.append("b.client_id = ?")
            args.append(client_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        columns = ", ".join(f"b.{c.strip()}" for c in _GRANT.split(","))
        rows = await self._all(
            f"SELECT {columns}, r.grant_id, r.reviewer, r.role, r.decision, r.note, r.signed_at "  # noqa: S608
            f"FROM breakglass b LEFT JOIN reviews r ON r.grant_id = b.grant_id {clause} "
            "ORDER BY b.opened_at DESC LIMIT ?", (*args, limit))
        return [(_grant(r[:15]), Review(*r[15:]) if r[15] is not None else None) for r in rows]

    async def review_of(self, grant_id: str) -> Review | None:
        rows = await self._all("SELECT grant_id, reviewer, role, decision, note, signed_at FROM reviews "
                               "WHERE grant_id = ?", (grant_id,))
        return Review(*rows[0]) if rows else None

    async def overdue(self, now: float) -> int:
        """Uses whose review is past due and not signed."""
        rows = await self._all("SELECT COUNT(*) FROM breakglass b LEFT JOIN reviews r ON r.grant_id = b.grant_id "
                               "WHERE r.grant_id IS NULL AND b.review_due < ?", (now,))
        return int(rows[0][0])

    async def sign(self, review: Review) -> None:
        async with self._transaction():
            async with self._db.execute("SELECT 1 FROM reviews WHERE grant_id = ?", (review.grant_id,)) as cur:
                if await cur.fetchone() is not None:
                    raise AlreadySigned(review.grant_id)
            await self._db.execute(
                "INSERT INTO reviews (grant_id, reviewer, role, decision, note, signed_at) VALUES (?, ?, ?, ?, ?, ?)",
                (review.grant_id, review.reviewer, review.role, review.decision, review.note, review.signed_at))

    # ------------------------------------------------------------------ restriction (UK GDPR Art. 18)
    async def restrict(self, client_id: str, pseudonym: str, reason: str, by: str, now: float) -> bool:
        """True if the client was not restricted already."""
        return await self._run("INSERT OR IGNORE INTO restrictions (client_id, pseudonym, reason, restricted_by, "
                               "restricted_at) VALUES (?, ?, ?, ?, ?)", (client_id, pseudonym, reason, by, now)) == 1

    async def unrestrict(self, client_id: str) -> bool:
        return await self._run("DELETE FROM restrictions WHERE client_id = ?", (client_id,)) == 1

    async def restricted(self) -> dict[str, dict[str, Any]]:
        rows = await self._all("SELECT client_id, pseudonym, reason, restricted_by, restricted_at FROM restrictions")
        return {r[0]: {"client": r[1], "reason": r[2], "by": r[3], "at": r[4]} for r in rows}

    # ------------------------------------------------------------------ consent
    async def record_consent(self, c: Consent) -> None:
        await self._run(f"INSERT INTO consents ({_CONSENT}) VALUES ({','.join('?' * 14)})",  # noqa: S608
                        (c.consent_id, c.client_id, c.pseudonym, json.dumps(list(c.classes)), c.recipient, c.purpose,
                         c.form, c.evidence_sha256, c.recorded_by, c.recorded_at, c.valid_until, None, None, None))

    async def consent(self, consent_id: str) -> Consent | None:
        rows = await self._all(f"SELECT {_CONSENT} FROM consents WHERE consent_id = ?", (consent_id,))  # noqa: S608
        return _consent(rows[0]) if rows else None

    async def consents(self, client_id: str | None = None) -> list[Consent]:
        where, args = ("WHERE client_id = ?", (client_id,)) if client_id is not None else ("", ())
        return [_consent(r) for r in await self._all(
            f"SELECT {_CONSENT} FROM consents {where} ORDER BY recorded_at DESC", args)]  # noqa: S608

    async def withdraw_consent(self, consent_id: str, by: str, reason: str, now: float) -> list[str]:
        """Withdraw a consent and revoke the grants resting on it, in one transaction; the grants revoked."""
        async with self._transaction():
            async with self._db.execute("UPDATE consents SET withdrawn_at = ?, withdrawn_by = ?, withdrawn_reason = ? "
                                        "WHERE consent_id = ? AND withdrawn_at IS NULL",
                                        (now, by, reason, consent_id)) as cur:
                if cur.rowcount != 1:
                    return []
            async with self._db.execute("SELECT grant_id FROM disclosures WHERE consent_id = ? AND revoked_at IS NULL",
                                        (consent_id,)) as cur:
                grants = [str(r[0]) for r in await cur.fetchall()]
            await self._db.execute("UPDATE disclosures SET revoked_at = ?, revoked_reason = ? WHERE consent_id = ? "
                                   "AND revoked_at IS NULL", (now, f"consent {consent_id} withdrawn", consent_id))
        return grants

    # ------------------------------------------------------------------ disclosure grants
    async def grant_disclosure(self, g: DisclosureGrant) -> None:
        await self._run(f"INSERT INTO disclosures ({_DISCLOSURE}) VALUES ({','.join('?' * 20)})",  # noqa: S608
                        (g.grant_id, g.client_id, g.pseudonym, g.recipient, g.basis, g.reference,
                         json.dumps(list(g.classes)), g.date_from, g.date_until, g.expires_at, int(g.notify),
                         g.exemption, g.consent_id, g.granted_by, g.granted_at, int(g.needs_approval), None, None,
                         None, None))

    async def disclosure(self, grant_id: str) -> DisclosureGrant | None:
        rows = await self._all(f"SELECT {_DISCLOSURE} FROM disclosures WHERE grant_id = ?", (grant_id,))  # noqa: S608
        return _disclosure(rows[0]) if rows else None

    async def disclosures(self, client_id: str | None = None) -> list[DisclosureGrant]:
        where, args = ("WHERE client_id = ?", (client_id,)) if client_id is not None else ("", ())
        return [_disclosure(r) for r in await self._all(
            f"SELECT {_DISCLOSURE} FROM disclosures {where} ORDER BY granted_at DESC", args)]  # noqa: S608

    async def approve_disclosure(self, grant_id: str, by: str, now: float) -> bool:
        return await self._run("UPDATE disclosures SET approved_by = ?, approved_at = ? WHERE grant_id = ? "
                               "AND approved_by IS NULL AND revoked_at IS NULL", (by, now, grant_id)) == 1

    async def revoke_disclosure(self, grant_id: str, reason: str, now: float) -> bool:
        return await self._run("UPDATE disclosures SET revoked_at = ?, revoked_reason = ? WHERE grant_id = ? "
                               "AND revoked_at IS NULL", (now, reason, grant_id)) == 1

    async def record_release(self, r: Release) -> None:
        await self._run("INSERT INTO releases (release_id, grant_id, released_by, released_at, records, sha256, "
                        "html_sha256) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (r.release_id, r.grant_id, r.released_by, r.released_at, json.dumps(r.records), r.sha256,
                         r.html_sha256))

    async def releases(self, grant_id: str | None = None) -> list[Release]:
        where, args = ("WHERE grant_id = ?", (grant_id,)) if grant_id is not None else ("", ())
        columns = "release_id, grant_id, released_by, released_at, records, sha256, html_sha256"
        sql = f"SELECT {columns} FROM releases {where}"  # noqa: S608
        rows = await self._all(sql + " ORDER BY released_at", args)
        return [Release(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6]) for r in rows]

    # ------------------------------------------------------------------ alerts
    async def queue_alert(self, alert: Alert, now: float) -> None:
        """An alert for a running gateway to deliver (a disclosure released by a command, not by the gateway)."""
        await self._run("INSERT INTO alerts (alert_id, grant_id, payload, created_at, next_at) VALUES (?, ?, ?, ?, ?)",
                        (alert.alert_id, alert.grant_id, json.dumps(alert.payload), now, now))

    async def due_alerts(self, now: float, hold_seconds: float, limit: int = 20) -> list[Alert]:
        """Alerts to send now, each held for `hold_seconds` so another gateway does not send it too."""
        async with self._transaction():
            async with self._db.execute(
                "SELECT alert_id, grant_id, payload, attempts FROM alerts WHERE delivered_at IS NULL "
                "AND given_up_at IS NULL AND next_at <= ? ORDER BY next_at LIMIT ?", (now, limit)) as cur:
                rows = [tuple(r) for r in await cur.fetchall()]
            for row in rows:
                await self._db.execute("UPDATE alerts SET next_at = ? WHERE alert_id = ?", (now + hold_seconds, row[0]))
        return [Alert(r[0], r[1], json.loads(r[2]), int(r[3])) for r in rows]

    async def delivered(self, alert_id: str, now: float) -> None:
        await self._run("UPDATE alerts SET delivered_at = ?, attempts = attempts + 1, last_error = NULL "
                        "WHERE alert_id = ?", (now, alert_id))

    async def failed(self, alert_id: str, error: str, next_at: float | None, now: float) -> None:
        """A failed attempt: retried at `next_at`, or given up (None) and left for the operator to see."""
        await self._run("UPDATE alerts SET attempts = attempts + 1, last_error = ?, next_at = COALESCE(?, next_at), "
                        "given_up_at = CASE WHEN ? IS NULL THEN ? ELSE NULL END WHERE alert_id = ?",
                        (error[:300], next_at, next_at, now, alert_id))

    async def alert_counts(self) -> dict[str, int]:
        rows = await self._all(
            "SELECT SUM(delivered_at IS NOT NULL), SUM(given_up_at IS NOT NULL), "
            "SUM(delivered_at IS NULL AND given_up_at IS NULL) FROM alerts")
        delivered, given_up, pending = (int(v or 0) for v in rows[0])
        return {"delivered": delivered, "given_up": given_up, "pending": pending}

    async def alerts_of(self, grant_id: str) -> list[dict[str, Any]]:
        rows = await self._all("SELECT alert_id, attempts, delivered_at, given_up_at, last_error FROM alerts "
                               "WHERE grant_id = ?", (grant_id,))
        return [dict(zip(("alert", "attempts", "delivered_at", "given_up_at", "last_error"), r, strict=True))
                for r in rows]


def _prepare(path: Path) -> None:
    private_dir(path.parent)
    if not path.exists():
        path.touch(mode=0o600)

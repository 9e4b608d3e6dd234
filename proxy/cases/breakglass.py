"""Break-glass grants: emergency access to one client, time-boxed, alerted at once and reviewed after.

A practitioner asks with a coded reason and free text (`POST /_fieldguard/break-glass`); the gateway
stores a `GrantRow`, and for that client, until it expires, the caller holds the relation `breakglass`,
which shows what policy.csv's `breakglass` rows name. The `GlassBook` is the request path's view of the
open grants (a dictionary lookup per request), re-read from the store every few seconds so a grant made
or ended on another gateway counts there too. The `Alerter` delivers the alert owed for each grant to the
configured webhook, retrying with a growing pause; the alert names the grant, never the client's data.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import structlog

from proxy.cases.store import Alert, CasesStore, GrantRow

log = structlog.get_logger("fieldguard.breakglass")

DECISIONS = ("justified", "unjustified")
REVIEWER_ROLES = ("service_manager", "dpo")


def new_grant_id() -> str:
    return "bg-" + secrets.token_hex(8)


def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")


def alert_payload(grant: GrantRow, label: str) -> dict[str, Any]:
    """What the alert says: who opened which client (by pseudonym), why (the code), what and until when.
    Never the client's CRM id, never the justification (the practitioner's words about the client)."""
    return {"event": "break-glass opened", "grant": grant.grant_id, "user": grant.user, "role": grant.role,
            "client": grant.pseudonym, "reason": grant.reason, "reason_label": label, "purpose": grant.purpose,
            "classes": list(grant.classes), "opened_at": iso(grant.opened_at), "expires_at": iso(grant.expires_at),
            "review_by": iso(grant.review_due)}


def new_alert(grant: GrantRow, label: str) -> Alert:
    return Alert("al-" + secrets.token_hex(8), grant.grant_id, alert_payload(grant, label), 0)


class GlassBook:
    """The open grants, by user and client, and the restricted clients: what the request path asks once per
    request, re-read from the cases store by one background task."""

    def __init__(self) -> None:
        self._by_user: dict[str, dict[str, GrantRow]] = {}
        self.overdue = 0  # unreviewed uses past their review date, counted at the last refresh
        self.restricted: frozenset[str] = frozenset()  # clients whose processing is restricted (Art. 18)
        self.requests_overdue = 0  # clients' requests (subject access, erasure, ...) open past their due date
        self.refreshed_at: float | None = None
        self._changes: list[tuple[bool, GrantRow]] = []  # (opened?, grant) made here since a refresh began

    def open_for(self, user: str | None, now: float) -> Mapping[str, GrantRow]:
        """The caller's open grants by client id (an empty mapping for nearly everyone)."""
        held = self._by_user.get(user or "")
        if not held:
            return {}
        return {c: g for c, g in held.items() if g.open_at(now)}

    def add(self, grant: GrantRow) -> None:
        _open(self._by_user, grant)
        self._changes.append((True, grant))

    def end(self, grant: GrantRow) -> None:
        _close(self._by_user, grant)
        self._changes.append((False, grant))

    def open_count(self, now: float) -> int:
        return sum(g.open_at(now) for held in self._by_user.values() for g in held.values())

    async def refresh(self, store: CasesStore) -> None:
        """Re-read the open grants (and the overdue count): grants made or ended by another gateway."""
        now = time.time()
        self._changes = []
        by_user: dict[str, dict[str, GrantRow]] = {}
        for grant in await store.open_grants(now):
            by_user.setdefault(grant.user, {})[grant.client_id] = grant
        self.overdue = await store.overdue(now)
        self.restricted = frozenset(await store.restricted())
        self.requests_overdue = await store.overdue_requests(datetime.now(UTC).date().isoformat())
        # a grant opened or ended here while the store was being read (committed after the read began) is not
        # in what was read: applied again, so that a grant just given is never taken back by a refresh
        for opened, grant in self._changes:
            (_open if opened else _close)(by_user, grant)
        self._changes = []
        self._by_user = by_user
        self.refreshed_at = now


@dataclass(frozen=True, slots=True)
class AlertTarget:
    url: str
    headers: Mapping[str, str]
    timeout_seconds: float = 5.0
    attempts: int = 8  # then given up, counted in /metrics, and left in the store for the operator
    first_retry_seconds: float = 2.0


class Alerter:
    """Delivers the alerts owed: each POSTed as JSON; a failure is retried after 2, 4, 8 ... seconds."""

    def __init__(self, store: CasesStore, target: AlertTarget | None) -> None:
        self.store = store
        self.target = target
        self.delivered = 0
        self.given_up = 0
        self._client: httpx.AsyncClient | None = None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def deliver(self) -> int:
        """One pass over the alerts due; the number delivered. Never raises for a webhook's fault: that is
        the alert's state (retried, then given up), not the task's."""
        target = self.target
        if target is None:
            return 0
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=target.timeout_seconds)
        sent = 0
        for alert in await self.store.due_alerts(time.time(), hold_seconds=target.timeout_seconds * 2):
            error = await self._post(alert, target)
            now = time.time()
            if error is None:
                await self.store.delivered(alert.alert_id, now)
                self.delivered += 1
                sent += 1
                log.info("break-glass alert delivered", grant=alert.grant_id, attempts=alert.attempts + 1)
                continue
            tried = alert.attempts + 1
            if tried >= target.attempts:
                await self.store.failed(alert.alert_id, error, None, now)
                self.given_up += 1
                log.error("break-glass alert given up", grant=alert.grant_id, attempts=tried, error=error)
            else:
                retry = target.first_retry_seconds * 2 ** (tried - 1)
                await self.store.failed(alert.alert_id, error, now + retry, now)
                log.warning("break-glass alert failed; retrying", grant=alert.grant_id, attempts=tried,
                            retry_in=retry, error=error)
        return sent

    async def _post(self, alert: Alert, target: AlertTarget) -> str | None:
        assert self._client is not None
        try:
            resp = await self._client.post(target.url, json=alert.payload,
                                           headers={**target.headers, "x-fieldguard-alert": alert.alert_id})
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return None if resp.status_code < 300 else f"webhook answered {resp.status_code}"


def _open(book: dict[str, dict[str, GrantRow]], grant: GrantRow) -> None:
    book.setdefault(grant.user, {})[grant.client_id] = grant


def _close(book: dict[str, dict[str, GrantRow]], grant: GrantRow) -> None:
    held = book.get(grant.user, {})
    if grant.client_id in held and held[grant.client_id].grant_id == grant.grant_id:
        del held[grant.client_id]

"""Change announcements between replicas: LISTEN/NOTIFY on one channel, plus a re-check by every reader.

A notification is only a hint to re-read now. It is sent after the change has committed, in a statement
of its own (a NOTIFY inside a transaction takes a database-wide lock at commit), and only for rare control
events (a policy published, a key shredded or rotated), never per request or per audit record. It can be
lost (the listener was reconnecting; PgBouncer in transaction mode drops LISTEN), so each reader still
re-reads every few seconds, and a reconnected listener wakes them all: a missed notification costs at
most one re-check interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog

from proxy.postgres.database import DatabaseError, connect, redact

log = structlog.get_logger("fieldguard.postgres")

CHANNEL = "fieldguard"


async def announce(conn_or_pool: Any, topic: str, detail: str = "") -> None:
    """Tell every listening replica that `topic` changed (after the change committed; never raises: the
    re-check catches up with what a lost announcement did not say)."""
    try:
        await conn_or_pool.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{topic}:{detail}"[:7000])
    except Exception as exc:
        log.warning("change announcement not sent; replicas catch up at their next re-check",
                    topic=topic, error=type(exc).__name__)


class Listener:
    """One dedicated LISTEN connection. `step` (a supervised task) connects, or proves the connection
    alive; handlers run by topic on each notification, and all of them after a reconnect, since what was
    announced meanwhile is lost."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.handlers: dict[str, list[Callable[[str], None]]] = {}
        self._conn: Any = None
        self.connected_at: float | None = None
        self.last_notification: float | None = None
        self.notifications = 0
        self.reconnects = 0

    def on(self, topic: str, handler: Callable[[str], None]) -> None:
        self.handlers.setdefault(topic, []).append(handler)

    async def step(self) -> None:
        conn = self._conn
        if conn is not None and not conn.is_closed():
            await conn.fetchval("SELECT 1")  # a dead connection raises here, and is replaced at the next step
            return
        self._conn = None
        conn = await connect(self.url, "fieldguard-listener")
        try:
            await conn.add_listener(CHANNEL, self._notified)
        except Exception as exc:
            await conn.close()
            raise DatabaseError(f"cannot LISTEN on {redact(self.url)}: {type(exc).__name__}") from None
        conn.add_termination_listener(self._lost)
        first = self.connected_at is None
        self._conn, self.connected_at = conn, time.time()
        if not first:
            self.reconnects += 1
            log.info("change listener reconnected; re-reading everything", database=redact(self.url))
            for handlers in self.handlers.values():
                for handler in handlers:
                    handler("")

    def _lost(self, conn: Any) -> None:
        if conn is self._conn:
            self._conn = None
            log.warning("change listener lost its connection; reconnecting", database=redact(self.url))

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        topic, _, detail = payload.partition(":")
        self.last_notification = time.time()
        self.notifications += 1
        for handler in self.handlers.get(topic, ()):
            try:
                handler(detail)
            except Exception as exc:  # a handler's fault never stops the listener
                log.error("change handler failed", topic=topic, error=type(exc).__name__)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            await conn.close()

    def status(self) -> dict[str, Any]:
        return {"connected": self._conn is not None and not self._conn.is_closed(),
                "last_notification": self.last_notification, "notifications": self.notifications,
                "reconnects": self.reconnects}

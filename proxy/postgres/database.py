"""Connections to the shared PostgreSQL, each kind for its own traffic.

The pool serves short statements and transactions that leave no session state behind (no SET, LISTEN,
session advisory locks or temporary tables), so asyncpg's reset query on every release (an extra round
trip, 48-66 us of client CPU per statement measured here) is turned off. The listener and any writer
that holds a session open get connections of their own (`connect`).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

T = TypeVar("T")


def blocking(work: Callable[[], Awaitable[T]]) -> T:
    """Run async database work to its end from synchronous code (a command's report, a start-up read),
    on an event loop of its own in a thread, so it works whether or not the caller is inside a loop."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((True, asyncio.run(work())))  # type: ignore[arg-type]
        except BaseException as exc:
            box.append((False, exc))

    thread = threading.Thread(target=run, name="fieldguard-db")
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def is_postgres(url: str) -> bool:
    """A store setting naming PostgreSQL rather than a file."""
    return url.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, for logs, errors and status."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


class DatabaseError(Exception):
    """PostgreSQL could not be reached or refused a statement; the message names the database, never a secret."""


class _Stateless(asyncpg.Connection):  # type: ignore[misc]
    """A pooled connection with no session state to reset."""

    def get_reset_query(self) -> str:
        return ""


class Database:
    """One PostgreSQL database: a pool for statements, and fresh dedicated connections on request."""

    def __init__(self, url: str, pool: Any) -> None:
        self.url = url
        self.pool = pool

    @classmethod
    async def open(cls, url: str, *, min_size: int = 1, max_size: int = 8, wait: float = 5.0) -> Database:
        try:
            pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, timeout=wait,
                                             command_timeout=30, connection_class=_Stateless,
                                             server_settings={"application_name": "fieldguard"})
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise DatabaseError(f"cannot connect to {redact(url)}: {type(exc).__name__}: {exc}"[:300]) from None
        return cls(url, pool)

    async def connect(self, name: str, wait: float = 5.0) -> Any:
        """A dedicated connection (the listener's, a writer's): its session state is its own."""
        return await connect(self.url, name, wait)

    async def close(self) -> None:
        await self.pool.close()

    def __repr__(self) -> str:
        return f"Database({redact(self.url)})"


async def connect(url: str, name: str = "fieldguard-tool", wait: float = 5.0) -> Any:
    """A connection of its own, named in `pg_stat_activity` (`fieldguard-listener`, ...) for operators."""
    try:
        return await asyncpg.connect(url, timeout=wait, command_timeout=30, server_settings={"application_name": name})
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseError(f"cannot connect to {redact(url)}: {type(exc).__name__}: {exc}"[:300]) from None

"""The keystore on PostgreSQL, shared by every replica of a service (`[keys] store = "postgresql://..."`).

The same rows and rules as the SQLite keystore (`proxy.keys.store`), in the project's schema (`fieldguard
db upgrade`). Reads go through a pool without session state; a shred or rotation takes the revocations
table's lock for its transaction, so revocation numbers are committed in order (a reader that has seen
number n has seen every one before it), and is announced to the other replicas after it commits.

What a shred leaves: the destroyed row keeps no wrapped bytes, but PostgreSQL keeps the old row version
in its pages until vacuumed and in its write-ahead log and backups for as long as those are kept. Each is
wrapped by the KEK, so `fieldguard keys rotate-kek --retire-old` after a shred makes them useless.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import asyncpg

from proxy.keys.store import _COLUMNS, DataKey, KeystoreConflict, KeystoreUnavailable, _row, new_pseudonym, revoked
from proxy.postgres import Database, announce, check_schema, connect

TOPIC = "keys"
P = ParamSpec("P")
R = TypeVar("R")
_LOST = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.InternalClientError,
         asyncpg.CannotConnectNowError, OSError, TimeoutError)


def _reachable(method: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """The database lost mid-call is `KeystoreUnavailable` (503, nothing released), never a stack trace."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except _LOST as exc:
            raise KeystoreUnavailable(f"the keystore database is unreachable ({type(exc).__name__})") from None
        except asyncpg.PostgresError as exc:
            if isinstance(exc, asyncpg.UniqueViolationError):
                raise
            raise KeystoreUnavailable(f"the keystore database refused a statement ({type(exc).__name__})") from None

    return call


class PgKeystore:
    """The `Keystore` on a shared PostgreSQL database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.pool: Any = db.pool

    @classmethod
    async def open(cls, url: str) -> PgKeystore:
        db = await Database.open(url)
        try:
            await check_schema(db.pool, url)
        except BaseException:
            await db.close()
            raise
        return cls(db)

    async def close(self) -> None:
        await self.db.close()

    # ------------------------------------------------------------------ data keys
    @_reachable
    async def get_many(self, key_ids: Iterable[bytes]) -> dict[bytes, DataKey]:
        ids = list(set(key_ids))
        if not ids:
            return {}
        rows = await self.pool.fetch(f"SELECT {_COLUMNS} FROM data_keys WHERE key_id = ANY($1::bytea[])", ids)  # noqa: S608
        return {bytes(r[0]): _row(tuple(r)) for r in rows}

    @_reachable
    async def active(self, client_id: str, scope: str) -> DataKey | None:
        row = await self.pool.fetchrow(
            f"SELECT {_COLUMNS} FROM data_keys WHERE client_id = $1 AND scope = $2 AND status = 'active' "  # noqa: S608
            "ORDER BY version DESC LIMIT 1", client_id, scope)
        return _row(tuple(row)) if row else None

    @_reachable
    async def next_version(self, client_id: str | None, scope: str) -> int:
        if client_id is None:
            return 1
        found = await self.pool.fetchval(
            "SELECT COALESCE(MAX(version), 0) FROM data_keys WHERE client_id = $1 AND scope = $2", client_id, scope)
        return int(found) + 1

    @_reachable
    async def add(self, key: DataKey) -> DataKey:
        """Store a new key; `KeystoreConflict` when another writer was first or its KEK was retired meanwhile.
        The KEK's advisory lock, shared here and exclusive in `retire_keks`, orders the two: the insert's
        own statement starts after any retirement of its KEK has committed, and so sees it."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock_shared(hashtext($1))", key.kek_id or "")
                status = await conn.execute(
                    f"INSERT INTO data_keys ({_COLUMNS}, linked_at) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 "  # noqa: S608
                    "WHERE NOT EXISTS (SELECT 1 FROM retired_keks WHERE kek_id = $7)",
                    key.key_id, key.client_id, key.scope, key.version, key.status.value, key.wrapped, key.kek_id,
                    key.created_at, key.created_at if key.client_id else None)
        except asyncpg.UniqueViolationError:
            raise KeystoreConflict("the client already has a key of this scope and version") from None
        if status.endswith(" 0"):
            raise KeystoreConflict(f"KEK {key.kek_id} was retired")
        return key

    @_reachable
    async def link(self, key_id: bytes, client_id: str) -> None:
        await self.pool.execute("UPDATE data_keys SET client_id = $1, linked_at = $2 WHERE key_id = $3 "
                                "AND client_id IS NULL", client_id, time.time(), key_id)

    async def _revoke(self, conn: Any, key_id: bytes | None, client_id: str | None, now: float) -> int:
        return int(await conn.fetchval("INSERT INTO revocations (key_id, client_id, at) VALUES ($1, $2, $3) "
                                       "RETURNING seq", key_id, client_id, now))

    @_reachable
    async def retire_active(self, client_id: str, scope: str) -> list[DataKey]:
        now = time.time()
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("LOCK TABLE revocations IN SHARE ROW EXCLUSIVE MODE")
                rows = await conn.fetch(
                    f"UPDATE data_keys SET status = 'decrypt_only', retired_at = $1 WHERE client_id = $2 "  # noqa: S608
                    f"AND scope = $3 AND status = 'active' RETURNING {_COLUMNS}", now, client_id, scope)
                seq = 0
                for row in rows:
                    seq = await self._revoke(conn, bytes(row[0]), client_id, now)
            if seq:
                await announce(conn, TOPIC, str(seq))
        return [_row(tuple(r)) for r in rows]

    @_reachable
    async def destroy(self, client_id: str | None, scope: str | None, reason: str,
                      key_ids: Iterable[bytes] = ()) -> list[DataKey]:
        now = time.time()
        seq = 0
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("LOCK TABLE revocations IN SHARE ROW EXCLUSIVE MODE")
                ids = list(key_ids)
                if client_id is not None:
                    query = "SELECT key_id FROM data_keys WHERE client_id = $1 AND status != 'destroyed'"
                    args: list[object] = [client_id]
                    if scope is not None:
                        query += " AND scope = $2"
                        args.append(scope)
                    ids += [bytes(r[0]) for r in await conn.fetch(query, *args)]
                rows = await conn.fetch(f"SELECT {_COLUMNS} FROM data_keys WHERE key_id = ANY($1::bytea[]) "  # noqa: S608
                                        "FOR UPDATE", list(set(ids)))
                victims = [_row(tuple(r)) for r in rows]
                for key in victims:
                    await conn.execute("UPDATE data_keys SET status = 'destroyed', wrapped = NULL, destroyed_at = $1, "
                                       "destroy_reason = $2 WHERE key_id = $3", now, reason, key.key_id)
                    seq = await self._revoke(conn, key.key_id, client_id, now)
                if client_id is not None and scope is None:
                    await conn.execute("DELETE FROM client_pseudonyms WHERE client_id = $1", client_id)
                    await conn.execute("INSERT INTO tombstones (client_id, at, reason) VALUES ($1, $2, $3) "
                                       "ON CONFLICT DO NOTHING", client_id, now, reason)
                    seq = await self._revoke(conn, None, client_id, now)
            if seq:
                await announce(conn, TOPIC, str(seq))
        return victims

    @_reachable
    async def rewrap(self, key_id: bytes, wrapped: bytes, kek_id: str) -> None:
        await self.pool.execute("UPDATE data_keys SET wrapped = $1, kek_id = $2 WHERE key_id = $3 "
                                "AND status != 'destroyed'", wrapped, kek_id, key_id)

    @_reachable
    async def needing_rewrap(self, kek_id: str, limit: int) -> list[DataKey]:
        rows = await self.pool.fetch(f"SELECT {_COLUMNS} FROM data_keys WHERE status != 'destroyed' "  # noqa: S608
                                     "AND kek_id != $1 ORDER BY key_id LIMIT $2", kek_id, limit)
        return [_row(tuple(r)) for r in rows]

    @_reachable
    async def keys_of(self, client_id: str) -> list[DataKey]:
        rows = await self.pool.fetch(f"SELECT {_COLUMNS} FROM data_keys WHERE client_id = $1 "  # noqa: S608
                                     "ORDER BY scope, version", client_id)
        return [_row(tuple(r)) for r in rows]

    # ------------------------------------------------------------------ revocations
    @_reachable
    async def revocations_since(self, seq: int) -> tuple[int, set[bytes], set[str]]:
        rows = await self.pool.fetch("SELECT seq, key_id, client_id FROM revocations WHERE seq > $1 ORDER BY seq", seq)
        return revoked(seq, rows)

    @_reachable
    async def latest_revocation(self) -> int:
        return int(await self.pool.fetchval("SELECT COALESCE(MAX(seq), 0) FROM revocations"))

    # ------------------------------------------------------------------ pseudonyms
    @_reachable
    async def pseudonyms(self, client_ids: Iterable[str]) -> dict[str, str]:
        wanted = list(set(client_ids))
        if not wanted:
            return {}
        found = {str(c): str(p) for c, p in await self.pool.fetch(
            "SELECT client_id, pseudonym FROM client_pseudonyms WHERE client_id = ANY($1::text[])", wanted)}
        missing = [c for c in wanted if c not in found]
        if missing:
            now = time.time()
            await self.pool.executemany(
                "INSERT INTO client_pseudonyms (client_id, pseudonym, created_at) SELECT $1, $2, $3 "
                "WHERE NOT EXISTS (SELECT 1 FROM tombstones WHERE client_id = $1) "
                "ON CONFLICT (client_id) DO NOTHING", [(c, new_pseudonym(), now) for c in missing])
            found.update({str(c): str(p) for c, p in await self.pool.fetch(
                "SELECT client_id, pseudonym FROM client_pseudonyms WHERE client_id = ANY($1::text[])", missing)})
        return found

    @_reachable
    async def known_pseudonym(self, client_id: str) -> str | None:
        found = await self.pool.fetchval("SELECT pseudonym FROM client_pseudonyms WHERE client_id = $1", client_id)
        return str(found) if found is not None else None

    @_reachable
    async def tombstoned(self, client_ids: Iterable[str]) -> set[str]:
        wanted = list(set(client_ids))
        if not wanted:
            return set()
        rows = await self.pool.fetch("SELECT client_id FROM tombstones WHERE client_id = ANY($1::text[])", wanted)
        return {str(r[0]) for r in rows}

    @_reachable
    async def client_of_pseudonym(self, pseudonym: str) -> str | None:
        found = await self.pool.fetchval("SELECT client_id FROM client_pseudonyms WHERE pseudonym = $1", pseudonym)
        return str(found) if found is not None else None

    # ------------------------------------------------------------------ gateways and KEK retirement
    @_reachable
    async def beat(self, instance: str, host: str, pid: int, kek_id: str | None) -> None:
        now = time.time()
        await self.pool.execute(
            "INSERT INTO gateways (instance, host, pid, kek_id, started_at, seen_at) VALUES ($1, $2, $3, $4, $5, $5) "
            "ON CONFLICT (instance) DO UPDATE SET kek_id = excluded.kek_id, seen_at = excluded.seen_at",
            instance, host, pid, kek_id, now)

    @_reachable
    async def leave(self, instance: str) -> None:
        await self.pool.execute("DELETE FROM gateways WHERE instance = $1", instance)

    @_reachable
    async def live_gateways(self, within: float) -> list[dict[str, object]]:
        now = time.time()
        rows = await self.pool.fetch("SELECT instance, host, pid, kek_id, seen_at FROM gateways WHERE seen_at >= $1 "
                                     "ORDER BY host, pid", now - within)
        return [{"instance": i, "host": h, "pid": p, "kek": k, "seen_seconds_ago": round(now - t, 1)}
                for i, h, p, k, t in rows]

    @_reachable
    async def retire_keks(self, kek_ids: Iterable[str], live_within: float) -> tuple[list[str], dict[str, str]]:
        retired: list[str] = []
        refused: dict[str, str] = {}
        async with self.pool.acquire() as conn, conn.transaction():
            for kek_id in kek_ids:  # waits for keys being stored under this KEK, and holds new ones back
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", kek_id)
                keys = int(await conn.fetchval("SELECT COUNT(*) FROM data_keys WHERE kek_id = $1 "
                                               "AND status != 'destroyed'", kek_id))
                users = await conn.fetch("SELECT host, pid FROM gateways WHERE kek_id = $1 AND seen_at >= $2",
                                         kek_id, time.time() - live_within)
                if keys:
                    refused[kek_id] = f"{keys} data keys are still wrapped by it"
                elif users:
                    refused[kek_id] = "still current in the running gateway " + ", ".join(f"{h}:{p}" for h, p in users)
                else:
                    await conn.execute("INSERT INTO retired_keks (kek_id, at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                                       kek_id, time.time())
                    retired.append(kek_id)
        return retired, refused

    @_reachable
    async def summary(self) -> dict[str, object]:
        by = [{"scope": s, "status": st, "keys": n, "clients": c} for s, st, n, c in await self.pool.fetch(
            "SELECT scope, status, COUNT(*), COUNT(DISTINCT client_id) FROM data_keys GROUP BY scope, status "
            "ORDER BY scope, status")]
        keks = {str(k): int(n) for k, n in await self.pool.fetch(
            "SELECT kek_id, COUNT(*) FROM data_keys WHERE status != 'destroyed' GROUP BY kek_id")}
        unlinked = await self.pool.fetchval("SELECT COUNT(*) FROM data_keys WHERE client_id IS NULL "
                                            "AND status != 'destroyed'")
        return {"keys": by, "wrapped_by_kek": keks, "unlinked": int(unlinked)}


_IMPORTED = {
    "data_keys": ("key_id", "client_id", "scope", "version", "status", "wrapped", "kek_id", "created_at", "linked_at",
                  "retired_at", "destroyed_at", "destroy_reason"),
    "client_pseudonyms": ("client_id", "pseudonym", "created_at"),
    "tombstones": ("client_id", "at", "reason"),
    "retired_keks": ("kek_id", "at"),
}


def _read_keystore_file(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    if not path.exists():
        raise KeystoreConflict(f"no keystore file at {path}")
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return {table: [tuple(r) for r in db.execute(f"SELECT {', '.join(cols)} FROM {table}")]  # noqa: S608
                for table, cols in _IMPORTED.items()}


async def import_keystore(path: Path, url: str, dry_run: bool = False) -> dict[str, int]:
    """Copy a keystore file into the shared database as it is (going from one process to several): every
    data key (wrapped as it was), pseudonym, tombstone and retired KEK, in one transaction. Refused when the
    database already holds a key or a pseudonym, so two keystores are never mixed."""
    rows = await asyncio.to_thread(_read_keystore_file, path)
    conn = await connect(url, "fieldguard-import")
    try:
        await check_schema(conn, url)
        async with conn.transaction():
            held = await conn.fetchval("SELECT (SELECT COUNT(*) FROM data_keys) + (SELECT COUNT(*) FROM "
                                       "client_pseudonyms)")
            if held:
                raise KeystoreConflict(f"the database's keystore is not empty ({held} keys and pseudonyms): "
                                       "nothing was imported")
            if not dry_run:
                for table, cols in _IMPORTED.items():
                    records = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows[table]]
                    await conn.copy_records_to_table(table, records=records, columns=cols)
    finally:
        await conn.close()
    return {table: len(found) for table, found in rows.items()}

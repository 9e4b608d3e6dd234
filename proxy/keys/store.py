"""The keystore: every client's wrapped data keys and audit pseudonym, beside the gateway, never in the CRM.

SQLite by default (WAL, synchronous=FULL: a committed key survives a power cut), behind the async
`Keystore` interface so a shared PostgreSQL store can follow. A destroyed key keeps its row (id,
client, scope, when, why) but loses its wrapped bytes for good, and is listed in `revocations`, which
running gateways poll to drop it from their caches at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import aiosqlite

from proxy.secretfile import check_private, private_dir


class KeyStatus(StrEnum):
    ACTIVE = "active"  # encrypts new writes and decrypts
    DECRYPT_ONLY = "decrypt_only"  # rotated out: decrypts what it sealed, seals nothing new
    DESTROYED = "destroyed"  # shredded: its wrapped bytes are gone


@dataclass(frozen=True, slots=True)
class DataKey:
    """One client's data key for one scope and version (the key itself stays wrapped here)."""

    key_id: bytes
    client_id: str | None  # None until the CRM assigns the client's id
    scope: str
    version: int
    status: KeyStatus
    wrapped: bytes | None
    kek_id: str | None
    created_at: float

    @property
    def hex_id(self) -> str:
        return self.key_id.hex()


class Keystore(Protocol):
    async def get_many(self, key_ids: Iterable[bytes]) -> dict[bytes, DataKey]: ...

    async def active(self, client_id: str, scope: str) -> DataKey | None: ...

    async def add(self, key: DataKey) -> DataKey: ...

    async def link(self, key_id: bytes, client_id: str) -> None: ...

    async def retire_active(self, client_id: str, scope: str) -> list[DataKey]: ...

    async def destroy(self, client_id: str | None, scope: str | None, reason: str,
                      key_ids: Iterable[bytes] = ()) -> list[DataKey]: ...

    async def rewrap(self, key_id: bytes, wrapped: bytes, kek_id: str) -> None: ...

    async def needing_rewrap(self, kek_id: str, limit: int) -> list[DataKey]: ...

    async def keys_of(self, client_id: str) -> list[DataKey]: ...

    async def revocations_since(self, seq: int) -> tuple[int, set[bytes], set[str]]: ...

    async def latest_revocation(self) -> int: ...

    async def pseudonyms(self, client_ids: Iterable[str]) -> dict[str, str]: ...

    async def known_pseudonym(self, client_id: str) -> str | None: ...

    async def client_of_pseudonym(self, pseudonym: str) -> str | None: ...

    async def tombstoned(self, client_ids: Iterable[str]) -> set[str]: ...

    async def summary(self) -> dict[str, object]: ...

    async def next_version(self, client_id: str | None, scope: str) -> int: ...

    async def beat(self, instance: str, host: str, pid: int, kek_id: str | None) -> None: ...

    async def leave(self, instance: str) -> None: ...

    async def live_gateways(self, within: float) -> list[dict[str, object]]: ...

    async def retire_keks(self, kek_ids: Iterable[str], live_within: float) -> tuple[list[str], dict[str, str]]: ...

    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS data_keys (
    key_id BLOB PRIMARY KEY,
    client_id TEXT,
    scope TEXT NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'decrypt_only', 'destroyed')),
    wrapped BLOB,
    kek_id TEXT,
    created_at REAL NOT NULL,
    linked_at REAL,
    retired_at REAL,
    destroyed_at REAL,
    destroy_reason TEXT
);
CREATE INDEX IF NOT EXISTS data_keys_client ON data_keys (client_id, scope, status);
CREATE INDEX IF NOT EXISTS data_keys_kek ON data_keys (kek_id);
CREATE TABLE IF NOT EXISTS client_pseudonyms (
    client_id TEXT PRIMARY KEY,
    pseudonym TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS revocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id BLOB,
    client_id TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tombstones (
    client_id TEXT PRIMARY KEY,
    at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS retired_keks (
    kek_id TEXT PRIMARY KEY,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS gateways (
    instance TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    kek_id TEXT,
    started_at REAL NOT NULL,
    seen_at REAL NOT NULL
);
"""

# Two concurrent first writes for one client must not both make a version 1, nor two active keys.
_UNIQUE = """
CREATE UNIQUE INDEX IF NOT EXISTS data_keys_version ON data_keys (client_id, scope, version);
CREATE UNIQUE INDEX IF NOT EXISTS data_keys_one_active ON data_keys (client_id, scope)
    WHERE status = 'active' AND client_id IS NOT NULL;
"""

_COLUMNS = "key_id, client_id, scope, version, status, wrapped, kek_id, created_at"


def _row(row: Any) -> DataKey:
    key_id, client_id, scope, version, status, wrapped, kek_id, created_at = row
    return DataKey(bytes(key_id), str(client_id) if client_id is not None else None, str(scope), int(version),
                   KeyStatus(str(status)), bytes(wrapped) if wrapped is not None else None,
                   str(kek_id) if kek_id is not None else None, float(created_at))


def _private_file(path: Path) -> None:
    """The keystore file exists with mode 0600 before SQLite opens it."""
    private_dir(path.parent)
    if not path.exists():
        path.touch(mode=0o600)
    check_private(path)


def revoked(seq: int, rows: Iterable[Any]) -> tuple[int, set[bytes], set[str]]:
    """Revocation rows (seq, key id, client) since `seq`: the last number, the keys, the clients erased whole."""
    last = seq
    keys: set[bytes] = set()
    clients: set[str] = set()
    for s, key_id, client_id in rows:
        last = max(last, int(s))
        if key_id is not None:
            keys.add(bytes(key_id))
        elif client_id is not None:
            clients.add(str(client_id))
    return last, keys, clients


def new_pseudonym() -> str:
    """A random pseudonym: unlinkable to the client once its keystore row is gone."""
    return "P-" + secrets.token_hex(8).upper()


class KeystoreUnavailable(Exception):
    """The keystore could not be read or written now (its database is down): nothing encrypted is released."""


class KeystoreConflict(Exception):
    """The keystore's own rules refused a change (a duplicate active key, a key under a retired KEK)."""


class SqliteKeystore:
    """One aiosqlite connection shared by the gateway's coroutines. Every statement holds `_lock`, and a
    transaction holds it from BEGIN to COMMIT, so no other coroutine's statement joins (or is rolled
    back with) a transaction it did not open."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> SqliteKeystore:
        await asyncio.to_thread(_private_file, path)
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA secure_delete=ON")  # destroyed wrapped keys are overwritten on disk
        await db.execute("PRAGMA busy_timeout=5000")
        await db.executescript(_SCHEMA)
        try:
            await db.executescript(_UNIQUE)
        except sqlite3.IntegrityError:
            await db.close()
            raise KeystoreConflict(f"{path}: a client has two keys of one scope and version, or two active keys "
                                   "(made by an earlier version under concurrent writes); see `keys status`") from None
        return cls(db)

    async def close(self) -> None:
        await self._db.close()

    # ------------------------------------------------------------------ statements
    async def _all(self, sql: str, args: Iterable[object] = ()) -> list[tuple[Any, ...]]:
        async with self._db.execute(sql, tuple(args)) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def _one(self, sql: str, args: Iterable[object] = ()) -> tuple[Any, ...] | None:
        async with self._db.execute(sql, tuple(args)) as cur:
            row = await cur.fetchone()
        return tuple(row) if row is not None else None

    async def _run(self, sql: str, args: Iterable[object] = ()) -> int:
        async with self._db.execute(sql, tuple(args)) as cur:
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

    # ------------------------------------------------------------------ data keys
    async def get_many(self, key_ids: Iterable[bytes]) -> dict[bytes, DataKey]:
        async with self._lock:
            return await self._get_many(key_ids)

    async def _get_many(self, key_ids: Iterable[bytes]) -> dict[bytes, DataKey]:
        ids = list(set(key_ids))
        found: dict[bytes, DataKey] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for row in await self._all(f"SELECT {_COLUMNS} FROM data_keys WHERE key_id IN ({marks})", chunk):  # noqa: S608
                key = _row(row)
                found[key.key_id] = key
        return found

    async def active(self, client_id: str, scope: str) -> DataKey | None:
        async with self._lock:
            row = await self._one(
                f"SELECT {_COLUMNS} FROM data_keys WHERE client_id = ? AND scope = ? AND status = 'active' "  # noqa: S608
                "ORDER BY version DESC LIMIT 1", (client_id, scope))
        return _row(row) if row else None

    async def next_version(self, client_id: str | None, scope: str) -> int:
        if client_id is None:
            return 1
        async with self._lock:
            row = await self._one("SELECT COALESCE(MAX(version), 0) FROM data_keys WHERE client_id = ? AND scope = ?",
                                  (client_id, scope))
        return int(row[0]) + 1 if row else 1

    async def add(self, key: DataKey) -> DataKey:
        """Store a new key; `KeystoreConflict` if the client already has an active key of the scope (another
        writer was first) or its KEK was retired meanwhile: both are re-read or re-wrapped, never stored."""
        async with self._lock:
            try:
                added = await self._run(
                    f"INSERT INTO data_keys ({_COLUMNS}, linked_at) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? "  # noqa: S608
                    "WHERE NOT EXISTS (SELECT 1 FROM retired_keks WHERE kek_id = ?)",
                    (key.key_id, key.client_id, key.scope, key.version, key.status.value, key.wrapped, key.kek_id,
                     key.created_at, key.created_at if key.client_id else None, key.kek_id))
            except sqlite3.IntegrityError:
                raise KeystoreConflict("the client already has a key of this scope and version") from None
        if not added:
            raise KeystoreConflict(f"KEK {key.kek_id} was retired")
        return key

    async def link(self, key_id: bytes, client_id: str) -> None:
        async with self._lock:
            await self._run("UPDATE data_keys SET client_id = ?, linked_at = ? WHERE key_id = ? AND client_id IS NULL",
                            (client_id, time.time(), key_id))

    async def retire_active(self, client_id: str, scope: str) -> list[DataKey]:
        async with self._transaction():
            rows = await self._all(
                f"UPDATE data_keys SET status = 'decrypt_only', retired_at = ? WHERE client_id = ? AND scope = ? "  # noqa: S608
                f"AND status = 'active' RETURNING {_COLUMNS}", (time.time(), client_id, scope))
            for row in rows:
                await self._run("INSERT INTO revocations (key_id, client_id, at) VALUES (?, ?, ?)",
                                (bytes(row[0]), client_id, time.time()))
        return [_row(r) for r in rows]

    async def destroy(self, client_id: str | None, scope: str | None, reason: str,
                      key_ids: Iterable[bytes] = ()) -> list[DataKey]:
        """Destroy every version (of one scope, or all); with all scopes, also the pseudonym link."""
        now = time.time()
        async with self._transaction():
            ids = list(key_ids)
            if client_id is not None:
                query = "SELECT key_id FROM data_keys WHERE client_id = ? AND status != 'destroyed'"
                args: tuple[object, ...] = (client_id,)
                if scope is not None:
                    query += " AND scope = ?"
                    args += (scope,)
                ids += [bytes(r[0]) for r in await self._all(query, args)]
            victims = await self._get_many(ids)
            for key_id in victims:
                await self._run(
                    "UPDATE data_keys SET status = 'destroyed', wrapped = NULL, destroyed_at = ?, destroy_reason = ? "
                    "WHERE key_id = ?", (now, reason, key_id))
                await self._run("INSERT INTO revocations (key_id, client_id, at) VALUES (?, ?, ?)",
                                (key_id, client_id, now))
            if client_id is not None and scope is None:  # erased: a tombstone, and no new key or pseudonym ever
                await self._run("DELETE FROM client_pseudonyms WHERE client_id = ?", (client_id,))
                await self._run("INSERT OR IGNORE INTO tombstones (client_id, at, reason) VALUES (?, ?, ?)",
                                (client_id, now, reason))
                await self._run("INSERT INTO revocations (key_id, client_id, at) VALUES (NULL, ?, ?)", (client_id, now))
        async with self._lock:  # the old page images of the wrapped keys leave the write-ahead log too
            await self._run("PRAGMA wal_checkpoint(TRUNCATE)")
        return list(victims.values())

    async def rewrap(self, key_id: bytes, wrapped: bytes, kek_id: str) -> None:
        async with self._lock:
            await self._run("UPDATE data_keys SET wrapped = ?, kek_id = ? WHERE key_id = ? AND status != 'destroyed'",
                            (wrapped, kek_id, key_id))

    async def needing_rewrap(self, kek_id: str, limit: int) -> list[DataKey]:
        async with self._lock:
            rows = await self._all(f"SELECT {_COLUMNS} FROM data_keys WHERE status != 'destroyed' "  # noqa: S608
                                   "AND kek_id != ? ORDER BY key_id LIMIT ?", (kek_id, limit))
        return [_row(r) for r in rows]

    async def keys_of(self, client_id: str) -> list[DataKey]:
        async with self._lock:
            rows = await self._all(f"SELECT {_COLUMNS} FROM data_keys WHERE client_id = ? "  # noqa: S608
                                   "ORDER BY scope, version", (client_id,))
        return [_row(r) for r in rows]

    # ------------------------------------------------------------------ revocations
    async def revocations_since(self, seq: int) -> tuple[int, set[bytes], set[str]]:
        async with self._lock:
            rows = await self._all("SELECT seq, key_id, client_id FROM revocations WHERE seq > ? ORDER BY seq", (seq,))
        return revoked(seq, rows)

    async def latest_revocation(self) -> int:
        async with self._lock:
            row = await self._one("SELECT COALESCE(MAX(seq), 0) FROM revocations")
        return int(row[0]) if row else 0

    # ------------------------------------------------------------------ pseudonyms
    async def pseudonyms(self, client_ids: Iterable[str]) -> dict[str, str]:
        """Each client's audit pseudonym, made on first use."""
        wanted = list(set(client_ids))
        found: dict[str, str] = {}
        async with self._lock:
            for i in range(0, len(wanted), 500):
                chunk = wanted[i:i + 500]
                marks = ",".join("?" * len(chunk))
                found.update({str(c): str(p) for c, p in await self._all(
                    f"SELECT client_id, pseudonym FROM client_pseudonyms WHERE client_id IN ({marks})", chunk)})  # noqa: S608
            missing = [c for c in wanted if c not in found]
            if missing:
                erased = await self._tombstoned(missing)
                missing = [c for c in missing if c not in erased]
            if missing:
                now = time.time()
                await self._db.executemany(
                    "INSERT INTO client_pseudonyms (client_id, pseudonym, created_at) SELECT ?, ?, ? "
                    "WHERE NOT EXISTS (SELECT 1 FROM tombstones WHERE client_id = ?) "
                    "ON CONFLICT (client_id) DO NOTHING", [(c, new_pseudonym(), now, c) for c in missing])
                marks = ",".join("?" * len(missing))
                found.update({str(c): str(p) for c, p in await self._all(
                    f"SELECT client_id, pseudonym FROM client_pseudonyms WHERE client_id IN ({marks})", missing)})  # noqa: S608
        return found

    async def known_pseudonym(self, client_id: str) -> str | None:
        """The client's pseudonym if they have one (never made here: a lookup must not create one)."""
        async with self._lock:
            row = await self._one("SELECT pseudonym FROM client_pseudonyms WHERE client_id = ?", (client_id,))
        return str(row[0]) if row else None

    async def tombstoned(self, client_ids: Iterable[str]) -> set[str]:
        """Which of these clients were erased (their keys and pseudonym link destroyed for good)."""
        async with self._lock:
            return await self._tombstoned(client_ids)

    async def _tombstoned(self, client_ids: Iterable[str]) -> set[str]:
        wanted = list(set(client_ids))
        found: set[str] = set()
        for i in range(0, len(wanted), 500):
            chunk = wanted[i:i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(str(r[0]) for r in await self._all(
                f"SELECT client_id FROM tombstones WHERE client_id IN ({marks})", chunk))  # noqa: S608
        return found

    async def client_of_pseudonym(self, pseudonym: str) -> str | None:
        """The client a pseudonym stands for (none once the client is shredded: the link is gone)."""
        async with self._lock:
            row = await self._one("SELECT client_id FROM client_pseudonyms WHERE pseudonym = ?", (pseudonym,))
        return str(row[0]) if row else None

    # ------------------------------------------------------------------ gateways and KEK retirement
    async def beat(self, instance: str, host: str, pid: int, kek_id: str | None) -> None:
        """A running gateway says it lives, and which KEK it wraps new keys with."""
        now = time.time()
        async with self._lock:
            await self._run("INSERT INTO gateways (instance, host, pid, kek_id, started_at, seen_at) "
                            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (instance) DO UPDATE SET kek_id = excluded.kek_id, "
                            "seen_at = excluded.seen_at", (instance, host, pid, kek_id, now, now))

    async def leave(self, instance: str) -> None:
        async with self._lock:
            await self._run("DELETE FROM gateways WHERE instance = ?", (instance,))

    async def live_gateways(self, within: float) -> list[dict[str, object]]:
        async with self._lock:
            rows = await self._all("SELECT instance, host, pid, kek_id, seen_at FROM gateways WHERE seen_at >= ? "
                                   "ORDER BY host, pid", (time.time() - within,))
        return [{"instance": i, "host": h, "pid": p, "kek": k, "seen_seconds_ago": round(time.time() - t, 1)}
                for i, h, p, k, t in rows]

    async def retire_keks(self, kek_ids: Iterable[str], live_within: float) -> tuple[list[str], dict[str, str]]:
        """Mark KEKs retired, in one transaction with the checks that no key and no live gateway still uses
        them; from the commit on, no key wrapped by them can be stored (`add`). Returns the retired ones
        and, for the others, why not."""
        retired: list[str] = []
        refused: dict[str, str] = {}
        async with self._transaction():
            for kek_id in kek_ids:
                row = await self._one("SELECT COUNT(*) FROM data_keys WHERE kek_id = ? AND status != 'destroyed'",
                                      (kek_id,))
                keys = int(row[0]) if row else 0
                users = await self._all("SELECT host, pid FROM gateways WHERE kek_id = ? AND seen_at >= ?",
                                        (kek_id, time.time() - live_within))
                if keys:
                    refused[kek_id] = f"{keys} data keys are still wrapped by it"
                elif users:
                    refused[kek_id] = "still current in the running gateway " + ", ".join(f"{h}:{p}" for h, p in users)
                else:
                    await self._run("INSERT OR IGNORE INTO retired_keks (kek_id, at) VALUES (?, ?)",
                                    (kek_id, time.time()))
                    retired.append(kek_id)
        return retired, refused

    async def summary(self) -> dict[str, object]:
        async with self._lock:
            by = [{"scope": s, "status": st, "keys": n, "clients": c} for s, st, n, c in await self._all(
                "SELECT scope, status, COUNT(*), COUNT(DISTINCT client_id) FROM data_keys GROUP BY scope, status")]
            keks = {str(k): int(n) for k, n in await self._all(
                "SELECT kek_id, COUNT(*) FROM data_keys WHERE status != 'destroyed' GROUP BY kek_id")}
            row = await self._one("SELECT COUNT(*) FROM data_keys WHERE client_id IS NULL AND status != 'destroyed'")
        return {"keys": by, "wrapped_by_kek": keks, "unlinked": int(row[0]) if row else 0}

"""The audit trail on the shared PostgreSQL (`[audit] store = "postgresql://..."`): one trail for the service.

Each replica appends to its own hash chain (`audit_records`, keyed by replica and sequence), as the SQLite
trail does: group commit in batches on one dedicated connection, a response released only once its
record's batch has committed. One global lock per record would serialise every replica (139 records/s at
four replicas, measured here); a chain per replica does not (1,808/s).

The sealer merges the chains into one sequence (`audit_log`): each entry names a replica record (replica,
sequence, leaf and link hashes), in a hash chain of its own whose head is signed, every
`checkpoint_every` entries or `checkpoint_seconds`, as a checkpoint (`audit_seals`). One replica seals at a
time, the holder of an advisory lock on a connection of its own (another takes over when it goes); a
stale sealer cannot fork the log, since entries are keyed by their index and a checkpoint is only added
on top of the last one (compare-and-set on the size). Replicas are integrated only up to their highest
contiguous sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import structlog

from proxy.audit.checkpoints import Checkpoint, CheckpointSigner
from proxy.audit.record import AuditRecord
from proxy.audit.siem import Siem
from proxy.audit.trail import GENESIS, MAX_BATCH, AuditUnavailable, leaf_hash, link_hash
from proxy.postgres import check_schema, redact
from proxy.postgres.database import DatabaseError, connect

log = structlog.get_logger("fieldguard.audit")

SEAL_LOCK = 0x46475345  # 'FGSE': the one sealer of a service
SEAL_BATCH = 5000  # replica records merged per sealer transaction at most
_REPLICA_LOCK = "fieldguard-audit-replica:"


def entry_body(idx: int, replica: str, rseq: int, leaf: bytes, link: bytes) -> bytes:
    """The sealed log's entry for one replica record: what its leaf hash covers."""
    return orjson.dumps({"seq": idx, "replica": replica, "rseq": rseq, "leaf": leaf.hex(), "link": link.hex()})


@dataclass(slots=True)
class _Pending:
    body: bytes
    done: asyncio.Future[int]


class PgTrail:
    """This replica's chain in the shared trail (the gateway's `Trail`), and its share of the sealing."""

    def __init__(self, url: str, replica: str, signer: CheckpointSigner, *, origin: str = "",
                 timeout_seconds: float = 2.0, checkpoint_every: int = 1000, checkpoint_seconds: float = 60.0,
                 commit_delay_seconds: float = 0.0, coming: Callable[[], int] = lambda: 0, siem: Siem,
                 wait_for_replica: bool = False) -> None:
        self.url = url
        self.replica = replica
        self.timeout = timeout_seconds
        self.commit_delay = commit_delay_seconds
        self.coming = coming
        self.siem = siem
        self.wait_for_replica = wait_for_replica  # a command waits for another on this host; a gateway refuses
        self.sealer = Sealer(url, signer, origin or socket.gethostname(), checkpoint_every, checkpoint_seconds,
                             on_seal=lambda cp: siem.checkpoint(cp.as_dict()), replica=replica)
        self._conn: Any = None
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._seq = 0
        self._head = GENESIS
        self.last_error: str | None = None
        self.last_commit: float | None = None
        self.commits = 0
        self.records = 0

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        try:
            await self._connect()
        except DatabaseError as exc:
            self.last_error = str(exc)
            log.error("audit store unavailable; data requests get 503", error=str(exc))
        self._writer = asyncio.get_running_loop().create_task(self._write_forever(), name="fieldguard-audit")

    async def _connect(self) -> None:
        conn = await connect(self.url, "fieldguard-audit")
        try:
            await check_schema(conn, self.url)
            if await conn.fetchval("SHOW synchronous_commit") in ("off", "local"):
                raise DatabaseError(f"{redact(self.url)}: synchronous_commit is off: an acknowledged audit "
                                    "record could be lost in a crash; set it on")
            key = _REPLICA_LOCK + self.replica
            if self.wait_for_replica:
                await conn.execute("SET lock_timeout = '30s'")
                await conn.execute("SELECT pg_advisory_lock(hashtext($1))", key)
            elif not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
                raise DatabaseError(f"another gateway is writing the trail as replica {self.replica!r}: give each "
                                    "one its own [audit] replica")
            await conn.execute("INSERT INTO audit_replicas (replica, first_seen) VALUES ($1, $2) "
                               "ON CONFLICT DO NOTHING", self.replica, time.time())  # the sealer's list
            row = await conn.fetchrow("SELECT seq, link FROM audit_records WHERE replica = $1 "
                                      "ORDER BY seq DESC LIMIT 1", self.replica)
        except BaseException:
            await conn.close()
            raise
        self._seq, self._head = (int(row["seq"]), bytes(row["link"])) if row else (0, GENESIS)
        self._conn = conn
        self.last_error = None

    async def close(self) -> None:
        """Commit what is queued, seal what this replica can, let go of the replica's name."""
        self._closing = True
        if self._writer is not None:
            await self._queue.put(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer, 30)
            self._writer = None
        with contextlib.suppress(Exception):
            await self.sealer.step(force=True)
        await self.sealer.close()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
        self.siem.close()

    # ------------------------------------------------------------------ appending
    async def append(self, record: AuditRecord) -> None:
        if self._writer is None or self._closing:
            raise AuditUnavailable("audit store not open")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        self._queue.put_nowait(_Pending(record.encode(), done))
        deadline = loop.call_later(self.timeout, self._expire, done)
        try:
            record.seq = await done
        finally:
            deadline.cancel()

    def _expire(self, done: asyncio.Future[int]) -> None:
        if not done.done():
            self.last_error = "audit commit timed out"
            done.set_exception(AuditUnavailable("audit commit timed out", queued=True))

    async def tick(self) -> None:
        """Proves the writer alive and the database reachable; seals when this replica is the sealer."""
        if self._writer is None or self._writer.done():
            raise AuditUnavailable("the audit writer is not running")
        if self._conn is None:
            raise AuditUnavailable(self.last_error or "the audit store is not connected")
        await self.sealer.step()

    async def _write_forever(self) -> None:
        while True:
            first = await self._queue.get()
            batch: list[_Pending] = []
            stopping = first is None
            if first is not None:
                batch.append(first)
            stopping = await self._gather(batch) or stopping
            if batch:
                await self._commit(batch)
            if stopping:
                return

    async def _gather(self, batch: list[_Pending]) -> bool:
        """Whatever else is queued; while requests are still coming, wait up to the commit delay for them."""
        until = time.monotonic() + self.commit_delay
        while len(batch) < MAX_BATCH:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = until - time.monotonic()
                if not self.commit_delay or left <= 0 or self.coming() <= 0:
                    return False
                try:
                    item = await asyncio.wait_for(self._queue.get(), left)
                except TimeoutError:
                    return False
            if item is None:
                return True
            batch.append(item)
        return False

    async def _commit(self, batch: list[_Pending]) -> None:
        """One transaction for the batch; any failure fails the batch alone, and the next batch starts from
        the head as the database has it (a commit whose answer was lost may have landed)."""
        bodies: list[bytes] = []
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = None
                await self._connect()
            conn = self._conn
            now = time.time()
            seq, head = self._seq, self._head
            rows = []
            for p in batch:
                seq += 1
                body = b'{"seq":%d,' % seq + p.body[1:]
                leaf = leaf_hash(body)
                head = link_hash(head, leaf)
                rows.append((self.replica, seq, now, body, leaf, head))
                bodies.append(body)
            async with conn.transaction():
                await conn.copy_records_to_table("audit_records", records=rows,
                                                 columns=("replica", "seq", "recorded_at", "body", "leaf", "link"))
        except Exception as exc:
            uncertain = isinstance(exc, (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError))
            error = f"audit write failed: {type(exc).__name__}: {exc}"[:200]
            self.last_error = error
            log.error("audit write failed; responses withheld", error=type(exc).__name__, records=len(batch))
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.close()
            self._conn = None  # reconnect, and re-read the head, before the next batch
            for p in batch:
                if not p.done.done():
                    p.done.set_exception(AuditUnavailable(error, queued=uncertain))
            return
        self._seq, self._head = seq, head
        self.last_error = None
        self.last_commit = now
        self.commits += 1
        self.records += len(batch)
        for p, row in zip(batch, rows, strict=True):
            if not p.done.done():
                p.done.set_result(row[1])
        try:
            self.siem.append_bodies(bodies)
        except Exception as exc:
            log.error("SIEM audit line failed", error=type(exc).__name__)

    # ------------------------------------------------------------------ health
    def health(self) -> dict[str, Any]:
        return {"ok": self.last_error is None and self._conn is not None, "records": self._seq,
                "replica": self.replica, "commits": self.commits, "pending": self._queue.qsize(),
                "unsealed": max(0, self._seq - self.sealer.replica_sealed),
                "last_error": self.last_error, "last_commit": self.last_commit, "free_bytes": None,
                "sealer": self.sealer.status()}


class Fenced(Exception):
    """Another sealer extended the log first: this one's work is discarded, and it steps down."""


class Sealer:
    """Merges every replica's chain into the service's one sealed log, when it holds the sealing lock."""

    def __init__(self, url: str, signer: CheckpointSigner, origin: str, every: int, seconds: float,
                 on_seal: Callable[[Checkpoint], None] = lambda cp: None, replica: str = "") -> None:
        self.url = url
        self.replica = replica
        self.replica_sealed = 0  # how far the service's sealed log has taken this replica's chain
        self.on_seal = on_seal
        self.signer = signer
        self.origin = origin
        self.every = every
        self.seconds = seconds
        self._conn: Any = None
        self.leader = False
        self.sealed_size = 0
        self.last_seal_at = -math.inf

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self.leader = False
        if conn is not None and not conn.is_closed():
            await conn.close()

    async def step(self, force: bool = False) -> int:
        """Integrate what the replicas have committed and sign a checkpoint when one is due (`force`: whenever
        anything is unsigned). Returns the entries added; 0 when another replica is the sealer."""
        if self._conn is None or self._conn.is_closed():
            self._conn, self.leader = await connect(self.url, "fieldguard-sealer"), False
        added = 0
        if self.leader and not await self._conn.fetchval(  # still ours? (a leader that lost it steps down)
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
                "AND classid = 0 AND objid = $1::oid AND objsubid = 1 AND granted)", SEAL_LOCK):
            log.warning("this replica no longer holds the sealing lock; stepping down")
            self.leader = False
        if not self.leader:
            self.leader = bool(await self._conn.fetchval("SELECT pg_try_advisory_lock($1)", SEAL_LOCK))
            if self.leader:
                log.info("this replica seals the service's audit trail")
        if self.leader:
            try:
                added = await self._integrate(force)
            except (Fenced, asyncpg.UniqueViolationError):
                log.warning("another sealer extended the audit log first; stepping down")
                await self.close()
                return 0
        if self.replica:
            found = await self._conn.fetchval("SELECT sealed FROM audit_replicas WHERE replica = $1", self.replica)
            self.replica_sealed = int(found or 0)
        return added

    async def _integrate(self, force: bool) -> int:
        conn = self._conn
        signed: Checkpoint | None = None
        async with conn.transaction():
            last = await conn.fetchrow("SELECT idx, link FROM audit_log ORDER BY idx DESC LIMIT 1")
            size, head = (int(last["idx"]), bytes(last["link"])) if last else (0, GENESIS)
            rows = await conn.fetch(
                "SELECT p.replica, p.sealed, r.seq, r.leaf, r.link FROM audit_replicas p CROSS JOIN LATERAL "
                "(SELECT seq, leaf, link, recorded_at FROM audit_records r WHERE r.replica = p.replica "
                "AND r.seq > p.sealed ORDER BY r.seq LIMIT $1) r ORDER BY r.recorded_at, p.replica, r.seq", SEAL_BATCH)
            done: dict[str, int] = {}
            entries = []
            for r in rows:
                replica, rseq = str(r["replica"]), int(r["seq"])
                if rseq != done.get(replica, int(r["sealed"])) + 1:
                    continue  # not contiguous (yet): a later step takes it
                done[replica] = rseq
                size += 1
                body = entry_body(size, replica, rseq, bytes(r["leaf"]), bytes(r["link"]))
                leaf = leaf_hash(body)
                head = link_hash(head, leaf)
                entries.append((size, replica, rseq, body, leaf, head))
            if entries:
                await conn.copy_records_to_table("audit_log", records=entries,
                                                 columns=("idx", "replica", "rseq", "body", "leaf", "link"))
                await conn.executemany("UPDATE audit_replicas SET sealed = $2 WHERE replica = $1", list(done.items()))
            sealed = int(await conn.fetchval("SELECT COALESCE(MAX(size), 0) FROM audit_seals"))
            due = size - sealed >= self.every or time.monotonic() - self.last_seal_at >= self.seconds
            if size > sealed and (due or force):
                signed = self.signer.sign(self.origin, size, head)
                inserted = await conn.execute(
                    "INSERT INTO audit_seals (size, head, origin, time, key_id, signature) "
                    "SELECT $1, $2, $3, $4, $5, $6 WHERE (SELECT COALESCE(MAX(size), 0) FROM audit_seals) = $7",
                    signed.size, signed.head, signed.origin, signed.time, signed.key_id, signed.signature, sealed)
                if inserted.endswith(" 0"):
                    raise Fenced()
                sealed = size
        if signed is not None:
            self.last_seal_at = time.monotonic()
            with contextlib.suppress(Exception):
                self.on_seal(signed)
        self.sealed_size = sealed
        return len(entries)

    def status(self) -> dict[str, Any]:
        return {"leader": self.leader, "sealed": self.sealed_size, "replica_sealed": self.replica_sealed}

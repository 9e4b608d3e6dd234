"""The durable, tamper-evident audit trail.

Every record is canonical JSON, appended to an SQLite table in one writer thread: its leaf hash is
SHA-256(0x00 || body) and its link is SHA-256(previous link || leaf), so editing, removing, inserting or
reordering any record breaks every link after it. Every `checkpoint_every` records or
`checkpoint_seconds` the head is signed (Ed25519, see proxy.audit.checkpoints).

Group commit: requests hand their records to one writer thread, which commits whatever has queued while
the previous commit was on disk, in one transaction with one fsync, then releases all their responses.
While other requests are still on their way (`coming`: the gateway's count of requests whose records
are not yet handed over), the writer holds the commit up to `commit_delay_seconds` for them, as PostgreSQL's
`commit_delay` does: under load one fsync then carries many records; a lone request never waits.
A response leaves only after its record is committed; if that cannot happen within `timeout_seconds`
the caller gets 503 and no data.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import queue
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog

from proxy.audit.checkpoints import Checkpoint, CheckpointSigner
from proxy.audit.record import AuditRecord
from proxy.audit.siem import Siem

log = structlog.get_logger("fieldguard.audit")

GENESIS = bytes(32)
MAX_BATCH = 512  # records per transaction at most: bounds a commit's time and memory
_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_records (
    seq INTEGER PRIMARY KEY,
    recorded_at REAL NOT NULL,
    body BLOB NOT NULL,
    leaf BLOB NOT NULL,
    link BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY,
    head BLOB NOT NULL,
    origin TEXT NOT NULL,
    time TEXT NOT NULL,
    key_id TEXT NOT NULL,
    signature BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_records_no_update BEFORE UPDATE ON audit_records
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_records_no_delete BEFORE DELETE ON audit_records
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""


class AuditUnavailable(Exception):
    """The record could not be made durable: no data may be released. `queued`: it is still in the writer's
    queue and may be committed later, saying what the caller did not get (a correction must follow it)."""

    def __init__(self, message: str, queued: bool = False) -> None:
        super().__init__(message)
        self.queued = queued


class StoreReplaced(Exception):
    """The store is not the one this writer has been appending to: nothing more is written until restart."""


class Trail(Protocol):
    """Where the gateway's audit records go. `append` returns only once the record is as durable as the
    trail promises, or raises `AuditUnavailable`; `tick` is the checkpoint timer's beat, and proves the
    writer alive."""

    siem: Siem

    async def open(self) -> None: ...

    async def append(self, record: AuditRecord) -> None: ...

    async def tick(self) -> None: ...

    def health(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


def canonical(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def leaf_hash(body: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + body).digest()


def link_hash(previous: bytes, leaf: bytes) -> bytes:
    return hashlib.sha256(previous + leaf).digest()


@dataclass(frozen=True, slots=True)
class StoredRecord:
    seq: int
    body: bytes
    leaf: bytes
    link: bytes


def _drain(q: queue.SimpleQueue[_Pending | _Tick | None]) -> list[_Pending | _Tick | None]:
    """Whatever else is queued now, without waiting."""
    out: list[_Pending | _Tick | None] = []
    try:
        while True:
            out.append(q.get_nowait())
    except queue.Empty:
        return out


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def read_records(conn: sqlite3.Connection) -> Iterator[StoredRecord]:
    """Rows as stored; a value of the wrong type (someone edited the file) is read as bytes, never trusted."""
    for seq, body, leaf, link in conn.execute("SELECT seq, body, leaf, link FROM audit_records ORDER BY seq"):
        yield StoredRecord(int(seq), _bytes(body), _bytes(leaf), _bytes(link))


def _bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return b"" if value is None else str(value).encode()


def read_checkpoints(conn: sqlite3.Connection) -> list[Checkpoint]:
    rows = conn.execute("SELECT origin, size, head, time, key_id, signature FROM checkpoints ORDER BY size")
    return [Checkpoint(str(o), int(s), bytes(h), str(t), str(k), bytes(sig)) for o, s, h, t, k, sig in rows]


@dataclass(slots=True)
class _Pending:
    body: bytes  # the record, encoded on the event loop without its sequence number
    done: asyncio.Future[int]  # its sequence number, once committed


@dataclass(slots=True)
class _Tick:
    """The checkpoint timer: sign the head if it is due, and answer, so the caller knows the writer lives."""

    done: asyncio.Future[None]


class DurableTrail:
    """The gateway's `AuditTrail`: SQLite store, hash links, signed checkpoints, group commit."""

    def __init__(self, path: Path, signer: CheckpointSigner, *, origin: str = "", timeout_seconds: float = 2.0,
                 checkpoint_every: int = 1000, checkpoint_seconds: float = 60.0, max_bytes: int = 0,
                 commit_delay_seconds: float = 0.0, coming: Callable[[], int] = lambda: 0,
                 siem: Siem) -> None:
        self.path = path
        self.signer = signer
        self.origin = origin or socket.gethostname()
        self.timeout = timeout_seconds
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = checkpoint_seconds
        self.max_bytes = max_bytes
        self.siem = siem
        self.commit_delay = commit_delay_seconds
        self.coming = coming  # read by the writer thread
        self._conn: sqlite3.Connection | None = None  # owned by the writer thread once it runs
        self._pending: queue.SimpleQueue[_Pending | _Tick | None] = queue.SimpleQueue()  # loop -> writer; None: stop
        self._writer: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._seq = 0
        self._head = GENESIS
        self._identity: tuple[int, int] = (0, 0)  # device and inode of the store file as opened
        self._checkpointed = 0
        self._checkpoint_at = -math.inf  # a new run's first records are signed at the first beat
        self._signed: list[Checkpoint] = []  # signed by the writer thread, copied to the SIEM on the loop
        self.last_error: str | None = None
        self.last_commit: float | None = None
        self.commits = 0
        self.records = 0

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self._open_sync)
        except (sqlite3.Error, OSError) as exc:
            self.last_error = f"cannot open the audit store: {type(exc).__name__}"
            log.error("audit store unavailable; data requests get 503", error=type(exc).__name__)
        self._writer = threading.Thread(target=self._write_forever, name="fieldguard-audit", daemon=True)
        self._writer.start()

    def _open_sync(self) -> None:
        conn = connect(self.path)
        if self.max_bytes:
            page = int(conn.execute("PRAGMA page_size").fetchone()[0])
            conn.execute(f"PRAGMA max_page_count={max(self.max_bytes // page, 16)}")
        row = conn.execute("SELECT seq, link FROM audit_records ORDER BY seq DESC LIMIT 1").fetchone()
        if row is not None:
            self._seq, self._head = int(row[0]), bytes(row[1])
        last = conn.execute("SELECT MAX(size) FROM checkpoints").fetchone()
        self._checkpointed = int(last[0] or 0)
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        self._conn = conn
        self.last_error = None
        if self._seq > self._checkpointed:
            self._checkpoint_sync()  # anchor what an earlier run left unsigned

    async def close(self) -> None:
        """Commit what is pending, sign a last checkpoint, stop the writer."""
        if self._writer is not None:
            self._closing = True
            self._pending.put(None)
            await asyncio.to_thread(self._writer.join, 30)
            self._writer = None
        elif self._conn is not None:
            self._close_sync()
        for cp in self._signed:
            self.siem.checkpoint(cp.as_dict())
        self._signed.clear()
        self.siem.close()

    def _close_sync(self) -> None:
        if self._conn is None:
            return
        try:
            if self._seq > self._checkpointed:
                self._checkpoint_sync()
        except sqlite3.Error:
            pass
        self._conn.close()
        self._conn = None

    # ------------------------------------------------------------------ appending
    async def append(self, record: AuditRecord) -> None:
        """Return once the record is committed; raise AuditUnavailable otherwise (then: 503, no data)."""
        if self._writer is None or self._closing:
            raise AuditUnavailable("audit store not open")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        self._pending.put(_Pending(record.encode(), done))
        deadline = loop.call_later(self.timeout, self._expire, done)  # a timer, not a task: cheap per request
        try:
            record.seq = await done
        finally:
            deadline.cancel()

    async def tick(self) -> None:
        """Sign the head if `checkpoint_seconds` have passed with records unsigned; raise if the writer
        does not answer within the audit timeout (it is stuck or gone)."""
        if self._writer is None or self._closing or not self._writer.is_alive():
            raise AuditUnavailable("the audit writer is not running")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.put(_Tick(done))
        try:
            await asyncio.wait_for(done, self.timeout)
        except TimeoutError:
            raise AuditUnavailable("the audit writer did not answer") from None

    def _expire(self, done: asyncio.Future[int]) -> None:
        if not done.done():
            self.last_error = "audit commit timed out"
            done.set_exception(AuditUnavailable("audit commit timed out", queued=True))

    def _write_forever(self) -> None:
        """The writer thread: whatever queued while the last commit was on disk goes in the next one.
        One hop back to the event loop per batch releases all of its responses. Any failure fails that
        batch alone; the thread itself never stops but on the stop sign."""
        assert self._loop is not None
        stopping = False
        while not stopping:
            first = self._pending.get()  # blocks in C until a record (or the stop sign) arrives
            batch: list[_Pending] = []
            ticks: list[_Tick] = []
            for item in self._gather([first, *_drain(self._pending)]):
                if item is None:
                    stopping = True
                elif isinstance(item, _Tick):
                    ticks.append(item)
                else:
                    batch.append(item)
            error: str | None = None
            bodies: list[bytes] = []
            try:
                if self._conn is None:
                    self._open_sync()
                if batch:
                    bodies = self._commit_sync([p.body for p in batch])
                if ticks and self._checkpoint_due():
                    self._checkpoint_sync()
            except Exception as exc:  # disk, SQLite, or a record that cannot be serialised
                error = f"audit write failed: {type(exc).__name__}: {exc}"[:200]
            signed, self._signed = self._signed, []
            try:
                self._loop.call_soon_threadsafe(self._settle, batch, ticks, bodies, signed, error)
            except RuntimeError:  # the loop is gone: nobody is waiting any more
                return
        self._close_sync()

    def _gather(self, items: list[_Pending | _Tick | None]) -> list[_Pending | _Tick | None]:
        """Hold the commit while requests are still coming with their records, up to the commit delay:
        the group in group commit. Never when the stop sign is in, or nobody else is coming."""
        if not self.commit_delay or items[-1] is None:
            return items
        until = time.monotonic() + self.commit_delay
        while len(items) < MAX_BATCH and self.coming() > 0:
            left = until - time.monotonic()
            if left <= 0:
                break
            try:
                items.append(self._pending.get(timeout=left))
            except queue.Empty:
                break
            items.extend(_drain(self._pending))
            if items[-1] is None:
                break
        return items

    def _settle(self, batch: list[_Pending], ticks: list[_Tick], bodies: list[bytes], signed: list[Checkpoint],
                error: str | None) -> None:
        """On the event loop: release the batch's responses (or fail them), then copy it to the SIEM."""
        for tick in ticks:
            if not tick.done.done():
                tick.done.set_result(None) if error is None else tick.done.set_exception(AuditUnavailable(error))
        if error is not None:
            self.last_error = error
            log.error("audit write failed; responses withheld", error=error.split(":")[0], records=len(batch))
            for p in batch:
                if not p.done.done():
                    p.done.set_exception(AuditUnavailable(error))
            return
        self.last_error = None
        for p, body in zip(batch, bodies, strict=True):
            if not p.done.done():
                p.done.set_result(int(body[7:body.index(b",")]))  # b'{"seq":N,...'
        try:  # the SIEM copy, in one write per batch, from the bodies just committed
            self.siem.append_bodies(bodies)
            for cp in signed:
                self.siem.checkpoint(cp.as_dict())
        except Exception as exc:  # the SIEM copy must never hold back the durable trail
            log.error("SIEM audit line failed", error=type(exc).__name__)

    def _commit_sync(self, records: list[bytes]) -> list[bytes]:
        """One transaction, one fsync. The head is read inside the write lock, so `fieldguard` commands
        can append beside a running gateway without forking the chain."""
        conn = self._conn
        assert conn is not None
        self._check_store()
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT seq, link FROM audit_records ORDER BY seq DESC LIMIT 1").fetchone()
            seq, head = (int(row[0]), bytes(row[1])) if row is not None else (0, GENESIS)
            if seq < self._seq:
                raise StoreReplaced(f"the store holds {seq} records, {self._seq} were written to it")
            rows = []
            for encoded in records:
                seq += 1
                body = b'{"seq":%d,' % seq + encoded[1:]
                leaf = leaf_hash(body)
                head = link_hash(head, leaf)
                rows.append((seq, now, body, leaf, head))
            conn.executemany("INSERT INTO audit_records (seq, recorded_at, body, leaf, link) VALUES (?, ?, ?, ?, ?)",
                             rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._seq, self._head = seq, head
        self.last_commit = now
        self.commits += 1
        self.records += len(records)
        if self._seq - self._checkpointed >= self.checkpoint_every or self._checkpoint_due():
            self._checkpoint_sync()
        return [r[2] for r in rows]

    def _check_store(self) -> None:
        """Before each commit: the file on disk is the one this writer opened (a store replaced by a copy would
        take the records into a deleted file), and it still ends, at our last record, with our head."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise StoreReplaced("the audit store file is gone") from None
        if (st.st_dev, st.st_ino) != self._identity:
            raise StoreReplaced("the audit store file was replaced since it was opened")
        if self._seq:
            assert self._conn is not None
            row = self._conn.execute("SELECT link FROM audit_records WHERE seq = ?", (self._seq,)).fetchone()
            if row is None or bytes(row[0]) != self._head:
                raise StoreReplaced(f"the audit store no longer ends with record {self._seq} as it was written")

    def _checkpoint_due(self) -> bool:
        return time.monotonic() - self._checkpoint_at >= self.checkpoint_seconds

    def _checkpoint_sync(self) -> Checkpoint | None:
        conn = self._conn
        assert conn is not None
        self._checkpoint_at = time.monotonic()
        if self._seq == self._checkpointed:
            return None
        cp = self.signer.sign(self.origin, self._seq, self._head)
        conn.execute("INSERT OR IGNORE INTO checkpoints (size, head, origin, time, key_id, signature) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (cp.size, cp.head, cp.origin, cp.time, cp.key_id, cp.signature))
        self._checkpointed = cp.size
        self._signed.append(cp)
        return cp

    # ------------------------------------------------------------------ health
    def health(self) -> dict[str, Any]:
        pending = self._pending.qsize()
        free = None
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(self.path.parent).free
        return {"ok": self.last_error is None and self._conn is not None, "records": self._seq,
                "commits": self.commits, "checkpointed": self._checkpointed, "pending": pending,
                "last_error": self.last_error, "last_commit": self.last_commit, "free_bytes": free}


class UndurableTrail:
    """`[audit] durable = false`: the SIEM lines alone. Nothing is hash-linked, signed or verifiable, so
    it is for benchmarks (the cost of durability is measured against it) and development, never service."""

    def __init__(self, siem: Siem) -> None:
        self.siem = siem
        self.records = 0
        self._lines: list[bytes] = []

    async def open(self) -> None:
        log.warning("audit is not durable ([audit] durable = false): no record an auditor can verify")

    async def append(self, record: AuditRecord) -> None:
        """The SIEM line is written with the others of this loop turn: as the durable trail writes its
        lines once per commit, so that the baseline does not pay a write per request that service does not."""
        self.records += 1
        if not self._lines:
            asyncio.get_running_loop().call_soon(self._write)
        self._lines.append(canonical(record.as_dict()))

    def _write(self) -> None:
        lines, self._lines = self._lines, []
        self.siem.append_bodies(lines)

    async def tick(self) -> None:
        return None

    async def close(self) -> None:
        if self._lines:
            self._write()
        self.siem.close()

    def health(self) -> dict[str, Any]:
        return {"ok": True, "durable": False, "records": self.records, "last_error": None, "free_bytes": None}

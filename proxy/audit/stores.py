"""Where the trail is kept: an SQLite file (one gateway's, or several on one host taking turns), or the
shared PostgreSQL (every replica's chain and the sealed log); opening it for writing, and verifying it,
whichever it is. The writers (`trail`, `pgtrail`) and verifiers (`verify`, `pgverify`) know one store each."""

from __future__ import annotations

import secrets
import socket
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from proxy.audit.checkpoints import Checkpoint, CheckpointSigner
from proxy.audit.pgtrail import PgTrail
from proxy.audit.pgverify import from_export, read_shared, verify_shared
from proxy.audit.record import AuditRecord
from proxy.audit.siem import JsonLinesTrail, Siem
from proxy.audit.trail import DurableTrail, Trail, UndurableTrail, connect, read_checkpoints, read_records
from proxy.audit.verify import Verdict, VerifyInputError, lines_of, read_export, verify
from proxy.config import Settings
from proxy.postgres import DatabaseError, is_postgres

AuditStore = Path | str
"""Where the trail is kept: an SQLite file, or the shared PostgreSQL's URL."""


def is_shared(store: AuditStore) -> bool:
    return isinstance(store, str) and is_postgres(store)


def store_of(settings: Settings) -> AuditStore:
    """The configured trail: the database URL as given (no path), or the file."""
    store = settings.audit.store
    return store if is_shared(store) else Path(store)


def store_exists(store: AuditStore) -> bool:
    return is_shared(store) or Path(store).exists()


def replica_name(settings: Settings, command: bool = False) -> str:
    """This process's name in a shared trail: `[audit] replica`, else host:port for a gateway (stable across
    restarts, unique on a host) or cli@host for the commands of a host (which take turns)."""
    if command:
        return f"cli@{socket.gethostname()}"
    return settings.audit.replica or f"{socket.gethostname()}:{settings.server.port}"


def open_trail(settings: Settings, siem: Siem | None = None, coming: Callable[[], int] = lambda: 0,
               command: bool = False) -> Trail:
    """The deployment's audit trail, with its SIEM copy. `coming` counts the requests whose records are
    still to be handed over: group commit waits for them. `command`: for an operator's command."""
    audit = settings.audit
    siem = siem or JsonLinesTrail(audit.log)
    if not audit.durable:
        return UndurableTrail(siem)
    if is_shared(audit.store):
        return PgTrail(audit.store, replica_name(settings, command),
                       CheckpointSigner(settings.keys.in_dir(audit.signing_key)), origin=audit.origin,
                       timeout_seconds=audit.timeout_seconds if not command else 30.0,
                       checkpoint_every=audit.checkpoint_every, checkpoint_seconds=audit.checkpoint_seconds,
                       commit_delay_seconds=max(0.0, min(audit.commit_delay_ms / 1000, audit.timeout_seconds / 4)),
                       coming=coming, siem=siem, wait_for_replica=command)
    return DurableTrail(
        Path(audit.store), CheckpointSigner(settings.keys.in_dir(audit.signing_key)),
        origin=audit.origin, timeout_seconds=audit.timeout_seconds, checkpoint_every=audit.checkpoint_every,
        checkpoint_seconds=audit.checkpoint_seconds, max_bytes=audit.max_bytes,
        commit_delay_seconds=max(0.0, min(audit.commit_delay_ms / 1000, audit.timeout_seconds / 4)),
        coming=coming, siem=siem)


async def record_operation(settings: Settings, action: str, *, who: str, dry_run: bool = False,
                           counts: dict[str, int] | None = None, reason: str | None = None,
                           clients: list[str] | None = None, key_ids: list[str] | None = None,
                           break_glass: str | None = None, disclosure: dict[str, Any] | None = None,
                           denied: str | None = None, consent: dict[str, Any] | None = None) -> AuditRecord:
    """An operator's command (a key shred, an audit query) is an access too: one record (`denied`: the
    command was refused, and why), appended to the
    deployment's durable trail beside a running gateway (the chain head is read inside the write lock)."""
    record = AuditRecord(request_id=secrets.token_hex(12), method="CLI", user=f"u:{who}", route=action,
                         status=403 if denied else 0 if dry_run else 200,
                         outcome="denied" if denied else "dry-run" if dry_run else "allowed",
                         reason=denied or reason, clients=clients or [], key_ids=sorted(key_ids or []),
                         counts=dict(counts or {}), break_glass=break_glass, disclosure=disclosure,
                         consent=consent)
    trail = open_trail(settings, command=True)
    await trail.open()
    try:
        await trail.append(record)
    finally:
        await trail.close()
    return record


def verify_store(path: AuditStore, public: Ed25519PublicKey, anchors: Iterable[Checkpoint] = ()) -> Verdict:
    if is_shared(path):
        try:
            return verify_shared(read_shared(str(path)), public, anchors)
        except DatabaseError as exc:
            verdict = Verdict()
            verdict.fail(f"the store cannot be read: {exc}")
            return verdict
    conn = connect(Path(path), readonly=True)
    try:
        total = int(conn.execute("SELECT COUNT(*) FROM audit_records").fetchone()[0])
        return verify(read_records(conn), read_checkpoints(conn), public, anchors, total)
    except sqlite3.DatabaseError as exc:
        verdict = Verdict()
        verdict.fail(f"the store cannot be read: {exc}")
        return verdict
    finally:
        conn.close()


def verify_export(path: Path, public: Ed25519PublicKey, anchors: Iterable[Checkpoint] = ()) -> Verdict:
    try:
        shared = from_export(item for _, item in lines_of(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise VerifyInputError(f"{path}: not an export of a shared trail ({type(exc).__name__})") from None
    if shared is not None:  # a shared trail's export: every replica's chain, the sealed log, its checkpoints
        return verify_shared(shared, public, anchors)
    records, checkpoints = read_export(path)
    return verify(iter(records), checkpoints, public, anchors, len(records))

"""Each replica's status as a row the others, `fieldguard status` and the console can read: the policy it
enforces, the last change announcement it heard, the revocation it has caught up to, its audit lag."""

from __future__ import annotations

import json
import time
from typing import Any

from proxy.postgres.database import Database


async def report(db: Database, instance: str, host: str, pid: int, started_at: float,
                 status: dict[str, Any]) -> None:
    await db.pool.execute(
        "INSERT INTO replicas (instance, host, pid, started_at, seen_at, status) VALUES ($1, $2, $3, $4, $5, $6) "
        "ON CONFLICT (instance) DO UPDATE SET seen_at = excluded.seen_at, status = excluded.status",
        instance, host, pid, started_at, time.time(), json.dumps(status, default=str))


async def leave(db: Database, instance: str) -> None:
    await db.pool.execute("DELETE FROM replicas WHERE instance = $1", instance)


async def read_all(db: Database, within: float | None = None) -> list[dict[str, Any]]:
    """Every replica's last report, newest first; `within`: only those seen in the last that many seconds."""
    now = time.time()
    rows = await db.pool.fetch("SELECT instance, host, pid, started_at, seen_at, status FROM replicas "
                               "WHERE seen_at >= $1 ORDER BY seen_at DESC", now - within if within else 0.0)
    return [{"instance": r["instance"], "host": r["host"], "pid": r["pid"],
             "seen_seconds_ago": round(now - r["seen_at"], 1), "up_seconds": round(now - r["started_at"], 1),
             **json.loads(r["status"])} for r in rows]

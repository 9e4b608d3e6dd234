"""Scale-out: what a second gateway process buys, on SQLite and on PostgreSQL, beside the pass-through with
as many processes, in one run; and what a keystore of 10^6 clients on PostgreSQL costs a request against 10^3.

    python -m benchmarks.scaleout [--duration 3] [--repeat 3] [--out benchmarks/results/scaleout.json]

Every target runs unpinned: two processes need both cores, which they share with the CRM, wrk and
PostgreSQL. So read the ratios (each FieldGuard against the pass-through with as many processes, in the same
run) and the CPU per request, not the absolute throughput. PostgreSQL comes from `FIELDGUARD_BENCH_POSTGRES`
(default the machine's, database `test`); a run database is made and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks import targets, wrk
from benchmarks.procs import PY, Proc, Registry, cpu_seconds, free_port, interrupt_on_signals, wait_quiet
from benchmarks.world import PASSPHRASE, World, build, make_keys
from proxy.keys.kek import FileKek
from proxy.keys.pgstore import PgKeystore
from proxy.keys.ring import KeyRing, wrap_aad
from proxy.postgres import upgrade

POSTGRES = os.environ.get("FIELDGUARD_BENCH_POSTGRES", "postgresql://127.0.0.1:5432/test")
RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("pass x1", "pass x2", "fg-sqlite x1", "fg-sqlite x2", "fg-pg x1", "fg-pg x2")
CELLS = (("record", 64), ("listing", 64), ("record", 8))


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(POSTGRES, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def make_database() -> str:
    name = f"fieldguard_bench_{secrets.token_hex(4)}"
    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    return f"{POSTGRES.rsplit('/', 1)[0]}/{name}"


def drop_database(url: str) -> None:
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))


async def copy_keystore(sqlite_file: Path, url: str) -> int:
    """The run's keystore (made by the CRM's encryption) into PostgreSQL, rows as they are."""
    with sqlite3.connect(sqlite_file) as db:
        keys = db.execute("SELECT key_id, client_id, scope, version, status, wrapped, kek_id, created_at, "
                          "linked_at FROM data_keys").fetchall()
        names = db.execute("SELECT client_id, pseudonym, created_at FROM client_pseudonyms").fetchall()
    conn = await asyncpg.connect(url)
    try:
        await conn.copy_records_to_table("data_keys", records=keys, columns=(
            "key_id", "client_id", "scope", "version", "status", "wrapped", "kek_id", "created_at", "linked_at"))
        await conn.copy_records_to_table("client_pseudonyms", records=names,
                                         columns=("client_id", "pseudonym", "created_at"))
    finally:
        await conn.close()
    return len(keys)


def start(reg: Registry, w: World, name: str, url: str, limit: float) -> targets.Target:
    """One target, unpinned; two processes of it share the port (SO_REUSEPORT)."""
    t = targets.Target(name, "pass" if name.startswith("pass") else "fieldguard", name)
    port = free_port()
    t.url = f"http://127.0.0.1:{port}"
    directory = w.root / name.replace(" ", "-")
    directory.mkdir()
    n = 2 if name.endswith("x2") else 1
    if name.startswith("pass"):
        one = f"{PY} -m benchmarks.passthrough --app aiohttp --port {port} --upstream {w.crm_url} --reuse-port"
        args = ["sh", "-c", " & ".join([one] * n) + " & wait"]
    else:
        extra = "" if "sqlite" in name else f'store = "{url}"'
        conf = targets.fieldguard_conf(directory, port, w, directory / "audit.sqlite3" if not extra else Path("x"))
        text = conf.read_text()
        if extra:
            text = text.replace('store = "x"', extra).replace("[keys]\n", f"[keys]\n{extra}\n")
        conf.write_text(text)
        args = [PY, "-m", "proxy.cli", "serve", "--config", str(conf), "--workers", str(n)]
    t.proc = reg.start(Proc(name, args, directory / "server.log", None, limit))
    t.proc.wait_ready(t.url + ("/health" if name.startswith("pass") else "/readyz"), timeout=90)
    return t


def one_run(t: targets.Target, script: Path, req: wrk.Request, c: int, seconds: int) -> dict[str, Any]:
    assert t.proc is not None
    cpu0, t0 = cpu_seconds(t.proc.pid), time.monotonic()
    res = wrk.run(script, t.url, req, c, seconds)
    cpu = cpu_seconds(t.proc.pid) - cpu0
    n = max(res["requests"], 1)
    return {"rps": res["requests"] / (res["duration_us"] / 1e6), "p50_ms": res["latency_us"]["p50"] / 1000,
            "p99_ms": res["latency_us"]["p99"] / 1000, "cpu_us": cpu / n * 1e6,
            "server_cores": cpu / (time.monotonic() - t0), "errors": wrk.errors(res)}


async def keystore_cost(url: str, kek: FileKek, clients: int, samples: int = 300) -> dict[str, Any]:
    """A request's keystore cost with the key not cached: one lookup by key id and one unwrap, for 1 key (a
    record) and for 50 (a list), on a PostgreSQL keystore of `clients` clients."""
    conn = await asyncpg.connect(url)
    ids: list[bytes] = []
    try:
        now = time.time()
        batch = []
        for cid in range(1, clients + 1):
            key_id = os.urandom(16)
            wrapped, kek_id = kek.wrap(os.urandom(32), wrap_aad(key_id, "record"))
            batch.append((key_id, str(cid), "record", 1, "active", wrapped, kek_id, now))
            ids.append(key_id)
            if len(batch) == 50_000 or cid == clients:
                await conn.copy_records_to_table("data_keys", records=batch, columns=(
                    "key_id", "client_id", "scope", "version", "status", "wrapped", "kek_id", "created_at"))
                batch = []
        await conn.execute("ANALYZE data_keys")
        size = int(await conn.fetchval("SELECT pg_total_relation_size('data_keys')"))
    finally:
        await conn.close()
    store = await PgKeystore.open(url)
    ring = KeyRing(store, kek, cache_size=1, cache_seconds=0.0)  # nothing stays cached: every lookup is cold
    rng = random.Random(clients)
    out: dict[str, Any] = {"clients": clients, "table_mb": round(size / 1e6, 1)}
    try:
        for keys in (1, 50):
            times = []
            for _ in range(samples):
                wanted = rng.sample(ids, keys)
                t0 = time.perf_counter()
                await ring.prefetch(wanted)
                for k in wanted:
                    ring.opened(k)
                times.append((time.perf_counter() - t0) * 1e6)
                ring.rows.drop_where(lambda *_: True)
                ring.open_keys.drop_where(lambda *_: True)
            out[f"cold_{keys}_key_us_median"] = round(statistics.median(times), 1)
            out[f"cold_{keys}_key_us_p90"] = round(sorted(times)[int(0.9 * len(times))], 1)
    finally:
        await store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaleout", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keystore-clients", default="1000,1000000")
    parser.add_argument("--out", type=Path, default=RESULTS / "scaleout.json")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk not found (make bench installs it)", file=sys.stderr)
        return 2
    try:
        url = make_database()
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"PostgreSQL is not reachable at {POSTGRES} ({type(exc).__name__}): scale-out not measured",
              file=sys.stderr)
        return 0
    root = Path(tempfile.mkdtemp(prefix="fg-scaleout-"))
    reg = Registry()
    interrupt_on_signals()
    limit = 1800.0
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    keystore: list[dict[str, Any]] = []
    try:
        asyncio.run(upgrade(url))
        print(f"setting up in {root}: the CRM, encrypted; its keystore copied to PostgreSQL ...", flush=True)
        w = build(reg, root, limit)
        copied = asyncio.run(copy_keystore(w.keys / "keystore.sqlite3", url))
        print(f"  {copied} keys in PostgreSQL; starting {', '.join(TARGETS)}", flush=True)
        live = {name: start(reg, w, name, url, limit) for name in TARGETS}
        script = wrk.write_script(root)
        reqs = {"record": wrk.Request(w.loads.record, token=w.token),
                "listing": wrk.Request(w.loads.listing, token=w.token)}
        for t in live.values():
            if t.kind == "fieldguard":
                for req in reqs.values():
                    wrk.run(script, t.url, req, 8, 1)
        for rep in range(args.repeat):
            for load, c in CELLS:
                order = list(live)[rep % len(live):] + list(live)[:rep % len(live)]
                for name in order:
                    wait_quiet(0.3, 10.0)
                    r = one_run(live[name], script, reqs[load], c, args.duration)
                    runs.setdefault(f"{load} c={c}", {}).setdefault(name, []).append(r)
            print(f"  repetition {rep + 1}/{args.repeat} done", flush=True)
        reg.stop_all()
        kek = FileKek(make_keys(root / "ks-keys") / "kek.json", PASSPHRASE.encode())
        for clients in (int(c) for c in args.keystore_clients.split(",")):
            db = make_database()
            try:
                asyncio.run(upgrade(db))
                keystore.append(asyncio.run(keystore_cost(db, kek, clients)))
                print(f"  keystore of {clients:,} clients: {keystore[-1]}", flush=True)
            finally:
                drop_database(db)
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        reg.stop_all()
        drop_database(url)
        shutil.rmtree(root, ignore_errors=True)
    medians = {cell: {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in by.items()}
               for cell, by in runs.items()}
    print(table(medians))
    print(keystore_table(keystore))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"finished": datetime.now(UTC).isoformat(timespec="seconds"),
                                    "duration_s": args.duration, "repeat": args.repeat, "cells": medians,
                                    "keystore": keystore, "runs": runs}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


def table(medians: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| cell | target | req/s | ratio to pass (same processes) | p50 ms | p99 ms | cpuµs | cores used |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for cell, by in medians.items():
        for name, m in by.items():
            base = by.get("pass x2" if name.endswith("x2") else "pass x1")
            ratio = f"{m['rps'] / base['rps']:.2f}" if base and not name.startswith("pass") else ""
            lines.append(f"| {cell} | {name} | {m['rps']:,.0f} | {ratio} | {m['p50_ms']:.2f} | {m['p99_ms']:.1f} | "
                         f"{m['cpu_us']:,.0f} | {m['server_cores']:.2f} |")
    return "\n".join(lines)


def keystore_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| clients | table MB | cold lookup, 1 key (µs, median / p90) | cold lookup, 50 keys (µs, median / p90) |",
             "|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['clients']:,} | {r['table_mb']} | {r['cold_1_key_us_median']:,.0f} / "
                     f"{r['cold_1_key_us_p90']:,.0f} | {r['cold_50_key_us_median']:,.0f} / "
                     f"{r['cold_50_key_us_p90']:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

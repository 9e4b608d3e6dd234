"""`fieldguard serve --workers N`: worker processes on one port, sharing the keystore and the trail, a dead
worker restarted, every record in one trail that verifies; on SQLite (the default) and on PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import (
    KEK_ENV,
    Gateway,
    Service,
    Signing,
    fieldguard,
    make_keys,
    pg_sql,
    policies_copy,
    start_gateway,
    wait_until,
)
from tests.test_encryption import crm_process
from tests.test_key_custody import new_client, note


def workers(gw: Gateway, n: int, env: dict[str, str] | None = None) -> Service:
    """`fieldguard serve --workers n` with the gateway's config, as an operator would run it."""
    return Service([sys.executable, "-m", "proxy.cli", "serve", "--config", str(gw.config), "--workers", str(n)],
                   gw.config.parent / "workers.log", f"{gw.url}/healthz", env={**KEK_ENV, **(env or {})})


def live_pids(keys: Path) -> set[int]:
    with sqlite3.connect(keys / "keystore.sqlite3") as db:
        rows = db.execute("SELECT pid FROM gateways WHERE seen_at >= ?", (time.time() - 30,)).fetchall()
    return {int(r[0]) for r in rows}


def test_two_workers_share_the_port_the_keystore_and_one_trail_and_a_dead_one_comes_back(
        signing: Signing, tmp_path: Path) -> None:
    crm, url, _ = crm_process(tmp_path / "crm", seed=False)
    keys = make_keys(tmp_path / "keys")
    gw = start_gateway(tmp_path / "gw", url, signing, keys, policies=policies_copy(tmp_path / "gw"), start=False,
                       extra="checkpoint_seconds = 1.0", sections="[relations]\nrefresh_seconds = 0.5\n")
    svc = workers(gw, 2).start()
    try:
        pids = wait_until(lambda: (p if len(p := live_pids(keys)) == 2 else None), "both workers to beat")
        client = new_client(gw, "Ida")
        alice = gw.as_user("alice", "counsellor")
        wait_until(lambda: gw.get(f"/clients/{client}", alice).status_code == 200, "both to know the client")
        notes = [note(gw, client, f"note {i}") for i in range(6)]
        bodies = {gw.get(f"/session-notes/{n}", alice).json()["body"] for n in notes for _ in range(4)}
        assert bodies == {f"note {i}" for i in range(6)}  # whichever worker wrote, whichever reads

        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(live_pids(keys) - {victim}) == 2 and "worker exited; restarting" in svc.output(),
                   "the dead worker to be replaced", timeout=40)
        assert gw.get(f"/session-notes/{notes[0]}", alice).json()["body"] == "note 0"

        def verified() -> dict[str, object] | None:  # the running workers sign the shared chain's head each second
            out = fieldguard(gw.config, "audit", "verify")
            found: dict[str, object] = json.loads(out.stdout)
            return found if out.returncode == 0 and found["ok"] else None
        verdict = wait_until(verified, "the workers' chain to verify, signed to its end", timeout=60, every=0.5)
        assert verdict["records"] == verdict["verified"]
    finally:
        svc.stop()
        crm.stop()
    assert svc.proc is not None and svc.proc.returncode == 0, svc.output()[-2000:]
    with sqlite3.connect(tmp_path / "gw" / "audit.sqlite3") as db:
        routes = [json.loads(b)["route"] for (b,) in db.execute("SELECT body FROM audit_records")]
    assert sum(r.startswith("/session-notes/") for r in routes) >= 25  # every read, both workers, one chain


def test_workers_on_postgresql_write_one_trail_as_replicas_of_their_own(postgres: str, signing: Signing,
                                                                        tmp_path: Path) -> None:
    crm, url, _ = crm_process(tmp_path / "crm", seed=False)
    keys = make_keys(tmp_path / "keys")
    gw = start_gateway(tmp_path / "gw", url, signing, keys, policies=policies_copy(tmp_path / "gw"), start=False,
                       extra=f'store = "{postgres}"\ncheckpoint_seconds = 1.0',
                       keys_extra=f'store = "{postgres}"', sections="[relations]\nrefresh_seconds = 0.5\n")
    assert fieldguard(gw.config, "db", "upgrade").returncode == 0
    svc = workers(gw, 2).start()
    try:
        client = new_client(gw, "Jo")
        alice = gw.as_user("alice", "counsellor")

        def fresh(path: str) -> httpx.Response:  # a connection each: the kernel spreads connections over workers
            return httpx.get(gw.url + path, headers={"authorization": f"Bearer {alice}"})

        wait_until(lambda: all(fresh(f"/clients/{client}").status_code == 200 for _ in range(8)),
                   "both workers to know the client")
        written = note(gw, client, "one service")
        for _ in range(30):
            assert fresh(f"/session-notes/{written}").json().get("body") == "one service"
        replicas = {r["replica"] for r in pg_sql(postgres, "SELECT DISTINCT replica FROM audit_records")}
        assert {r.rsplit("/", 1)[1] for r in replicas if "/w" in r} == {"w0", "w1"}, replicas

        def verified() -> bool:
            out = fieldguard(gw.config, "audit", "verify")
            return out.returncode == 0 and json.loads(out.stdout)["records"] >= 32
        wait_until(verified, "the workers' records to be sealed into one trail", timeout=60, every=0.5)
    finally:
        svc.stop()
        crm.stop()

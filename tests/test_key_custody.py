"""Key custody beside running gateways: a KEK rotated (and retired) by the command line while a gateway
serves, concurrent first writes for one client, and a shred that lands while a write is in flight."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import HTTP, Gateway, Ran, Signing, make_keys, policies_copy, start_gateway, wait_until
from tests.conftest import fieldguard as run_command
from tests.test_encryption import crm_process


def cli(gw: Gateway, *args: str) -> Ran:
    return run_command(gw.config, *args)


def status(gw: Gateway) -> dict[str, Any]:
    out = cli(gw, "keys", "status")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def until(check: Callable[[], bool], seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


@pytest.fixture
def world(signing: Signing, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An empty CRM, its own keys, and a gateway whose key cache forgets within a fifth of a second (so
    every read after a rotation opens its key cold, through the keystore and the KEK)."""
    crm, url, _ = crm_process(tmp_path / "crm", seed=False)
    keys = make_keys(tmp_path / "keys")
    gw = start_gateway(tmp_path / "gw", url, signing, keys, policies=policies_copy(tmp_path / "gw"),
                       keys_extra="cache_seconds = 0.2")
    yield {"gw": gw, "url": url, "keys": keys, "dir": tmp_path, "signing": signing}
    gw.service.stop()
    crm.stop()


def new_client(gw: Gateway, first: str) -> int:
    r = gw.request("POST", "/clients", gw.as_user("erin", "admin"), json={
        "name": {"first": first, "last": "Example"}, "date_of_birth": "1990-01-01", "email": f"{first}@example.org",
        "counsellor": "alice", "category": "adult", "status": "active", "gp": {"name": "Dr Quill"}})
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def note(gw: Gateway, client: int, body: str) -> int:
    r = gw.request("POST", f"/clients/{client}/session-notes", gw.as_user("alice", "counsellor"),
                   json={"session_date": "2026-11-20", "summary": "s", "body": body})
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def read(gw: Gateway, note_id: int) -> str | None:
    r = gw.get(f"/session-notes/{note_id}", gw.as_user("alice", "counsellor"))
    assert r.status_code == 200, r.text
    return r.json().get("body")  # type: ignore[no-any-return]


def test_a_running_gateway_opens_cold_keys_after_a_kek_rotation(world: dict[str, Any]) -> None:
    """It used to read kek.json once: keys re-wrapped by the new KEK could not be opened until restart."""
    gw: Gateway = world["gw"]
    first = note(gw, new_client(gw, "Ann"), "written before the rotation")
    before = status(gw)["current_kek"]
    out = cli(gw, "keys", "rotate-kek")
    assert out.returncode == 0, out.stderr
    # the gateway takes up the new KEK at its next beat, dropping rows cached under the old one
    assert until(lambda: [g["kek"] for g in status(gw)["gateways"]] == [status(gw)["current_kek"]])
    assert read(gw, first) == "written before the rotation"
    second = note(gw, new_client(gw, "Ben"), "written after the rotation")
    assert read(gw, second) == "written after the rotation"
    after = status(gw)
    assert after["current_kek"] != before and list(after["wrapped_by_kek"]) == [after["current_kek"]]


def test_retiring_the_old_kek_beside_a_running_gateway_loses_nothing(world: dict[str, Any]) -> None:
    """With --retire-old, a key the gateway made after the rotation was wrapped by the retired KEK and was
    unreadable for ever after a restart. Now the gateway wraps with the new KEK within a beat, and the
    retirement waits for it."""
    gw: Gateway = world["gw"]
    first = note(gw, new_client(gw, "Ann"), "before")
    old = status(gw)["current_kek"]
    out = cli(gw, "keys", "rotate-kek", "--retire-old")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["retired"] == [old] and report["not_retired"] == {}
    live = status(gw)["gateways"]
    assert len(live) == 1 and live[0]["kek"] == report["kek"]  # the running gateway said it took it up
    later = note(gw, new_client(gw, "Cal"), "made by the running gateway after the retirement")
    assert read(gw, first) == "before"
    after = status(gw)
    assert after["keks"] == [report["kek"]] and list(after["wrapped_by_kek"]) == [report["kek"]]
    fresh = start_gateway(world["dir"] / "gw2", world["url"], world["signing"], world["keys"],
                          policies=policies_copy(world["dir"] / "gw2"))
    try:  # a restarted gateway (nothing cached) reads both
        assert read(fresh, first) == "before"
        assert read(fresh, later) == "made by the running gateway after the retirement"
    finally:
        fresh.service.stop()


def test_retirement_waits_for_a_gateway_that_has_not_taken_up_the_new_kek(
        signing: Signing, tmp_path: Path) -> None:
    """A gateway that is alive but has not beaten since the rotation (here: stopped with SIGSTOP) still
    wraps with the old KEK: its retirement is refused, named, and done by the next run once it has."""
    crm, url, _ = crm_process(tmp_path / "crm", seed=False)
    keys = make_keys(tmp_path / "keys")
    gw = start_gateway(tmp_path / "gw", url, signing, keys, policies=policies_copy(tmp_path / "gw"), process=True)
    try:
        note(gw, new_client(gw, "Ann"), "x")
        old = status(gw)["current_kek"]
        assert until(lambda: [g["kek"] for g in status(gw)["gateways"]] == [old])
        assert gw.service.proc is not None
        os.kill(gw.service.proc.pid, signal.SIGSTOP)
        try:
            out = cli(gw, "keys", "rotate-kek", "--retire-old", "--wait", "1")
            assert out.returncode == 1
            assert f"{old}: still current in the running gateway" in out.stderr
            assert old in status(gw)["keks"]  # kept: the stopped gateway may still wrap with it
        finally:
            os.kill(gw.service.proc.pid, signal.SIGCONT)
        current = status(gw)["current_kek"]
        assert until(lambda: [g["kek"] for g in status(gw)["gateways"]] == [current])
        out = cli(gw, "keys", "rotate-kek", "--retire-old", "--wait", "10")
        assert out.returncode == 0, out.stderr
        assert old in json.loads(out.stdout)["retired"] and old not in status(gw)["keks"]
    finally:
        gw.service.stop()
        crm.stop()
    assert status(gw)["gateways"] == []  # a clean stop leaves the registry


def test_concurrent_first_writes_for_one_client_make_one_active_key(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    client = new_client(gw, "Dee")  # a client record key; no process-notes key yet
    alice = gw.as_user("alice", "counsellor")

    async def together(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30, headers={"authorization": f"Bearer {alice}"}) as c:
            return await asyncio.gather(*(c.post(f"/clients/{client}/process-notes", json={
                "written_at": "2026-11-20", "body": f"process note {i}"}) for i in range(n)))

    answers = asyncio.run(together(8))
    assert [r.status_code for r in answers] == [201] * 8
    with sqlite3.connect(world["keys"] / "keystore.sqlite3") as db:
        rows = db.execute("SELECT status, version FROM data_keys WHERE client_id = ? AND scope = 'process_notes'",
                          (str(client),)).fetchall()
    assert rows == [("active", 1)]
    bodies = {gw.get(f"/process-notes/{r.json()['id']}", alice).json().get("body") for r in answers}
    assert bodies == {f"process note {i}" for i in range(8)}


def test_a_shred_that_commits_while_a_write_is_in_flight_is_told_not_hidden(
        switchable: str, signing: Signing, tmp_path: Path) -> None:
    """The write was sealed with the client's key before the shred; the CRM stored it after. The caller
    used to get 201 for text nobody can ever read: now 410, and the audit record says why."""
    keys = make_keys(tmp_path / "keys")
    gw = start_gateway(tmp_path / "gw", switchable, signing, keys, policies=policies_copy(tmp_path / "gw"),
                       timeout=20.0)
    try:
        alice = gw.as_user("alice", "counsellor")
        assert gw.request("POST", "/clients/1/session-notes", alice,
                          json={"session_date": "2026-11-20", "body": "the first, before any shred"}).status_code == 201
        HTTP.post(switchable + "/_control", json={"delay": 6.0}).raise_for_status()
        arrived = HTTP.get(switchable + "/_control").json()["arrived"]
        answer: list[httpx.Response] = []
        writer = threading.Thread(target=lambda: answer.append(gw.request(
            "POST", "/clients/1/session-notes", alice, json={"session_date": "2026-11-21", "body": "in flight"})))
        writer.start()
        wait_until(lambda: HTTP.get(switchable + "/_control").json()["arrived"] > arrived,
                   "the write reached the CRM", timeout=10)
        shred = cli(gw, "keys", "shred", "--client", "1", "--reason", "Art.17 T-9", "--yes")
        assert shred.returncode == 0, shred.stderr
        writer.join()
        r = answer[0]
        assert r.status_code == 410, r.text
        assert r.json()["error"] == ("this client's records were erased while the write was in flight; what it "
                                     "sealed can never be read")
        assert gw.audit_for(r.headers["x-request-id"])["reason"] == "client erased during the write"
    finally:
        HTTP.post(switchable + "/_control", json={"delay": 0.0})
        gw.service.stop()

"""Nothing dies silently: every background task survives any exception, says so in /readyz, and the
decisions that depend on what it keeps fresh are refused once it is too old.

Each gateway test feeds a running gateway the fault that used to stop a task for good: a cover.yaml
saved in Latin-1 (the policy watcher), a relation source that fails or answers nonsense (the relations
refresh), a record the audit writer cannot write. The unit tests hold the supervisor to its rules.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from proxy.app import Gateway as App
from proxy.supervisor import Supervisor
from tests.conftest import (
    AUDIENCE,
    HTTP,
    ISSUER,
    Gateway,
    Signing,
    policies_copy,
    start_gateway,
)
from tests.harness import driven


def readyz(gw: Gateway) -> dict[str, Any]:
    return gw.readyz()  # type: ignore[no-any-return]


def wait_until(check: Any, timeout: float = 30, what: str = "the condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{what} never held")


# ---------------------------------------------------------------------------------------------- policy
def test_a_latin1_cover_file_is_a_finding_and_the_watcher_goes_on(crm: str, signing: Signing, shared_keys: Path,
                                                                    tmp_path: Path) -> None:
    policies = policies_copy(tmp_path)
    gw = start_gateway(tmp_path, crm, signing, shared_keys, policies=policies)
    try:
        dana = gw.as_user("dana", "service_manager")
        shown_before = gw.get("/clients/1", dana).json()
        assert "last" not in shown_before["name"]  # alice's client: dana has no cover of alice yet
        before = readyz(gw)["checks"]["policy"]["hash"]
        cover = policies / "cover.yaml"
        good = cover.read_text()
        grant = ("  - user: dana\n    covers: alice\n    from: 2020-01-01T00:00:00Z\n"
                 "    until: 2099-01-01T00:00:00Z\n    reason: cover for Zoë\n")
        cover.write_bytes((good + grant).encode("latin-1"))  # an editor that saved in Latin-1
        bad_line = (good + grant).splitlines().index("    reason: cover for Zoë") + 1
        state = wait_until(lambda: (r := readyz(gw))["checks"]["policy"]["last_reload_error"] and r,
                           what="the refusal in /readyz")
        error = state["checks"]["policy"]["last_reload_error"]
        assert f"cover.yaml:{bad_line}" in error and "not UTF-8" in error, error
        assert state["ready"] is False and state["checks"]["policy"]["hash"] == before
        assert state["checks"]["tasks"]["policy"]["ok"] is True  # the watcher itself is alive and well
        assert "last" not in gw.get("/clients/1", dana).json()["name"]  # the policy in force stays
        # the officer saves it again, as UTF-8: the watcher, still running, applies it
        cover.write_text(good + grant, encoding="utf-8")
        wait_until(lambda: readyz(gw)["checks"]["policy"]["hash"] != before, what="the corrected cover applied")
        assert readyz(gw)["ready"] is True
        assert gw.get("/clients/1", dana).json()["name"]["last"]  # cover of alice: her clients in clear
    finally:
        gw.service.stop()


# ---------------------------------------------------------------------------------------------- relations
@pytest.mark.parametrize(("mode", "reason"), [("fail", "internal lookup badly"), ("garbage", "not answer with a list")])
def test_a_failing_relation_source_is_retried_reported_and_then_refuses(
        switchable: str, signing: Signing, shared_keys: Path, tmp_path: Path, mode: str, reason: str) -> None:
    gw = start_gateway(tmp_path, switchable, signing, shared_keys,
                       sections="[relations]\nrefresh_seconds = 0.2\nmax_age_seconds = 1.5\n")
    try:
        alice, erin = gw.as_user("alice", "counsellor"), gw.as_user("erin", "admin")
        assert gw.get("/clients/1/session-notes", alice).json()["items"][0]["body"] == "note body 1"
        # the staff directory breaks, and meanwhile client 1 moves to bob
        HTTP.post(switchable + "/_control", json={"relations": mode, "assign": {"1": "bob"}}).raise_for_status()
        state = wait_until(lambda: (r := readyz(gw))["checks"]["tasks"]["relations"]["failures"] and r,
                           what="the failing refresh in /readyz")
        task = state["checks"]["tasks"]["relations"]
        assert reason in task["last_error"] and task["last_success"] is not None
        assert reason in state["checks"]["relations"]["last_error"]
        # past relations.max_age_seconds, what depends on the facts is refused, not decided on old ones
        r = wait_until(lambda: (r := gw.get("/clients/1/session-notes", alice)).status_code == 503 and r,
                       what="a refusal on stale facts")
        assert r.json()["error"] == "need-to-know relations are out of date; try again shortly"
        assert gw.audit_for(r.headers["x-request-id"])["reason"] == "relations stale"
        assert gw.get("/clients/1", erin).status_code == 200  # admin's rules need no relation: still served
        stale = readyz(gw)
        assert stale["ready"] is False and stale["checks"]["relations"]["ok"] is False
        assert stale["checks"]["tasks"]["relations"]["ok"] is False
        # the directory is mended: the refresh recovers by itself, on the new facts
        HTTP.post(switchable + "/_control", json={"relations": "ok"}).raise_for_status()
        wait_until(lambda: readyz(gw)["ready"], what="readiness after the source recovered")
        assert gw.get("/clients/1/session-notes", alice).status_code == 403  # moved away from her
        assert gw.get("/clients/1/session-notes", gw.as_user("bob", "counsellor")).status_code == 200
        log = gw.service.output()
        assert '"background task failed; retrying"' in log and '"background task recovered"' in log
        assert "note body" not in log  # names and counts, never values
    finally:
        gw.service.stop()


# ---------------------------------------------------------------------------------------------- audit writer
def test_the_audit_writer_survives_a_record_it_could_not_write(gateway: Gateway, signing: Signing) -> None:
    """A lone surrogate in a signed claim used to reach the writer thread unencodable and kill it (every
    later request got 503). Records are encoded on the event loop now, claim strings made printable: that
    request is answered and recorded, and the writer goes on for everyone after it."""
    now = int(time.time())
    odd = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 600,
                      "jti": "\ud800", "roles": ["counsellor"], "purpose_of_use": ["TREAT"]},
                     _private_key(signing), algorithm="ES256")
    r = gateway.get("/clients/1", odd)
    assert r.status_code == 200 and gateway.audit_for(r.headers["x-request-id"])["token_id"] == "\ufffd"
    ok = gateway.get("/clients/1", gateway.as_user("alice", "counsellor"))
    assert ok.status_code == 200 and ok.json()["name"]["first"]
    assert gateway.audit_for(ok.headers["x-request-id"])["status"] == 200
    checks = readyz(gateway)["checks"]
    assert checks["audit"]["ok"] is True and checks["tasks"]["audit"]["ok"] is True


def _private_key(signing: Signing) -> Any:
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(signing.private_pem, password=None)


# ---------------------------------------------------------------------------------------------- SIGHUP
async def test_sighup_reloads_without_adding_tasks(crm: str, signing: Signing, shared_keys: Path,
                                                   tmp_path: Path) -> None:
    """The ASGI app driven directly, in this test's own loop: fifty SIGHUPs wake the one policy task and
    create no task of their own (the task list used to grow by one on every SIGHUP)."""
    policies = policies_copy(tmp_path)
    gw = start_gateway(tmp_path, crm, signing, shared_keys, policies=policies, start=False)
    async with driven(gw.config) as (app, client):
        await _fifty_sighups(app, client, policies, signing.token("alice", "counsellor", "TREAT"))


async def _fifty_sighups(app: App, client: httpx.AsyncClient, policies: Path, token: str) -> None:
    alice = {"authorization": f"Bearer {token}"}
    assert (await client.get("/clients/1", headers=alice)).status_code == 200
    loop = asyncio.get_running_loop()
    created: list[str] = []
    factory = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        created.append(getattr(coro, "__qualname__", "?"))
        return asyncio.Task(coro, loop=loop, **kw)

    try:
        tasks = set(app.runtime.supervisor.tasks)
        assert tasks == {"policy", "relations", "revocations", "keystore", "audit", "breakglass", "alerts"}
        loop.set_task_factory(counting)
        cover = policies / "cover.yaml"  # a change that needs no new proof: the reload is quick
        cover.write_text(cover.read_text().replace("test cover while bob is away", "bob is away"))
        before = app.runtime.bundle.digest
        for _ in range(50):
            os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 60
        while app.runtime.bundle.digest == before and time.monotonic() < deadline:  # noqa: ASYNC110 - a poll
            await asyncio.sleep(0.05)
        assert app.runtime.bundle.digest != before
        assert created == [] and set(app.runtime.supervisor.tasks) == tasks
    finally:
        loop.set_task_factory(factory)
    assert (await client.get("/clients/1", headers=alice)).status_code == 200


# ---------------------------------------------------------------------------------------------- the supervisor
async def test_a_step_that_raises_is_retried_with_backoff_and_recovers() -> None:
    calls: list[float] = []

    async def flaky() -> None:
        calls.append(time.monotonic())
        if len(calls) <= 3:
            raise TypeError("unhashable type: 'list'")

    sup = Supervisor()
    task = sup.add("flaky", flaky, every=0.05, stale_after=5, first_pause=0.05)
    await sup.start()
    try:
        assert task.failures == 1 and task.last_error == "TypeError: unhashable type: 'list'"
        assert not task.fresh and not sup.healthy
        while len(calls) < 5:  # noqa: ASYNC110 - waiting on the supervisor's own pace
            await asyncio.sleep(0.02)
        gaps = [b - a for a, b in itertools.pairwise(calls)]
        assert gaps[0] >= 0.045 and gaps[1] >= 0.095 and gaps[2] >= 0.195  # doubling: backing off, not spinning
        assert task.failures == 0 and task.last_error is None and task.fresh and sup.healthy
        assert sup.status()["flaky"]["running"] is True
    finally:
        await sup.stop()
    assert sup.status()["flaky"]["running"] is False


async def test_a_task_that_never_succeeds_goes_stale_and_readiness_fails() -> None:
    async def broken() -> None:
        raise OSError("disk gone")

    async def fine() -> None:
        return None

    sup = Supervisor()
    sup.add("fine", fine, every=0.05)
    bad = sup.add("broken", broken, every=0.05, stale_after=0.2)
    await sup.start()
    try:
        await asyncio.sleep(0.1)
        status = sup.status()
        assert status["fine"]["ok"] is True and status["broken"]["ok"] is False
        assert status["broken"]["last_success"] is None and bad.last_error == "OSError: disk gone"
        assert not sup.healthy
    finally:
        await sup.stop()


async def test_wake_runs_a_step_at_once_and_is_rate_limited() -> None:
    runs: list[float] = []

    async def step() -> None:
        runs.append(time.monotonic())

    sup = Supervisor()
    task = sup.add("slow", step, every=60)
    await sup.start()  # the first run
    try:
        task.wake()
        await asyncio.sleep(0.05)
        assert len(runs) == 2  # woken: ran now, not in 60 s
        for _ in range(10):
            task.wake(at_most_every=5)
        await asyncio.sleep(0.05)
        assert len(runs) == 2  # it ran less than 5 s ago: not again
    finally:
        await sup.stop()


def test_two_tasks_of_one_name_are_refused() -> None:
    sup = Supervisor()

    async def step() -> None:
        return None

    sup.add("policy", step, every=1)
    with pytest.raises(ValueError, match="already supervised"):
        sup.add("policy", step, every=1)

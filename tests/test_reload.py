"""Safe rollout: a changed policy applies atomically; a broken one never replaces a good one."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Gateway, Signing, policies_copy, start_gateway, wait_until

GRANT = "p, admin, any, clinical_notes, read, allow"
DENY = "p, admin, any, clinical_notes, read, deny"


@pytest.fixture
def gw(crm: str, signing: Signing, shared_keys: Path, tmp_path: Path) -> Iterator[Gateway]:
    g = start_gateway(tmp_path, crm, signing, shared_keys, policies=policies_copy(tmp_path))
    yield g
    g.service.stop()


def policy_file(gw: Gateway) -> Path:
    return Path(gw.config.parent / "policies" / "policy.csv")


def readyz(gw: Gateway) -> dict[str, object]:
    return gw.readyz()  # type: ignore[no-any-return]


def wait_for_hash_change(gw: Gateway, old: str, timeout: float = 90) -> str:
    """Generous: the proof runs in a thread that shares the GIL with the traffic (and CI shares its cores)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = readyz(gw)["checks"]["policy"]["hash"]  # type: ignore[index]
        if new != old:
            return str(new)
        time.sleep(0.1)
    raise AssertionError("policy never reloaded")


def test_edit_applies_and_broken_edit_is_refused(gw: Gateway) -> None:
    erin = gw.as_user("erin", "admin")
    assert "body" not in gw.get("/session-notes/1", erin).json()
    before = readyz(gw)["checks"]["policy"]["hash"]  # type: ignore[index]
    path = policy_file(gw)
    path.write_text(path.read_text().replace(DENY, GRANT))
    after = wait_for_hash_change(gw, str(before))
    assert "body" in gw.get("/session-notes/1", erin).json()
    # now a broken edit: a trailing comment would make the rule silently never match in pycasbin
    path.write_text(path.read_text().replace(GRANT, DENY + "  # back to normal"))
    deadline = time.monotonic() + 30
    while not readyz(gw)["checks"]["policy"]["last_reload_error"] and time.monotonic() < deadline:  # type: ignore[index]
        time.sleep(0.1)
    state = readyz(gw)
    assert state["ready"] is False, state
    assert state["checks"]["policy"]["last_reload_error"], state  # type: ignore[index]
    policy = state["checks"]["policy"]  # type: ignore[index]
    assert policy["hash"] == after and "comment after a rule" in policy["last_reload_error"]
    assert "body" in gw.get("/session-notes/1", erin).json()  # the good policy is still in force
    log = gw.service.output()
    assert "policy reload refused" in log and "comment after a rule" in log


def policy_polls_since(gw: Gateway, moment: float, polls: int) -> None:
    """Wait until the policy task has finished `polls` runs after `moment` (epoch seconds): all but the first
    of them began after it. A run that reloads ends only once the new policy is in force."""
    seen: set[float] = set()

    def enough() -> bool:
        last = readyz(gw)["checks"]["tasks"]["policy"]["last_success"]  # type: ignore[index]
        if last is not None and last > moment:
            seen.add(float(last))
        return len(seen) >= polls

    wait_until(enough, f"{polls} policy polls after the edit", every=0.02)


def test_sighup_reloads(crm: str, signing: Signing, shared_keys: Path, tmp_path: Path) -> None:
    """With the file watcher off, only the signal can load an edit: nothing changes until SIGHUP, then it
    applies (with the watcher on, any edit reloads by itself and proves nothing about the signal)."""
    gw = start_gateway(tmp_path, crm, signing, shared_keys, policies=policies_copy(tmp_path), process=True,
                       start=False)
    gw.config.write_text(gw.config.read_text().replace("[policy]\n", "[policy]\nwatch = false\n", 1))
    gw.service.start()
    try:
        _sighup_reloads(gw)
    finally:
        gw.service.stop()


def _sighup_reloads(gw: Gateway) -> None:
    gw_proc = gw.service.proc
    assert gw_proc is not None
    erin = gw.as_user("erin", "admin")
    assert "body" not in gw.get("/session-notes/1", erin).json()
    path = policy_file(gw)
    before = str(readyz(gw)["checks"]["policy"]["hash"])  # type: ignore[index]
    path.write_text(path.read_text().replace(DENY, GRANT))
    # four polls later (a watcher loads a change on its second look after it): still the old policy
    policy_polls_since(gw, time.time(), 4)
    assert readyz(gw)["checks"]["policy"]["hash"] == before  # type: ignore[index]
    assert "body" not in gw.get("/session-notes/1", erin).json()
    assert '"policy reloaded"' not in gw.service.output()
    os.kill(gw_proc.pid, signal.SIGHUP)
    wait_for_hash_change(gw, before)
    assert "body" in gw.get("/session-notes/1", erin).json()
    assert gw_proc.poll() is None  # handled, not the default action (which ends the process)
    assert '"policy reloaded"' in gw.service.output()


def test_no_request_sees_half_a_policy(gw: Gateway) -> None:
    """Flip the admin's note access back and forth under traffic: every response is wholly under one
    policy (all note bodies, or a refusal), and its audit record says the same."""
    erin = gw.as_user("erin", "admin")
    path = policy_file(gw)
    deny_text = path.read_text()
    grant_text = deny_text.replace(DENY, GRANT)
    stop = threading.Event()
    seen: list[tuple[str, bool, int]] = []
    errors: list[str] = []

    def traffic() -> None:
        with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {erin}"}, timeout=30) as c:
            while not stop.is_set():
                r = c.get("/session-notes?per_page=40")
                if r.status_code == 403:
                    seen.append((r.headers["x-request-id"], False, 0))
                    continue
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                rows = r.json()["items"]
                shown = [("body" in row) for row in rows]
                if not rows or not all(shown):
                    errors.append("half")
                seen.append((r.headers["x-request-id"], all(shown), len(rows)))

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    hashes = {str(readyz(gw)["checks"]["policy"]["hash"])}  # type: ignore[index]
    for i in range(4):
        before = str(readyz(gw)["checks"]["policy"]["hash"])  # type: ignore[index]
        path.write_text(grant_text if i % 2 == 0 else deny_text)  # a proof made before reloads in 0.2 s
        hashes.add(wait_for_hash_change(gw, before))
        time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(seen) > 20 and {s[1] for s in seen} == {True, False}
    by_id = {rec["request_id"]: rec for rec in gw.audit_records()}
    for request_id, shown, _ in seen[:200]:
        rec = by_id[request_id]
        assert ("clinical_notes" in rec["shown"]) == shown
    assert len(hashes) == 2  # grant and deny, each applied twice
    # and nothing else was ever in force: not a file caught between its truncation and its write
    reloads = [json.loads(line) for line in gw.service.output().splitlines() if '"policy reloaded"' in line]
    assert len(reloads) == 4 and {r["new"] for r in reloads} == {h[:16] for h in hashes}


def test_an_emptied_policy_is_refused_and_the_one_in_force_stays(gw: Gateway) -> None:
    """A truncated or emptied policy.csv (an editor that crashed, a bad deploy) never takes over."""
    alice = gw.as_user("alice", "counsellor")
    assert gw.get("/clients/1/session-notes", alice).json()["items"][0]["body"]
    before = readyz(gw)["checks"]["policy"]["hash"]  # type: ignore[index]
    policy_file(gw).write_text("# everything was here\n")
    deadline = time.monotonic() + 30
    while not readyz(gw)["checks"]["policy"]["last_reload_error"] and time.monotonic() < deadline:  # type: ignore[index]
        time.sleep(0.1)
    policy = readyz(gw)["checks"]["policy"]  # type: ignore[index]
    assert policy["hash"] == before and "no rules" in policy["last_reload_error"]
    assert gw.get("/clients/1/session-notes", alice).json()["items"][0]["body"]


def test_a_class_that_would_stop_being_encrypted_is_refused_until_the_bundle_says_why(gw: Gateway) -> None:
    """Removing `encrypt:` from a class used to reload quietly: new notes then reached the CRM in plaintext."""
    fields = gw.config.parent / "policies" / "fields.yaml"
    sealed = "  clinical_notes:  {label: R, encrypt: record,"
    text = fields.read_text()
    assert sealed in text
    before = readyz(gw)["checks"]["policy"]["hash"]  # type: ignore[index]
    fields.write_text(text.replace(sealed, "  clinical_notes:  {label: R,"))
    deadline = time.monotonic() + 60
    while not readyz(gw)["checks"]["policy"]["last_reload_error"] and time.monotonic() < deadline:  # type: ignore[index]
        time.sleep(0.1)
    policy = readyz(gw)["checks"]["policy"]  # type: ignore[index]
    assert policy["hash"] == before
    assert "class clinical_notes would stop being encrypted" in policy["last_reload_error"]
    # said on purpose, with the reason, it is taken up
    reasoned = '  clinical_notes:  {label: R, plaintext: "the CRM encrypts at rest (T-7)",'
    fields.write_text(text.replace(sealed, reasoned))
    wait_for_hash_change(gw, str(before))
    assert not readyz(gw)["checks"]["policy"]["last_reload_error"]  # type: ignore[index]

"""The durable trail: tamper each way and `audit verify` names the record; kill -9 loses no released
record; an unwritable store releases no data; queries, reports and exports over a real run."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.audit.checkpoints import key_id, load_public, note
from proxy.audit.trail import canonical, leaf_hash, link_hash, read_checkpoints
from tests.conftest import (
    HTTP,
    Gateway,
    Ran,
    Signing,
    fieldguard,
    make_keys,
    policies_copy,
    start_crm,
    start_gateway,
    wait_until,
)


def cli(gw: Gateway, *args: str) -> Ran:
    return fieldguard(gw.config, *args)


def verdict(out: Ran) -> dict[str, Any]:
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def run(crm: str, signing: Signing, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real run of the demo policy: a gateway with checkpoints every 20 records, a mix of requests."""
    d = tmp_path_factory.mktemp("trail")
    keys = make_keys(d / "keys")
    gw = start_gateway(d / "gw", crm, signing, keys, policies=policies_copy(d / "gw"),
                       extra="checkpoint_every = 20")
    try:
        alice, carol, erin = (gw.as_user("alice", "counsellor"), gw.as_user("carol", "supervisor"),
                              gw.as_user("erin", "admin"))
        for _ in range(12):
            assert gw.get("/clients/1/session-notes", alice).status_code == 200
            assert gw.get("/clients/1", carol).status_code == 200
            assert gw.get("/clients/2", alice).status_code == 403
            assert gw.get("/clients/1/appointments", erin).status_code == 200
    finally:
        gw.service.stop()  # a clean stop signs a last checkpoint
    return {"gw": gw, "store": d / "gw" / "audit.sqlite3", "keys": keys, "dir": d}


def test_a_clean_trail_verifies(run: dict[str, Any]) -> None:
    out = cli(run["gw"], "audit", "verify", "--public-key", str(run["keys"] / "audit-signing.pub.pem"))
    v = verdict(out)
    assert out.returncode == 0 and v["ok"] and v["records"] == 48 and v["checkpoints"] >= 2
    assert v["last_checkpoint"] == 48 and v["unanchored"] == 0


def tampered(run: dict[str, Any], name: str) -> tuple[Path, sqlite3.Connection]:
    copy = run["dir"] / f"{name}.sqlite3"
    src = sqlite3.connect(run["store"])
    dst = sqlite3.connect(copy)
    src.backup(dst)
    src.close()
    dst.execute("DROP TRIGGER audit_records_no_update")  # what someone with the file and sqlite3 does first
    dst.execute("DROP TRIGGER audit_records_no_delete")
    return copy, dst


def verify_copy(run: dict[str, Any], store: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    out = cli(run["gw"], "audit", "verify", "--store", str(store),
              "--public-key", str(run["keys"] / "audit-signing.pub.pem"), *extra)
    return out.returncode, verdict(out)


def test_editing_one_field_is_named(run: dict[str, Any]) -> None:
    store, db = tampered(run, "edit")
    body = json.loads(db.execute("SELECT body FROM audit_records WHERE seq = 17").fetchone()[0])
    body["user"] = "u:somebody-else"
    db.execute("UPDATE audit_records SET body = ? WHERE seq = 17", (json.dumps(body),))  # as text, as by hand
    db.commit()
    code, v = verify_copy(run, store)
    assert code == 1 and v["first_bad_record"] == 17
    assert "record 17" in v["problems"][0] and "edited" in v["problems"][0]


def test_deleting_a_record_is_named(run: dict[str, Any]) -> None:
    store, db = tampered(run, "delete")
    db.execute("DELETE FROM audit_records WHERE seq = 23")
    db.commit()
    code, v = verify_copy(run, store)
    assert code == 1 and v["first_bad_record"] == 23 and "missing" in v["problems"][0]


def test_swapping_two_records_is_named(run: dict[str, Any]) -> None:
    store, db = tampered(run, "swap")
    a, b = (db.execute("SELECT body, leaf, link FROM audit_records WHERE seq = ?", (s,)).fetchone() for s in (30, 31))
    db.execute("UPDATE audit_records SET body = ?, leaf = ?, link = ? WHERE seq = 30", b)
    db.execute("UPDATE audit_records SET body = ?, leaf = ?, link = ? WHERE seq = 31", a)
    db.commit()
    code, v = verify_copy(run, store)
    assert code == 1 and v["first_bad_record"] == 30


def test_inserting_a_record_is_named(run: dict[str, Any]) -> None:
    store, db = tampered(run, "insert")
    rows = db.execute("SELECT seq, body, leaf, link FROM audit_records WHERE seq >= 10 ORDER BY seq DESC").fetchall()
    for seq, body, _leaf, _link in rows:  # make room, as an attacker must
        record = json.loads(body)
        record["seq"] = seq + 1
        new = canonical(record)
        db.execute("UPDATE audit_records SET seq = ?, body = ?, leaf = ? WHERE seq = ?",
                   (seq + 1, new, leaf_hash(new), seq))
    prev = db.execute("SELECT link FROM audit_records WHERE seq = 9").fetchone()[0]
    forged = json.loads(db.execute("SELECT body FROM audit_records WHERE seq = 11").fetchone()[0])
    forged.update(seq=10, user="u:nobody", route="/clients")
    body = canonical(forged)
    db.execute("INSERT INTO audit_records VALUES (10, 0, ?, ?, ?)",
               (body, leaf_hash(body), link_hash(prev, leaf_hash(body))))
    db.commit()
    code, v = verify_copy(run, store)
    assert code == 1 and v["first_bad_record"] in (10, 11), v


def test_truncation_after_a_checkpoint_is_named(run: dict[str, Any]) -> None:
    store, db = tampered(run, "truncate")
    db.execute("DELETE FROM audit_records WHERE seq > 40")
    db.commit()
    code, v = verify_copy(run, store)
    assert code == 1 and "removed from its end" in " ".join(v["problems"]) and v["first_bad_record"] == 41
    # deleting the checkpoints too hides it from the store alone, but not from a kept export
    db.execute("DELETE FROM checkpoints WHERE size > 40")
    db.commit()
    anchors = run["dir"] / "anchor.jsonl"
    out = cli(run["gw"], "audit", "export", "--format", "jsonl", "--output", str(anchors))
    assert out.returncode == 0, out.stderr
    code, v = verify_copy(run, store, "--anchor", str(anchors))
    assert code == 1 and v["first_bad_record"] == 41


def test_rewriting_the_chain_and_resigning_with_another_key_is_caught(run: dict[str, Any]) -> None:
    store, db = tampered(run, "rewrite")
    rows = db.execute("SELECT seq, body FROM audit_records ORDER BY seq").fetchall()
    head = bytes(32)
    forger = Ed25519PrivateKey.generate()
    db.execute("DELETE FROM checkpoints")
    for seq, body in rows:
        record = json.loads(body)
        if seq == 5:
            record["purpose"] = "HRESCH"
        new = canonical(record)
        head = link_hash(head, leaf_hash(new))
        db.execute("UPDATE audit_records SET body = ?, leaf = ?, link = ? WHERE seq = ?",
                   (new, leaf_hash(new), head, seq))
        if seq % 20 == 0 or seq == len(rows):
            sig = forger.sign(note("forged", seq, head, "2026-01-01T00:00:00+00:00"))
            db.execute("INSERT INTO checkpoints VALUES (?, ?, 'forged', '2026-01-01T00:00:00+00:00', 'x', ?)",
                       (seq, head, sig))
    db.commit()
    code, v = verify_copy(run, store)
    assert code == 1 and "signed by another key" in v["problems"][0]
    # ...and if they also replace the signing key file, the auditor's own copy of the public key still says no
    assert v["checkpoints"] == 0


def test_rewritten_records_under_the_original_checkpoints_are_placed(run: dict[str, Any]) -> None:
    store, db = tampered(run, "rechain")
    rows = db.execute("SELECT seq, body FROM audit_records ORDER BY seq").fetchall()
    head = bytes(32)
    for seq, body in rows:
        new = bytes(body)
        if seq == 27:  # a refusal (403) rewritten as a success, the rest as stored, the chain re-linked
            assert b'"status":403' in new
            new = new.replace(b'"status":403', b'"status":200')
        head = link_hash(head, leaf_hash(new))
        db.execute("UPDATE audit_records SET body = ?, leaf = ?, link = ? WHERE seq = ?",
                   (new, leaf_hash(new), head, seq))
    db.commit()
    code, v = verify_copy(run, store)
    assert code == 1 and "records 21 to 40 do not match the checkpoint" in v["problems"][0]


def test_a_chain_rewritten_with_every_checkpoint_deleted_is_not_passed(run: dict[str, Any]) -> None:
    """Re-linked from the first record with the checkpoints gone, the store alone is self-consistent: only
    the signed checkpoints could tell, so their absence is itself the failure (and the SIEM's copy places it)."""
    store, db = tampered(run, "unsigned")
    db.execute("DELETE FROM checkpoints")
    head = bytes(32)
    for seq, body in db.execute("SELECT seq, body FROM audit_records ORDER BY seq").fetchall():
        new = bytes(body).replace(b'"status":403', b'"status":200')
        head = link_hash(head, leaf_hash(new))
        db.execute("UPDATE audit_records SET body = ?, leaf = ?, link = ? WHERE seq = ?",
                   (new, leaf_hash(new), head, seq))
    db.commit()
    code, v = verify_copy(run, store)
    assert code == 1 and v["checkpoints"] == 0 and v["unanchored"] == v["records"] >= 48
    assert f"{v['records']} records are covered by no recent signed checkpoint (none is)" in v["problems"][0]
    # the gateway's SIEM log kept every checkpoint: with it as the anchor the first rewritten span is named
    code, v = verify_copy(run, store, "--anchor", str(run["gw"].audit))
    assert code == 1 and "do not match the checkpoint" in v["problems"][0] and v["first_bad_record"] == 1


def test_the_siem_log_anchors_a_clean_trail(run: dict[str, Any]) -> None:
    code, v = verify_copy(run, run["store"], "--anchor", str(run["gw"].audit))
    assert code == 0 and v["ok"] and v["checkpoints"] >= 2 and v["last_checkpoint"] == v["records"] >= 48


def test_a_running_gateways_unsigned_last_records_are_pending_not_failed(
        crm: str, signing: Signing, tmp_path: Path) -> None:
    """Between checkpoints a live trail always has a tail: within two checkpoint intervals of the last
    checkpoint it is reported as pending; a tail behind an old checkpoint, or with none, is a failure."""
    keys = make_keys(tmp_path / "keys")
    gw = start_gateway(tmp_path / "gw", crm, signing, keys, policies=policies_copy(tmp_path / "gw"),
                       extra="checkpoint_every = 5\ncheckpoint_seconds = 3600")
    try:
        alice = gw.as_user("alice", "counsellor")
        for _ in range(7):
            assert gw.get("/clients/1", alice).status_code == 200
        out = cli(gw, "audit", "verify", "--public-key", str(keys / "audit-signing.pub.pem"))
        v = verdict(out)
        assert out.returncode == 0 and v["pending"] is True and v["last_checkpoint"] == 5 and v["unanchored"] == 2
        store = tmp_path / "gw" / "audit.sqlite3"
        old = tmp_path / "old.sqlite3"
        src, dst = sqlite3.connect(store), sqlite3.connect(old)
        src.backup(dst)
        src.close()
        # the same checkpoints, validly signed by the gateway's own key, but long ago: what a trail whose
        # later checkpoints were deleted looks like
        key = serialization.load_pem_private_key((keys / "audit-signing.pem").read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        long_ago = "2026-01-01T00:00:00.000+00:00"
        for size, head, origin in dst.execute("SELECT size, head, origin FROM checkpoints").fetchall():
            dst.execute("UPDATE checkpoints SET time = ?, signature = ? WHERE size = ?",
                        (long_ago, key.sign(note(origin, size, head, long_ago)), size))
        dst.commit()
        dst.close()
    finally:
        gw.service.stop()
    out = cli(gw, "audit", "verify", "--store", str(old), "--public-key", str(keys / "audit-signing.pub.pem"))
    v = verdict(out)
    assert out.returncode == 1 and v["pending"] is False and v["last_checkpoint"] == 5
    assert v["last_checkpoint_time"] == long_ago and "no recent signed checkpoint" in v["problems"][0]


def test_an_emptied_store_is_not_passed(run: dict[str, Any]) -> None:
    store, db = tampered(run, "emptied")
    db.execute("DELETE FROM audit_records")
    db.execute("DELETE FROM checkpoints")
    db.commit()
    code, v = verify_copy(run, store)
    assert code == 1 and v["records"] == 0 and "holds no record" in v["problems"][0]


def test_an_export_with_its_checkpoints_stripped_is_not_passed(run: dict[str, Any], tmp_path: Path) -> None:
    export = tmp_path / "trail.jsonl"
    assert cli(run["gw"], "audit", "export", "--output", str(export)).returncode == 0
    lines = export.read_text().splitlines()
    stripped = tmp_path / "stripped.jsonl"
    stripped.write_text("".join(line + "\n" for line in lines if '"checkpoint"' not in line))
    assert len(stripped.read_text().splitlines()) < len(lines)
    out = cli(run["gw"], "audit", "verify", "--export", str(stripped),
              "--public-key", str(run["keys"] / "audit-signing.pub.pem"))
    assert out.returncode == 1 and "covered by no recent signed checkpoint" in verdict(out)["problems"][0]


def test_files_that_are_not_trails_get_a_sentence_not_a_traceback(run: dict[str, Any], tmp_path: Path) -> None:
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"event": "access", "seq": 1}\n')
    out = cli(run["gw"], "audit", "verify", "--export", str(odd),
              "--public-key", str(run["keys"] / "audit-signing.pub.pem"))
    assert out.returncode == 1 and "odd.jsonl:1: neither a record nor a checkpoint" in out.stderr
    assert "Traceback" not in out.stderr
    out = cli(run["gw"], "audit", "verify", "--anchor", str(odd),
              "--public-key", str(run["keys"] / "audit-signing.pub.pem"))
    assert out.returncode == 1 and "no checkpoint in it to anchor the trail to" in out.stderr
    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text("hello\n")
    out = cli(run["gw"], "audit", "verify", "--public-key", str(not_a_key))
    assert out.returncode == 1 and "not an Ed25519 public key" in out.stderr and "Traceback" not in out.stderr


def test_queries_reports_and_exports(run: dict[str, Any], tmp_path: Path) -> None:
    gw = run["gw"]
    out = cli(gw, "audit", "query", "--client", "1", "--user", "alice", "--format", "json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) == 12 and {r["route"] for r in rows} == {"/clients/{client_id:int}/session-notes"}
    denied = json.loads(cli(gw, "audit", "query", "--outcome", "denied", "--format", "json").stdout)
    assert len(denied) == 12 and all(r["status"] == 403 for r in denied)
    table = cli(gw, "audit", "query", "--role", "supervisor").stdout
    assert table.splitlines()[0].startswith("seq") and len(table.splitlines()) == 13
    report = json.loads(cli(gw, "audit", "report", "--client", "1", "--format", "json").stdout)
    assert report["count"] == 36 and {a["who"] for a in report["accesses"]} == {"u:alice", "u:carol", "u:erin"}
    carol = next(a for a in report["accesses"] if a["who"] == "u:carol")
    assert carol["why"] == "TREAT" and "identity" in carol["pseudonymised"] and "contact" in carol["withheld"]
    html = tmp_path / "report.html"
    assert cli(gw, "audit", "report", "--client", "1", "--output", str(html)).returncode == 0
    assert "<table>" in html.read_text() and "u:carol" in html.read_text()
    fhir = [json.loads(x) for x in cli(gw, "audit", "export", "--format", "fhir").stdout.splitlines()]
    read = next(e for e in fhir if e["agent"][0]["who"]["identifier"]["value"] == "u:carol")
    assert read["resourceType"] == "AuditEvent" and read["action"] == "R" and read["outcome"] == "0"
    assert read["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
    patient = read["entity"][0]
    assert patient["role"]["code"] == "1" and patient["what"]["identifier"]["value"].startswith("P-")
    assert {d["type"] for d in patient["detail"]} >= {"shown", "pseudonymised", "removed"}
    ecs = [json.loads(x) for x in cli(gw, "audit", "export", "--format", "ecs").stdout.splitlines()]
    assert {e["event"]["outcome"] for e in ecs} >= {"success", "failure"} and ecs[0]["user"]["id"]
    export = tmp_path / "trail.jsonl"
    assert cli(gw, "audit", "export", "--output", str(export)).returncode == 0
    out = cli(gw, "audit", "verify", "--export", str(export),
              "--public-key", str(run["keys"] / "audit-signing.pub.pem"))
    assert out.returncode == 0 and verdict(out)["ok"]
    # looking at the trail is itself recorded
    again = json.loads(cli(gw, "audit", "query", "--outcome", "allowed", "--format", "json",
                           "--limit", "100000").stdout)
    assert any(r["method"] == "CLI" and r["route"] == "audit report" for r in again)


def test_kill_9_under_load_loses_no_released_record(crm: str, signing: Signing, tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    gw = start_gateway(tmp_path / "gw", crm, signing, keys, policies=policies_copy(tmp_path / "gw"),
                       process=True)  # kill -9
    released: list[str] = []
    stop = threading.Event()

    def load() -> None:
        token = gw.as_user("alice", "counsellor")
        with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {token}"}, timeout=5) as c:
            while not stop.is_set():
                try:
                    r = c.get("/clients/1/session-notes")
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    released.append(r.headers["x-request-id"])

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    wait_until(lambda: len(released) > 200, "200 responses released under load", timeout=60)
    assert gw.service.proc is not None
    os.killpg(gw.service.proc.pid, signal.SIGKILL)  # mid-load: the threads are still sending
    stop.set()
    for t in threads:
        t.join()
    assert len(released) > 50
    db = sqlite3.connect(tmp_path / "gw" / "audit.sqlite3")
    stored = {json.loads(b)["request_id"] for (b,) in db.execute("SELECT body FROM audit_records")}
    db.close()
    missing = [r for r in released if r not in stored]
    assert not missing, f"{len(missing)} responses left without their record"
    # the tail the killed gateway had not signed is reported; an auditor after an unclean stop accepts it
    out = cli(gw, "audit", "verify", "--public-key", str(keys / "audit-signing.pub.pem"), "--allow-unanchored")
    assert out.returncode == 0, out.stdout
    v = verdict(out)
    assert v["records"] >= len(released) and v["unanchored"] == v["records"] - v["last_checkpoint"] > 0


def _chattr(flag: str, *paths: Path) -> bool:
    return subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True).returncode == 0


@pytest.fixture
def own_gateway(signing: Signing, tmp_path: Path) -> Iterator[tuple[Gateway, Path]]:
    crm_svc, url = start_crm(tmp_path / "crm")
    keys = make_keys(tmp_path / "keys")
    gw = start_gateway(tmp_path / "gw", url, signing, keys, policies=policies_copy(tmp_path / "gw"),
                       extra="timeout_seconds = 1.0")
    yield gw, tmp_path / "gw" / "audit.sqlite3"
    gw.service.stop()
    crm_svc.stop()


def test_unwritable_store_releases_no_data(own_gateway: tuple[Gateway, Path]) -> None:
    gw, store = own_gateway
    alice = gw.as_user("alice", "counsellor")
    assert gw.get("/clients/1", alice).status_code == 200
    files = [store, store.with_name(store.name + "-wal")]
    if not shutil.which("chattr") or not _chattr("+i", *files):
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        r = gw.get("/clients/1", alice)
        assert r.status_code == 503 and set(r.json()) == {"error", "request_id"}
        assert "liam" not in r.text.lower() and "@" not in r.text
        ready = gw.readyz()
        assert ready["ready"] is False and ready["checks"]["audit"]["ok"] is False
    finally:
        _chattr("-i", *files)
    assert gw.get("/clients/1", alice).status_code == 200  # recovers once the store is writable again
    assert gw.readyz()["checks"]["audit"]["ok"] is True


def test_a_commit_that_times_out_is_corrected_in_the_trail(crm: str, signing: Signing, tmp_path: Path) -> None:
    """A record whose commit outlives the audit time-out is still committed later, with the status the
    caller would have had; the caller got 503 and nothing. A second record, `amends` naming the first,
    says so, so the trail never claims a release that did not happen."""
    keys = make_keys(tmp_path / "keys")
    gw = start_gateway(tmp_path / "gw", crm, signing, keys, policies=policies_copy(tmp_path / "gw"),
                       extra="timeout_seconds = 0.5")
    store = tmp_path / "gw" / "audit.sqlite3"
    try:
        alice = gw.as_user("alice", "counsellor")
        assert gw.get("/clients/1", alice).status_code == 200
        lock = sqlite3.connect(store, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # the writer waits for the lock (busy_timeout) past the time-out
        try:
            r = gw.get("/clients/1", alice)
            assert r.status_code == 503 and r.json()["error"] == "audit trail unavailable; nothing was released"
            assert "Liam" not in r.text
            withheld = r.headers["x-request-id"]
        finally:
            lock.execute("ROLLBACK")
            lock.close()

        def stored() -> list[dict[str, Any]]:
            db = sqlite3.connect(store)
            try:
                return [json.loads(b) for (b,) in db.execute("SELECT body FROM audit_records ORDER BY seq")]
            finally:
                db.close()

        def both() -> list[dict[str, Any]] | None:
            mine = [x for x in stored() if withheld in (x["request_id"], x.get("amends"))]
            return mine if len(mine) == 2 else None

        original, correction = wait_until(both, "the withheld request's record and its correction")
        assert original["request_id"] == withheld and original["status"] == 200 and original["amends"] is None
        assert correction["amends"] == withheld and correction["request_id"] != withheld
        assert correction["status"] == 503 and correction["outcome"] == "error"
        assert correction["reason"] == "withheld: audit commit timed out"
        assert (correction["user"], correction["route"], correction["clients"]) == (
            original["user"], original["route"], original["clients"])
        assert gw.get("/clients/1", alice).status_code == 200  # the trail carries on
    finally:
        gw.service.stop()
    public = str(keys / "audit-signing.pub.pem")
    out = cli(gw, "audit", "verify", "--public-key", public)
    assert verdict(out)["ok"], out.stdout
    # the views read the pair as one withheld access
    shown = json.loads(cli(gw, "audit", "query", "--client", "1", "--format", "json", "--public-key", public).stdout)
    assert [r["amended_by"] for r in shown if r["request_id"] == withheld] == [correction["request_id"]]
    report = json.loads(cli(gw, "audit", "report", "--client", "1", "--format", "json", "--public-key", public).stdout)
    assert [a["outcome"] for a in report["accesses"]] == ["allowed", "withheld", "allowed"]
    assert report["accesses"][1]["shown"] == []


def test_full_store_releases_no_data(crm: str, signing: Signing, tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    gw = start_gateway(tmp_path / "gw", crm, signing, keys, policies=policies_copy(tmp_path / "gw"),
                       extra="max_bytes = 65536")
    try:
        alice = gw.as_user("alice", "counsellor")
        statuses = [gw.get("/clients/1/session-notes", alice).status_code for _ in range(200)]
        assert statuses[0] == 200 and statuses[-1] == 503
        first_refusal = statuses.index(503)
        assert set(statuses[first_refusal:]) == {503}
        assert "full" in gw.readyz()["checks"]["audit"]["last_error"]
    finally:
        gw.service.stop()
    out = cli(gw, "audit", "verify", "--public-key", str(keys / "audit-signing.pub.pem"))
    assert verdict(out)["ok"] and verdict(out)["records"] == first_refusal


def test_signing_key_is_private_and_its_id_is_stable(run: dict[str, Any], crm: str, signing: Signing,
                                                     tmp_path: Path) -> None:
    """The key is made once and kept: every checkpoint, of this run and of later runs on the same keys/, names
    the id of the public key auditors were given (a key made again at a start would sign under a new id)."""
    key = run["keys"] / "audit-signing.pem"
    assert key.stat().st_mode & 0o077 == 0
    out = cli(run["gw"], "audit", "public-key")
    public = run["keys"] / "audit-signing.pub.pem"
    assert out.stdout == public.read_text()
    expected = key_id(load_public(public))
    assert len(expected) == 16

    def key_ids(store: Path) -> list[str]:
        db = sqlite3.connect(store)
        try:
            return [cp.key_id for cp in read_checkpoints(db)]
        finally:
            db.close()

    ran = key_ids(run["store"])
    assert len(ran) >= 2 and set(ran) == {expected}
    # the same keys/ under a gateway started, stopped and started again: the key is loaded, not made anew
    keys = tmp_path / "keys"
    shutil.copytree(run["keys"], keys, symlinks=True)
    private = key.read_bytes()
    gw = start_gateway(tmp_path / "gw", crm, signing, keys, policies=policies_copy(tmp_path / "gw"))
    for restarted in (False, True):
        if restarted:
            gw.service.start()
        try:
            assert gw.get("/clients/1", gw.as_user("alice", "counsellor")).status_code == 200
        finally:
            gw.service.stop()  # a clean stop signs a checkpoint
    later = key_ids(tmp_path / "gw" / "audit.sqlite3")
    assert len(later) >= 2 and set(later) == {expected}
    assert (keys / "audit-signing.pem").read_bytes() == private
    assert cli(gw, "audit", "public-key").stdout == out.stdout


def test_audit_off_keeps_the_siem_lines_and_says_so(crm: str, signing: Signing, tmp_path: Path) -> None:
    """`[audit] durable = false` (the benchmark's baseline): no store, SIEM lines still written, loudly."""
    keys = make_keys(tmp_path / "keys")
    gw = start_gateway(tmp_path / "gw", crm, signing, keys, policies=policies_copy(tmp_path / "gw"),
                       extra="durable = false")
    try:
        alice = gw.as_user("alice", "counsellor")
        assert gw.get("/clients/1", alice).status_code == 200
        assert gw.get("/clients/2", alice).status_code == 403
        audit = gw.readyz()["checks"]["audit"]
        assert audit["durable"] is False and audit["records"] == 2
        records = gw.audit_records()
        assert [(r["route"], r["status"], r["seq"]) for r in records] == [
            ("/clients/{client_id:int}", 200, None), ("/clients/{client_id:int}", 403, None)]
    finally:
        gw.service.stop()
    assert not (tmp_path / "gw" / "audit.sqlite3").exists()
    assert "audit is not durable" in (tmp_path / "gw" / "gateway.log").read_text()


def test_commits_group_concurrent_requests_and_never_hold_a_lone_one(
        switchable: str, signing: Signing, tmp_path: Path) -> None:
    """Group commit: records of requests in flight together share one fsync; a lone request is committed
    at once, however long the commit delay. The CRM takes a second over the note lists, so that the 24
    requests are in flight together however busy the machine is (without the delay: two commits)."""
    keys = make_keys(tmp_path / "keys")
    gw = start_gateway(tmp_path / "gw", switchable, signing, keys, policies=policies_copy(tmp_path / "gw"),
                       extra="timeout_seconds = 20.0\ncommit_delay_ms = 3000")

    def counts() -> tuple[int, int]:
        audit = gw.readyz()["checks"]["audit"]
        return audit["records"], audit["commits"]

    try:
        alice = gw.as_user("alice", "counsellor")
        records0, commits0 = counts()
        started = time.monotonic()
        for _ in range(5):
            assert gw.get("/clients/1", alice).status_code == 200
        alone = time.monotonic() - started
        records1, commits1 = counts()
        assert (records1 - records0, commits1 - commits0) == (5, 5)
        assert alone < 3.0, "a lone request was held for the commit delay"

        async def together(n: int) -> list[int]:
            limits = httpx.Limits(max_connections=n)
            async with httpx.AsyncClient(base_url=gw.url, limits=limits, timeout=15,
                                         headers={"authorization": f"Bearer {alice}"}) as c:
                statuses = await asyncio.gather(*(c.get("/clients/1/session-notes") for _ in range(n)))
            return [r.status_code for r in statuses]

        HTTP.post(switchable + "/_control", json={"delay": 1.0}).raise_for_status()
        started = time.monotonic()
        assert asyncio.run(together(24)) == [200] * 24
        grouped = time.monotonic() - started - 1.0
        records2, commits2 = counts()
        assert records2 - records1 == 24
        # all 24 in flight together: the writer holds the first commit until the last record is handed over
        assert commits2 - commits1 == 1, f"24 concurrent records took {commits2 - commits1} commits"
        assert grouped < 3.0, "the commit waited out its delay although nobody else was coming"
    finally:
        gw.service.stop()
    out = cli(gw, "audit", "verify", "--public-key", str(keys / "audit-signing.pub.pem"))
    assert verdict(out)["ok"] and verdict(out)["records"] == 29


def test_a_replaced_store_is_noticed_and_nothing_is_released(crm: str, signing: Signing, tmp_path: Path) -> None:
    """A store swapped for a copy would take the records into the deleted file, released with no record on
    disk: the writer checks before each commit that the file is the one it opened, and fails closed."""
    keys = make_keys(tmp_path / "keys")
    gw = start_gateway(tmp_path / "gw", crm, signing, keys, policies=policies_copy(tmp_path / "gw"))
    store = tmp_path / "gw" / "audit.sqlite3"
    alice = gw.as_user("alice", "counsellor")
    try:
        assert gw.get("/clients/1", alice).status_code == 200
        copy = tmp_path / "copy.sqlite3"
        src, dst = sqlite3.connect(store), sqlite3.connect(copy)
        src.backup(dst)
        src.close()
        dst.close()
        assert gw.get("/clients/1", alice).status_code == 200  # the copy is now one record behind
        os.replace(copy, store)
        r = gw.get("/clients/1", alice)
        assert r.status_code == 503 and "name" not in r.text
        audit = gw.readyz()["checks"]["audit"]
        assert audit["ok"] is False and "the audit store file was replaced since it was opened" in audit["last_error"]
        assert gw.get("/clients/1", alice).status_code == 503  # and stays closed until someone looks
    finally:
        gw.service.stop()

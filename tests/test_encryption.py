"""Per-client field encryption through the gateway: what the CRM holds, tampering, shredding, rotation."""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.keys.envelope import is_sealed
from tests.conftest import (
    HTTP,
    Gateway,
    Ran,
    Service,
    Signing,
    direct,
    free_port,
    make_keys,
    policies_copy,
    start_gateway,
    wait_until,
)
from tests.conftest import fieldguard as run_command

MARKERS = {
    "body": "MARKER-BODY-7f3a session about sleep and work stress",
    "summary": "MARKER-SUMMARY-21c9 first session",
    "process": "MARKER-PROCESS-88d1 my countertransference",
    "letter": "MARKER-LETTER-4b2e dear doctor",
    "gp": "MARKER-GP-9e77 Dr Quill",
}


def crm_process(directory: Path, seed: bool) -> tuple[Service, str, Path]:
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    db = directory / "crm.sqlite3"
    args = [sys.executable, "-m", "examples.crm", "--db", str(db), "--port", str(port)]
    if not seed:
        args.append("--staff-only")
    svc = Service(args, directory / "crm.log", f"http://127.0.0.1:{port}/health").start()
    return svc, f"http://127.0.0.1:{port}", db


def fieldguard(gw: Gateway, *args: str) -> Ran:
    return run_command(gw.config, *args)


@pytest.fixture(scope="module")
def setup(signing: Signing, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A CRM with its staff but no client records (so no seeded plaintext), its own keys, and a gateway."""
    d = tmp_path_factory.mktemp("enc")
    crm, url, db = crm_process(d / "crm", seed=False)
    keys = make_keys(d / "keys")
    gw = start_gateway(d / "gw", url, signing, keys, policies=policies_copy(d / "gw"))
    yield {"crm": crm, "url": url, "db": db, "gw": gw, "keys": keys, "dir": d}
    gw.service.stop()
    crm.stop()


def _create_client(gw: Gateway, counsellor: str, first: str) -> int:
    erin = gw.as_user("erin", "admin")
    r = gw.request("POST", "/clients", erin, json={
        "name": {"first": first, "last": "Example"}, "date_of_birth": "1991-02-03", "email": f"{first}@example.org",
        "counsellor": counsellor, "category": "adult", "status": "active",
        "gp": {"name": MARKERS["gp"], "surgery": "Riverside"}})
    assert r.status_code == 201, r.text
    assert r.json()["gp"]["name"] == MARKERS["gp"]  # admin reads GP details in clear
    return int(r.json()["id"])


def _write_records(gw: Gateway, client: int) -> None:
    alice = gw.as_user("alice", "counsellor")
    r = gw.request("POST", f"/clients/{client}/session-notes", alice, json={
        "session_date": "2026-11-20", "summary": MARKERS["summary"], "body": MARKERS["body"],
        "risk": {"level": "low", "factors": ["MARKER-RISK-1"]}})
    assert r.status_code == 201, r.text
    r = gw.request("POST", f"/clients/{client}/process-notes", alice, json={
        "written_at": "2026-11-20", "body": MARKERS["process"], "supervision_due": "2026-12-01"})
    assert r.status_code == 201, r.text
    r = gw.request("POST", f"/clients/{client}/letters", alice, json={
        "sent_on": "2026-11-21", "recipient": "GP", "subject": "Referral", "body": MARKERS["letter"],
        "third_party": False})
    assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def clients(setup: dict[str, Any]) -> dict[str, int]:
    gw = setup["gw"]
    found = {"a": _create_client(gw, "alice", "Ann"), "b": _create_client(gw, "alice", "Ben"),
             "c": _create_client(gw, "bob", "Cal")}
    for name in ("a", "b"):
        _write_records(gw, found[name])
    return found


def test_crm_database_holds_no_plaintext_of_encrypted_classes(setup: dict[str, Any], clients: dict[str, int]
                                                              ) -> None:
    db: Path = setup["db"]
    raw = b"".join(p.read_bytes() for p in db.parent.glob("crm.sqlite3*"))
    assert b"fg1." in raw
    for value in [*MARKERS.values(), "MARKER-RISK-1"]:
        assert value.encode() not in raw, value
    # the CRM's own API shows ciphertext; the gateway shows the counsellor plaintext
    note = direct(setup["url"], f"/clients/{clients['a']}/session-notes")["items"][0]
    assert is_sealed(note["body"]) and is_sealed(note["risk"]) and is_sealed(note["summary"])
    shown = setup["gw"].get(f"/session-notes/{note['id']}", setup["gw"].as_user("alice", "counsellor")).json()
    assert shown["body"] == MARKERS["body"] and shown["risk"] == {"level": "low", "factors": ["MARKER-RISK-1"]}


def test_only_clear_outcomes_unwrap_keys(setup: dict[str, Any], clients: dict[str, int]) -> None:
    gw: Gateway = setup["gw"]
    r = gw.get(f"/clients/{clients['a']}", gw.as_user("carol", "supervisor"))
    assert r.status_code == 200 and "gp" not in r.json()
    rec = gw.audit_for(r.headers["x-request-id"])
    assert rec["key_ids"] == [] and "gp" in rec["removed"]
    r = gw.get(f"/clients/{clients['a']}/session-notes", gw.as_user("carol", "supervisor"))
    rec = gw.audit_for(r.headers["x-request-id"])
    assert r.json()["items"][0]["body"] == MARKERS["body"] and len(rec["key_ids"]) == 1


def _sealed_note(setup: dict[str, Any], client: int) -> dict[str, Any]:
    return direct(setup["url"], f"/clients/{client}/session-notes")["items"][0]  # type: ignore[no-any-return]


def _patch_crm(setup: dict[str, Any], path: str, body: dict[str, Any]) -> None:
    HTTP.patch(setup["url"] + path, json=body, timeout=10).raise_for_status()


def _flip(ciphertext: str) -> str:
    body = ciphertext[4:]
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[-5] ^= 0x01
    return "fg1." + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


@pytest.mark.parametrize("attack", ["flip", "other_field", "other_client", "unknown_version"])
def test_tampered_ciphertexts_are_removed_and_audited(setup: dict[str, Any], clients: dict[str, int],
                                                      attack: str) -> None:
    gw: Gateway = setup["gw"]
    note = _sealed_note(setup, clients["b"])
    original = {"body": note["body"], "summary": note["summary"]}
    if attack == "flip":
        change = {"body": _flip(note["body"])}
    elif attack == "other_field":
        change = {"body": note["summary"]}
    elif attack == "other_client":
        change = {"body": _sealed_note(setup, clients["a"])["body"]}
    else:
        raw = bytearray(base64.urlsafe_b64decode(note["body"][4:] + "=="))
        raw[0] = 9
        change = {"body": "fg1." + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()}
    _patch_crm(setup, f"/session-notes/{note['id']}", change)
    try:
        r = gw.get(f"/session-notes/{note['id']}", gw.as_user("alice", "counsellor"))
        assert r.status_code == 200
        shown = r.json()
        assert "body" not in shown and shown["summary"] == MARKERS["summary"]
        assert "fg1." not in r.text
        rec = gw.audit_for(r.headers["x-request-id"])
        expected = {"flip": "authentication failed", "other_field": "authentication failed",
                    "other_client": "key belongs to another client", "unknown_version": "unknown envelope version"}
        assert any(expected[attack] in f and f.startswith("session_note.body") for f in rec["decrypt_failures"]), rec
    finally:
        _patch_crm(setup, f"/session-notes/{note['id']}", original)


def test_new_client_keys_are_linked_and_refused_creates_leave_no_key(setup: dict[str, Any],
                                                                     clients: dict[str, int]) -> None:
    gw: Gateway = setup["gw"]
    status = json.loads(fieldguard(gw, "keys", "status").stdout)
    assert status["unlinked"] == 0
    destroyed_before = sum(k["keys"] for k in status["keys"] if k["status"] == "destroyed")
    # the CRM refuses this create (it assigns ids itself), after the gateway made and used a key for it
    r = gw.request("POST", "/clients", gw.as_user("erin", "admin"), json={
        "id": 999, "name": {"first": "Orphan", "last": "Key"}, "gp": {"name": "x", "surgery": "y"}})
    assert r.status_code == 422, r.text
    status = json.loads(fieldguard(gw, "keys", "status").stdout)
    destroyed = sum(k["keys"] for k in status["keys"] if k["status"] == "destroyed")
    assert status["unlinked"] == 0 and destroyed == destroyed_before + 1
    rec = gw.audit_for(r.headers["x-request-id"])
    assert rec["outcome"] == "denied" and rec["upstream_status"] == 422 and len(rec["key_ids"]) == 1


def test_client_key_rotation_keeps_old_data_readable(setup: dict[str, Any], clients: dict[str, int]) -> None:
    gw: Gateway = setup["gw"]
    alice = gw.as_user("alice", "counsellor")
    before = _sealed_note(setup, clients["a"])["body"][:30]
    out = fieldguard(gw, "keys", "rotate", "--client", str(clients["a"]), "--actor", "sam")
    assert out.returncode == 0, out.stderr
    assert gw.get(f"/clients/{clients['a']}/session-notes", alice).json()["items"][0]["body"] == MARKERS["body"]

    def sealed_after_rotation() -> str | None:
        r = gw.request("POST", f"/clients/{clients['a']}/session-notes", alice, json={"body": "after rotation"})
        assert r.status_code == 201, r.text
        new_body: str = direct(setup["url"], f"/session-notes/{r.json()['id']}")["body"]
        return new_body if new_body[:30] != before else None

    # the gateway drops the rotated key within revocation_poll_seconds; then writes seal under the new
    # version (the key id is in the envelope's header), and the old note still reads
    wait_until(sealed_after_rotation, "a note sealed under the client's new key version", timeout=10)
    assert gw.get(f"/clients/{clients['a']}/session-notes", alice).json()["items"][0]["body"] == MARKERS["body"]
    rec = [x for x in gw.audit_records() if x["route"] == "keys rotate"][-1]
    assert rec["user"] == "u:sam" and rec["method"] == "CLI" and rec["clients"][0].startswith("P-")


def test_rotate_kek_rewraps_and_everything_still_reads(setup: dict[str, Any], clients: dict[str, int]) -> None:
    gw: Gateway = setup["gw"]
    dry = fieldguard(gw, "keys", "rotate-kek", "--dry-run")
    assert dry.returncode == 0 and json.loads(dry.stdout)["would_rewrap"] > 0
    before = json.loads(fieldguard(gw, "keys", "status").stdout)
    crm_before = direct(setup["url"], "/session-notes?per_page=100")
    out = fieldguard(gw, "keys", "rotate-kek")
    assert out.returncode == 0, out.stderr
    after = json.loads(fieldguard(gw, "keys", "status").stdout)
    assert after["current_kek"] != before["current_kek"] and list(after["wrapped_by_kek"]) == [after["current_kek"]]
    assert direct(setup["url"], "/session-notes?per_page=100") == crm_before  # no CRM traffic, nothing re-encrypted
    # a fresh gateway (cold cache) opens every key through the new KEK
    fresh = start_gateway(setup["dir"] / "gw2", setup["url"], gw.signing, setup["keys"],
                          policies=policies_copy(setup["dir"] / "gw2"))
    try:
        for name in ("a", "b"):
            body = fresh.get(f"/clients/{clients[name]}/session-notes", fresh.as_user("alice", "counsellor")).json()
            assert {n["body"] for n in body["items"]} >= {MARKERS["body"]}
    finally:
        fresh.service.stop()
    assert json.loads(fieldguard(gw, "keys", "rotate-kek", "--dry-run").stdout)["would_rewrap"] > 0  # a new one


def test_shred_makes_a_clients_fields_unreadable_everywhere(setup: dict[str, Any], clients: dict[str, int],
                                                            signing: Signing) -> None:
    gw: Gateway = setup["gw"]
    alice = gw.as_user("alice", "counsellor")
    erin = gw.as_user("erin", "admin")
    backup = setup["dir"] / "backup"
    backup.mkdir()
    src = sqlite3.connect(setup["db"])
    dst = sqlite3.connect(backup / "crm.sqlite3")
    src.backup(dst)
    src.close()
    dst.close()
    victim, other = clients["b"], clients["a"]
    pseudonym_before = gw.audit_for(gw.get(f"/clients/{victim}", erin).headers["x-request-id"])["clients"]
    dry = fieldguard(gw, "keys", "shred", "--client", str(victim), "--reason", "Art.17 request T-1", "--dry-run")
    assert dry.returncode == 0 and json.loads(dry.stdout)["destroyed"] == 0
    assert gw.get(f"/clients/{victim}/session-notes", alice).json()["items"][0]["body"] == MARKERS["body"]
    out = fieldguard(gw, "keys", "shred", "--client", str(victim), "--reason", "Art.17 request T-1", "--yes")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["destroyed"] >= 2  # record and process_notes scopes
    def unreadable() -> httpx.Response | None:  # the gateway drops the keys at its next revocation poll
        r = gw.get(f"/clients/{victim}/session-notes", alice)
        return r if "body" not in r.json()["items"][0] else None

    r = wait_until(unreadable, "the shredded client's notes unreadable", timeout=10)
    assert r is not None
    note = r.json()["items"][0]
    assert "body" not in note and "summary" not in note and "fg1." not in r.text
    assert any("unknown or destroyed key" in f for f in gw.audit_for(r.headers["x-request-id"])["decrypt_failures"])
    assert "gp" not in gw.get(f"/clients/{victim}", erin).json()
    # other clients unaffected
    assert gw.get(f"/clients/{other}/session-notes", alice).json()["items"][0]["body"] == MARKERS["body"]
    # the audit trail no longer links the client: the pseudonym is gone, and none is made for them again
    pseudonym_after = gw.audit_for(gw.get(f"/clients/{victim}", erin).headers["x-request-id"])["clients"]
    assert pseudonym_after == ["erased"] != pseudonym_before
    # a tombstone: nothing more is written about them, and no key is made for them
    note_id = r.json()["items"][0]["id"]
    for method, path, body in (("PATCH", f"/session-notes/{note_id}", {"summary": "x"}),
                               ("POST", f"/clients/{victim}/session-notes", {"summary": "x", "body": "y"})):
        refused = gw.request(method, path, alice, json=body)
        assert refused.status_code == 410, refused.text
        assert refused.json()["error"] == "this client's records were erased; nothing more can be written for them"
        assert gw.audit_for(refused.headers["x-request-id"])["reason"] == "client erased"
    again = fieldguard(gw, "keys", "shred", "--client", str(victim), "--reason", "Art.17 request T-1", "--yes")
    assert again.returncode == 0 and json.loads(again.stdout)["destroyed"] == 0
    never = fieldguard(gw, "keys", "shred", "--client", "987654", "--reason", "typo", "--yes")
    assert never.returncode == 1 and "not known to the keystore" in never.stderr
    shreds = [x for x in gw.audit_records() if x["route"] == "keys shred" and x["outcome"] == "allowed"]
    assert shreds[-2]["reason"] == "Art.17 request T-1" and shreds[-2]["clients"] == pseudonym_before
    assert shreds[-2]["counts"]["destroyed"] >= 2 and shreds[-1]["clients"] == ["erased"]
    # a copy of the CRM taken before the shred is no help
    port = free_port()
    copy_crm = Service([sys.executable, "-m", "examples.crm", "--db", str(backup / "crm.sqlite3"), "--port",
                        str(port), "--no-seed"], backup / "crm.log", f"http://127.0.0.1:{port}/health").start()
    try:
        g2 = start_gateway(setup["dir"] / "gw3", f"http://127.0.0.1:{port}", signing, setup["keys"],
                           policies=policies_copy(setup["dir"] / "gw3"))
        try:
            old = g2.get(f"/clients/{victim}/session-notes", g2.as_user("alice", "counsellor")).json()["items"][0]
            assert "body" not in old and is_sealed(direct(f"http://127.0.0.1:{port}",
                                                          f"/clients/{victim}/session-notes")["items"][0]["body"])
            assert g2.get(f"/clients/{other}/session-notes",
                          g2.as_user("alice", "counsellor")).json()["items"][0]["body"] == MARKERS["body"]
        finally:
            g2.service.stop()
    finally:
        copy_crm.stop()
    keystore = (setup["keys"] / "keystore.sqlite3").read_bytes()
    assert keystore.count(b"Art.17 request T-1") >= 1  # the reason is kept; the wrapped keys are not


def test_keystore_and_kek_files_are_private(setup: dict[str, Any]) -> None:
    keys: Path = setup["keys"]
    for name in ("kek.json", "keystore.sqlite3"):
        assert (keys / name).stat().st_mode & 0o077 == 0, name
    shutil.copy(keys / "kek.json", keys / "loose.json")
    (keys / "loose.json").chmod(0o644)
    from proxy.keys.kek import FileKek
    from proxy.secretfile import InsecureKeyFile

    with pytest.raises(InsecureKeyFile):
        FileKek(keys / "loose.json", b"whatever passphrase")
    (keys / "loose.json").unlink()


def _version(ciphertext: str) -> int:
    body = ciphertext[4:]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))[0]


@pytest.fixture(scope="module")
def bound(setup: dict[str, Any]) -> dict[str, Any]:
    """A client of alice's with two session notes and two letters, one of them from a third party."""
    gw: Gateway = setup["gw"]
    alice = gw.as_user("alice", "counsellor")
    client = _create_client(gw, "alice", "Dee")
    notes = []
    for text in ("MARKER-BOUND-ONE first", "MARKER-BOUND-TWO second"):
        r = gw.request("POST", f"/clients/{client}/session-notes", alice, json={"session_date": "2026-11-22",
                                                                                 "body": text})
        assert r.status_code == 201, r.text
        notes.append(int(r.json()["id"]))
    letters = {}
    for third in (True, False):
        r = gw.request("POST", f"/clients/{client}/letters", alice, json={
            "sent_on": "2026-11-23", "recipient": "Dr Quill" if third else "Dee", "subject": "Report",
            "body": f"MARKER-LETTER-{'THIRD' if third else 'OWN'}", "third_party": third})
        assert r.status_code == 201, r.text
        letters[third] = int(r.json()["id"])
    return {"client": client, "notes": notes, "letters": letters}


def test_a_flag_flipped_at_the_crm_releases_nothing(setup: dict[str, Any], bound: dict[str, Any]) -> None:
    """`third_party` turned off in the CRM's own database would show the client a third party's letter:
    the letter's fields were sealed as class third_party, so read as letters they fail their tag."""
    gw: Gateway = setup["gw"]
    letter = bound["letters"][True]
    held = direct(setup["url"], f"/letters/{letter}")
    assert _version(held["body"]) == 2  # a create: bound to its class (the CRM gives the id afterwards)
    client = gw.as_user("dee", "client", client_id=str(bound["client"]))
    r = gw.get(f"/letters/{letter}", client)
    assert r.status_code == 200 and "body" not in r.json()  # the policy: no third-party letters for the client
    _patch_crm(setup, f"/letters/{letter}", {"third_party": False})
    try:
        r = gw.get(f"/letters/{letter}", client)
        assert r.status_code == 200, r.text
        assert "MARKER-LETTER-THIRD" not in r.text and "Dr Quill" not in r.text and "fg1." not in r.text
        assert not {"body", "recipient", "subject"} & r.json().keys()
        rec = gw.audit_for(r.headers["x-request-id"])
        assert "letter.body: authentication failed (tampered, moved to another field or record, or read under " \
               "another class)" in rec["decrypt_failures"], rec
    finally:
        _patch_crm(setup, f"/letters/{letter}", {"third_party": True})


def test_a_ciphertext_replayed_into_another_record_fails(setup: dict[str, Any], bound: dict[str, Any]) -> None:
    """Once the CRM has given a record its id, what the gateway seals for it is bound to that id: the
    client's own key and the same field, copied into another note, no longer opens."""
    gw: Gateway = setup["gw"]
    alice = gw.as_user("alice", "counsellor")
    first, second = bound["notes"]
    r = gw.request("PATCH", f"/session-notes/{first}", alice, json={"body": "MARKER-BOUND-ONE amended"})
    assert r.status_code == 200, r.text
    sealed = direct(setup["url"], f"/session-notes/{first}")["body"]
    assert _version(sealed) == 3
    original = direct(setup["url"], f"/session-notes/{second}")["body"]
    _patch_crm(setup, f"/session-notes/{second}", {"body": sealed})
    try:
        r = gw.get(f"/session-notes/{second}", alice)
        assert r.status_code == 200 and "body" not in r.json() and "MARKER-BOUND-ONE" not in r.text
        rec = gw.audit_for(r.headers["x-request-id"])
        assert any(f.startswith("session_note.body: authentication failed") for f in rec["decrypt_failures"]), rec
        assert gw.get(f"/session-notes/{first}", alice).json()["body"] == "MARKER-BOUND-ONE amended"
    finally:
        _patch_crm(setup, f"/session-notes/{second}", {"body": original})
    assert gw.get(f"/session-notes/{second}", alice).json()["body"] == "MARKER-BOUND-TWO second"


def test_a_flag_set_through_the_gateway_reseals_what_it_reclassifies(setup: dict[str, Any],
                                                                      bound: dict[str, Any]) -> None:
    """alice marks the client's own letter as a third party's, and back: each time the stored fields the flag
    reclassifies are opened as the class they were and sealed as the class they become, so they stay
    readable to whoever may read that class (and only them)."""
    gw: Gateway = setup["gw"]
    alice, client = gw.as_user("alice", "counsellor"), gw.as_user("dee", "client", client_id=str(bound["client"]))
    letter = bound["letters"][False]
    before = direct(setup["url"], f"/letters/{letter}")
    assert gw.get(f"/letters/{letter}", client).json()["body"] == "MARKER-LETTER-OWN"
    r = gw.request("PATCH", f"/letters/{letter}", alice, json={"third_party": True})
    assert r.status_code == 200, r.text
    rec = gw.audit_for(r.headers["x-request-id"])
    assert rec["reclassified"] == ["third_party"] and rec["written"] == ["body", "recipient", "subject", "third_party"]
    held = direct(setup["url"], f"/letters/{letter}")
    assert held["third_party"] is True and held["sent_on"] == before["sent_on"]
    assert held["body"] != before["body"] and _version(held["body"]) == 3
    assert gw.get(f"/letters/{letter}", alice).json()["body"] == "MARKER-LETTER-OWN"
    shown = gw.get(f"/letters/{letter}", client)
    assert "body" not in shown.json() and gw.audit_for(shown.headers["x-request-id"])["decrypt_failures"] == []
    r = gw.request("PATCH", f"/letters/{letter}", alice, json={"third_party": False})
    assert r.status_code == 200, r.text
    assert gw.get(f"/letters/{letter}", client).json()["body"] == "MARKER-LETTER-OWN"


def test_a_flag_that_cannot_reseal_is_refused(setup: dict[str, Any], bound: dict[str, Any]) -> None:
    """A stored field that does not open (here: tampered) cannot be sealed as its new class; the flag is
    refused (409) rather than left pointing at a field nobody could read again, and the CRM keeps the record."""
    gw: Gateway = setup["gw"]
    alice = gw.as_user("alice", "counsellor")
    letter = bound["letters"][False]
    held = direct(setup["url"], f"/letters/{letter}")
    _patch_crm(setup, f"/letters/{letter}", {"subject": _flip(held["subject"])})
    try:
        r = gw.request("PATCH", f"/letters/{letter}", alice, json={"third_party": True})
        assert r.status_code == 409, r.text
        assert r.json()["error"] == "subject cannot be opened to re-seal it as third_party; the flag is left as it is"
        rec = gw.audit_for(r.headers["x-request-id"])
        assert rec["outcome"] == "denied" and rec["reason"].startswith("re-seal failed: authentication failed")
        assert direct(setup["url"], f"/letters/{letter}")["third_party"] is False
    finally:
        _patch_crm(setup, f"/letters/{letter}", {"subject": held["subject"]})


def test_ciphertexts_sealed_before_the_binding_still_open(setup: dict[str, Any], bound: dict[str, Any]) -> None:
    """Version 1 (resource and path only), what earlier releases wrote, is still read with the client's key."""
    import asyncio

    import orjson
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from proxy.keys import FileKek, KeyRing, SqliteKeystore, associated_where
    from tests.conftest import KEK_PASSPHRASE

    async def data_key() -> tuple[bytes, AESGCM]:
        store = await SqliteKeystore.open(setup["keys"] / "keystore.sqlite3")
        try:
            ring = KeyRing(store, FileKek(setup["keys"] / "kek.json", KEK_PASSPHRASE.encode()))
            opened = await ring.for_writing(str(bound["client"]), "record")
            return opened.key.key_id, opened.aead
        finally:
            await store.close()

    key_id, aead = asyncio.run(data_key())
    header, nonce = bytes((1, 1)) + key_id, b"\x01" * 12
    sealed = aead.encrypt(nonce, orjson.dumps("MARKER-V1 written long ago"),
                                      header + associated_where("session_note", "body"))
    old = "fg1." + base64.urlsafe_b64encode(header + nonce + sealed).rstrip(b"=").decode()
    second = bound["notes"][1]
    original = direct(setup["url"], f"/session-notes/{second}")["body"]
    _patch_crm(setup, f"/session-notes/{second}", {"body": old})
    try:
        assert gw_body(setup, second) == "MARKER-V1 written long ago"
    finally:
        _patch_crm(setup, f"/session-notes/{second}", {"body": original})


def gw_body(setup: dict[str, Any], note: int) -> Any:
    gw: Gateway = setup["gw"]
    return gw.get(f"/session-notes/{note}", gw.as_user("alice", "counsellor")).json().get("body")

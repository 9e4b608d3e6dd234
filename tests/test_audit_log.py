"""Audit, first form: one JSON line per request, with names and pseudonyms, never values."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.conftest import Gateway, direct


def test_a_read_is_recorded_with_classes_rules_and_pseudonyms(gateway: Gateway, crm: str) -> None:
    r = gateway.get("/clients/1", gateway.as_user("carol", "supervisor"))
    rec = gateway.audit_for(r.headers["x-request-id"])
    assert rec["user"] == "u:carol" and rec["role"] == "supervisor" and rec["purpose"] == "TREAT"
    assert rec["method"] == "GET" and rec["route"] == "/clients/{client_id:int}" and rec["status"] == 200
    assert rec["outcome"] == "allowed" and rec["relations"] == ["any+supervision"]
    assert rec["clients"] == [r.json()["name"]["first"]]  # the pseudonym, never the CRM id
    assert rec["pseudonymised"] == {"identity": ["name.first"], "reference": ["id"]}  # no CRM id for a supervisor
    assert "contact" in rec["removed"] and "service" in rec["shown"]
    assert rec["rules"] and all(rule.startswith("policy.csv:") for rule in rec["rules"])
    assert len(rec["policy"]) == 64 and rec["token_id"]


def test_denials_are_recorded(gateway: Gateway) -> None:
    r = gateway.get("/clients/2", gateway.as_user("alice", "counsellor"))
    rec = gateway.audit_for(r.headers["x-request-id"])
    assert rec["status"] == 403 and rec["outcome"] == "denied"
    assert rec["reason"] == ("not on the caseload: policy.csv:35 grants counsellor identity only through "
                             "breakglass or caseload; the caller holds any") and len(rec["clients"]) == 1
    r = gateway.get("/nowhere", gateway.as_user("alice", "counsellor"))
    assert gateway.audit_for(r.headers["x-request-id"])["reason"] == "unknown route"


def test_no_values_reach_the_audit_log(gateway: Gateway, crm: str) -> None:
    alice = gateway.as_user("alice", "counsellor")
    client = direct(crm, "/clients/1")
    notes = direct(crm, "/clients/1/session-notes")["items"]
    for path in ("/clients/1", "/clients/1/session-notes", "/clients?per_page=50"):
        assert gateway.get(path, alice).status_code == 200
    text = gateway.audit.read_text()
    for value in (client["email"], client["name"]["last"], client["phone"], client["date_of_birth"],
                  notes[0]["body"][:30], client["case_number"]):
        assert value not in text
    assert '"clients":["1"]' not in text


def test_a_cover_grant_is_named_with_its_reason_in_every_record_it_decides(gateway: Gateway) -> None:
    """tests/conftest.py gives dana a live grant to cover bob ("test cover while bob is away")."""
    dana = gateway.as_user("dana", "service_manager")
    r = gateway.get("/clients/2", dana)  # bob's client: dana sees it in full through the cover grant
    assert r.status_code == 200 and "email" in r.json()
    rec = gateway.audit_for(r.headers["x-request-id"])
    assert rec["relations"] == ["any+cover"]
    assert rec["cover"] == [{"grant": "cover.yaml:2", "reason": "test cover while bob is away"}]
    other = gateway.get("/clients/1", dana)  # alice's client: no grant decides it
    assert gateway.audit_for(other.headers["x-request-id"])["cover"] == []


def test_denied_requests_for_ids_the_crm_never_named_make_no_pseudonym(gateway: Gateway, shared_keys: Path) -> None:
    """Each used to add a permanent pseudonym row: 200 such requests grew the keystore by 22 MB."""
    def rows() -> int:
        with sqlite3.connect(shared_keys / "keystore.sqlite3") as db:
            return int(db.execute("SELECT COUNT(*) FROM client_pseudonyms").fetchone()[0])

    alice = gateway.as_user("alice", "counsellor")
    before = rows()
    for n in range(30):
        r = gateway.get(f"/clients/{9_000_000 + n}/session-notes", alice)
        assert r.status_code == 403
        assert gateway.audit_for(r.headers["x-request-id"])["clients"] == ["unresolved"]
    for too_long in ("7" * 50_000, "1" * 20):  # ids are bounded by the route: a 64-bit integer at most
        r = gateway.get("/clients/" + too_long, alice)
        assert r.status_code == 403 and gateway.audit_for(r.headers["x-request-id"])["reason"] == "unknown route"
    assert rows() == before


def test_a_denied_request_for_a_client_on_a_caseload_is_found_by_subject_access(gateway: Gateway) -> None:
    """The CRM has this client (a caseload names them), so the refusal is theirs to see in an access report."""
    r = gateway.get("/clients/3/session-notes", gateway.as_user("erin", "admin"))
    assert r.status_code == 403
    clients = gateway.audit_for(r.headers["x-request-id"])["clients"]
    assert len(clients) == 1 and clients[0].startswith("P-")

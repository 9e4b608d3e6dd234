"""Restriction of processing (UK GDPR Art. 18), through the gateway against the example CRM: a restricted
client's records are refused to every role but the DPO with a clear 403 and an audit record, lists leave
the client out, nothing is written for them, break-glass still opens what it opens; lifting it restores
access."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Gateway, Signing, fieldguard, make_keys, policies_copy, start_crm, start_gateway, wait_until

RESTRICTED = "this client's records are restricted (UK GDPR Art. 18): they are kept, not processed"


@pytest.fixture(scope="module")
def gw(signing: Signing, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    d = tmp_path_factory.mktemp("restriction")
    crm, url = start_crm(d / "crm")
    g = start_gateway(d / "gw", url, signing, make_keys(d / "keys"), policies=policies_copy(d / "gw"),
                      sections='[cases]\nrefresh_seconds = 0.2\nrestriction_exempt_roles = ["dpo", "supervisor"]\n')
    yield g
    g.service.stop()
    crm.stop()


def test_a_restricted_client_is_refused_left_out_and_not_written(gw: Gateway) -> None:
    alice, erin = gw.as_user("alice", "counsellor"), gw.as_user("erin", "admin")
    assert gw.get("/clients/9", alice).status_code == 200
    before = {row["id"] for row in gw.get("/clients?per_page=200", alice).json()["items"]}
    assert 9 in before

    out = fieldguard(gw.config, "restrict", "--client", "9", "--reason", "accuracy contested, request R-9",
                     "--actor", "pat")
    assert out.returncode == 0, out.stderr
    r = wait_until(lambda: r if (r := gw.get("/clients/9", alice)).status_code == 403 else None,
                   "the restriction taken up by the gateway", timeout=10)
    assert r.json()["error"] == RESTRICTED
    assert gw.audit_for(r.headers["x-request-id"])["reason"] == "client restricted"
    admin = gw.get("/clients/9", erin)  # admin sees any client's contact details: not this one's
    assert admin.status_code == 403 and admin.json()["error"] == RESTRICTED
    notes = gw.get("/clients/9/session-notes", alice)
    assert notes.status_code == 403 and gw.audit_for(notes.headers["x-request-id"])["reason"] == "client restricted"

    listed = gw.get("/clients?per_page=200", alice).json()
    assert {row["id"] for row in listed["items"]} == before - {9}
    flat = gw.get("/session-notes?per_page=500", alice).json()["items"]
    assert flat and all(n["client_id"] != 9 for n in flat)

    write = gw.request("POST", "/clients/9/session-notes", alice,
                       json={"session_date": "2026-11-30", "summary": "s", "body": "b"})
    assert write.status_code == 403 and "nothing is changed while the restriction stands" in write.json()["error"]
    assert gw.audit_for(write.headers["x-request-id"])["reason"] == "client restricted"
    change = gw.request("PATCH", "/clients/9", erin, json={"phone": "07700 900123"})
    assert change.status_code == 403 and gw.audit_for(change.headers["x-request-id"])["reason"] == \
        "client restricted"

    # an exempt role (here the supervisor, by cases.restriction_exempt_roles) keeps its usual view
    exempt = gw.get("/clients/9/session-notes", gw.as_user("carol", "supervisor"))
    assert exempt.status_code == 200 and exempt.json()["items"][0]["body"]

    again = fieldguard(gw.config, "restrict", "--client", "9", "--reason", "accuracy contested again")
    assert again.returncode == 1 and "restricted already" in again.stderr

    lifted = fieldguard(gw.config, "unrestrict", "--client", "9", "--reason", "correction made; client told",
                        "--actor", "pat")
    assert lifted.returncode == 0, lifted.stderr
    wait_until(lambda: gw.get("/clients/9", alice).status_code == 200, "the restriction lifted", timeout=10)
    records = [x for x in gw.audit_records() if x["route"] in ("restrict", "unrestrict")]
    assert [(x["route"], x["outcome"]) for x in records] == [("restrict", "allowed"), ("restrict", "denied"),
                                                            ("unrestrict", "allowed")]
    assert records[0]["user"] == "u:pat" and records[0]["clients"][0].startswith("P-")


def test_break_glass_still_opens_a_restricted_client(gw: Gateway) -> None:
    bob = gw.as_user("bob", "counsellor")
    assert fieldguard(gw.config, "restrict", "--client", "17", "--reason", "objection pending, request R-17"
                      ).returncode == 0
    wait_until(lambda: gw.get("/clients/17", gw.as_user("alice", "counsellor")).status_code == 403,
               "the restriction taken up", timeout=10)
    declared = gw.request("POST", "/_fieldguard/break-glass", bob, json={
        "client": 17, "reason": "risk_to_self", "justification": "Client phoned in crisis; her counsellor is away."})
    assert declared.status_code == 201, declared.text
    shown = gw.get("/clients/17", bob)
    assert shown.status_code == 200 and shown.json()["phone"] and "referral_source" not in shown.json()


@pytest.mark.parametrize(("args", "message"), [
    (("--client", "99999", "--reason", "accuracy contested"), "client 99999 is not in the CRM"),
    (("--client", "3", "--reason", "x"), "--reason must give the ground"),
])
def test_a_restriction_without_a_client_or_a_reason_is_refused(gw: Gateway, args: tuple[str, ...],
                                                               message: str) -> None:
    out = fieldguard(gw.config, "restrict", *args)
    assert out.returncode == 1 and message in out.stderr
    assert [x for x in gw.audit_records() if x["route"] == "restrict"][-1]["reason"].startswith(message)

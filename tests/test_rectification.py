"""Rectification through the gateway, against the example CRM: the DPO records a client's correction (sealed
under the client's key); the client's counsellor sees it in her queue, applies it with an ordinary write tied
to the request (its audit record names the request and the path written) or refuses it with a reason;
nobody else may, and a write tied to the request must be of the record it corrects."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Gateway, Signing, direct, fieldguard, make_keys, policies_copy, start_crm, start_gateway

NEW_ADDRESS = "12 Mill Lane"


@pytest.fixture(scope="module")
def world(signing: Signing, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("rectify")
    crm, url = start_crm(d / "crm")
    gw = start_gateway(d / "gw", url, signing, make_keys(d / "keys"), policies=policies_copy(d / "gw"))
    yield {"gw": gw, "url": url}
    gw.service.stop()
    crm.stop()


def ask(gw: Gateway, client: str = "1", field: str = "address.line1", correction: str = NEW_ADDRESS) -> Any:
    return fieldguard(gw.config, "rectify", "request", "--client", client, "--resource", "client", "--record", client,
                      "--field", field, "--correction", correction, "--reference", "letter R-1")


def queue(gw: Gateway, token: str) -> dict[str, Any]:
    r = gw.get("/_fieldguard/rectifications", token)
    assert r.status_code == 200, r.text
    return {q["request"]: q for q in r.json()["requests"]}


def test_the_counsellor_applies_a_correction_and_the_trail_says_what_changed(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    made = ask(gw)
    assert made.returncode == 0, made.stderr
    req = json.loads(made.stdout)["request"]
    with sqlite3.connect(gw.config.parent / "cases.sqlite3") as db:
        (detail,) = db.execute("SELECT detail FROM rights_requests WHERE request_id = ?", (req,)).fetchone()
    assert NEW_ADDRESS not in detail and '"correction": "fg1.' in detail  # sealed under the client's key
    alice, bob = gw.as_user("alice", "counsellor"), gw.as_user("bob", "counsellor")
    assert queue(gw, alice)[req]["correction"] == NEW_ADDRESS
    assert req not in queue(gw, bob)  # not his client
    theirs = gw.request("PATCH", "/clients/1", bob, json={"address": {"line1": NEW_ADDRESS}},
                        headers={"x-fieldguard-rectification": req})
    assert theirs.status_code == 403
    assert gw.audit_for(theirs.headers["x-request-id"])["reason"] == "rectification not yours"
    elsewhere = gw.request("PATCH", "/clients/9", alice, json={"address": {"line1": NEW_ADDRESS}},
                           headers={"x-fieldguard-rectification": req})
    assert elsewhere.status_code == 409 and "apply it with a PATCH or PUT of that record" in elsewhere.json()["error"]
    assert direct(world["url"], "/clients/9")["address"]["line1"] != NEW_ADDRESS  # refused before the write
    r = gw.request("PATCH", "/clients/1", alice, json={"address": {"line1": NEW_ADDRESS}},
                   headers={"x-fieldguard-rectification": req})
    assert r.status_code == 200, r.text
    audited = gw.audit_for(r.headers["x-request-id"])
    assert audited["rectification"] == req and audited["written"] == ["address.line1"]
    assert audited["reason"] == f"rectification applied: {req}"
    assert direct(world["url"], "/clients/1")["address"]["line1"] == NEW_ADDRESS
    listed = {x["request"]: x for x in json.loads(fieldguard(gw.config, "rectify", "list", "--all").stdout)}
    assert (listed[req]["status"], listed[req]["outcome"], listed[req]["by"]) == (
        "completed", "applied: address.line1", "u:alice")
    again = gw.request("PATCH", "/clients/1", alice, json={"address": {"line1": "x"}},
                       headers={"x-fieldguard-rectification": req})
    assert again.status_code == 409 and gw.audit_for(again.headers["x-request-id"])["reason"] == "rectification closed"


def test_a_correction_refused_says_why(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    req = json.loads(ask(gw, field="email", correction="someone@else.example").stdout)["request"]
    alice = gw.as_user("alice", "counsellor")
    bare = gw.request("POST", f"/_fieldguard/rectifications/{req}", alice, json={"decision": "refused"})
    assert bare.status_code == 422 and gw.audit_for(bare.headers["x-request-id"])["reason"] == \
        "rectification decision invalid"
    r = gw.request("POST", f"/_fieldguard/rectifications/{req}", alice,
                   json={"decision": "refused", "reason": "the address we hold was confirmed by the client in person"})
    assert r.status_code == 200 and r.json()["status"] == "refused"
    listed = {x["request"]: x for x in json.loads(fieldguard(gw.config, "rectify", "list", "--all").stdout)}
    assert listed[req]["status"] == "refused" and listed[req]["outcome"].startswith("the address we hold")
    assert req not in queue(gw, alice)


def test_a_request_for_something_the_map_does_not_have_is_refused(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    odd = fieldguard(gw.config, "rectify", "request", "--client", "1", "--resource", "diary", "--record", "1",
                     "--field", "x", "--correction", "y")
    assert odd.returncode == 1 and "unknown resource 'diary'" in odd.stderr
    field = ask(gw, field="shoe_size")
    assert field.returncode == 1 and "client has no field 'shoe_size'" in field.stderr
    nobody = ask(gw, client="99999")
    assert nobody.returncode == 1 and "client 99999 is not in the CRM" in nobody.stderr

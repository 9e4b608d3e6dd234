"""Writes through the gateway: allowed ones reach the CRM, refused ones never do."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.keys.envelope import is_sealed
from proxy.writes import merged, needs_stored
from tests.conftest import REPO, Gateway, Signing, direct, policies_copy, start_crm, start_gateway


@pytest.fixture(scope="module")
def crm_w(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    svc, url = start_crm(tmp_path_factory.mktemp("crm-writes"))
    yield url
    svc.stop()


@pytest.fixture(scope="module")
def gw(crm_w: str, signing: Signing, shared_keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    d = tmp_path_factory.mktemp("gw-writes")
    g = start_gateway(d, crm_w, signing, shared_keys, policies=policies_copy(d))
    yield g
    g.service.stop()


def note_of(crm: str, client: int) -> dict[str, object]:
    return direct(crm, f"/clients/{client}/session-notes")["items"][0]  # type: ignore[no-any-return]


def test_counsellor_updates_a_note_of_their_own_client(gw: Gateway, crm_w: str) -> None:
    note = note_of(crm_w, 1)
    r = gw.request("PATCH", f"/session-notes/{note['id']}", gw.as_user("alice", "counsellor"),
                   json={"summary": "Updated after review"})
    assert r.status_code == 200, r.text
    assert r.json()["summary"] == "Updated after review"
    assert is_sealed(direct(crm_w, f"/session-notes/{note['id']}")["summary"])  # the CRM holds ciphertext
    again = gw.get(f"/session-notes/{note['id']}", gw.as_user("alice", "counsellor")).json()
    assert again["summary"] == "Updated after review"


def test_counsellor_cannot_touch_another_counsellors_client(gw: Gateway, crm_w: str) -> None:
    note = note_of(crm_w, 2)
    r = gw.request("PATCH", f"/session-notes/{note['id']}", gw.as_user("alice", "counsellor"),
                   json={"summary": "x"})
    assert r.status_code == 403 and "summary" in r.json()["error"]
    assert direct(crm_w, f"/session-notes/{note['id']}")["summary"] == note["summary"]
    rec = gw.audit_for(r.headers["x-request-id"])
    assert rec["outcome"] == "denied" and rec["refused"] == ["summary (clinical_notes)"]


def test_create_note_for_own_client_and_refuse_for_others(gw: Gateway, crm_w: str) -> None:
    alice = gw.as_user("alice", "counsellor")
    body = {"author": "bob", "session_date": "2026-11-20", "summary": "First session",
            "body": "Talked about sleep.", "risk": {"level": "low", "factors": []}}
    r = gw.request("POST", "/clients/1/session-notes", alice, json=body)
    assert r.status_code == 403 and "author (set by the gateway)" in r.json()["error"], r.text
    del body["author"]
    r = gw.request("POST", "/clients/1/session-notes", alice, json=body)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["body"] == "Talked about sleep." and created["client_id"] == 1
    assert created["author"] == "alice" == direct(crm_w, f"/session-notes/{created['id']}")["author"]  # the writer
    assert "author" in gw.audit_for(r.headers["x-request-id"])["written"]
    r = gw.request("PATCH", f"/session-notes/{created['id']}", alice, json={"author": "bob"})
    assert r.status_code == 403 and "author (set by the gateway)" in r.json()["error"]
    before = direct(crm_w, "/session-notes?per_page=1")["total"]
    r = gw.request("POST", "/session-notes", alice, json={**body, "client_id": 2})
    assert r.status_code == 403 and r.json()["error"] == "not allowed to create session_note records for this client"
    assert gw.audit_for(r.headers["x-request-id"])["reason"] == "no create on clinical_notes (any)"
    assert direct(crm_w, "/session-notes?per_page=1")["total"] == before


def test_admin_writes_contact_details_but_no_notes(gw: Gateway, crm_w: str) -> None:
    erin = gw.as_user("erin", "admin")
    address = direct(crm_w, "/clients/3")["address"]
    r = gw.request("PATCH", "/clients/3", erin, json={"phone": "07700 900999", "address": {"town": "Leeds"}})
    assert r.status_code == 200, r.text
    stored = direct(crm_w, "/clients/3")
    assert stored["phone"] == "07700 900999" and stored["address"] == {**address, "town": "Leeds"}  # merged
    r = gw.request("POST", "/clients/3/session-notes", erin, json={"summary": "x"})
    assert r.status_code == 403


def test_unknown_fields_are_refused_with_their_name(gw: Gateway, crm_w: str) -> None:
    erin = gw.as_user("erin", "admin")
    r = gw.request("PATCH", "/clients/3", erin, json={"phone": "07700 900111", "nhs_number": "123"})
    assert r.status_code == 422 and "nhs_number" in r.json()["error"]
    r = gw.request("PATCH", "/clients/3", erin, json={"address": {"country": "UK"}})
    assert r.status_code == 422 and "address.country" in r.json()["error"]
    assert direct(crm_w, "/clients/3")["phone"] != "07700 900111"


def test_client_may_rectify_contact_details_only(gw: Gateway, crm_w: str) -> None:
    me = gw.as_user("client1", "client", client_id="1")
    assert gw.request("PATCH", "/clients/1", me, json={"email": "new@example.org"}).status_code == 200
    assert direct(crm_w, "/clients/1")["email"] == "new@example.org"
    r = gw.request("PATCH", "/clients/1", me, json={"status": "closed"})
    assert r.status_code == 403 and "status" in r.json()["error"]
    assert gw.request("PATCH", "/clients/2", me, json={"email": "x@example.org"}).status_code == 403


def test_put_needs_write_on_every_class(gw: Gateway, crm_w: str) -> None:
    """PUT replaces the whole record: what the body leaves out the CRM clears. So a replace needs write on
    every class of the resource, not only on the classes the body holds."""
    alice = gw.as_user("alice", "counsellor")
    stored = direct(crm_w, "/clients/1")
    # a body of nothing but what alice may write (contact details of her own client): every field passes,
    # and the replace is still refused, for the classes it would clear
    contact = {k: stored[k] for k in ("email", "phone", "address", "emergency_contacts")}
    r = gw.request("PUT", "/clients/1", alice, json=contact)
    message = "a full replace needs write on every class; not allowed: gp, identity, referral, service"
    assert r.status_code == 403 and r.json()["error"] == message, r.text
    rec = gw.audit_for(r.headers["x-request-id"])
    assert rec["outcome"] == "denied" and rec["reason"] == message
    assert rec["refused"] == ["gp", "identity", "referral", "service"]
    assert direct(crm_w, "/clients/1") == stored  # the CRM never saw it: name, GP and case kept
    # the whole record back: refused field by field first, naming the fields she may not write
    whole = {k: v for k, v in stored.items() if k != "id"}
    r = gw.request("PUT", "/clients/1", alice, json=whole)
    assert r.status_code == 403, r.text
    assert r.json()["error"] == ("not allowed to write: case_number (identity), category (service), "
                                 "closed (service), counsellor (service), date_of_birth (identity)")  # the first five
    rec = gw.audit_for(r.headers["x-request-id"])
    assert rec["reason"] == r.json()["error"]
    assert {"name.first (identity)", "gp (gp)", "referral_source (referral)"} <= set(rec["refused"])  # all of them
    assert direct(crm_w, "/clients/1") == stored


def test_put_by_a_role_that_writes_every_class_replaces_the_record(gw: Gateway, crm_w: str) -> None:
    erin = gw.as_user("erin", "admin")  # write on every class of a client record
    shown = gw.get("/clients/5", erin).json()
    whole = {k: v for k, v in shown.items() if k != "id"}
    r = gw.request("PUT", "/clients/5", erin, json={**whole, "phone": "07700 900555"})
    assert r.status_code == 200, r.text
    rec = gw.audit_for(r.headers["x-request-id"])
    assert rec["outcome"] == "allowed" and rec["method"] == "PUT" and "phone" in rec["written"]
    stored = direct(crm_w, "/clients/5")
    assert stored["phone"] == "07700 900555" and stored["name"] == shown["name"]
    assert is_sealed(stored["gp"])  # replaced, and sealed again on the way
    assert gw.get("/clients/5", erin).json() == {**shown, "phone": "07700 900555"}


def test_delete_guarded_by_the_record_class(gw: Gateway, crm_w: str) -> None:
    appt = direct(crm_w, "/clients/4/appointments")["items"][0]
    note = note_of(crm_w, 1)
    erin = gw.as_user("erin", "admin")
    assert gw.request("DELETE", f"/session-notes/{note['id']}", erin).status_code == 403
    assert direct(crm_w, f"/session-notes/{note['id']}")["id"] == note["id"]
    assert gw.request("DELETE", f"/appointments/{appt['id']}", erin).status_code == 204
    assert direct(crm_w, f"/appointments?id={appt['id']}")["total"] == 0


def test_new_client_created_by_admin_becomes_visible_to_its_counsellor(gw: Gateway, crm_w: str) -> None:
    erin = gw.as_user("erin", "admin")
    body = {"name": {"first": "Nia", "last": "Test"}, "date_of_birth": "1990-01-01", "email": "nia@example.org",
            "counsellor": "alice", "category": "adult", "status": "waiting"}
    r = gw.request("POST", "/clients", erin, json=body)
    assert r.status_code == 201, r.text
    new_id = r.json()["id"]
    alice = gw.as_user("alice", "counsellor")
    assert gw.get(f"/clients/{new_id}", alice).json()["name"]["first"] == "Nia"
    assert gw.get(f"/clients/{new_id}", gw.as_user("bob", "counsellor")).status_code == 403
    # a counsellor cannot create clients
    assert gw.request("POST", "/clients", alice, json=body).status_code == 403


def test_bad_bodies_get_clear_errors(gw: Gateway, crm_w: str) -> None:
    erin = gw.as_user("erin", "admin")
    r = gw.request("PATCH", "/clients/3", erin, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "request body is not valid JSON"
    r = gw.request("PATCH", "/clients/3", erin, json=[1, 2])
    assert r.status_code == 422
    r = gw.request("PATCH", "/clients/3", erin, content=b"phone=1", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = gw.request("PATCH", "/clients/3", erin, json={"referral_source": "x" * 70000})
    assert r.status_code == 413
    for resp in (r,):
        assert "Traceback" not in resp.text and "x" * 20 not in resp.text


def test_a_record_cannot_be_moved_to_a_client_the_caller_may_not_write(gw: Gateway, crm_w: str) -> None:
    note = note_of(crm_w, 1)
    erin, alice = gw.as_user("erin", "admin"), gw.as_user("alice", "counsellor")
    assert gw.request("PATCH", f"/session-notes/{note['id']}", erin, json={"client_id": 3}).status_code == 403
    r = gw.request("PATCH", f"/session-notes/{note['id']}", alice, json={"client_id": 2})
    assert r.status_code == 403
    assert direct(crm_w, f"/session-notes/{note['id']}")["client_id"] == 1
    # even within her own caseload: the note's fields are sealed with client 1's key
    mine = [c["id"] for c in direct(crm_w, "/clients?counsellor=alice&per_page=5")["items"]]
    r = gw.request("PATCH", f"/session-notes/{note['id']}", alice, json={"client_id": mine[1]})
    assert r.status_code == 409 and direct(crm_w, f"/session-notes/{note['id']}")["client_id"] == 1


def test_a_flag_that_reclassifies_fields_needs_write_on_every_class_it_selects(gw: Gateway, crm_w: str) -> None:
    """`third_party` decides whether a letter's text is `letters` or `third_party`: admin may write
    `reference` (the flag's own class) but neither of those, so admin cannot release a GP's letter to the
    client by clearing the flag."""
    third = next(r for r in direct(crm_w, "/clients/1/letters")["items"] if r["third_party"])
    erin = gw.as_user("erin", "admin")
    r = gw.request("PATCH", f"/letters/{third['id']}", erin, json={"third_party": False})
    assert r.status_code == 403, r.text
    assert "third_party (decides the class of other fields; needs write on letters, third_party)" in r.json()["error"]
    rec = gw.audit_for(r.headers["x-request-id"])
    assert rec["outcome"] == "denied" and rec["refused"] == [
        "third_party (decides the class of other fields; needs write on letters, third_party)"]
    assert direct(crm_w, f"/letters/{third['id']}")["third_party"] is True
    client = gw.as_user("client1", "client", client_id="1")
    assert "body" not in gw.get(f"/letters/{third['id']}", client).json()
    # the client's own counsellor may write both classes: she may reclassify, and the record says so
    alice = gw.as_user("alice", "counsellor")
    r = gw.request("PATCH", f"/letters/{third['id']}", alice, json={"third_party": True})
    assert r.status_code == 200, r.text
    rec = gw.audit_for(r.headers["x-request-id"])
    assert rec["reclassified"] == ["third_party"] and rec["written"] == ["third_party"]


def test_a_write_records_the_paths_it_wrote(gw: Gateway, crm_w: str) -> None:
    note = note_of(crm_w, 1)
    alice = gw.as_user("alice", "counsellor")
    r = gw.request("PATCH", f"/session-notes/{note['id']}", alice,
                   json={"summary": "Reviewed", "risk": {"level": "low", "factors": ["sleep"]}})
    assert r.status_code == 200, r.text
    rec = gw.audit_for(r.headers["x-request-id"])
    assert rec["written"] == ["risk", "summary"] and rec["refused"] == []  # risk is classified as a whole
    assert "Reviewed" not in str(rec) and "sleep" not in str(rec)  # names, never values


def test_a_client_is_created_under_the_relation_its_record_gives(gw: Gateway, crm_w: str) -> None:
    """`create` is decided under the relation the new record establishes: admin (create on identity under
    any) may register a client for anyone; a counsellor (no create on identity) may not, even for herself."""
    body = {"case_number": "FG-NEW-1", "name": {"first": "Nia", "last": "New"}, "counsellor": "alice",
            "category": "adult", "status": "active"}
    r = gw.request("POST", "/clients", gw.as_user("alice", "counsellor"), json=body)
    assert r.status_code == 403 and r.json()["error"] == "not allowed to create client records for this client"
    assert gw.audit_for(r.headers["x-request-id"])["reason"] == "no create on identity (any+caseload)"
    r = gw.request("POST", "/clients", gw.as_user("erin", "admin"), json=body)
    assert r.status_code == 201, r.text


def test_a_partial_nested_write_changes_only_what_it_names(gw: Gateway, crm_w: str) -> None:
    """The example CRM, like json-server, replaces a nested object given in a PATCH: the gateway merges the
    caller's part into the stored object itself, so `address.town` alone leaves the street and postcode."""
    before = direct(crm_w, "/clients/5")["address"]
    assert before["line1"] and before["postcode"]
    r = gw.request("PATCH", "/clients/5", gw.as_user("erin", "admin"), json={"address": {"town": "Derby"}})
    assert r.status_code == 200, r.text
    assert r.json()["address"] == {**before, "town": "Derby"}
    assert direct(crm_w, "/clients/5")["address"] == {**before, "town": "Derby"}
    assert gw.audit_for(r.headers["x-request-id"])["written"] == ["address.town"]


def test_a_nested_write_never_drops_a_field_the_caller_may_not_write(
        crm_w: str, signing: Signing, shared_keys: Path, tmp_path: Path) -> None:
    """A map where the postcode is `gp` (which counsellors read but do not write): alice's PATCH of her
    client's town keeps the postcode; had the object gone to the CRM as given, the postcode would be gone."""
    policies = policies_copy(tmp_path)
    fields = policies / "fields.yaml"
    fields.write_text(fields.read_text().replace("address.postcode: {class: contact, mask: postcode_district}",
                                                 "address.postcode: {class: gp, mask: postcode_district}"))
    g = start_gateway(tmp_path / "gw", crm_w, signing, shared_keys, policies=policies)
    try:
        alice = g.as_user("alice", "counsellor")
        before = direct(crm_w, "/clients/1")["address"]
        r = g.request("PATCH", "/clients/1", alice, json={"address": {"postcode": "DE1 1AA"}})
        assert r.status_code == 403 and "address.postcode (gp)" in r.json()["error"]
        r = g.request("PATCH", "/clients/1", alice, json={"address": {"town": "Belper"}})
        assert r.status_code == 200, r.text
        assert direct(crm_w, "/clients/1")["address"] == {**before, "town": "Belper"}
    finally:
        g.service.stop()


@pytest.mark.parametrize(("merge", "sent"), [
    ("shallow", {"address": {"line1": "1 Road", "town": "Derby", "postcode": "DE1"}, "email": "new@x.org"}),
    ("deep", {"address": {"town": "Derby"}, "email": "new@x.org"}),
    ("replace", {"id": 5, "address": {"line1": "1 Road", "town": "Derby", "postcode": "DE1"}, "email": "new@x.org",
                 "phone": "0"}),
])
def test_what_each_merge_sends(merge: str, sent: dict[str, object]) -> None:
    stored = {"id": 5, "address": {"line1": "1 Road", "town": "Leeds", "postcode": "DE1"}, "email": "a@x.org",
              "phone": "0"}
    body = {"address": {"town": "Derby"}, "email": "new@x.org"}
    assert needs_stored(merge, body) is (merge != "deep")
    assert merged(merge, stored, body) == sent


def test_a_route_declares_how_its_crm_merges(tmp_path: Path) -> None:
    from proxy.policy import MapError, parse_fieldmap

    text = (REPO / "policies" / "fields.yaml").read_text()
    deep = text.replace("      - GET PUT PATCH DELETE /clients/{client_id:int}\n",
                        "      - GET PUT DELETE /clients/{client_id:int}\n"
                        "      - PATCH /clients/{client_id:int}: {merge: deep}\n")
    route = next(r for r in parse_fieldmap(deep).routes if r.method == "PATCH" and r.resource == "client")
    assert route.merge == "deep"
    with pytest.raises(MapError, match="merge must be one of shallow, deep, replace"):
        parse_fieldmap(deep.replace("{merge: deep}", "{merge: sideways}"))


def test_a_nested_create_whose_body_names_another_client_is_refused(gw: Gateway, crm_w: str) -> None:
    """POST /clients/1/letters with client_id 2 in the body was checked against client 1 only and forwarded;
    only the example CRM's own check stopped it. Now the gateway refuses, naming the field."""
    alice = gw.as_user("alice", "counsellor")
    before = direct(crm_w, "/clients/2/letters?per_page=1")["total"]
    r = gw.request("POST", "/clients/1/letters", alice, json={"client_id": 2, "subject": "x", "body": "y",
                                                               "third_party": False})
    assert r.status_code == 422 and r.json()["error"] == "client_id in the body names another client than the path"
    assert gw.audit_for(r.headers["x-request-id"])["refused"] == ["client_id"]
    assert direct(crm_w, "/clients/2/letters?per_page=1")["total"] == before

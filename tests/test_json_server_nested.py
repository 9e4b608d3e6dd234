"""A CRM shaped unlike the example one, as another service's security officer would bring it, from the
README alone: json-server over examples/json-server-nested (contact details in nested objects, a client
with several practitioners, supervision kept on the supervisor's staff row, staff known by an opaque id and
matched to the caller's token by e-mail, camelCase keys), guarded by the shipped policy.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HTTP, REPO, Gateway, Service, Signing, free_port, policies_copy, start_gateway

EXAMPLE = REPO / "examples" / "json-server-nested"
JSON_SERVER = REPO / "node_modules" / ".bin" / "json-server"
PSEUDONYM = re.compile(r"^P-[0-9A-F]{16}$")
STAFF = {"alice": "s1", "bob": "s2", "carol": "s3", "dev": "s4"}


@pytest.fixture(scope="module")
def crm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    if not JSON_SERVER.exists():
        pytest.skip("json-server is not installed (make test installs it with npm ci)")
    d = tmp_path_factory.mktemp("json-server-nested")
    db = d / "db.json"
    shutil.copyfile(EXAMPLE / "db.json", db)
    port = free_port()
    svc = Service([str(JSON_SERVER), "--host", "127.0.0.1", "--port", str(port), "--watch", "false", "--quiet",
                   str(db)], d / "json-server.log", f"http://127.0.0.1:{port}/staff?_limit=1").start()
    yield f"http://127.0.0.1:{port}", db
    svc.stop()


@pytest.fixture(scope="module")
def gw(crm: tuple[str, Path], signing: Signing, shared_keys: Path, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[Gateway]:
    d = tmp_path_factory.mktemp("gw-nested")
    g = start_gateway(d, crm[0], signing, shared_keys, policies=policies_copy(d, cover_for=None),
                      fields_file=EXAMPLE / "fields.yaml",
                      identity=f'public_key_file = "{signing.public_file}"\nuser_claim = "email"')
    yield g
    g.service.stop()


def token(gw: Gateway, name: str, role: str, purpose: str = "TREAT") -> str:
    return gw.signing.token(name, role, purpose, claims={"email": f"{name}@service.example"})


def crm_json(crm: tuple[str, Path], path: str) -> Any:
    return HTTP.get(crm[0] + path).json()


def test_the_facts_are_read_where_this_crm_keeps_them(gw: Gateway) -> None:
    relations = gw.readyz()["checks"]["relations"]
    assert (relations["clients"], relations["staff"], relations["supervision_links"]) == (4, 4, 2)


@pytest.mark.parametrize(("name", "clients"), [("alice", [1, 3]), ("bob", [2, 3]), ("dev", [4]), ("zoe", [])])
def test_each_counsellor_sees_their_caseload_a_shared_client_included(gw: Gateway, name: str,
                                                                      clients: list[int]) -> None:
    """Client 3 has two practitioners: both see them. zoe's e-mail matches no staff row: she holds no
    relation, so she sees no client."""
    caller = token(gw, name, "counsellor")
    r = gw.get("/clients?_page=1&_limit=50", caller)
    assert r.status_code == 200, r.text
    assert sorted(c["id"] for c in r.json()) == clients and int(r.headers["x-total-count"]) == len(clients)
    for other in {1, 2, 3, 4} - set(clients):
        assert gw.get(f"/clients/{other}", caller).status_code == 403


def test_a_supervisor_known_from_her_own_row_sees_her_supervisees_clients_and_no_identifier(
        gw: Gateway, crm: tuple[str, Path]) -> None:
    carol = token(gw, "carol", "supervisor")
    listing = gw.get("/clients?_page=1&_limit=50", carol)
    assert listing.status_code == 200 and len(listing.json()) == 3  # s1's and s2's clients, not dev's
    assert gw.get("/clients/4", carol).status_code == 403
    names = [w for c in crm_json(crm, "/clients") for w in (c["name"]["first"], c["name"]["last"],
                                                             c["name"]["preferred"]) if w]
    for client in listing.json():
        assert PSEUDONYM.match(client["id"]) and set(client) <= {"id", "name", "practitionerIds", "status"}
        notes = gw.get(f"/clients/{client['id']}/notes", carol)  # addressed by pseudonym
        assert notes.status_code == 200, notes.text
        text = json.dumps([client, notes.json()])
        assert not any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", text, re.IGNORECASE) for n in names), text
        assert all(n["clientId"] == client["id"] for n in notes.json())
    liam = next(c for c in listing.json() if gw.get(f"/clients/{c['id']}/notes", carol).json()[0]["id"] == 1)
    first = gw.get(f"/clients/{liam['id']}/notes", carol).json()[0]
    assert first["text"] == f"{liam['id']} reported a better week; {liam['id']} slept well."


def test_a_partial_write_of_a_nested_object_keeps_everything_else(gw: Gateway, crm: tuple[str, Path]) -> None:
    """json-server replaces a top-level object given in a PATCH: the gateway sends the stored one merged."""
    before = crm_json(crm, "/clients/1")["contact"]
    erin = gw.signing.token("erin", "admin", "HOPERAT", claims={"email": "erin@service.example"})
    r = gw.request("PATCH", "/clients/1", erin, json={"contact": {"email": "liam.b@example.org"}})
    assert r.status_code == 200, r.text
    assert crm_json(crm, "/clients/1")["contact"] == {**before, "email": "liam.b@example.org"}
    alice = token(gw, "alice", "counsellor")
    r = gw.request("PATCH", "/clients/1", alice, json={"contact": {"address": {"town": "Duffield"}}})
    assert r.status_code == 200, r.text
    after = crm_json(crm, "/clients/1")["contact"]
    assert after == {**before, "email": "liam.b@example.org", "address": {**before["address"], "town": "Duffield"}}
    assert _on_disk(crm, "clients", 1)["contact"] == after


def test_a_note_is_authored_by_the_writers_staff_id(gw: Gateway, crm: tuple[str, Path]) -> None:
    alice = token(gw, "alice", "counsellor")
    r = gw.request("POST", "/notes", alice, json={"clientId": 3, "date": "2026-11-30", "text": "Reviewed goals."})
    assert r.status_code == 201, r.text
    assert crm_json(crm, f"/notes/{r.json()['id']}")["authorId"] == STAFF["alice"]  # matched by e-mail
    r = gw.request("POST", "/notes", alice, json={"clientId": 2, "date": "2026-11-30", "text": "x"})
    assert r.status_code == 403  # bob's client only


def _on_disk(crm: tuple[str, Path], collection: str, record_id: int) -> dict[str, Any]:
    """json-server writes its file after it answers: wait for it to catch up with its API."""
    want = crm_json(crm, f"/{collection}/{record_id}")
    deadline = time.monotonic() + 5
    while True:
        rows = json.loads(crm[1].read_text())[collection]
        found: dict[str, Any] = next(r for r in rows if r["id"] == record_id)
        if found == want or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_a_total_the_crm_counted_over_hidden_rows_is_not_passed_on(
        crm: tuple[str, Path], signing: Signing, shared_keys: Path, tmp_path: Path) -> None:
    """A list route declared without a client filter: the CRM pages and counts every client, and the
    gateway drops the rows alice may not see. Its X-Total-Count (4, or 4 less this page's dropped rows)
    would tell her how many clients there are: the header goes."""
    fields = tmp_path / "fields.yaml"
    fields.write_text((EXAMPLE / "fields.yaml").read_text().replace(
        "      - GET /clients: {list: true, filter: id, query: {status: service}}",
        "      - GET /clients: {list: true, query: {status: service}}"))
    shutil.copy(EXAMPLE / "retention.yaml", tmp_path / "retention.yaml")  # the schedules travel with the map
    g = start_gateway(tmp_path / "gw", crm[0], signing, shared_keys, policies=policies_copy(tmp_path, cover_for=None),
                      fields_file=fields, identity=f'public_key_file = "{signing.public_file}"\nuser_claim = "email"')
    try:
        r = g.get("/clients?_page=1&_limit=2", token(g, "alice", "counsellor"))
        assert r.status_code == 200 and [c["id"] for c in r.json()] == [1]
        assert "x-total-count" not in r.headers
        erin = g.signing.token("erin", "admin", "HOPERAT", claims={"email": "erin@service.example"})
        assert g.get("/clients?_page=1&_limit=2", erin).headers["x-total-count"] == "4"  # she sees every row
    finally:
        g.service.stop()

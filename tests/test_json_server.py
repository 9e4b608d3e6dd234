"""The gateway in front of a CRM nobody here wrote: json-server 0.17 serving examples/json-server/db.json.

Same Casbin policy as the example CRM, a different field map (examples/json-server/fields.yaml): bare
JSON arrays, camelCase keys, paging by `_page`/`_limit` with the count in `X-Total-Count`, and
"any of" filters by repeating a parameter. Every answer through the gateway is compared with what
json-server itself answers for the same request (read directly, bypassing the gateway).
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import itertools
import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.keys.envelope import is_sealed
from proxy.policy.bundle import BundleSource, load_bundle
from proxy.policy.fieldmap import load_fieldmap
from tests.conftest import (
    HTTP,
    REPO,
    Gateway,
    Service,
    Signing,
    free_port,
    policies_copy,
    proofs_dir,
    start_gateway,
)
from tests.test_need_to_know import EXPECTED, PSEUDONYM, SCENARIOS, anonymous, breaking_glass, check

JSON_SERVER = REPO / "node_modules" / ".bin" / "json-server"
DB = REPO / "examples" / "json-server" / "db.json"
FIELDS = REPO / "examples" / "json-server" / "fields.yaml"

if not JSON_SERVER.exists() or shutil.which("node") is None:
    pytest.skip("json-server is not installed (node_modules/.bin/json-server and node are needed; run `npm ci`)",
                allow_module_level=True)

FIELDMAP = load_fieldmap(FIELDS)
SUB_RESOURCES = {"notes": "note", "appointments": "appointment"}


@dataclass
class JsonServer:
    url: str
    db: Path  # the copy json-server reads and rewrites

    def get(self, path: str) -> httpx.Response:
        r = HTTP.get(self.url + path, timeout=10)
        r.raise_for_status()
        return r

    def json(self, path: str) -> Any:
        return self.get(path).json()

    def stored(self, collection: str, record_id: int, like: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The record as json-server has written it to its database file. It writes the file after it has
        answered, so with `like` (what its API now says) wait a little for the file to catch up."""
        deadline = time.monotonic() + 5
        while True:
            rows = json.loads(self.db.read_text(encoding="utf-8"))[collection]
            found = next((r for r in rows if r["id"] == record_id), None)
            if like is None or found == like or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def total(self, path: str) -> int:
        return int(self.get(path).headers["x-total-count"])


@pytest.fixture(scope="module")
def js(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JsonServer]:
    d = tmp_path_factory.mktemp("json-server")
    db = d / "db.json"
    shutil.copyfile(DB, db)
    port = free_port()
    svc = Service([str(JSON_SERVER), "--host", "127.0.0.1", "--port", str(port), "--watch", "false", "--quiet",
                   str(db)], d / "json-server.log", f"http://127.0.0.1:{port}/staff?_limit=1").start()
    yield JsonServer(f"http://127.0.0.1:{port}", db)
    svc.stop()


@pytest.fixture(scope="module")
def gw(js: JsonServer, signing: Signing, shared_keys: Path, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[Gateway]:
    d = tmp_path_factory.mktemp("gw-json-server")
    g = start_gateway(d, js.url, signing, shared_keys, policies=policies_copy(d), fields_file=FIELDS)
    yield g
    g.service.stop()


def _db() -> dict[str, list[dict[str, Any]]]:
    return json.loads(DB.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def _first_client_with_records(counsellor: str) -> int:
    db = _db()
    return int(next(
        c["id"] for c in db["clients"]
        if c["counsellor"] == counsellor and all(any(r["clientId"] == c["id"] for r in db[k]) for k in SUB_RESOURCES)
    ))


WHOSE = {"alice's": _first_client_with_records("alice"), "bob's": _first_client_with_records("bob"),
         "fatima's": _first_client_with_records("fatima")}
CASELOAD = sorted(c["id"] for c in _db()["clients"] if c["counsellor"] == "alice")
BOBS = sorted(c["id"] for c in _db()["clients"] if c["counsellor"] == "bob")


# ------------------------------------------------------------------------------------------ the map itself
def test_field_map_loads_with_the_shared_policy_and_declares_every_class() -> None:
    bundle = load_bundle(BundleSource(REPO / "policies", FIELDS), proofs_dir())
    assert set(bundle.fieldmap.classes) == set(load_fieldmap(REPO / "policies" / "fields.yaml").classes)
    # the retention schedules beside this field map, which name its fields, not the shipped ones
    assert [s.name for s in bundle.retention.schedules] == ["children_and_young_people", "adults"]
    fmt = bundle.fieldmap.list_format
    assert (fmt.items, fmt.metadata, fmt.total, fmt.total_header, fmt.filter_style) == (
        ".", (), None, "X-Total-Count", "repeat")
    # every key json-server holds is classified: nothing of this CRM is dropped for being unknown
    db = _db()
    for collection, resource in (("clients", "client"), ("notes", "note"), ("appointments", "appointment"),
                                 ("staff", "staff")):
        keys = {k for row in db[collection] for k in row}
        assert keys == {s.path for s in FIELDMAP.resources[resource].specs}, collection


# ------------------------------------------------------------------------------------------ (a) outcomes
@pytest.mark.parametrize(("sub", "role", "client_claim", "whose", "relation"), SCENARIOS)
def test_every_class_outcome_through_the_gateway(
    gw: Gateway, js: JsonServer, sub: str, role: str, client_claim: str | None, whose: str, relation: str
) -> None:
    client = WHOSE[whose]
    expected = EXPECTED[(role, relation)]
    token = gw.as_user(sub, role, client_id=client_claim)
    with breaking_glass(gw, token, client, relation):
        _outcomes(gw, js, token, f"{sub}/{role} on {whose} client {client}", client, expected)


def _outcomes(gw: Gateway, js: JsonServer, token: str, where: str, client: int, expected: dict[str, str]) -> None:
    checked = 0
    record = js.json(f"/clients/{client}")
    names = [record["firstName"], record["lastName"]] if anonymous(expected) else None
    # the client record
    resource = FIELDMAP.resources["client"]
    r = gw.get(f"/clients/{client}", token)
    visible = expected[resource.record_class] != "remove"
    assert r.status_code == (200 if visible else 403), (where, r.text)
    if visible:
        check(record, r.json(), resource, expected, f"{where}: /clients/{client}", names)
        checked += 1
    # notes and appointments: nested list, flat list filtered by the client, item route
    for path, name in SUB_RESOURCES.items():
        resource = FIELDMAP.resources[name]
        visible = expected[resource.record_class] != "remove"
        raw_rows = js.json(f"/clients/{client}/{path}")
        assert raw_rows, f"db.json gives client {client} some {path}"
        nested = gw.get(f"/clients/{client}/{path}", token)
        flat = gw.get(f"/{path}?clientId={client}&_page=1&_limit=100", token)
        item = gw.get(f"/{path}/{raw_rows[0]['id']}", token)
        if not visible:
            assert nested.status_code == 403, (where, path, nested.text)
            assert item.status_code == 403, (where, path, item.text)
            # the flat list gives nothing of the client, either refused or empty
            assert flat.status_code == 403 or (flat.status_code == 200 and flat.json() == []), (where, flat.text)
            continue
        assert nested.status_code == 200, (where, path, nested.text)
        assert isinstance(nested.json(), list) and len(nested.json()) == len(raw_rows), where
        for raw, shown in zip(raw_rows, nested.json(), strict=True):
            check(raw, shown, resource, expected, f"{where}: /clients/{client}/{path}", names)
            checked += 1
        if expected["reference"] != "clear":
            # filtering by the real client id would link pseudonymised rows to the client: refused
            assert flat.status_code == 403 and "clientId" in flat.json()["error"], (where, flat.text)
        else:
            assert flat.status_code == 200, (where, path, flat.text)
            assert len(flat.json()) == len(raw_rows) == int(flat.headers["x-total-count"]), where
            for raw, shown in zip(raw_rows, flat.json(), strict=True):
                check(raw, shown, resource, expected, f"{where}: /{path}?clientId={client}", names)
        assert item.status_code == 200, (where, path, item.text)
        check(raw_rows[0], item.json(), resource, expected, f"{where}: /{path}/{raw_rows[0]['id']}", names)
    # the staff directory (not client data)
    resource = FIELDMAP.resources["staff"]
    staff = gw.get("/staff/alice", token)
    if expected["staff"] == "remove":
        assert staff.status_code == 403, (where, staff.text)
    else:
        assert staff.status_code == 200, (where, staff.text)
        check(js.json("/staff/alice"), staff.json(), resource, expected, f"{where}: /staff/alice")
    if any(v != "remove" for k, v in expected.items() if k != "staff"):
        assert checked > 0, where


def test_pseudonyms_are_stable_and_link_the_records_of_one_client(gw: Gateway) -> None:
    carol = gw.as_user("carol", "supervisor")
    first = gw.get("/clients/1", carol).json()["firstName"]
    assert first == gw.get("/clients/1", carol).json()["firstName"] and PSEUDONYM.match(first)
    assert gw.get("/clients/2", carol).json()["firstName"] != first
    # a researcher sees the same pseudonym in place of the id, and on the client's appointments
    rhea = gw.as_user("rhea", "researcher")
    assert gw.get("/clients/1", rhea).json()["id"] == first
    assert {a["clientId"] for a in gw.get("/clients/1/appointments", rhea).json()} == {first}


# ------------------------------------------------------------------------------------------ (b) push-down
def test_client_list_is_pushed_down_to_the_caseload_and_counted(gw: Gateway, js: JsonServer) -> None:
    alice = gw.as_user("alice", "counsellor")
    r = gw.get("/clients?_page=1&_limit=10", alice)
    assert r.status_code == 200, r.text
    rows = r.json()
    assert [c["id"] for c in rows] == CASELOAD and {c["counsellor"] for c in rows} == {"alice"}
    assert int(r.headers["x-total-count"]) == len(CASELOAD) == js.total("/clients?counsellor=alice&_page=1&_limit=1")
    for row in rows:  # her own clients in clear, exactly as stored
        assert row == js.json(f"/clients/{row['id']}")
    # paging stays consistent on the filtered set
    page2 = gw.get("/clients?_page=2&_limit=2", alice)
    assert [c["id"] for c in page2.json()] == CASELOAD[2:4]
    assert int(page2.headers["x-total-count"]) == len(CASELOAD)
    # a supervisor's list: the supervisees' clients only, identity pseudonymised
    carol = gw.get("/clients?_page=1&_limit=100", gw.as_user("carol", "supervisor"))
    assert {c["counsellor"] for c in carol.json()} == {"alice", "bob", "chen", "dev"}
    want = sum(js.total(f"/clients?counsellor={c}&_page=1&_limit=1") for c in ("alice", "bob", "chen", "dev"))
    assert int(carol.headers["x-total-count"]) == want == len(carol.json())
    assert all(PSEUDONYM.match(c["firstName"]) and "lastName" not in c for c in carol.json())


def test_note_list_is_pushed_down_and_pages_add_up(gw: Gateway, js: JsonServer) -> None:
    alice = gw.as_user("alice", "counsellor")
    only_hers = "&".join(f"clientId={c}" for c in CASELOAD)
    raw_total = js.total(f"/notes?{only_hers}&_page=1&_limit=1")
    assert 5 < raw_total < js.total("/notes?_page=1&_limit=1")
    first = gw.get("/notes?_page=1&_limit=5", alice)
    assert first.status_code == 200, first.text
    assert len(first.json()) == 5 and {n["clientId"] for n in first.json()} <= set(CASELOAD)
    assert int(first.headers["x-total-count"]) == raw_total
    seen: list[int] = []
    for page in range(1, raw_total // 5 + 2):
        r = gw.get(f"/notes?_page={page}&_limit=5", alice)
        assert int(r.headers["x-total-count"]) == raw_total
        seen += [n["id"] for n in r.json()]
    assert seen == [n["id"] for n in js.json(f"/notes?{only_hers}")]
    # asking for another counsellor's client gives an empty list, not their notes
    other = gw.get(f"/notes?clientId={BOBS[0]}", alice)
    assert other.status_code == 200 and other.json() == [] and other.headers["x-total-count"] == "0"
    assert js.json(f"/notes?clientId={BOBS[0]}"), "bob's client has notes the gateway withheld"
    # asking for hers and his gives only hers
    mixed = gw.get(f"/notes?clientId={CASELOAD[0]}&clientId={BOBS[0]}", alice).json()
    assert mixed and mixed == js.json(f"/notes?clientId={CASELOAD[0]}")


# ------------------------------------------------------------------------------------------ (c) json-server features
@pytest.mark.parametrize("path", [
    "/clients/1?_embed=notes",
    "/clients?_embed=notes",
    "/clients/1?_embed=appointments",
    "/clients?q=Barker",
    "/notes?q=tearful",
    "/notes/1?_expand=client",
    "/appointments?_expand=client",
    "/clients?lastName_like=B",
    "/clients?dob_gte=2000-01-01",
    "/clients?_sort=dob",
    "/notes?_start=0&_end=5",
    "/notes?clientId_ne=1",
    "/clients?callback=x",
])
def test_json_server_query_features_are_refused(gw: Gateway, path: str) -> None:
    r = gw.get(path, gw.as_user("alice", "counsellor"))
    assert r.status_code == 400, r.text
    name = path.split("?", 1)[1].split("=", 1)[0]
    assert r.json()["error"] == f"query parameter not allowed: {name}"
    rec = gw.audit_for(r.headers["x-request-id"])
    assert rec["outcome"] == "denied" and rec.get("upstream_status") is None  # json-server never asked


def test_refused_parameters_are_refused_even_when_the_filter_leaves_nothing(gw: Gateway) -> None:
    r = gw.get(f"/notes?clientId={BOBS[0]}&_embed=client", gw.as_user("alice", "counsellor"))
    assert r.status_code == 400, r.text


# ------------------------------------------------------------------------------------------ (d) writes
def test_counsellor_updates_a_note_of_her_client(gw: Gateway, js: JsonServer) -> None:
    note = js.json(f"/notes?clientId={CASELOAD[0]}")[0]
    r = gw.request("PATCH", f"/notes/{note['id']}", gw.as_user("alice", "counsellor"),
                   json={"summary": "Updated after review"})
    assert r.status_code == 200, r.text
    assert r.json() == {**note, "summary": "Updated after review"}
    stored = js.json(f"/notes/{note['id']}")
    assert is_sealed(stored["summary"]) and stored == js.stored("notes", note["id"], stored)  # ciphertext, on disk
    assert gw.get(f"/notes/{note['id']}", gw.as_user("alice", "counsellor")).json()["summary"] == "Updated after review"


def test_counsellor_cannot_change_a_note_of_another_counsellors_client(gw: Gateway, js: JsonServer) -> None:
    note = js.json(f"/notes?clientId={BOBS[0]}")[0]
    r = gw.request("PATCH", f"/notes/{note['id']}", gw.as_user("alice", "counsellor"), json={"summary": "x"})
    assert r.status_code == 403 and "summary" in r.json()["error"], r.text
    assert js.json(f"/notes/{note['id']}") == note == js.stored("notes", note["id"])
    rec = gw.audit_for(r.headers["x-request-id"])
    assert rec["outcome"] == "denied" and rec["refused"] == ["summary (clinical_notes)"]


def test_admin_writes_contact_details_but_not_notes(gw: Gateway, js: JsonServer) -> None:
    erin = gw.as_user("erin", "admin")
    r = gw.request("PATCH", "/clients/3", erin, json={"email": "new.address@example.org"})
    assert r.status_code == 200, r.text
    assert r.json()["email"] == "new.address@example.org"
    assert js.json("/clients/3")["email"] == "new.address@example.org"
    assert js.stored("clients", 3, js.json("/clients/3"))["email"] == "new.address@example.org"  # type: ignore[index]
    note = js.json("/notes?clientId=3")[0]
    r = gw.request("PATCH", f"/notes/{note['id']}", erin, json={"summary": "x"})
    assert r.status_code == 403, r.text
    assert js.json(f"/notes/{note['id']}") == note


def test_unknown_fields_are_refused_by_name(gw: Gateway, js: JsonServer) -> None:
    before = js.json("/clients/4")
    r = gw.request("PATCH", "/clients/4", gw.as_user("erin", "admin"),
                   json={"email": "x@example.org", "nhsNumber": "485 777 3456"})
    assert r.status_code == 422, r.text
    assert "nhsNumber" in r.json()["error"] and "email" not in r.json()["error"]
    assert js.json("/clients/4") == before == js.stored("clients", 4)


def test_counsellor_creates_notes_for_her_clients_only(gw: Gateway, js: JsonServer) -> None:
    alice = gw.as_user("alice", "counsellor")
    body = {"clientId": CASELOAD[1], "date": "2026-11-21", "summary": "First session", "text": "Talked about sleep."}
    before = js.total("/notes?_page=1&_limit=1")
    r = gw.request("POST", "/notes", alice, json=body)
    assert r.status_code == 201, r.text
    created = r.json()
    assert {k: created[k] for k in body} == body
    stored = js.json(f"/notes/{created['id']}")
    assert stored == js.stored("notes", created["id"], stored)
    assert all(is_sealed(stored[k]) for k in ("date", "summary", "text")) and stored["clientId"] == CASELOAD[1]
    assert gw.get(f"/notes/{created['id']}", alice).json() == created
    assert js.total("/notes?_page=1&_limit=1") == before + 1
    r = gw.request("POST", "/notes", alice, json={**body, "clientId": BOBS[0]})
    assert r.status_code == 403 and r.json()["error"] == "not allowed to create note records for this client"
    assert gw.audit_for(r.headers["x-request-id"])["reason"] == "no create on clinical_notes (any)"
    assert js.total("/notes?_page=1&_limit=1") == before + 1
    assert not any(n["summary"] == "First session" for n in js.json(f"/notes?clientId={BOBS[0]}"))


def test_new_client_created_by_admin_is_visible_to_its_counsellor_at_once(gw: Gateway, js: JsonServer) -> None:
    erin = gw.as_user("erin", "admin")
    body = {"caseRef": "FG-2026-0999", "firstName": "Nia", "lastName": "Test", "dob": "1990-01-01",
            "counsellor": "alice", "category": "adult", "status": "waiting"}
    r = gw.request("POST", "/clients", erin, json=body)
    assert r.status_code == 201, r.text
    new_id = r.json()["id"]
    assert js.json(f"/clients/{new_id}")["firstName"] == "Nia"
    assert gw.get(f"/clients/{new_id}", gw.as_user("alice", "counsellor")).json()["firstName"] == "Nia"
    assert gw.get(f"/clients/{new_id}", gw.as_user("bob", "counsellor")).status_code == 403
    assert gw.request("POST", "/clients", gw.as_user("alice", "counsellor"), json=body).status_code == 403


def test_counsellors_who_register_clients_do_so_on_their_own_caseload_only(
        js: JsonServer, signing: Signing, shared_keys: Path, tmp_path: Path) -> None:
    """A service whose counsellors register their own clients: `create` on identity under caseload, and
    write on the client's fields under caseload, never under any. Before `create` existed such a bundle had
    to allow writes under any, and a counsellor's PATCH of another counsellor's client went through."""
    policies = policies_copy(tmp_path)
    with (policies / "policy.csv").open("a") as f:
        f.write("p, counsellor, caseload, identity, create, allow\n"
                "p, counsellor, caseload, identity, write, allow\n"
                "p, counsellor, caseload, service, write, allow\n")
    gw = start_gateway(tmp_path / "gw", js.url, signing, shared_keys, policies=policies, fields_file=FIELDS)
    try:
        alice = gw.as_user("alice", "counsellor")
        mine = {"caseRef": "FG-2026-0998", "firstName": "Ola", "lastName": "Own", "counsellor": "alice",
                "category": "adult", "status": "waiting"}
        r = gw.request("POST", "/clients", alice, json=mine)
        assert r.status_code == 201, r.text  # decided under caseload: the relation the record gives her
        new_id = r.json()["id"]
        r = gw.request("POST", "/clients", alice, json={**mine, "caseRef": "FG-2026-0997", "counsellor": "bob"})
        assert r.status_code == 403 and r.json()["error"] == "not allowed to create client records for this client"
        assert gw.audit_for(r.headers["x-request-id"])["reason"] == "no create on identity (any)"
        # another counsellor's client: neither changed nor taken over
        before = js.json(f"/clients/{BOBS[0]}")
        for change in ({"firstName": "X"}, {"counsellor": "alice"}):
            r = gw.request("PATCH", f"/clients/{BOBS[0]}", alice, json=change)
            assert r.status_code == 403, (change, r.text)
        assert js.json(f"/clients/{BOBS[0]}") == before
        # her own client, handed to bob: the move needs write under the relation it leaves her (any)
        r = gw.request("PATCH", f"/clients/{new_id}", alice, json={"counsellor": "bob"})
        assert r.status_code == 403, r.text
        assert gw.audit_for(r.headers["x-request-id"])["refused"] == ["counsellor (service)"]
        assert js.json(f"/clients/{new_id}")["counsellor"] == "alice"
        assert gw.request("PATCH", f"/clients/{new_id}", alice, json={"status": "active"}).status_code == 200
    finally:
        gw.service.stop()


def test_admin_cannot_move_a_clinical_note_to_another_client(gw: Gateway, js: JsonServer) -> None:
    # admin may write `reference` for any client but may not read or write clinical notes; re-linking a
    # note would show one client's session notes to another client (self) and that client's counsellor
    note = js.json("/notes?clientId=1")[0]
    try:
        r = gw.request("PATCH", f"/notes/{note['id']}", gw.as_user("erin", "admin"), json={"clientId": 3})
        assert r.status_code == 403, r.text
        assert js.json(f"/notes/{note['id']}")["clientId"] == 1
    finally:
        HTTP.patch(f"{js.url}/notes/{note['id']}", json={"clientId": note["clientId"]}, timeout=10)


# ------------------------------------------------------------------------------------------ response headers
def _express_etag(document: Any) -> str:
    """json-server's ETag: Express's weak ETag of the JSON it sends (two-space indented)."""
    body = json.dumps(document, indent=2, ensure_ascii=False).encode()
    digest = base64.b64encode(hashlib.sha1(body, usedforsecurity=False).digest()).decode()[:27]
    return f'W/"{len(body):x}-{digest}"'


def _guess_from_etag(etag: str, known: dict[str, Any], month: str) -> dict[str, Any] | None:
    """Try every start in the month, duration and status: the length in the ETag prunes most guesses."""
    m = re.match(r'^W/"([0-9a-f]+)-', etag)
    if m is None:  # not json-server's ETag: nothing to guess against
        return None
    length = int(m.group(1), 16)
    year, mon = map(int, month.split("-"))
    days = calendar.monthrange(year, mon)[1]
    statuses = ("booked", "attended", "cancelled", "did_not_attend", "no_show", "rescheduled")
    for minutes, status in itertools.product(range(5, 125, 5), statuses):
        shape = {**known, "start": f"{month}-01T00:00:00", "minutes": minutes, "status": status}
        if len(json.dumps(shape, indent=2, ensure_ascii=False).encode()) != length:
            continue
        for day, quarter in itertools.product(range(1, days + 1), range(96)):
            start = f"{month}-{day:02d}T{quarter // 4:02d}:{quarter % 4 * 15:02d}:00"
            guess = {**known, "start": start, "minutes": minutes, "status": status}
            if _express_etag(guess) == etag:
                return guess
    return None


def test_etag_does_not_reveal_what_was_masked(gw: Gateway, js: JsonServer) -> None:
    appt = js.json("/appointments?clientId=1")[0]
    assert js.get(f"/appointments/{appt['id']}").headers["etag"] == _express_etag(appt)  # the algorithm is right
    rhea = gw.as_user("rhea", "researcher")
    r = gw.get(f"/appointments/{appt['id']}", rhea)
    shown = r.json()
    assert set(shown) == {"clientId", "counsellor", "start"} and len(shown["start"]) == 7  # month only
    # what a researcher can do with what the gateway gives: resolve the pseudonym through /clients/N,
    # then guess the hidden values offline against the ETag
    client = next(n for n in range(1, 41) if gw.get(f"/clients/{n}", rhea).json()["id"] == shown["clientId"])
    etag = r.headers.get("etag")
    known = {"id": appt["id"], "clientId": client, "counsellor": shown["counsellor"]}
    recovered = _guess_from_etag(etag, known, shown["start"]) if etag else None
    assert recovered is None, f"exact appointment recovered from the ETag: {recovered}"


def test_conditional_requests_never_test_the_unredacted_record(gw: Gateway, js: JsonServer) -> None:
    """The CRM's validators describe the hidden record: none are passed on, none are forwarded."""
    alice = gw.as_user("alice", "counsellor")
    first = gw.get("/clients/1", alice)
    assert first.status_code == 200 and "etag" not in first.headers and "last-modified" not in first.headers
    upstream_etag = js.get("/clients/1").headers["etag"]
    again = gw.get("/clients/1", alice, headers={"if-none-match": upstream_etag})
    assert again.status_code == 200 and again.json() == first.json()

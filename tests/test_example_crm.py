"""The example CRM (examples/crm) run as a real process on a loopback port, exercised over HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SUB_RESOURCES = ("appointments", "session-notes", "process-notes", "feedback", "letters", "communications")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def crm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """Start ``python -m examples.crm`` on a new SQLite file and yield a client bound to it."""
    tmp = tmp_path_factory.mktemp("crm")
    port = _free_port()
    log = (tmp / "crm.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.crm", "--db", str(tmp / "crm.sqlite3"), "--port", str(port)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"CRM exited with {proc.returncode}: {(tmp / 'crm.log').read_text()}")
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"CRM did not answer /health: {(tmp / 'crm.log').read_text()}")
            time.sleep(0.05)
        yield client
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _json(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


def test_health_and_seed(crm: httpx.Client) -> None:
    assert _json(crm.get("/health")) == {"status": "ok"}
    clients = _json(crm.get("/clients"))
    assert clients["total"] == 200
    assert clients["page"] == 1 and clients["per_page"] == 50 and len(clients["items"]) == 50
    assert _json(crm.get("/staff"))["total"] == 12
    assert _json(crm.get("/clients/1"))["counsellor"] == "alice"
    assert _json(crm.get("/clients/2"))["counsellor"] == "bob"
    alice = _json(crm.get("/staff/alice"))
    assert alice == {"username": "alice", "name": "Alice Morgan", "role": "counsellor", "supervisor": "carol"}
    for resource in ("session-notes", "letters"):
        assert _json(crm.get(f"/clients/1/{resource}"))["total"] >= 2


def test_filters_with_commas(crm: httpx.Client) -> None:
    both = _json(crm.get("/clients", params={"counsellor": "alice,bob", "per_page": 500}))
    assert both["total"] == 50 and {c["counsellor"] for c in both["items"]} == {"alice", "bob"}
    assert [c["id"] for c in _json(crm.get("/clients?id=4,3,999"))["items"]] == [3, 4]
    notes = _json(crm.get("/session-notes?client_id=1,2&per_page=500"))["items"]
    assert notes and {n["client_id"] for n in notes} == {1, 2}
    third = _json(crm.get("/letters?client_id=1,2&third_party=true"))["items"]
    assert len(third) == 2 and all(letter["third_party"] is True for letter in third)
    supervisors = _json(crm.get("/staff?role=supervisor"))["items"]
    assert [s["username"] for s in supervisors] == ["carol", "sam"]
    assert _json(crm.get("/clients?counsellor=nobody"))["total"] == 0


def test_paging(crm: httpx.Client) -> None:
    page = _json(crm.get("/clients?page=2&per_page=7&status=active,waiting,closed"))
    assert page["total"] == 200 and page["page"] == 2 and page["per_page"] == 7
    assert [c["id"] for c in page["items"]] == list(range(8, 15))
    last = _json(crm.get("/clients?page=4&per_page=60"))
    assert [c["id"] for c in last["items"]] == list(range(181, 201))
    assert _json(crm.get("/clients?page=5&per_page=60"))["items"] == []
    for query in ("page=0", "page=x", "per_page=0", "per_page=501", "colour=red"):
        assert crm.get(f"/clients?{query}").status_code == 400, query


def test_client_crud(crm: httpx.Client) -> None:
    body = {"name": {"first": "Test", "last": "Person"}, "counsellor": "chen", "category": "adult",
            "status": "waiting", "opened": "2026-11-01"}  # fmt: skip
    created = _json(crm.post("/clients", json=body), 201)
    cid = created["id"]
    assert cid > 200 and created["case_number"] == f"FG-2026-{cid:04d}" and created["name"]["first"] == "Test"
    assert _json(crm.get(f"/clients/{cid}")) == created

    patched = _json(crm.patch(f"/clients/{cid}", json={"status": "active", "phone": "07700 900001"}))
    assert patched == {**created, "status": "active", "phone": "07700 900001"}

    replaced = _json(crm.put(f"/clients/{cid}", json={"id": cid, "name": {"first": "New", "last": "Name"}}))
    assert replaced["name"] == {"first": "New", "last": "Name"}
    assert replaced["status"] is None and replaced["counsellor"] is None
    assert replaced["case_number"] == created["case_number"]

    note = _json(crm.post(f"/clients/{cid}/session-notes", json={"author": "chen", "body": "hello"}), 201)
    assert note["client_id"] == cid
    assert crm.delete(f"/clients/{cid}").status_code == 204
    assert crm.get(f"/clients/{cid}").status_code == 404
    assert crm.get(f"/session-notes/{note['id']}").status_code == 404
    assert crm.delete(f"/clients/{cid}").status_code == 404


def test_session_note_crud_and_ciphertext(crm: httpx.Client) -> None:
    body = {"client_id": 1, "author": "alice", "session_date": "2026-11-20", "summary": "s", "body": "b",
            "risk": {"level": "low", "factors": []}}  # fmt: skip
    note = _json(crm.post("/session-notes", json=body), 201)
    nid = note["id"]
    assert note == {"id": nid, **body}
    assert nid in [n["id"] for n in _json(crm.get("/clients/1/session-notes?per_page=500"))["items"]]

    cipher = {"body": "fg1.AbC-body_ciphertext", "risk": "fg1.XyZ-risk", "session_date": "fg1.date"}
    patched = _json(crm.patch(f"/session-notes/{nid}", json=cipher))
    assert patched == {**note, **cipher}
    assert _json(crm.get(f"/session-notes/{nid}")) == patched
    assert _json(crm.get(f"/session-notes?id={nid}"))["items"] == [patched]

    put = _json(crm.put(f"/session-notes/{nid}", json={"author": "alice", "risk": {"level": "fg1.lvl"}}))
    assert put == {"id": nid, "client_id": 1, "author": "alice", "session_date": None, "summary": None,
                   "body": None, "risk": {"level": "fg1.lvl"}}  # fmt: skip

    original = _json(crm.get("/clients/1"))
    client_patch = _json(crm.patch("/clients/1", json={"name": "fg1.name", "date_of_birth": "fg1.dob"}))
    assert client_patch == {**original, "name": "fg1.name", "date_of_birth": "fg1.dob"}
    assert _json(crm.get("/clients?counsellor=alice&id=1"))["items"] == [client_patch]
    restore = {"name": original["name"], "date_of_birth": original["date_of_birth"]}
    assert _json(crm.patch("/clients/1", json=restore)) == original

    assert crm.delete(f"/session-notes/{nid}").status_code == 204
    assert crm.get(f"/session-notes/{nid}").status_code == 404


def test_nested_collections(crm: httpx.Client) -> None:
    for resource in SUB_RESOURCES:
        nested = _json(crm.get(f"/clients/2/{resource}?per_page=500"))
        flat = _json(crm.get(f"/{resource}?client_id=2&per_page=500"))
        assert nested == flat and nested["total"] >= 1, resource
        assert crm.get(f"/clients/99999/{resource}").status_code == 404
    mismatch = crm.post("/clients/1/feedback", json={"client_id": 2, "rating": 5})
    assert _json(mismatch, 422) == {"detail": "client_id in the body does not match the path"}
    assert crm.post("/clients/99999/feedback", json={"rating": 5}).status_code == 404


def test_validation(crm: httpx.Client) -> None:
    assert _json(crm.post("/clients", json={"colour": "red"}), 422) == {"detail": "unknown field: colour"}
    assert _json(crm.patch("/letters/1", json={"cc": "x"}), 422) == {"detail": "unknown field: cc"}
    assert _json(crm.post("/clients", json={"id": 5}), 422) == {"detail": "id is assigned by the CRM"}
    assert _json(crm.put("/clients/1", json={"id": 2}), 422) == {"detail": "id is assigned by the CRM"}
    bad = crm.post("/clients", content=b"{nope", headers={"content-type": "application/json"})
    assert _json(bad, 400) == {"detail": "invalid JSON"}
    assert _json(crm.post("/clients", json=[1, 2]), 422)["detail"]
    assert _json(crm.post("/session-notes", json={"body": "x"}), 422)["detail"].startswith("client_id")
    assert _json(crm.post("/session-notes", json={"client_id": 99999}), 422)["detail"].startswith("client_id")
    assert _json(crm.patch("/feedback/1", json={"client_id": "1"}), 422)["detail"].startswith("client_id")
    assert crm.post("/staff", json={}).status_code == 405


def test_not_found(crm: httpx.Client) -> None:
    missing = (
        "/clients/99999",
        "/staff/nobody",
        "/letters/99999",
        "/letters/99999/pdf",
        "/nope",
        "/clients/x",
    )
    for path in missing:
        assert "detail" in _json(crm.get(path), 404), path
    assert crm.patch("/appointments/99999", json={"status": "booked"}).status_code == 404
    assert crm.put("/communications/99999", json={}).status_code == 404


def test_letter_pdf(crm: httpx.Client) -> None:
    response = crm.get("/letters/1/pdf")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/pdf"
    assert response.content.startswith(b"%PDF-1.4") and response.content.rstrip().endswith(b"%%EOF")

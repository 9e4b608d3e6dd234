"""Every refusal of the pipeline, step by step, with the reason its audit record gives: the ASGI app
driven directly in the test's loop (tests/harness.py `driven`) in front of the real example CRM, so a
branch costs a millisecond or two, not a process start.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, Gateway, Signing, policies_copy, start_gateway
from tests.harness import driven


@pytest.fixture
def config(crm: str, signing: Signing, shared_keys: Path, tmp_path: Path) -> Gateway:
    return start_gateway(tmp_path, crm, signing, shared_keys, policies=policies_copy(tmp_path), start=False)


def _line(row: str) -> int:
    """Where a row sits in the shipped policy.csv (the reasons name it)."""
    lines = (REPO / "policies" / "policy.csv").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.strip() == row)


CASELOAD_NOTES, ADMIN_DENY = _line("p, counsellor, caseload, clinical_notes, read, allow"), \
    _line("p, admin, any, clinical_notes, read, deny")


def _auth(token: str, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", **extra}


# (what the caller sends) -> (status, the error's words, the audited outcome and reason)
STEPS: list[tuple[str, dict[str, Any], int, str, str, str]] = [
    # 1. authenticate
    ("no token", {"path": "/clients/1", "token": None}, 401, "bearer token required", "denied", "no token"),
    ("malformed token", {"path": "/clients/1", "token": "not.a.jwt"}, 401, "malformed token", "denied",
     "malformed token"),
    # 2. match
    ("unknown route", {"path": "/admin/export"}, 403, "route not allowed", "denied", "unknown route"),
    ("unknown method", {"path": "/clients/1", "method": "OPTIONS"}, 403, "route not allowed", "denied",
     "unknown route"),
    ("ambiguous path", {"path": "/clients/1%2F..%2F2"}, 400, "encoded separator", "denied",
     "path holds an encoded separator or parameter"),
    # 3. authorise
    ("unknown role", {"path": "/clients/1", "role": "janitor"}, 403, "role not known", "denied", "unknown role"),
    ("purpose not allowed", {"path": "/clients/1", "role": "researcher", "purpose": "TREAT"}, 403,
     "purpose of use TREAT not allowed", "denied", "purpose not allowed"),
    ("officer endpoint, not an officer", {"path": "/_fieldguard/explain?role=admin&class=contact"}, 403,
     "only the security officer role", "denied", "not an officer"),
    # 4. read (a write's body)
    ("body not JSON by type", {"path": "/session-notes/1", "method": "PATCH", "content": b"x",
                               "headers": {"content-type": "text/plain"}}, 415, "must be application/json",
     "denied", "request body must be application/json"),
    ("body not JSON", {"path": "/session-notes/1", "method": "PATCH", "content": b"{oops",
                       "headers": {"content-type": "application/json"}}, 400, "not valid JSON", "denied",
     "request body is not valid JSON"),
    ("body not an object", {"path": "/session-notes/1", "method": "PATCH", "json": [1, 2]}, 422,
     "must be a JSON object", "denied", "request body must be a JSON object"),
    # 5. locate (need to know)
    ("another counsellor's client", {"path": "/clients/2/session-notes"}, 403, "no access to this client",
     "denied", f"not on the caseload: policy.csv:{CASELOAD_NOTES} grants counsellor clinical_notes only through "
     "breakglass or caseload; the caller holds any"),
    ("an explicit deny", {"path": "/clients/1/session-notes", "role": "admin", "purpose": "HOPERAT"}, 403,
     f"explicit deny at policy.csv:{ADMIN_DENY}", "denied", f"explicit deny at policy.csv:{ADMIN_DENY}"),
    ("a query that is not allowed", {"path": "/clients?email=a@b.c"}, 400, "query parameter not allowed",
     "denied", "query parameter not allowed: email"),
    # 6. check
    ("a field the map does not know", {"path": "/session-notes/1", "method": "PATCH", "json": {"mood": "x"}}, 422,
     "unknown field: mood", "denied", "unknown field: mood"),
    ("a field the role may not write", {"path": "/clients/1", "method": "PATCH", "role": "researcher",
                                        "purpose": "HRESCH", "json": {"email": "x@y.z"}}, 403,
     "not allowed to write: email", "denied", "not allowed to write: email (contact)"),
]


@pytest.mark.parametrize(("name", "ask", "status", "words", "outcome", "reason"), STEPS, ids=[s[0] for s in STEPS])
async def test_each_step_refuses_with_its_reason(config: Gateway, signing: Signing, name: str, ask: dict[str, Any],
                                                 status: int, words: str, outcome: str, reason: str) -> None:
    async with driven(config.config) as (_, client):
        started = time.perf_counter()
        r = await _ask(client, signing, ask)
        took = time.perf_counter() - started
        assert r.status_code == status, r.text
        body = r.json()
        assert set(body) == {"error", "request_id"} and words in body["error"]
        record = config.audit_for(r.headers["x-request-id"])
        assert (record["outcome"], record["reason"], record["status"]) == (outcome, reason, status)
        assert took < 30  # not a timing assertion: a hang would show here, speed is measured in benchmarks/


async def test_what_passes_every_step_is_answered_and_recorded(config: Gateway, signing: Signing) -> None:
    async with driven(config.config) as (app, client):
        r = await _ask(client, signing, {"path": "/clients/1/session-notes?per_page=2"})
        assert r.status_code == 200 and r.json()["items"][0]["body"]
        record = config.audit_for(r.headers["x-request-id"])
        assert record["outcome"] == "allowed" and record["route"] == "/clients/{client_id:int}/session-notes"
        assert record["shown"]["clinical_notes"] and record["policy"] == app.bundle.digest
        assert record["relations"] == ["any+caseload"] and record["user"] == "u:alice"


async def _ask(client: httpx.AsyncClient, signing: Signing, ask: dict[str, Any]) -> httpx.Response:
    headers = dict(ask.get("headers", {}))
    token = ask["token"] if "token" in ask else signing.token("alice", ask.get("role", "counsellor"),
                                                             ask.get("purpose", "TREAT"))
    if token is not None:
        headers.update(_auth(token))
    kwargs: dict[str, Any] = {"headers": headers}
    if "json" in ask:
        kwargs["json"] = ask["json"]
    if "content" in ask:
        kwargs["content"] = ask["content"]
    return await client.request(ask.get("method", "GET"), ask["path"], **kwargs)

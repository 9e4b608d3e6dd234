"""encrypt-existing against a CRM that misbehaves: writes refused for a while, records that name no client.

json-server (examples/json-server) with a middleware (tests/upstreams/flaky-patch.js) that answers 503 to
the first PATCHes of chosen records. Nothing may be lost or overclaimed: a write the CRM refuses a few
times goes through on a retry; one it keeps refusing is reported by id, its page is done again by the next
run, and the run exits 1; a record holding plaintext with no client is left as it is (no client's key can
seal it), counted, and the run says so.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.keys.envelope import is_sealed
from tests.conftest import HTTP, REPO, Service, Signing, fieldguard, free_port, make_keys, policies_copy, start_gateway

JSON_SERVER = REPO / "node_modules" / ".bin" / "json-server"
FIELDS = REPO / "examples" / "json-server" / "fields.yaml"
FLAKY = REPO / "tests" / "upstreams" / "flaky-patch.js"

if not JSON_SERVER.exists() or shutil.which("node") is None:
    pytest.skip("json-server is not installed (node_modules/.bin/json-server and node are needed; run `npm ci`)",
                allow_module_level=True)

BUSY, DOWN, UNOWNED = 3, 7, 9001  # refused twice (a retry succeeds); refused until restarted; no client


@pytest.fixture(scope="module")
def crm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("flaky-crm")
    db = json.loads((REPO / "examples" / "json-server" / "db.json").read_text(encoding="utf-8"))
    db["notes"].append({"id": UNOWNED, "clientId": None, "author": "alice", "date": "2026-10-01",
                        "summary": "MARKER-UNOWNED summary", "text": "MARKER-UNOWNED text"})
    (d / "db.json").write_text(json.dumps(db), encoding="utf-8")
    port = free_port()
    svc = Service([str(JSON_SERVER), str(d / "db.json"), "--host", "127.0.0.1", "--port", str(port), "--watch",
                   "false", "--quiet", "--middlewares", str(FLAKY)], d / "json-server.log",
                  f"http://127.0.0.1:{port}/staff?_limit=1",
                  env={"FG_FLAKY_PATCH": f"notes/{BUSY}:2,notes/{DOWN}:1000"}).start()
    yield {"url": f"http://127.0.0.1:{port}", "dir": d, "svc": svc}
    svc.stop()


def _note(url: str, note: int) -> dict[str, Any]:
    r = HTTP.get(f"{url}/notes/{note}", timeout=10)
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


def _run(config: Path) -> tuple[int, dict[str, Any], str]:
    out = fieldguard(config, "encrypt-existing", "--rate", "0")
    return out.returncode, json.loads(out.stdout or "{}"), out.stderr


def test_refused_writes_and_unowned_records_are_reported_and_resumed(
        crm: dict[str, Any], signing: Signing, tmp_path: Path) -> None:
    url = crm["url"]
    keys = make_keys(tmp_path / "keys")
    gw = start_gateway(tmp_path / "gw", url, signing, keys, policies=policies_copy(tmp_path / "gw"),
                       fields_file=FIELDS)
    try:
        code, report, err = _run(gw.config)
        assert code == 1, err
        assert report["failures"] == 1 and report["failed"] == [f"note {DOWN}"] and report["unowned"] == 1
        assert report["complete"] is False
        assert "1 records could not be written (tried 3 times" in err
        assert "1 records hold plaintext of encrypted classes but name no client" in err
        assert "MARKER" not in err and "MARKER" not in json.dumps(report)  # ids and counts, never values
        assert is_sealed(_note(url, BUSY)["text"])  # refused twice, written on the third try
        assert not is_sealed(_note(url, DOWN)["text"])  # refused every time: left as it was, not lost
        assert _note(url, UNOWNED)["text"] == "MARKER-UNOWNED text"
        resume = json.loads((keys / "migration.json").read_text())
        assert resume == {f"encrypt-existing {url}": {"client": 1}}  # notes: not even page 1 is done

        # the CRM recovers and the unowned note is given its client: the next run finishes the job
        crm["svc"].stop()
        crm["svc"].env.pop("FG_FLAKY_PATCH")
        crm["svc"].start()
        HTTP.patch(f"{url}/notes/{UNOWNED}", json={"clientId": 1}, timeout=10).raise_for_status()
        code, report, err = _run(gw.config)
        assert code == 0, err
        assert report["failures"] == 0 and report["unowned"] == 0 and report["complete"] is True
        assert report["changed_records"] >= 2  # at least the refused note and the one given a client
        for note in (DOWN, UNOWNED):
            assert is_sealed(_note(url, note)["text"]), note
        alice = gw.as_user("alice", "counsellor")
        assert gw.get(f"/notes/{UNOWNED}", alice).json()["text"] == "MARKER-UNOWNED text"
        assert json.loads((keys / "migration.json").read_text()) == {}  # done: the next run starts afresh
    finally:
        gw.service.stop()

"""Moving a CRM that already holds plaintext into FieldGuard (encrypt-existing), and out again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.keys.envelope import is_sealed
from proxy.keys.migration import walks
from proxy.policy.fieldmap import load_fieldmap, values_at
from tests.conftest import (
    REPO,
    Gateway,
    Signing,
    direct,
    fieldguard,
    make_keys,
    policies_copy,
    start_crm,
    start_gateway,
)

FIELDMAP = load_fieldmap(REPO / "policies" / "fields.yaml")
VIEWS = [("alice", "counsellor", "/session-notes?per_page=500"), ("alice", "counsellor", "/process-notes?per_page=500"),
         ("alice", "counsellor", "/letters?per_page=500"), ("alice", "counsellor", "/communications?per_page=500"),
         ("carol", "supervisor", "/session-notes?per_page=500"), ("erin", "admin", "/clients?per_page=500"),
         ("client1", "client", "/clients/1/letters")]


@pytest.fixture(scope="module")
def setup(signing: Signing, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("migrate")
    crm, url = start_crm(d / "crm")
    keys = make_keys(d / "keys")
    gw = start_gateway(d / "gw", url, signing, keys, policies=policies_copy(d / "gw"))
    yield {"gw": gw, "url": url, "keys": keys}
    gw.service.stop()
    crm.stop()


def run(gw: Gateway, *args: str) -> tuple[int, dict[str, Any], str]:
    out = fieldguard(gw.config, *args)
    try:
        data = json.loads(out.stdout)
    except json.JSONDecodeError:
        data = {}
    return out.returncode, data, out.stderr


def views(gw: Gateway) -> dict[str, Any]:
    found = {}
    for sub, role, path in VIEWS:
        token = gw.as_user(sub, role, client_id="1" if role == "client" else None)
        r = gw.get(path, token)
        assert r.status_code == 200, (path, r.text)
        found[f"{sub} {path}"] = r.json()
    return found


def sealed_fields(url: str) -> tuple[int, int]:
    """Values of encrypted classes in the CRM, read directly: (sealed, still plaintext)."""
    sealed = plain = 0
    for walk in walks(FIELDMAP):
        rows = [r for page in (1, 2, 3, 4) for r in direct(url, f"{walk.listing.template}?per_page=500&page={page}")[
            "items"]]
        for row in rows:
            for spec in walk.resource.specs:
                if FIELDMAP.classes[spec.class_for(row)].key_scope is None:
                    continue
                for value in values_at(row, spec.path):
                    if value is None:
                        continue
                    if is_sealed(value):
                        sealed += 1
                    else:
                        plain += 1
    return sealed, plain


def test_encrypt_existing_interrupted_resumed_and_reversed(setup: dict[str, Any], tmp_path: Path) -> None:
    gw: Gateway = setup["gw"]
    url = setup["url"]
    before = views(gw)
    raw_before = direct(url, "/session-notes?per_page=500")
    assert sealed_fields(url)[0] == 0

    code, dry, err = run(gw, "encrypt-existing", "--dry-run")
    assert code == 0, err
    assert dry["fields"] > 1000 and sealed_fields(url)[0] == 0  # nothing changed

    code, first, err = run(gw, "encrypt-existing", "--rate", "0", "--max-records", "300")
    assert code == 0, err
    assert first["complete"] is False and first["records"] == 300
    partial, left = sealed_fields(url)
    assert partial > 0 and left > 0
    assert (setup["keys"] / "migration.json").exists()
    assert views(gw) == before  # mixed plaintext and ciphertext reads back the same

    code, second, err = run(gw, "encrypt-existing", "--rate", "0")
    assert code == 0, err
    assert second["complete"] is True and second["failures"] == 0
    assert first["fields"] + second["fields"] == dry["fields"]
    sealed, plain = sealed_fields(url)
    assert plain == 0 and sealed == dry["fields"]
    assert views(gw) == before

    code, again, err = run(gw, "encrypt-existing", "--rate", "0")
    assert code == 0 and again["fields"] == 0 and again["changed_records"] == 0  # idempotent

    audit = [r for r in gw.audit_records() if r["route"] == "encrypt-existing"]
    assert len(audit) >= 3 and audit[-1]["counts"]["records"] > 0

    export = tmp_path / "export.jsonl"
    code, out, err = run(gw, "decrypt-export", "--output", str(export))
    assert code == 0, err
    lines = [json.loads(x) for x in export.read_text().splitlines()]
    assert export.stat().st_mode & 0o077 == 0 and out["failures"] == 0
    notes = {x["record"]["id"]: x["record"] for x in lines if x["resource"] == "session_note"}
    assert all(notes[n["id"]]["body"] == n["body"] for n in raw_before["items"])
    assert sealed_fields(url)[1] == 0  # exporting left the CRM encrypted

    code, out, err = run(gw, "decrypt-export", "--rate", "0")
    assert code == 0, err
    assert sealed_fields(url)[0] == 0
    assert direct(url, "/session-notes?per_page=500") == raw_before

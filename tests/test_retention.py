"""Retention and erasure against the example CRM with its sensitive fields sealed, on a simulated date:
`retention plan --as-of 2046-01-01` lists the adult clients closed twenty years before and leaves the
safeguarding ones; a hold keeps a client and refuses their erasure; `retention run` makes the due clients
unreadable, deletes and blanks them at the CRM, and leaves a certificate; recording a supervision session
destroys that counsellor's earlier process notes and no one else's; an erasure needs a second person and
is refused within the safeguarding schedule, naming it; a death is recorded and relaxes nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from proxy.policy import MapError
from proxy.policy.fieldmap import parse_fieldmap
from proxy.policy.retention import parse_retention
from tests.conftest import (
    HTTP,
    REPO,
    Gateway,
    Signing,
    direct,
    fieldguard,
    make_keys,
    policies_copy,
    start_crm,
    start_gateway,
    wait_until,
)

AS_OF = "2046-01-01"


def _expected(url: str) -> dict[str, set[str]]:
    """The oracle, from the CRM before it is sealed: adult clients closed by 2026-01-01 are due in 2046, unless
    a session note of theirs records a medium or high risk (safeguarding: seventy years)."""
    clients = direct(url, "/clients?per_page=500")["items"]
    risky = {str(n["client_id"]) for n in direct(url, "/session-notes?per_page=500")["items"]
             if (n.get("risk") or {}).get("level") in ("medium", "high")}
    closed_adults = {str(c["id"]) for c in clients if c["category"] == "adult" and c["closed"]
                     and c["closed"] < "2026-01-01"}
    return {"due": closed_adults - risky, "safeguarding": {str(c["id"]) for c in clients if c["closed"]} & risky,
            "open_adults": {str(c["id"]) for c in clients if c["category"] == "adult" and not c["closed"]} - risky}


@pytest.fixture(scope="module")
def world(signing: Signing, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("retention")
    crm, url = start_crm(d / "crm")
    expected = _expected(url)
    gw = start_gateway(d / "gw", url, signing, make_keys(d / "keys"), policies=policies_copy(d / "gw"))
    sealed = fieldguard(gw.config, "encrypt-existing", "--rate", "0")
    assert sealed.returncode == 0, sealed.stderr
    assert expected["due"] and expected["safeguarding"], expected  # the seed gives both kinds
    yield {"gw": gw, "url": url, "dir": d, **expected}
    gw.service.stop()
    crm.stop()


def cli(gw: Gateway, *args: str) -> Any:
    return fieldguard(gw.config, *args)


def last(gw: Gateway, route: str) -> dict[str, Any]:
    return [r for r in gw.audit_records() if r["route"] == route][-1]


def counsellor_of(client: str) -> str:
    return ["alice", "bob", "chen", "dev", "fatima", "george", "hana", "ivan"][(int(client) - 1) % 8]


def test_the_schedules_are_checked_with_file_and_line() -> None:
    fm = parse_fieldmap((REPO / "policies" / "fields.yaml").read_text())
    text = (REPO / "policies" / "retention.yaml").read_text()
    assert [s.name for s in parse_retention(text, fm).schedules][:2] == ["safeguarding", "children_and_young_people"]
    for broken, said in ((text.replace("keep: 20 years", "keep: twenty years"), "keep is a period"),
                         (text.replace("classes: [process_notes]", "classes: [jottings]"), "unknown class 'jottings'"),
                         (text.replace("from: birth", "from: christening"), "from 'christening' is not one"),
                         (text.replace("field: risk.level", "field: risk_level"), "'risk_level' is not a field")):
        with pytest.raises(MapError) as bad:
            parse_retention(broken, fm)
        assert said in bad.value.detail and bad.value.line is not None and bad.value.file == "retention.yaml"
        line = broken.splitlines()[bad.value.line - 1]
        assert any(word in line for word in ("keep", "classes", "from", "holds", "name")), line


def test_policy_check_refuses_a_broken_schedule(world: dict[str, Any], tmp_path: Path) -> None:
    policies = policies_copy(tmp_path)
    target = policies / "retention.yaml"
    target.write_text(target.read_text().replace("keep: 7 years", "keep: 7 decades"))
    out = fieldguard(world["gw"].config, "policy", "check", str(policies))
    assert out.returncode != 0
    assert "retention.yaml:" in out.stdout + out.stderr and "keep is a period" in out.stdout + out.stderr


def test_the_plan_lists_the_adult_clients_due_and_leaves_the_safeguarding_ones(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    out = cli(gw, "retention", "plan", "--as-of", AS_OF)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    due = {c["client"] for c in plan["schedules"]["adult_counselling"]["due_clients"]}
    assert due == world["due"]
    assert not {c["client"] for s in plan["schedules"].values() for c in s["due_clients"]} & world["safeguarding"]
    assert plan["schedules"]["safeguarding"]["kept"] >= len(world["safeguarding"])
    assert plan["kept_open_ended"] >= len(world["open_adults"])  # an open case has no closing date yet
    now = json.loads(cli(gw, "retention", "plan").stdout)
    assert now["schedules"]["adult_counselling"]["due"] == 0  # today nothing adult is twenty years closed
    assert last(gw, "retention plan")["reason"] == f"as of {datetime.now(UTC).date()}"
    bad = cli(gw, "retention", "plan", "--as-of", "01/01/2046")
    assert bad.returncode == 1 and "'01/01/2046' is not a date (YYYY-MM-DD)" in bad.stderr


def test_a_hold_keeps_a_client_and_refuses_their_erasure(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    held = sorted(world["due"], key=int)[0]
    ok = cli(gw, "retention", "hold", "--client", held, "--reason", "insurance claim CL-77 pending")
    assert ok.returncode == 0, ok.stderr
    plan = json.loads(cli(gw, "retention", "plan", "--as-of", AS_OF).stdout)
    assert held not in {c["client"] for c in plan["schedules"]["adult_counselling"]["due_clients"]}
    assert {"client": held, "why": "on legal hold: insurance claim CL-77 pending"} in plan["held"]
    refused = cli(gw, "erase", "--client", held, "--request", "letter 2046-1")
    assert refused.returncode == 1 and "is on legal hold (insurance claim CL-77 pending)" in refused.stderr
    assert last(gw, "erase")["outcome"] == "denied"
    assert cli(gw, "retention", "release", "--client", held, "--reason", "claim settled").returncode == 0
    plan = json.loads(cli(gw, "retention", "plan", "--as-of", AS_OF).stdout)
    assert held in {c["client"] for c in plan["schedules"]["adult_counselling"]["due_clients"]}
    again = cli(gw, "retention", "release", "--client", held, "--reason", "claim settled")
    assert again.returncode == 1 and f"client {held} is not on hold" in again.stderr


def test_erasure_is_refused_within_the_safeguarding_schedule_naming_it(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    client = sorted(world["safeguarding"], key=int)[0]
    out = cli(gw, "erase", "--client", client, "--request", "email 2026-12-01")
    assert out.returncode == 1
    assert "retention schedule safeguarding (70 years from case_closed" in out.stderr
    assert "erasure refused, UK GDPR Art. 17(3)" in out.stderr
    assert "retention schedule safeguarding" in last(gw, "erase")["reason"]


def test_an_erasure_needs_a_second_person_and_leaves_a_certificate(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    client = sorted(world["open_adults"], key=int)[-1]
    who = counsellor_of(client)
    reader = gw.as_user(who, "counsellor")
    assert gw.get(f"/clients/{client}", reader).json().get("gp")  # readable before
    asked = cli(gw, "erase", "--client", client, "--request", "letter 17", "--actor", "sam")
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["status"] == "awaiting approval"
    assert gw.get(f"/clients/{client}", reader).json().get("gp")  # nothing happens before the approval
    own = cli(gw, "erase", "--client", client, "--request", "letter 17", "--approve", "--role", "dpo", "--actor", "sam")
    assert own.returncode == 1 and "a second person approves it" in own.stderr
    role = cli(gw, "erase", "--client", client, "--request", "letter 17", "--approve", "--role", "admin",
               "--actor", "dana")
    assert role.returncode == 1 and "--role must be one of dpo, service_manager" in role.stderr
    done = cli(gw, "erase", "--client", client, "--request", "letter 17", "--approve", "--role", "dpo",
               "--actor", "dana", "--out", str(world["dir"] / "certs"))
    assert done.returncode == 0, done.stderr
    made = json.loads(done.stdout)
    cert = json.loads(Path(made["certificate"]).read_text())
    assert cert["kind"] == "erasure" and cert["requested_by"] == "u:sam" and cert["approved_by"] == "u:dana"
    assert cert["clients"][0]["keys_destroyed"] and cert["trail"]["size"] >= 1
    assert "name.first" in cert["clients"][0]["blanked"] and not cert["clients"][0]["failed"]
    at_crm = direct(world["url"], f"/clients/{client}")
    assert at_crm["name"] == {"first": None, "last": None} and at_crm["email"] is None and at_crm["gp"] is None
    assert at_crm["id"] == int(client) and at_crm["counsellor"] == who  # the shell: ids and service
    assert direct(world["url"], f"/clients/{client}/session-notes")["items"] == []
    r = gw.get(f"/clients/{client}", reader)
    assert r.json().get("gp") is None and r.json()["name"] == {"first": None, "last": None}
    wait_until(lambda: gw.audit_for(gw.get(f"/clients/{client}", reader).headers["x-request-id"])["clients"]
               == ["erased"], "the running gateway took up the erasure (its revocation watcher)")
    record = last(gw, "erase")
    assert record["outcome"] == "allowed" and record["key_ids"] == cert["clients"][0]["keys_destroyed"]
    gone = cli(gw, "erase", "--client", client, "--request", "letter 17")
    assert gone.returncode == 1 and "was erased" in gone.stderr


def test_recording_supervision_destroys_that_counsellors_earlier_process_notes(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    alice, bob = gw.as_user("alice", "counsellor"), gw.as_user("bob", "counsellor")
    today = datetime.now(UTC).date()
    mine = gw.request("POST", "/clients/1/process-notes", alice, json={
        "written_at": f"{today - timedelta(days=2)}T10:00:00", "body": "countertransference",
        "supervision_due": str(today)})
    theirs = gw.request("POST", "/clients/2/process-notes", bob, json={
        "written_at": f"{today - timedelta(days=2)}T11:00:00", "body": "bob's own", "supervision_due": str(today)})
    assert mine.status_code == theirs.status_code == 201, mine.text + theirs.text
    note, other = mine.json()["id"], theirs.json()["id"]
    assert gw.get(f"/process-notes/{note}", alice).json()["body"] == "countertransference"
    dry = cli(gw, "retention", "supervision", "--counsellor", "alice", "--date", str(today - timedelta(days=1)),
              "--dry-run")
    assert dry.returncode == 0 and json.loads(dry.stdout)["would_destroy"].get("1", 0) >= 1, dry.stdout + dry.stderr
    assert gw.get(f"/process-notes/{note}", alice).status_code == 200
    out = cli(gw, "retention", "supervision", "--counsellor", "alice", "--date", str(today - timedelta(days=1)))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["destroyed"].get("1", 0) >= 1
    assert gw.get(f"/process-notes/{note}", alice).status_code == 404  # deleted through the CRM's API
    assert HTTP.get(world["url"] + f"/process-notes/{note}").status_code == 404
    assert gw.get(f"/process-notes/{other}", bob).json()["body"] == "bob's own"  # bob's: not his supervision
    later = gw.request("POST", "/clients/1/process-notes", alice, json={
        "written_at": f"{today}T16:00:00", "body": "after supervision", "supervision_due": str(today)})
    assert gw.get(f"/process-notes/{later.json()['id']}", alice).json()["body"] == "after supervision"
    records = [r for r in gw.audit_records() if r["route"] == "retention supervision"]
    assert records[-1]["reason"] == f"supervision of alice on {today - timedelta(days=1)}"
    assert any(r["reason"].startswith("retention: supervision of alice") and r.get("key_ids") is not None
               for r in records)  # one record per client whose notes went
    future = cli(gw, "retention", "supervision", "--counsellor", "alice", "--date", str(today + timedelta(days=2)))
    assert future.returncode == 1 and "is in the future" in future.stderr


def test_a_death_is_recorded_and_relaxes_nothing(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    client = "4"
    before = {role: gw.get(f"/clients/{client}", gw.as_user(user, role)).json()
              for user, role in (("dev", "counsellor"), ("erin", "admin"))}
    out = cli(gw, "retention", "event", "--client", client, "--event", "death", "--date", "2026-11-20")
    assert out.returncode == 0, out.stderr
    after = {role: gw.get(f"/clients/{client}", gw.as_user(user, role)).json()
             for user, role in (("dev", "counsellor"), ("erin", "admin"))}
    assert after == before  # confidentiality continues: every role sees what it saw
    assert "session_date" not in gw.get(f"/clients/{client}/session-notes", gw.as_user("erin", "admin")).text
    twice = cli(gw, "retention", "event", "--client", client, "--event", "death", "--date", "2026-11-20")
    assert twice.returncode == 1 and "death is recorded already" in twice.stderr
    odd = cli(gw, "retention", "event", "--client", client, "--event", "wedding", "--date", "2026-11-20")
    assert odd.returncode == 1 and "unknown event 'wedding' (retention.yaml records: death)" in odd.stderr
    assert last(gw, "retention event")["outcome"] == "denied"


def test_the_run_destroys_what_is_due_and_is_resumable(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    plan = json.loads(cli(gw, "retention", "plan", "--as-of", AS_OF).stdout)
    due = sorted({c["client"] for s in plan["schedules"].values() for c in s["due_clients"] if len(c) == 2
                  and "since" in c}, key=int)  # every schedule's: coaching (3 years), children (the 25th birthday) ...
    assert world["due"] <= set(due) and not set(due) & world["safeguarding"]
    kept = sorted(world["safeguarding"], key=int)[0]
    dry = cli(gw, "retention", "run", "--as-of", AS_OF, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert {c["client"] for c in json.loads(dry.stdout)["would_destroy"] if "why" in c} == set(due)
    assert gw.get(f"/clients/{due[0]}", gw.as_user(counsellor_of(due[0]), "counsellor")).json().get("gp")
    out = cli(gw, "retention", "run", "--as-of", AS_OF, "--yes", "--rate", "0", "--out", str(world["dir"] / "run"))
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    assert made["clients_destroyed"] == len(due)
    cert = json.loads(Path(made["certificate"]).read_text())
    assert {c["client"] for c in cert["clients"] if c["keys_destroyed"]} == set(due) and cert["as_of"] == AS_OF
    for client in due:
        r = gw.get(f"/clients/{client}", gw.as_user(counsellor_of(client), "counsellor"))
        assert r.json().get("gp") is None and r.json()["name"]["first"] is None
    assert gw.get(f"/clients/{kept}", gw.as_user(counsellor_of(kept), "counsellor")).json().get("gp")
    per_client = [r for r in gw.audit_records() if r["route"] == "retention run" and r["outcome"] == "allowed"]
    assert len([r for r in per_client if r.get("key_ids")]) >= len(due)
    again = json.loads(cli(gw, "retention", "run", "--as-of", AS_OF, "--yes", "--rate", "0",
                           "--out", str(world["dir"] / "run")).stdout)
    assert again["clients_destroyed"] == 0 and again["skipped_erased"] >= len(due)

"""The security officers' tools: check, test, diff, explain, signed bundles, shadow mode, reload."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from proxy.cli import main
from tests.conftest import HTTP, KEK_ENV, REPO, Signing, policies_copy, proofs_dir, start_gateway

GRANT_ADMIN_NOTES = ("p, admin, any, clinical_notes, read, deny", "p, admin, any, clinical_notes, read, allow")


def fieldguard(*args: str) -> tuple[int, str]:
    """The command as an officer runs it, from a directory of its own whose keys/proofs is the run's (the
    commands remember proofs in ./keys/proofs; never the repository's)."""
    with tempfile.TemporaryDirectory() as here, contextlib.chdir(here):
        Path("keys").mkdir()
        Path("keys/proofs").symlink_to(proofs_dir(), target_is_directory=True)
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(REPO / "policies", target)
    return target


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize(("row", "words"), [
    ("p, admin, any, clinical_notes, read, allow # temporary", "comment after a rule"),
    ("p, admin, any, clinical_notes", "expected 5"),
    ("g3, admin, counsellor", "unknown row type"),
    ("p, admni, any, contact, read, allow", "has no purpose of use"),
])
def test_check_names_the_line_of_each_pitfall(bundle: Path, row: str, words: str) -> None:
    policy = bundle / "policy.csv"
    line = len(policy.read_text().splitlines()) + 1
    policy.write_text(policy.read_text() + row + "\n")
    code, out = fieldguard("policy", "check", str(bundle))
    assert code == 1 and f"policy.csv:{line}: error: " in out and words in out


def test_check_passes_the_shipped_bundle() -> None:
    code, out = fieldguard("policy", "check", str(REPO / "policies"))
    assert code == 0 and out.startswith("ok:") and "0 warning(s)" in out


def test_check_warns_of_what_can_never_matter(bundle: Path) -> None:
    edit(bundle / "fields.yaml", "  staff:           {label: N, description: \"the staff directory\"}\n",
         "  staff:           {label: N, description: \"the staff directory\"}\n  unused:          {label: N}\n")
    code, out = fieldguard("policy", "check", str(bundle))
    assert code == 0 and "class 'unused' is named by no rule" in out


def test_shipped_tests_pass_and_a_wrong_policy_fails_them_by_name(bundle: Path) -> None:
    code, out = fieldguard("policy", "test", str(bundle))
    assert code == 0 and " 0 failed" in out
    edit(bundle / "policy.csv", *GRANT_ADMIN_NOTES)
    code, out = fieldguard("policy", "test", str(bundle))
    assert code == 1
    assert "FAIL  admin never reads clinical notes" in out
    assert "admin / any / clinical_notes: expected remove, got clear" in out
    assert "FAIL  admin is refused session notes" in out and "status: expected 403, got 200" in out


def test_diff_shows_what_each_role_gains_and_loses(bundle: Path) -> None:
    edit(bundle / "policy.csv", *GRANT_ADMIN_NOTES)
    edit(bundle / "policy.csv", "p, researcher, any, referral, read, allow\n", "")
    code, out = fieldguard("policy", "diff", str(REPO / "policies"), str(bundle))
    assert code == 0
    lines = out.splitlines()
    assert any(line.split()[:5] == ["gains", "admin", "any", "clinical_notes", "read"] for line in lines)
    assert any(line.split()[:5] == ["loses", "researcher", "any", "referral", "read"] for line in lines)
    code, md = fieldguard("policy", "diff", str(REPO / "policies"), str(bundle), "--format", "markdown")
    assert "**Access review:** 1 gained, 1 lost." in md and "| **gains** | admin | any | clinical_notes |" in md
    _, same = fieldguard("policy", "diff", str(REPO / "policies"), str(REPO / "policies"))
    assert same.strip() == "No change in what any role may see or do."


def test_diff_compares_relation_sets_whole(bundle: Path) -> None:
    """Deny overrides allow across the relations held: a deny under cover takes clinical notes from a
    supervisor who is also covering. Relation by relation, the diff showed no change at all."""
    policy = bundle / "policy.csv"
    policy.write_text(policy.read_text() + "p, supervisor, cover, clinical_notes, read, deny\n")
    code, out = fieldguard("policy", "diff", str(REPO / "policies"), str(bundle))
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.startswith("loses")]
    assert [r[:5] for r in rows] == [["loses", "supervisor", "any+supervision+cover", "clinical_notes", "read"]], out
    assert rows[0][5].startswith("policy.csv:73")  # the allow it loses


def test_diff_shows_what_the_field_map_changed(bundle: Path) -> None:
    """The review used to see only the decision table: a path moved to a class more roles read, a class no
    longer encrypted and a route served without identity all came out as "No change"."""
    fields = bundle / "fields.yaml"
    edit(fields, "  clinical_notes:  {label: R, encrypt: record,", "  clinical_notes:  {label: R,")
    text = fields.read_text()
    assert "      session_date: clinical_notes\n" in text
    fields.write_text(text.replace("      session_date: clinical_notes\n", "      session_date: service\n")
                      + "public:\n  - GET /staff/alice staff\n")
    code, out = fieldguard("policy", "diff", str(REPO / "policies"), str(bundle))
    assert code == 0 and "No change in what any role may see or do." in out
    assert "Field map:" in out
    lines = out.splitlines()
    weaker = [line for line in lines if line.startswith("weaker")]
    assert any("class clinical_notes" in line and "STOPS BEING ENCRYPTED" in line for line in weaker), out
    moved = next(line for line in weaker if "session_note.session_date" in line)
    assert "reclassified clinical_notes -> service: now shown more to" in moved and "admin (remove -> clear)" in moved
    assert any("route GET /staff/alice" in line and "served WITHOUT IDENTITY" in line for line in weaker)
    assert "a running gateway refuses this change on reload: class clinical_notes would stop being encrypted" in out


def test_explain_says_why(bundle: Path) -> None:
    code, out = fieldguard("policy", "explain", str(bundle), "--role", "counsellor", "--purpose", "TREAT",
                           "--path", "/clients/2/session-notes")
    assert code == 0 and "NOT visible" in out and "not on the caseload" in out and "policy.csv:" in out
    _, out = fieldguard("policy", "explain", str(bundle), "--role", "admin", "--class", "clinical_notes")
    assert "explicit deny at policy.csv:" in out
    _, out = fieldguard("policy", "explain", str(bundle), "--role", "researcher", "--purpose", "TREAT",
                        "--class", "service")
    assert "purpose of use TREAT is not allowed for role researcher" in out
    _, out = fieldguard("policy", "explain", str(bundle), "--role", "supervisor", "--relation", "supervision",
                        "--path", "/clients/1", "--format", "json")
    fields = {f["path"]: f for f in json.loads(out)["fields"]}
    assert fields["name.first"]["outcome"] == "pseudonym" and fields["email"]["outcome"] == "remove"


def test_explain_with_the_crms_facts(crm: str, tmp_path: Path) -> None:
    cfg = tmp_path / "fg.toml"
    cfg.write_text(f'[upstream]\nurl = "{crm}"\n[policy]\ndir = "{REPO / "policies"}"\n')
    code, out = fieldguard("policy", "explain", "--config", str(cfg), "--role", "counsellor", "--purpose", "TREAT",
                           "--user", "alice", "--path", "/clients/2")
    assert code == 0 and "holding any:" in out and "not on the caseload" in out
    code, out = fieldguard("policy", "explain", "--config", str(cfg), "--role", "counsellor", "--purpose", "TREAT",
                           "--user", "alice", "--path", "/clients/1")
    assert code == 0 and "holding any+caseload" in out and "NOT visible" not in out


def test_explain_says_field_by_field_what_a_write_may_change() -> None:
    code, out = fieldguard("policy", "explain", str(REPO / "policies"), "--role", "admin", "--purpose", "HOPERAT",
                           "--method", "PATCH", "--path", "/letters/3", "--format", "json")
    assert code == 0, out
    fields = {f["path"]: f for f in json.loads(out)["fields"]}
    assert fields["third_party"]["outcome"] == "allow"  # the flag's own class, reference
    assert fields["third_party (as a flag)"]["outcome"] == "deny"
    assert fields["third_party (as a flag)"]["reason"].endswith("needs write on letters, third_party")
    assert fields["body"]["reason"] == "no rule lets admin write letters"
    code, out = fieldguard("policy", "explain", str(REPO / "policies"), "--role", "counsellor", "--purpose", "TREAT",
                           "--relation", "caseload", "--method", "POST", "--path", "/clients/1/session-notes")
    assert code == 0 and "(a new session_note record)" in out and "allowed by policy.csv:" in out
    assert "author" in out and "set by the gateway (user); no caller writes it" in out


def test_signed_bundles(bundle: Path, tmp_path: Path, crm: str, signing: Signing, shared_keys: Path) -> None:
    key = tmp_path / "officer.pem"
    assert fieldguard("policy", "keygen", "--out", str(key))[0] == 0
    assert fieldguard("policy", "sign", str(bundle), "--key", str(key))[0] == 0
    extra = f'require_signature = true\nsigning_public_key = "{tmp_path / "officer.pub.pem"}"'
    gw = start_gateway(tmp_path / "gw", crm, signing, shared_keys, policies=bundle)
    gw.service.stop()
    cfg = gw.config.read_text().replace("[policy]\n", "[policy]\n" + extra + "\n")
    gw.config.write_text(cfg)
    gw.service.start()
    try:
        alice = gw.as_user("alice", "counsellor")
        assert gw.get("/clients/1", alice).status_code == 200
        edit(bundle / "policy.csv", *GRANT_ADMIN_NOTES)  # changed after review, not signed again
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = gw.readyz()
            if state["checks"]["policy"]["last_reload_error"]:
                break
            time.sleep(0.1)
        assert "changed after it was signed" in state["checks"]["policy"]["last_reload_error"]
        assert "body" not in gw.get("/session-notes/1", gw.as_user("erin", "admin")).text
        refusal = [r for r in gw.audit_records() if r["method"] == "POLICY"]
        assert refusal and refusal[-1]["outcome"] == "error" and "signed" in refusal[-1]["reason"]
        assert 'fieldguard_policy_reloads_total{result="refused"}' in HTTP.get(gw.url + "/metrics").text
    finally:
        gw.service.stop()
    (bundle / "bundle.sig").unlink()
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(gw.config)],
                         capture_output=True, text=True, timeout=60, env={**os.environ, **KEK_ENV})
    assert out.returncode == 1 and "not signed" in out.stderr


def test_shadow_mode_audits_differences_and_enforces_nothing(tmp_path: Path, crm: str, signing: Signing,
                                                             shared_keys: Path) -> None:
    candidate = policies_copy(tmp_path / "candidate")
    edit(candidate / "policy.csv", *GRANT_ADMIN_NOTES)
    active = policies_copy(tmp_path / "active")
    gw = start_gateway(tmp_path / "gw", crm, signing, shared_keys, policies=active)
    gw.service.stop()
    gw.config.write_text(gw.config.read_text().replace("[policy]\n", f'[policy]\nshadow_dir = "{candidate}"\n'))
    gw.service.start()
    try:
        erin = gw.as_user("erin", "admin")
        r = gw.get("/clients/1/appointments", erin)
        assert r.status_code == 200
        rec = gw.audit_for(r.headers["x-request-id"])
        assert rec["shadow"] == [] and rec["shadow_policy"]
        r = gw.get("/clients/1", gw.as_user("carol", "supervisor"))
        assert gw.audit_for(r.headers["x-request-id"])["shadow"] == []
        r = gw.get("/session-notes/1", erin)
        assert r.status_code == 403  # the active policy is enforced
        rec = gw.audit_for(r.headers["x-request-id"])
        assert "clinical_notes: remove -> clear (any)" in rec["shadow"]
        assert "fieldguard_shadow_differences_total" in HTTP.get(gw.url + "/metrics").text
        ready = gw.readyz()
        assert ready["checks"]["policy"]["shadow"] == rec["shadow_policy"]
    finally:
        gw.service.stop()


def test_reload_command_and_officer_endpoints(tmp_path: Path, crm: str, signing: Signing, shared_keys: Path) -> None:
    policies = policies_copy(tmp_path)
    gw = start_gateway(tmp_path / "gw", crm, signing, shared_keys, policies=policies, process=True)  # SIGHUP
    gw.service.stop()
    gw.config.write_text(gw.config.read_text().replace("[policy]", "[policy]\nwatch = false").replace(
        "[server]", f'[server]\npid_file = "{tmp_path / "fg.pid"}"'))
    gw.service.start()
    try:
        before = gw.readyz()["checks"]["policy"]["hash"]
        edit(policies / "policy.csv", *GRANT_ADMIN_NOTES)
        time.sleep(0.5)
        assert gw.readyz()["checks"]["policy"]["hash"] == before  # not watching
        code, out = fieldguard("policy", "reload", "--config", str(gw.config))
        assert code == 0, out
        deadline = time.monotonic() + 30
        while gw.readyz()["checks"]["policy"]["hash"] == before:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        officer = gw.as_user("sam", "security_officer")
        r = gw.get("/_fieldguard/explain?role=counsellor&purpose=TREAT&user=alice&path=/clients/2", officer)
        assert r.status_code == 200 and r.json()["visible"] is False and r.json()["relations"] == "any"
        rec = gw.audit_for(r.headers["x-request-id"])
        assert rec["route"] == "/_fieldguard/explain" and rec["user"] == "u:sam"
        # whom it answered about: an answer about a named user and client is a disclosure too
        assert rec["about"] == {"role": "counsellor", "user": "alice", "method": "GET",
                                "route": "/clients/{client_id:int}"}
        assert len(rec["clients"]) == 1 and rec["clients"][0].startswith("P-")
        assert gw.get("/_fieldguard/explain?role=admin&class=clinical_notes",
                      gw.as_user("erin", "admin")).status_code == 403
        edit(policies / "policy.csv", GRANT_ADMIN_NOTES[1], GRANT_ADMIN_NOTES[1] + " # oops")
        r = gw.request("POST", "/_fieldguard/reload", officer)
        assert r.status_code == 409 and "comment after a rule" in r.json()["error"]
    finally:
        gw.service.stop()


def test_check_with_a_config_reads_the_relation_sources_and_warns_of_one_that_matches_nothing(
        crm: str, signing: Signing, shared_keys: Path, tmp_path: Path) -> None:
    policies = policies_copy(tmp_path)
    gw = start_gateway(tmp_path / "gw", crm, signing, shared_keys, policies=policies, start=False)
    code, out = fieldguard("policy", "check", "--config", str(gw.config))
    assert code == 0, out
    assert "relations: 200 clients with a practitioner, 12 staff rows, 8 supervision links" in out
    assert "warning:" not in out
    edit(policies / "fields.yaml", "  counsellor: counsellor\n", "  counsellor: assignedTo\n")
    code, out = fieldguard("policy", "check", "--config", str(gw.config))
    assert code == 0 and "warning: the relation source matched no client (/clients assignedTo)" in out

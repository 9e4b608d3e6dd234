"""`make demo` as a new user tries it: start `fieldguard demo`, paste the printed lines, read the answers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import HTTP, REPO, Service, free_port, printed, proofs_dir, wait_until


def access_lines(service: Service) -> list[dict[str, Any]]:
    """The audit lines the demo has printed so far (a line still being written is not one yet)."""
    found = []
    for line in service.output().splitlines():
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("event") == "access":
                found.append(rec)
    return found


def test_demo_shows_each_role_what_the_rules_allow(tmp_path: Path) -> None:
    port, crm_port = free_port(), free_port()
    (tmp_path / "keys").mkdir(mode=0o700)  # everything else in it the demo makes; the run's proofs it may reuse
    (tmp_path / "keys" / "proofs").symlink_to(proofs_dir(), target_is_directory=True)
    demo = Service([sys.executable, "-m", "proxy.cli", "demo", "--port", str(port), "--crm-port", str(crm_port),
                    "--alerts-port", str(free_port()),
                    "--data", str(tmp_path / "demo"), "--keys", str(tmp_path / "keys")], tmp_path / "demo.log",
                   f"http://127.0.0.1:{port}/readyz", cwd=REPO)
    demo.start(timeout=90)
    try:
        out = printed(demo, "Stop with Ctrl-C.")
        tokens = dict(re.findall(r"^export (\w+)=(\S+)$", out, re.M))
        curls = re.findall(r"^  curl -s -H \"Authorization: Bearer \$(\w+)\" '([^']+)'; echo$", out, re.M)
        assert set(tokens) >= {"ALICE", "CAROL", "ERIN", "RHEA"} and len(curls) >= 10

        def call(user: str, url: str) -> httpx.Response:
            return HTTP.get(url, headers={"authorization": f"Bearer {tokens[user]}"}, timeout=10)

        results = {(user, url.split(str(port), 1)[1]): call(user, url) for user, url in curls}
        # a counsellor sees their own client's notes and nothing of anyone else's
        assert results[("ALICE", "/clients/1/session-notes")].json()["items"][0]["body"]
        assert results[("ALICE", "/clients/2")].status_code == 403
        # a supervisor sees notes under a pseudonym, without name or contact
        carol = results[("CAROL", "/clients/1")].json()
        assert carol["name"]["first"].startswith("P-") and "last" not in carol["name"] and "email" not in carol
        assert results[("CAROL", "/clients/1/session-notes")].json()["items"][0]["body"]
        # admin sees contact details and appointments and no notes
        erin = results[("ERIN", "/clients/1")].json()
        assert erin["email"] and results[("ERIN", "/clients/1/appointments")].json()["items"]
        assert results[("ERIN", "/clients/1/session-notes")].status_code == 403
        # a researcher sees no identity
        for row in results[("RHEA", "/clients?per_page=3")].json()["items"]:
            assert row["id"].startswith("P-") and "name" not in row and "email" not in row
            assert re.fullmatch(r"\d{4}", row["date_of_birth"])
        # every access appears in the audit output
        lines = wait_until(lambda: found if len(found := access_lines(demo)) >= len(curls) else [],
                           "an audit line printed for each curl", timeout=10)
        audit_file = (tmp_path / "demo" / "audit.jsonl").read_text().splitlines()
        assert len(audit_file) >= len(curls)
        assert {rec["user"] for rec in lines} >= {"u:alice", "u:carol", "u:erin", "u:rhea"}
        # behind the gateway the CRM holds ciphertext (the printed line shows it)
        direct_line = re.search(r"^  curl -s '(http://127.0.0.1:\d+/clients/1/session-notes[^']*)'", out, re.M)
        assert direct_line is not None
        raw = HTTP.get(direct_line.group(1), timeout=10).json()["items"][0]
        assert raw["body"].startswith("fg1.") and raw["summary"].startswith("fg1.")
        # a data-protection officer shreds client 1's keys: their notes become unreadable through the gateway
        cfg = tmp_path / "demo" / "fieldguard.toml"
        shred = subprocess.run([sys.executable, "-m", "proxy.cli", "keys", "shred", "--config", str(cfg), "--client",
                                "1", "--reason", "erasure request T-42", "--yes"], capture_output=True, text=True,
                               cwd=REPO, timeout=60)
        assert shred.returncode == 0, shred.stderr
        # the shred ran in another process: the demo's gateway drops the keys at its next revocation poll
        wait_until(lambda: (notes := call("ALICE", f"http://127.0.0.1:{port}/clients/1/session-notes")
                            .json()["items"]) and all("body" not in n and "summary" not in n for n in notes),
                   "client 1's notes unreadable through the gateway after the shred", timeout=10)
        # the trail verifies, and answers "who accessed my record"
        verify = subprocess.run([sys.executable, "-m", "proxy.cli", "audit", "verify", "--config", str(cfg)],
                                capture_output=True, text=True, cwd=REPO, timeout=60)
        assert verify.returncode == 0 and json.loads(verify.stdout)["ok"], verify.stdout
        report = subprocess.run([sys.executable, "-m", "proxy.cli", "audit", "report", "--config", str(cfg),
                                 "--client", "2", "--format", "json"], capture_output=True, text=True, cwd=REPO,
                                timeout=60)
        assert report.returncode == 0, report.stderr
        assert "u:alice" in {a["who"] for a in json.loads(report.stdout)["accesses"]}
        others = [c["id"] for c in call("ALICE", f"http://127.0.0.1:{port}/clients?per_page=25").json()["items"]]
        readable = [call("ALICE", f"http://127.0.0.1:{port}/clients/{c}/session-notes").json()["items"]
                    for c in others if c != 1]
        assert any(n.get("body") for notes_of_one in readable for n in notes_of_one)  # other clients unaffected
    finally:
        demo.stop()
    with pytest.raises(httpx.ConnectError):  # stopping the demo stops its CRM too
        HTTP.get(f"http://127.0.0.1:{crm_port}/health", timeout=2)

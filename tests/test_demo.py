"""`make demo` as a new user tries it: start `fieldguard demo`, paste the printed lines, read the answers."""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import REPO, Service, free_port


def test_demo_shows_each_role_what_the_rules_allow(tmp_path: Path) -> None:
    port, crm_port = free_port(), free_port()
    demo = Service([sys.executable, "-m", "proxy.cli", "demo", "--port", str(port), "--crm-port", str(crm_port),
                    "--data", str(tmp_path / "demo")], tmp_path / "demo.log", f"http://127.0.0.1:{port}/readyz",
                   cwd=REPO)
    demo.start(timeout=90)
    try:
        out = demo.output()
        tokens = dict(re.findall(r"^export (\w+)=(\S+)$", out, re.M))
        curls = re.findall(r"^  curl -s -H \"Authorization: Bearer \$(\w+)\" '([^']+)'; echo$", out, re.M)
        assert set(tokens) >= {"ALICE", "CAROL", "ERIN", "RHEA"} and len(curls) >= 10

        def call(user: str, url: str) -> httpx.Response:
            return httpx.get(url, headers={"authorization": f"Bearer {tokens[user]}"}, timeout=10)

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
        time.sleep(0.3)
        lines = [json.loads(line) for line in demo.output().splitlines() if line.startswith('{"request_id"')]
        assert len(lines) >= len(curls)
        audit_file = (tmp_path / "demo" / "audit.jsonl").read_text().splitlines()
        assert len(audit_file) >= len(curls)
        assert {rec["user"] for rec in lines} >= {"u:alice", "u:carol", "u:erin", "u:rhea"}
        # the printed config works with the other commands too
        cfg = tmp_path / "demo" / "fieldguard.toml"
        assert shlex.quote(str(cfg))
    finally:
        demo.stop()

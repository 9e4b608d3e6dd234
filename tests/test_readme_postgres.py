"""The README's walkthrough of several gateways sharing PostgreSQL (its ```bash block) runs as written, on a
demo in a copy of the repository, against a database of its own on the machine's PostgreSQL.

As in test_readme: ports are free ones, not 8000-8002 (`127.0.0.1:800N` and `FIELDGUARD_SERVER_PORT=800N`
are replaced by them), and the block's database is the test's (`createdb` is skipped: the fixture made it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, Service, free_port, pg_sql, proofs_dir
from tests.test_readme import Command, readme_commands, run_shell


@pytest.mark.timeout(300)
def test_the_two_gateway_walkthrough_runs_as_written(postgres: str, tmp_path: Path) -> None:
    blocks = [block for section, block in readme_commands("bash") if section == "For operators"]
    assert len(blocks) == 1, "the README has one ```bash block, the PostgreSQL walkthrough"
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / ".venv").symlink_to(REPO / ".venv", target_is_directory=True)
    for name in ("examples", "policies"):
        shutil.copytree(REPO / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
    (clone / "keys").mkdir(mode=0o700)
    (clone / "keys" / "proofs").symlink_to(proofs_dir(), target_is_directory=True)
    port, crm, a, b = free_port(), free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDGUARD_")}
    demo = Service([".venv/bin/fieldguard", "demo", "--port", str(port), "--crm-port", str(crm), "--alerts-port",
                    str(free_port()), "--keys", str(clone / "keys")], clone / "demo.log",
                   f"http://127.0.0.1:{port}/healthz", cwd=clone, env=env)
    commands = []
    for c in blocks[0]:
        text = (c.text.replace("createdb -h 127.0.0.1 fieldguard", "true")
                .replace("postgresql://127.0.0.1:5432/fieldguard", postgres)
                .replace("FIELDGUARD_SERVER_PORT=8001", f"FIELDGUARD_SERVER_PORT={a}")
                .replace("FIELDGUARD_SERVER_PORT=8002", f"FIELDGUARD_SERVER_PORT={b}"))
        commands.append(Command(text, c.line, c.expect))
    try:
        demo.start(timeout=90)
        ran = run_shell(commands, clone, env, {"127.0.0.1:8000": port, "127.0.0.1:8100": crm,
                                               "127.0.0.1:8001": a, "127.0.0.1:8002": b})
    finally:
        demo.stop()
    failures = [f"README.md:{r.command.line}: `{r.command.text.splitlines()[0]}` exited {r.status}:\n"
                f"{r.output[-1500:]}" for r in ran if r.status != r.command.expect]
    failures += [f"README.md:{r.command.line}: a traceback:\n{r.output[-2000:]}" for r in ran
                 if "Traceback" in r.output]
    assert not failures, "\n\n".join(failures)
    said = {r.command.text.split(" #")[0].strip(): r.output for r in ran}  # as written: ports 8001, 8002

    def answer(fragment: str, n: int = 0) -> dict[str, object]:
        found = [out for text, out in said.items() if fragment in text][n]
        start = min(i for i in (found.find("{"), found.find("[")) if i >= 0)
        return json.JSONDecoder().raw_decode(found[start:])[0]  # type: ignore[no-any-return]

    status = answer("fieldguard status")
    assert len(status["replicas"]) == 2 and status["agree"], status  # type: ignore[arg-type]
    before = answer("127.0.0.1:8001/clients/9/session-notes")
    assert before["items"] and "body" in before["items"][0], before  # type: ignore[index]
    after = answer("127.0.0.1:8002/clients/9/session-notes")
    assert after["items"] and "body" not in after["items"][0], after  # type: ignore[index]
    assert "error" in answer("127.0.0.1:8001/clients/2/session-notes")  # dana, before the cover grant
    covered = answer("127.0.0.1:8002/clients/2/session-notes")
    assert "error" not in covered and covered["items"], covered
    verdict = answer("fieldguard audit verify")
    assert verdict["ok"] and verdict["checkpoints"], verdict
    replicas = {r["replica"] for r in pg_sql(postgres, "SELECT DISTINCT replica FROM audit_records")}
    assert {r.rsplit(":", 1)[1] for r in replicas if not r.startswith("cli@")} == {str(a), str(b)}, replicas

"""Starting the demo where one already runs: one sentence naming each port and what holds it, before any
banner or token is printed, and nothing of the running demo touched (not even with --reset). The demo also
makes its keys directory 0700 when it finds it open, as a clone leaves the repository's keys/."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path

from tests.conftest import HTTP, REPO, Service, free_port, proofs_dir


def test_a_second_demo_names_the_ports_and_their_holders_and_prints_no_token(tmp_path: Path) -> None:
    port, crm_port, alerts_port = free_port(), free_port(), free_port()
    keys = tmp_path / "keys"
    keys.mkdir()
    keys.chmod(0o755)  # as git leaves keys/ after a clone
    (keys / "proofs").symlink_to(proofs_dir(), target_is_directory=True)
    data = tmp_path / "demo"
    args = [sys.executable, "-m", "proxy.cli", "demo", "--port", str(port), "--crm-port", str(crm_port),
            "--alerts-port", str(alerts_port), "--data", str(data), "--keys", str(keys)]
    first = Service(args, tmp_path / "first.log", f"http://127.0.0.1:{port}/healthz", cwd=REPO)
    first.start(timeout=90)
    try:
        assert f"{keys} was mode 755; made it 700: it holds the demo's keys." in first.output()
        assert stat.S_IMODE(keys.stat().st_mode) == 0o700
        assert first.proc is not None
        second = subprocess.run([*args, "--reset"], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert second.returncode == 1
        assert second.stdout == ""  # no banner, no token, no curl line
        sentence = second.stderr.strip()
        assert "\n" not in sentence and "Traceback" not in sentence
        assert re.fullmatch(
            rf"port {port} is in use by process {first.proc.pid} \(python -m proxy\.cli demo --port {port} [^)]*\)"
            rf", port {crm_port} is in use by process \d+ \(python -m examples\.crm --db [^)]*\) "
            rf"and port {alerts_port} is in use by process \d+ \(python -m examples\.webhook --port [^)]*\): "
            r"a demo is running already; stop it \(Ctrl-C in its shell\), or start this one on other ports with "
            r"`fieldguard demo --port N --crm-port M --alerts-port K`\.", sentence), sentence
        # the first demo is untouched: --reset did not remove its data, and it still serves
        assert (data / "crm.sqlite3").exists() and (data / "fieldguard.toml").exists()
        assert HTTP.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        # only the CRM's port taken: the sentence names that one
        other = free_port()
        third = subprocess.run([*args[:5], str(other), *args[6:]], capture_output=True, text=True, cwd=REPO,
                               timeout=60)
        assert third.returncode == 1 and third.stdout == ""
        assert third.stderr.startswith(f"port {crm_port} is in use by process ") and f"port {other}" not in third.stderr
    finally:
        first.stop()


def test_serve_names_the_port_and_its_holder(tmp_path: Path) -> None:
    from tests.conftest import fieldguard

    holder = subprocess.Popen([sys.executable, "-c", "import socket, time; s = socket.socket(); "
                               "s.bind(('127.0.0.1', 0)); s.listen(); print(s.getsockname()[1], flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        port = int(holder.stdout.readline())
        config = tmp_path / "fieldguard.toml"
        config.write_text(f"[server]\nport = {port}\n")
        out = fieldguard(config, "serve")
        assert out.returncode == 1
        assert out.stderr.startswith(f"port {port} is in use by process {holder.pid} (python -c import socket, ")
        assert out.stderr.endswith("): stop it, or set server.port (FIELDGUARD_SERVER_PORT).\n")
        assert out.stderr.count("\n") == 1
    finally:
        holder.kill()
        holder.wait()

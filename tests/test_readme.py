"""Every command in the README's ```sh blocks runs as written, in a copy of the repository after `make demo`.

The copy has what a fresh clone has after `make demo` (`.venv`, `examples/`, `policies/`, `keys/` as git
leaves it, 0755) and a demo running in it. Each command is run by bash, in README order, one shell per
audience (the demo's commands, the operator's deployment), so that what a block exports is there for the
next; a command must exit 0 (or the status its `# exit N` comment gives) and print no traceback, and a curl
must answer JSON that is not an error. What is not run as written, and why:

- SKIPPED below: commands that cannot run inside the test suite.
- The running gateway and CRM are on free ports, not 8000 and 8100 (other tests and a developer's own
  demo may hold those): `127.0.0.1:8000` and `127.0.0.1:8100` in a command are replaced by the ports in use,
  the demo is started with `--port`/`--crm-port`, and the operator's commands get
  FIELDGUARD_SERVER_PORT and FIELDGUARD_UPSTREAM_URL (a staff-only example CRM: "your CRM").
- `/etc/fieldguard` is a directory in the copy: the test writes nothing outside its temporary directory.
- The demo is started with `--keys` naming the copy's keys/ (`make demo` uses the repository's, which is
  the clone's own); keys/proofs, here and in the operator's keys/, is this run's proof cache, so that the
  shipped bundle is proved once per run, not once per gateway.
- `.venv/bin/fieldguard serve` runs until stopped: it is started in the background, must answer /healthz
  and log `gateway listening; ready`, and is stopped when its shell is done.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, Service, free_port, proofs_dir

README = REPO / "README.md"

SKIPPED = {
    "make demo": "runs until stopped; the test starts the same `fieldguard demo` itself, on free ports",
    "make test": "the test suite this test is part of",
    "python3 -m venv .venv && .venv/bin/pip install -e .":
        "what `make setup` did before any test could run; it needs the package index and takes a minute",
}
LONG_RUNNING = (".venv/bin/fieldguard serve ",)


@dataclass(frozen=True)
class Command:
    text: str  # as in the README (a heredoc with its body)
    line: int  # in README.md
    expect: int  # the exit status its `# exit N` comment gives, else 0


def readme_commands(lang: str = "sh") -> list[tuple[str, list[Command]]]:
    """The ```sh blocks (or another fence's), each with the `## ` section it is in and its commands (a line,
    lines joined by a trailing backslash, or a line with its heredoc)."""
    text = README.read_text()
    blocks = []
    for fence in re.finditer(rf"^```{lang}\n(.*?)^```$", text, re.M | re.S):
        first = text.count("\n", 0, fence.start(1)) + 1
        headings = re.findall(r"^## (.+)$", text[:fence.start()], re.M)
        lines = fence.group(1).splitlines()
        commands, i = [], 0
        while i < len(lines):
            start, chunk = i, [lines[i]]
            while chunk[-1].endswith("\\") and i + 1 < len(lines):  # a command continued on the next line
                i += 1
                chunk.append(lines[i])
            heredoc = re.search(r"<<'?(\w+)'?", lines[i])
            if heredoc:
                while i + 1 < len(lines) and lines[i] != heredoc.group(1):
                    i += 1
                    chunk.append(lines[i])
            i += 1
            said = chunk[-1] if chunk[0].endswith("\\") else chunk[0]  # a continued command says it at its end
            expect = re.search(r"#\s*exit (\d+)", said)
            commands.append(Command("\n".join(chunk), first + start, int(expect.group(1)) if expect else 0))
        blocks.append((headings[-1] if headings else "", commands))
    return blocks


def is_operator(block: list[Command]) -> bool:
    return any("/etc/fieldguard" in c.text for c in block)


def written(command: Command) -> str:
    return command.text.split("  #")[0].strip()


@dataclass
class Ran:
    command: Command
    status: int
    output: str


def run_shell(commands: list[Command], cwd: Path, env: dict[str, str], ports: dict[str, int],
              prelude: str = "") -> list[Ran]:
    """One bash for all the commands, in order; each one's output and exit status."""
    script = ["exec 2>&1", prelude]
    for n, c in enumerate(commands):
        text = c.text.replace("/etc/fieldguard", str(cwd / "etc" / "fieldguard"))
        for written, port in ports.items():
            text = text.replace(written, f"127.0.0.1:{port}")
        script.append(f"echo '@@begin {n}'")
        if text.startswith(LONG_RUNNING):
            port = ports["127.0.0.1:8000"]
            script.append(f"{text.split(' #')[0]} > serve-{n}.log 2>&1 & echo $! > serve.pid\n"
                          f"for i in $(seq 300); do curl -sf http://127.0.0.1:{port}/healthz >/dev/null && break; "
                          f"sleep 0.1; done; curl -sf http://127.0.0.1:{port}/healthz >/dev/null; s=$?; "
                          f"sleep 0.5; cat serve-{n}.log")
        else:
            script.append(text)
            exported = re.match(r"export (\w+)=\$\(", text)
            # `export X=$(...)` is 0 whatever the command in it did: its status is whether X is set
            script.append(f'[ -n "${exported.group(1)}" ]; s=$?' if exported else "s=$?")
        script.append(f"echo \"@@end {n} $s\"")
    script.append('[ -f serve.pid ] && kill "$(cat serve.pid)" && rm serve.pid')
    out = subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=240).stdout
    ran = []
    for n, c in enumerate(commands):
        found = re.search(rf"^@@begin {n}\n(.*?)^@@end {n} (\d+)$", out, re.M | re.S)
        assert found is not None, f"README.md:{c.line}: `{c.text}` did not finish:\n{out[-3000:]}"
        ran.append(Ran(c, int(found.group(2)), found.group(1)))
    return ran


def check(ran: list[Ran]) -> list[str]:
    failures = []
    for r in ran:
        where = f"README.md:{r.command.line}: `{r.command.text.splitlines()[0]}`"
        if r.status != r.command.expect:
            failures.append(f"{where} exited {r.status} (expected {r.command.expect}):\n{r.output[-1500:]}")
        if "Traceback" in r.output:
            failures.append(f"{where} printed a traceback:\n{r.output[-3000:]}")
        if r.command.text.startswith("curl "):
            try:
                answer = json.loads(r.output)
            except ValueError:
                failures.append(f"{where} did not answer JSON: {r.output[:300]!r}")
                continue
            if isinstance(answer, dict) and "error" in answer:
                failures.append(f"{where} answered an error: {r.output[:300]}")
        if r.command.text.startswith(LONG_RUNNING) and "gateway listening; ready" not in r.output:
            failures.append(f"{where} did not log that it is ready:\n{r.output[-3000:]}")
    return failures


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a fresh clone holds after `make demo` set it up (the demo itself is started by the test)."""
    root = tmp_path_factory.mktemp("clone")
    (root / ".venv").symlink_to(REPO / ".venv", target_is_directory=True)
    for name in ("examples", "policies"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "keys").mkdir()
    (root / "keys").chmod(0o755)  # as git leaves it
    (root / "keys" / "proofs").symlink_to(proofs_dir(), target_is_directory=True)
    operator_keys = root / "etc" / "fieldguard" / "keys"
    operator_keys.mkdir(parents=True, mode=0o700)
    (operator_keys / "proofs").symlink_to(proofs_dir(), target_is_directory=True)
    return root


@pytest.mark.timeout(360)  # the whole README, four shells side by side, on a 2-core machine beside other tests
def test_every_readme_command_runs_as_written(clone: Path) -> None:
    """One shell per audience, run side by side: the operator's deployment, and on the demo each `## `
    section's commands (the demo's, the security officers', the auditors'), in README order within it."""
    blocks = readme_commands()
    everything = {written(c) for _, block in blocks for c in block}
    assert not set(SKIPPED) - everything, f"skipped commands the README no longer has: {set(SKIPPED) - everything}"
    shells: dict[str, list[Command]] = {}
    for section, block in blocks:
        name = "operator" if is_operator(block) else section
        run_here = [c for c in block if written(c) not in SKIPPED]
        if run_here:
            shells.setdefault(name, []).extend(run_here)
    assert set(shells) == {"operator", "The demo", "For security officers", "For auditors"}, set(shells)
    assert sum(len(cmds) for cmds in shells.values()) >= 40

    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDGUARD_")}
    # the operator's "your CRM": the example CRM with its staff and no client yet
    crm_port, op_port = free_port(), free_port()
    crm = Service([sys.executable, "-m", "examples.crm", "--db", str(clone / "your-crm.sqlite3"), "--port",
                   str(crm_port), "--staff-only"], clone / "your-crm.log", f"http://127.0.0.1:{crm_port}/health")
    crm.start()
    results: dict[str, list[Ran]] = {}

    def run(name: str, env: dict[str, str], ports: dict[str, int], prelude: str = "") -> threading.Thread:
        def go() -> None:
            results[name] = run_shell(shells[name], clone, env, ports, prelude)
        thread = threading.Thread(target=go, name=name)
        thread.start()
        return thread

    operator_env = {**env, "FIELDGUARD_SERVER_PORT": str(op_port), "FIELDGUARD_UPSTREAM_URL": f"http://127.0.0.1:{crm_port}"}
    threads = [run("operator", operator_env, {"127.0.0.1:8000": op_port})]
    port, demo_crm = free_port(), free_port()
    demo = Service([".venv/bin/fieldguard", "demo", "--port", str(port), "--crm-port", str(demo_crm),
                    "--alerts-port", str(free_port()),
                    "--keys", str(clone / "keys")], clone / "demo.log", f"http://127.0.0.1:{port}/healthz",
                   cwd=clone, env={**env})
    try:
        demo.start(timeout=90)
        deadline = time.monotonic() + 30
        while "Stop with Ctrl-C." not in (banner := demo.output()) and time.monotonic() < deadline:
            time.sleep(0.1)
        # what the demo section says to do first: paste the exports, run the curls it printed
        exports = "\n".join(re.findall(r"^export \w+=\S+$", banner, re.M))
        curls = "\n".join(line.strip() for line in re.findall(r"^  curl -s .*$", banner, re.M))
        assert exports.count("export ") >= 7 and curls.count("curl ") >= 10, banner[-3000:]
        pasted = subprocess.run(["bash", "-c", f"{exports}\n{curls}"], cwd=clone, env=env, capture_output=True,
                                text=True, timeout=60)
        assert pasted.returncode == 0 and pasted.stdout.count("{") >= 10, pasted.stdout + pasted.stderr
        ports = {"127.0.0.1:8000": port, "127.0.0.1:8100": demo_crm}
        threads += [run(name, env, ports, prelude=exports) for name in shells if name != "operator"]
    finally:
        for thread in threads:
            thread.join(timeout=240)
        demo.stop()
        crm.stop()
    assert "Traceback" not in demo.output()
    assert set(results) == set(shells), f"shells that did not finish: {set(shells) - set(results)}"
    failures = [f for name in shells for f in check(results[name])]
    assert not failures, "\n\n".join(failures)
    assert all(len(results[name]) == len(shells[name]) for name in shells)

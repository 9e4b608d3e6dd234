"""Processes the benchmark starts: each in its own session, pinned to one core, bounded in time by
coreutils `timeout`, and stopped by process group; plus CPU accounting from /proc."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of a plain GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback URLs we built)
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


class Proc:
    """One server process: `timeout LIMIT taskset -c CORE args...` in a new session."""

    def __init__(self, name: str, args: list[str], log: Path, core: int | None, limit_seconds: float,
                 env: dict[str, str] | None = None, cwd: Path = REPO) -> None:
        self.name, self.args, self.log, self.core, self.cwd = name, args, log, core, cwd
        self.limit = int(limit_seconds)
        self.env = {**os.environ, **(env or {})}
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> Proc:
        pinned = ["taskset", "-c", str(self.core)] if self.core is not None else []
        argv = ["timeout", "-k", "5", str(self.limit), *pinned, *self.args]
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(argv, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait_ready(self, url: str, timeout: float = 60.0, ok: Callable[[int], bool] = lambda s: s == 200) -> None:
        """Poll `url` until `ok(status)`; raise with the log's tail if the process dies or never gets there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
            status = http_status(url, timeout=1.0)
            if status is not None and ok(status):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready at {url} after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL if it lingers."""
        if self.popen is None or self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
        except ProcessLookupError:
            pass


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def interrupt_on_signals() -> None:
    """SIGINT (even when inherited as ignored), SIGTERM and SIGHUP all unwind to the `finally` that stops
    every process the benchmark started."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)


class Registry:
    """Every process started, stopped in reverse order at the end whatever happened."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc.start()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                print(f"could not stop {proc.name}: {exc}", file=sys.stderr)
        self.procs.clear()


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, utime+stime seconds) of one process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def tree(pid: int) -> list[int]:
    """The process and all its descendants (by parent links read from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                parents.setdefault(st[0], []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(parents.get(p, []))
    return out


def python_pid(pid: int) -> int:
    """The first Python process in the tree (under `timeout` and `taskset`), for profilers."""
    for p in tree(pid):
        try:
            if "python" in os.readlink(f"/proc/{p}/exe"):
                return p
        except OSError:
            continue
    return pid


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process tree (threads included; children that already exited are not)."""
    total = 0.0
    for p in tree(pid):
        st = _stat(p)
        if st is not None:
            total += st[1]
    return total


def busy_seconds() -> float:
    """CPU time spent by the whole machine (all cores; user, system, irq, softirq), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(values) - values[3] - values[4]) / TICK


def wait_quiet(threshold: float, longest: float, window: float = 0.3) -> float:
    """Wait (at most `longest` seconds) until the machine uses less than `threshold` cores over `window`;
    return the seconds waited."""
    started = time.monotonic()
    while True:
        before = busy_seconds()
        time.sleep(window)
        if (busy_seconds() - before) / window < threshold or time.monotonic() - started >= longest:
            return time.monotonic() - started

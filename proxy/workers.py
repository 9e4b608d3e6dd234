"""`fieldguard serve --workers N`: N gateway processes on one port, for the cores of one host.

Each worker is an ordinary `fieldguard serve` process that binds the port with SO_REUSEPORT, so the kernel
spreads connections over them; nothing is shared in memory. They share what they would share across
hosts: the keystore, the trail and the policy (PostgreSQL, or on one host the SQLite files, whose writers
take turns: one hash chain, whichever worker appends). Each worker has its own replica name in a shared
trail (`<replica>/w<i>`). This parent only starts them, passes signals on (SIGHUP: reload the policy,
SIGTERM/SIGINT: stop), and restarts a worker that dies, with a growing pause.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

import structlog

from proxy.config import Settings

log = structlog.get_logger("fieldguard.workers")

WORKER_ENV = "FIELDGUARD_WORKER"  # set in each worker: its index, and that it binds with SO_REUSEPORT
RESTART_PAUSE_MAX = 30.0


def worker_index() -> int | None:
    value = os.environ.get(WORKER_ENV, "")
    return int(value) if value.isdigit() else None


def replica_base(settings: Settings) -> str:
    return settings.audit.replica or f"{socket.gethostname()}:{settings.server.port}"


def shared_socket(host: str, port: int) -> socket.socket:
    """The worker's listening socket: one of several on the port (SO_REUSEPORT), the kernel balancing them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def supervise(settings: Settings, argv: list[str], workers: int) -> int:
    """Run `workers` copies of `fieldguard serve` with `argv` until SIGTERM or SIGINT; 1 if none could start."""
    base = replica_base(settings)
    children: dict[int, subprocess.Popen[bytes]] = {}
    failures = [0] * workers
    stopping = False

    def start(i: int) -> None:
        env = {**os.environ, WORKER_ENV: str(i), "FIELDGUARD_AUDIT_REPLICA": f"{base}/w{i}",
               "FIELDGUARD_SERVER_PID_FILE": ""}
        children[i] = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", *argv], env=env)
        log.info("worker started", worker=i, pid=children[i].pid)

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    if settings.server.pid_file:
        with open(settings.server.pid_file, "w") as f:  # SIGHUP here reaches every worker
            f.write(f"{os.getpid()}\n")
    for i in range(workers):
        start(i)
    restart_at: dict[int, float] = {}
    started = time.monotonic()
    while True:
        time.sleep(0.2)
        alive = [i for i, child in children.items() if child.poll() is None]
        if stopping and not alive:
            break
        for i, child in list(children.items()):
            code = child.poll()
            if code is None or stopping or i in restart_at:
                continue
            failures[i] += 1
            pause = min(0.5 * 2 ** (failures[i] - 1), RESTART_PAUSE_MAX)
            log.error("worker exited; restarting", worker=i, code=code, restart_in=pause)
            restart_at[i] = time.monotonic() + pause
        for i, at in list(restart_at.items()):
            if time.monotonic() >= at and not stopping:
                del restart_at[i]
                start(i)
        if not alive and time.monotonic() - started < 10 and all(failures):
            log.error("no worker could start; stopping")  # a configuration error: each said why
            stopping = True
            break
    if settings.server.pid_file:
        with contextlib.suppress(OSError):
            os.unlink(settings.server.pid_file)
    return 0 if not all(failures) else 1

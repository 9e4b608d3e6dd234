"""Running the gateway under uvicorn (uvloop + httptools: the cheapest server measured here)."""

from __future__ import annotations

import errno
import gc
import os
import socket
import sys
from pathlib import Path

import orjson
import structlog
import uvicorn

from proxy import logs
from proxy.app import Gateway
from proxy.audit import Siem
from proxy.config import Settings
from proxy.connection import guarded
from proxy.keys import KekError
from proxy.policy import PolicyError
from proxy.postgres import DatabaseError
from proxy.secretfile import open_dir_warning
from proxy.workers import shared_socket, worker_index


def run(settings: Settings, siem: Siem | None = None) -> int:
    """Serve until stopped; 1 when the configuration or the policy cannot be used."""
    logs.configure(settings.server.log_level)
    worker = worker_index()
    taken = port_taken(settings.server.host, settings.server.port) if worker is None else None
    if taken:
        print(f"{taken}: stop it, or set server.port (FIELDGUARD_SERVER_PORT).", file=sys.stderr)
        return 1
    warning = open_dir_warning(Path(settings.keys.dir))
    if warning:
        structlog.get_logger("fieldguard.gateway").warning("keys directory open to others", detail=warning)
    try:
        app = Gateway(settings, siem)
    except PolicyError as exc:
        print("policy refused; the gateway will not start:", file=sys.stderr)
        for finding in exc.findings:
            print(f"  {finding}", file=sys.stderr)
        return 1
    except (ValueError, OSError, KekError) as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    except DatabaseError as exc:  # the shared PostgreSQL unreachable, or its schema not this version's
        print(f"database error: {exc}", file=sys.stderr)
        return 1
    server = _Server(server_config(app, settings.server.host, settings.server.port))
    # Long-lived start-up objects (policy tables, routes) need no collection passes.
    gc.collect()
    gc.freeze()
    # one of `serve --workers N`: the port is shared with the other workers (SO_REUSEPORT)
    server.run(sockets=[shared_socket(settings.server.host, settings.server.port)] if worker is not None else None)
    return 0 if server.started else 1


class _Server(uvicorn.Server):
    """uvicorn's server, saying once it listens whether the gateway is ready, as /readyz would."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        app = self.config.app
        if self.started and not self.should_exit and isinstance(app, Gateway):
            await log_readiness(app, self.config.host, self.config.port)


NOT_READY = {"policy": "policy not in force", "upstream": "upstream unreachable",
             "relations": "relations not read", "audit": "audit trail not writable",
             "tasks": "background tasks not fresh"}


async def log_readiness(app: Gateway, host: str, port: int) -> None:
    """One line, true at the time: `gateway listening; ready`, or `gateway listening; not ready: upstream
    unreachable` (a warning) with the checks /readyz fails; the relations task logs when it later reads them."""
    from proxy.probes import readiness

    log = structlog.get_logger("fieldguard.gateway")
    url = f"http://{host}:{port}"
    try:
        checks = orjson.loads((await readiness(app.runtime)).body)["checks"]
    except Exception as exc:  # a log line must not stop a gateway that is serving
        log.warning("gateway listening; readiness unknown", url=url, error=type(exc).__name__)
        return
    failing = [name for name, check in checks.items() if not check.get("ok")]
    if not failing:
        log.info("gateway listening; ready", url=url)
        return
    log.warning(f"gateway listening; not ready: {', '.join(NOT_READY.get(n, n) for n in failing)}", url=url,
                not_ready=failing, readyz=f"{url}/readyz")


def server_config(app: Gateway, host: str, port: int, loop: str = "uvloop") -> uvicorn.Config:
    """How uvicorn serves the gateway: httptools with the head's size and time bounded (`proxy.connection`).
    Forwarding headers from the caller are never trusted (the gateway names its own peer to the CRM), and
    uvicorn logs nothing of requests: the audit trail does."""
    s = app.runtime.settings.server
    http = guarded(s.max_header_bytes, s.header_timeout_seconds, app.refused_connection)
    return uvicorn.Config(app, host=host, port=port, loop=loop, http=http, lifespan="on", access_log=False,
                          log_level="warning", server_header=False, proxy_headers=False)


def port_taken(host: str, port: int) -> str | None:
    """None when `host:port` can be listened on; else what holds it, as the start of a sentence
    ("port 8000 is in use by process 4242 (fieldguard demo)"). Checked before anything is started or printed,
    so that a second gateway or demo says so at once rather than dying on the port after its banner."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no holder
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return f"port {port} on {host} cannot be listened on ({exc.strerror})"
            return f"port {port} is in use by {port_holder(port)}"
    return None


def port_holder(port: int) -> str:
    """The process listening on a TCP port, by pid and command line, as far as /proc tells (Linux); else
    'another process'."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows, None)
                for row in rows:
                    cols = row.split()
                    if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(cols[9])
        except (OSError, ValueError):
            continue
    if inodes:
        wanted = {f"socket:[{inode}]" for inode in inodes}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if any(os.readlink(f"/proc/{pid}/fd/{fd}") in wanted for fd in os.listdir(f"/proc/{pid}/fd")):
                    return f"process {pid} ({_command(pid)})"
            except OSError:
                continue
    return "another process"


def _command(pid: str) -> str:
    """A process's command line, short: `fieldguard demo --port 8000`, `python -m examples.crm --port 8100`."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "unknown command"
    if len(argv) > 1 and os.path.basename(argv[0]).startswith("python") and not argv[1].startswith("-"):
        argv = argv[1:]  # a script run by the interpreter (.venv/bin/fieldguard): name the script
    if argv:
        argv[0] = os.path.basename(argv[0])
    text = " ".join(argv)
    return text if len(text) <= 120 else text[:119] + "…"

"""Running the gateway under uvicorn (uvloop + httptools: the cheapest server measured here)."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import structlog
import uvicorn

from proxy import logs
from proxy.app import Gateway
from proxy.audit import Siem
from proxy.config import Settings
from proxy.connection import guarded
from proxy.keys import KekError
from proxy.policy import PolicyError
from proxy.secretfile import open_dir_warning


def run(settings: Settings, siem: Siem | None = None) -> int:
    """Serve until stopped; 1 when the configuration or the policy cannot be used."""
    logs.configure(settings.server.log_level)
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
    server = uvicorn.Server(server_config(app, settings.server.host, settings.server.port))
    # Long-lived start-up objects (policy tables, routes) need no collection passes.
    gc.collect()
    gc.freeze()
    server.run()
    return 0 if server.started else 1


def server_config(app: Gateway, host: str, port: int, loop: str = "uvloop") -> uvicorn.Config:
    """How uvicorn serves the gateway: httptools with the head's size and time bounded (`proxy.connection`).
    Forwarding headers from the caller are never trusted (the gateway names its own peer to the CRM), and
    uvicorn logs nothing of requests: the audit trail does."""
    s = app.runtime.settings.server
    http = guarded(s.max_header_bytes, s.header_timeout_seconds, app.refused_connection)
    return uvicorn.Config(app, host=host, port=port, loop=loop, http=http, lifespan="on", access_log=False,
                          log_level="warning", server_header=False, proxy_headers=False)

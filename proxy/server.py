"""Running the gateway under uvicorn (uvloop + httptools: the cheapest server measured here)."""

from __future__ import annotations

import gc
import sys

import uvicorn

from proxy import logs
from proxy.app import Gateway
from proxy.audit import Siem
from proxy.config import Settings
from proxy.keys import KekError
from proxy.policy import PolicyError


def run(settings: Settings, siem: Siem | None = None) -> int:
    """Serve until stopped; 1 when the configuration or the policy cannot be used."""
    logs.configure(settings.server.log_level)
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
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    # Long-lived start-up objects (policy tables, routes) need no collection passes.
    gc.collect()
    gc.freeze()
    server.run()
    return 0 if server.started else 1

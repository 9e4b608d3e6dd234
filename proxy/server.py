"""Running the gateway under uvicorn (uvloop + httptools: the cheapest server measured here)."""

from __future__ import annotations

import gc
import sys

import uvicorn

from proxy import logs
from proxy.audit import JsonLinesTrail, MultiTrail
from proxy.config import Settings
from proxy.gateway import Gateway
from proxy.kek import KekError
from proxy.policy import PolicyError


def build(settings: Settings, siem: JsonLinesTrail | MultiTrail | None = None) -> Gateway:
    return Gateway(settings, siem)


def run(settings: Settings, siem: JsonLinesTrail | MultiTrail | None = None) -> int:
    """Serve until stopped; 1 when the configuration or the policy cannot be used."""
    logs.configure(settings.server.log_level)
    try:
        app = build(settings, siem)
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

"""The operators' probes: `/healthz` (the process is up), `/readyz` (every part works and every background
task is fresh), `/metrics` (Prometheus counts). They carry no client data, need no identity and are not
audited. `/readyz` tells anyone whether each part is ok; what is wrong (policy findings with their rule
text and lines, relation errors, paths) only a security officer's token is shown."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from proxy.asgi import Reply
from proxy.errors import GatewayError
from proxy.runtime import Runtime

PROBES = frozenset({"/healthz", "/readyz", "/metrics"})


async def probe(runtime: Runtime, path: str, headers: Mapping[str, str]) -> Reply:
    if path == "/healthz":
        return Reply(200, orjson.dumps({"status": "ok"}))
    if path == "/metrics":
        return Reply(200, runtime.metrics.render().encode(), [(b"content-type", b"text/plain; version=0.0.4")])
    reply = await readiness(runtime)
    if _officer(runtime, headers):
        return reply
    full = orjson.loads(reply.body)
    bare = {"ready": full["ready"], "checks": {name: {"ok": check["ok"]} for name, check in full["checks"].items()},
            "details": "with a security officer's token"}
    return Reply(reply.status, orjson.dumps(bare))


def _officer(runtime: Runtime, headers: Mapping[str, str]) -> bool:
    if "authorization" not in headers:
        return False
    try:
        who = runtime.verifier.authenticate(headers)
    except GatewayError:
        return False
    role = runtime.settings.policy.officer_role
    return who.role == role and runtime.bundle.table.purpose_allowed(role, who.purpose)


async def readiness(runtime: Runtime) -> Reply:
    bundle = runtime.bundle
    status = runtime.policy.status
    tasks = runtime.supervisor.status()
    upstream = await runtime.upstream.reachable()
    index = runtime.index
    relations = tasks.get("relations", {})
    relations_ok = index.synced_at is not None and bool(relations.get("ok", False))
    checks: dict[str, Any] = {
        "policy": {"ok": status.last_error is None, "hash": bundle.digest, "loaded_at": bundle.loaded_at,
                   "reload_failures": status.failures, "last_reload_error": status.last_error,
                   "shadow": runtime.shadow.bundle.digest if runtime.shadow else None},
        "upstream": {"ok": upstream},
        "relations": {"ok": relations_ok, "clients": len(index.counsellor_of), "staff": index.staff_rows,
                      "supervision_links": index.supervision_links, "synced_at": index.synced_at,
                      "last_error": relations.get("last_error")},
    }
    audit = runtime.trail.health()
    free = audit.get("free_bytes")
    audit["ok"] = audit["ok"] and (free is None or free >= runtime.settings.audit.min_free_bytes)
    checks["audit"] = audit
    glass = runtime.glass
    checks["breakglass"] = {"ok": True, "open": glass.open_count(time.time()), "reviews_overdue": glass.overdue,
                            "refreshed_at": glass.refreshed_at,
                            "alerts_given_up": runtime.alerter.given_up if runtime.alerter else 0}
    checks["rights"] = {"ok": True, "requests_overdue": glass.requests_overdue}  # informs: never unready
    if runtime.listener is not None:  # the shared database's change announcements (informs; the task decides)
        checks["replication"] = {"ok": True, **runtime.listener.status(),
                                 "key_epoch": runtime.ring.revocation_seq if runtime.ring else None}
    checks["tasks"] = {"ok": runtime.supervisor.healthy, **tasks}
    ready = all(check["ok"] for check in checks.values())
    return Reply(200 if ready else 503, orjson.dumps({"ready": ready, "checks": checks}))

"""FieldGuard's own cost per request, without the HTTP server in front of it.

    python -m benchmarks.inproc [--load record|listing|write] [--requests 2000] [--concurrency 1]
                                [--profile] [--audit-off]

Starts the example CRM (sealed, as `benchmarks.run` does), builds the gateway in this process on
uvloop, as the server runs it, and calls the ASGI application directly from `--concurrency` tasks:
what is left is the gateway's pipeline and its aiohttp call to the CRM. `--profile` prints the
functions with the most own time (cProfile). Useful to see a change to `proxy/` before a full `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from benchmarks.procs import Registry
from benchmarks.targets import fieldguard_conf
from benchmarks.world import World, build
from proxy.app import Gateway
from proxy.config import build_settings


async def drive(gw: Gateway, w: World, load: str, n: int, concurrency: int,
                profile: cProfile.Profile | None) -> float:
    path, _, query = getattr(w.loads, load).partition("?")
    method, body = ("PATCH", w.loads.write_body) if load == "write" else ("GET", b"")
    headers = [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {w.token}".encode()),
               (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope: dict[str, Any] = {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
                             "query_string": query.encode(), "headers": headers, "client": ("127.0.0.1", 1),
                             "scheme": "http"}
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    for _ in range(50):  # warm caches: keys, pseudonyms, plans, token
        await gw(dict(scope), receive, send)
    if set(statuses) != {200}:
        raise RuntimeError(f"the gateway answered {sorted(set(statuses))} to {method} {path}")
    if profile is not None:
        profile.enable()
    async def worker(count: int) -> None:
        for _ in range(count):
            await gw(dict(scope), receive, send)

    started, main_started = time.process_time(), time.thread_time()
    await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
    n = n // concurrency * concurrency
    spent = time.process_time() - started
    print(f"  of which the event loop's thread: {(time.thread_time() - main_started) / n * 1e6:,.0f} µs")
    if profile is not None:
        profile.disable()
    return spent / n * 1e6


async def run(w: World, load: str, n: int, concurrency: int, profile: cProfile.Profile | None,
              extra: str = "") -> float:
    conf = fieldguard_conf(w.root, 0, w, w.root / "audit.sqlite3", extra)
    import tomllib

    settings = build_settings(tomllib.loads(conf.read_text()), {}, w.root)
    gw = Gateway(settings)
    await gw.startup()
    try:
        return await drive(gw, w, load, n, concurrency, profile)
    finally:
        await gw.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", choices=("record", "listing", "write"), default="record")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--audit-off", action="store_true", help="[audit] durable = false")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="fg-inproc-"))
    reg = Registry()
    try:
        w = build(reg, root, limit=600)
        profile = cProfile.Profile() if args.profile else None
        us = uvloop.run(run(w, args.load, args.requests, args.concurrency, profile,
                            "durable = false" if args.audit_off else ""))
        print(f"{args.load}: {us:,.0f} µs of this process's CPU per request (gateway and its aiohttp client; "
              f"{args.requests} requests, {args.concurrency} at a time)")
        if profile is not None:
            pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    finally:
        reg.stop_all()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

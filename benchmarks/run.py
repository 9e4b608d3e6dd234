"""Load benchmark: FieldGuard against the CRM itself, nginx and bare Python pass-through proxies.

    python -m benchmarks.run [--quick] [--duration S] [--repeat N] [--targets a,b] [--loads record,listing,write]
                             [--concurrency 1,8,64] [--out benchmarks/results/latest.json] [--keep]

Server under test on core 0, the CRM and wrk on core 1. Each cell (load x concurrency x target) is run
`--repeat` times, interleaved across targets, and the median kept. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import report, targets, wrk
from benchmarks.checks import check_all
from benchmarks.procs import REPO, Registry, busy_seconds, cpu_seconds, interrupt_on_signals, wait_quiet
from benchmarks.world import World, build, get_json

LOADS = ("record", "listing", "write")
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TARGETS = ("direct", "nginx", "pass-aiohttp", "pass-starlette", "pass-httpx", "pass-granian", "fg",
                   "fg-tmpfs", "fg-noaudit")
RUN_BUDGET_S = 600.0  # the default duration (4 s, or 3 s) is fitted so the measuring stays under this
OVERHEAD_S = 0.45  # per wrk run: quiet check, wrk start, /proc scans, settle
SETTLE_S = 0.1
NOISY_CORE = 0.15  # other processes' CPU during a run, in cores, above which it is repeated once
QUIET_WAIT_S = 30.0  # before each run, wait this long at most for other processes to go quiet ...
QUIET_BUDGET_S = 240.0  # ... and this long over the whole run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 repetition of 2 s, c=1 and 64 only")
    p.add_argument("--duration", type=int, help="seconds per wrk run (default 4, or 3 if 4 would take over 10 min)")
    p.add_argument("--repeat", type=int, help="repetitions per cell (default 3)")
    p.add_argument("--targets", help=f"comma-separated, of: {','.join(targets.ALL)}")
    p.add_argument("--loads", help=f"comma-separated, of: {','.join(LOADS)}")
    p.add_argument("--concurrency", help="comma-separated connection counts (default 1,8,64)")
    p.add_argument("--peer-cells", choices=("reduced", "full"), default="reduced",
                   help="pass-through peers (starlette, httpx, granian): reads at c=1/64 only (default) or all")
    p.add_argument("--warmup", type=int, default=1,
                   help="seconds of c=8 load on each FieldGuard target per load before measuring (0: none)")
    p.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs, databases)")
    return p.parse_args(argv)


def plan(args: argparse.Namespace, names: list[str]) -> list[tuple[str, int, list[str]]]:
    """(load, concurrency, targets) cells, in the order one repetition runs them."""
    cells = []
    for load in args.loads:
        for c in args.concurrency:
            chosen = [t for t in names if t not in targets.PEERS or args.peer_cells == "full"
                      or (load != "write" and c in (1, 64))]
            cells.append((load, c, chosen))
    return cells


def fit_duration(args: argparse.Namespace, cells: list[tuple[str, int, list[str]]]) -> int:
    """4 s per run, or 3 s when 4 would make the measuring longer than RUN_BUDGET_S."""
    runs = sum(len(n) for _, _, n in cells) * args.repeat
    names = {n for *_, ns in cells for n in ns}
    warm = len(names & set(targets.FIELDGUARD)) * len(args.loads) * (args.warmup + OVERHEAD_S)
    return 4 if runs * (4 + OVERHEAD_S) + warm <= RUN_BUDGET_S else 3


def audit_counts(t: targets.Target) -> tuple[int, int]:
    """FieldGuard's durable audit so far, from /readyz: (records, commits); (0, 0) for other targets."""
    if t.kind != "fieldguard":
        return 0, 0
    try:
        audit = get_json(t.url + "/readyz", timeout=5)["checks"]["audit"]
    except (OSError, ValueError, KeyError):
        return 0, 0
    return int(audit.get("records", 0)), int(audit.get("commits", 0))


def one_run(t: targets.Target, w: World, script: Path, req: wrk.Request, c: int, seconds: int) -> dict[str, Any]:
    """One wrk run with the server's and the CRM's CPU, how busy the rest of the machine was, and for
    FieldGuard how many audit records each commit carried."""
    assert t.proc is not None
    audit0 = audit_counts(t)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    server0, crm0, busy0, t0 = cpu_seconds(t.proc.pid), cpu_seconds(w.crm.pid), busy_seconds(), time.monotonic()
    res = wrk.run(script, t.url, req, c, seconds)
    wall = time.monotonic() - t0
    server1, crm1, busy1 = cpu_seconds(t.proc.pid), cpu_seconds(w.crm.pid), busy_seconds()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    audit1 = audit_counts(t)
    commits = audit1[1] - audit0[1]
    wrk_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    n = max(res["requests"], 1)
    server, crm = server1 - server0, crm1 - crm0
    crm_part = 0.0 if t.name == "direct" else crm  # for direct, the core-1 CRM is idle
    return {
        "requests": res["requests"], "rps": res["requests"] / (res["duration_us"] / 1e6),
        "p50_ms": res["latency_us"]["p50"] / 1000, "p99_ms": res["latency_us"]["p99"] / 1000,
        "p90_ms": res["latency_us"]["p90"] / 1000, "max_ms": res["latency_us"]["max"] / 1000,
        "cpu_us": server / n * 1e6, "crm_cpu_us": crm_part / n * 1e6, "server_util": server / wall,
        "errors": wrk.errors(res), "error_detail": res["errors"], "bytes_per_req": res["bytes"] / n,
        "other_cores": max(0.0, (busy1 - busy0) - server - crm_part - wrk_cpu) / wall,
        "audit_records": audit1[0] - audit0[0], "audit_commits": commits,
        "audit_batch": (audit1[0] - audit0[0]) / commits if commits > 0 else None,
    }


def requests_for(w: World) -> dict[str, wrk.Request]:
    return {
        "record": wrk.Request(w.loads.record, token=w.token),
        "listing": wrk.Request(w.loads.listing, token=w.token),
        "write": wrk.Request(w.loads.write, "PATCH", w.loads.write_body, w.token),
    }


def measure(args: argparse.Namespace, w: World, live: dict[str, targets.Target], script: Path,
            cells: list[tuple[str, int, list[str]]]) -> tuple[report.Runs, dict[str, Any]]:
    reqs = requests_for(w)
    if args.warmup:
        for load in args.loads:
            for t in live.values():
                if t.kind == "fieldguard":  # key, token and pseudonym caches; the others have none
                    wrk.run(script, t.url, reqs[load], 8, args.warmup)
    runs: report.Runs = {}
    retries_left = max(3, len(cells) * args.repeat // 10)
    waited = 0.0

    def quiet() -> None:
        nonlocal waited
        waited += wait_quiet(NOISY_CORE, min(QUIET_WAIT_S, max(0.0, QUIET_BUDGET_S - waited)))
    total, done_count, started = sum(len(n) for *_, n in cells) * args.repeat, 0, time.monotonic()
    for rep in range(args.repeat):
        for load, c, names in cells:
            order = [n for n in names if n in live]
            order = order[rep % len(order):] + order[:rep % len(order)] if order else order  # rotate per repetition
            for name in order:
                quiet()
                r = one_run(live[name], w, script, reqs[load], c, args.duration)
                if r["other_cores"] > NOISY_CORE and retries_left > 0:
                    retries_left -= 1
                    quiet()
                    r = {**one_run(live[name], w, script, reqs[load], c, args.duration), "repeated_noisy": True}
                runs.setdefault(load, {}).setdefault(str(c), {}).setdefault(name, []).append(r)
                done_count += 1
                time.sleep(SETTLE_S)
            eta = (time.monotonic() - started) / max(done_count, 1) * (total - done_count)
            print(f"  rep {rep + 1}/{args.repeat} {load:<8} c={c:<3} done ({done_count}/{total} runs, "
                  f"~{eta / 60:.1f} min left, {waited:.0f} s waited for a quiet machine)", flush=True)
    noisy = sum(1 for by_c in runs.values() for by_t in by_c.values() for rs in by_t.values() for r in rs
                if r["other_cores"] > NOISY_CORE)
    return runs, {"waited_for_quiet_s": round(waited, 1), "noisy_runs_kept": noisy,
                  "noisy_threshold_cores": NOISY_CORE}


def code_state() -> dict[str, Any]:
    """Which gateway code is measured: the commit, files changed since, and a hash of proxy/ as loaded."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True, check=False).stdout

    digest = hashlib.sha256()
    proxy = REPO / "proxy"
    for path in sorted(proxy.rglob("*.py")):  # the subpackages too (policy/, keys/, audit/, cli/, ...)
        digest.update(path.relative_to(proxy).as_posix().encode() + b"\0" + path.read_bytes())
    changed = [ln[3:] for ln in git("status", "--porcelain", "proxy", "examples", "policies").splitlines()]
    return {"git": git("rev-parse", "--short", "HEAD").strip(), "changed_since_commit": changed,
            "proxy_sha256": digest.hexdigest()[:16]}


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return {"cpu": model, "nproc": len([ln for ln in cpuinfo.splitlines() if ln.startswith("processor")]),
            "kernel": Path("/proc/sys/kernel/osrelease").read_text().strip(), "python": sys.version.split()[0],
            "wrk": (wrk_version.stdout + wrk_version.stderr).split("\n")[0].strip()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.concurrency = [int(c) for c in args.concurrency.split(",")] if args.concurrency else (
        [1, 64] if args.quick else [1, 8, 64])
    args.loads = args.loads.split(",") if args.loads else list(LOADS)
    args.targets = args.targets.split(",") if args.targets else list(DEFAULT_TARGETS)
    unknown = [t for t in args.targets if t not in targets.ALL] + [ld for ld in args.loads if ld not in LOADS]
    if unknown or not shutil.which("wrk"):
        print(f"unknown targets or loads: {unknown}" if unknown else "wrk not found (make bench installs it)",
              file=sys.stderr)
        return 2
    limit = 600 + sum(len(n) for *_, n in plan(args, args.targets)) * args.repeat * ((args.duration or 4) + 2) * 2

    code = code_state()
    changed = ", ".join(code["changed_since_commit"])
    print(f"code: {code['git']}" + (f" + uncommitted changes to {changed}" if changed else ""), flush=True)
    root = Path(tempfile.mkdtemp(prefix="fg-bench-"))
    reg = Registry()
    interrupt_on_signals()
    world: World | None = None
    try:
        print(f"setting up in {root}: CRM on core 1, encrypting its sensitive fields ...", flush=True)
        world = build(reg, root, limit)
        print(f"  sealed {world.sealed_fields} fields; starting targets on core 0:", flush=True)
        live_all = targets.start_targets(reg, world, args.targets, limit)
        print("checking every target's answers:", flush=True)
        shapes = check_all(live_all, world)
        live = {n: t for n, t in live_all.items() if not t.skipped}
        if "fg" not in live and "fg" in args.targets:
            print(f"FieldGuard is not measurable: {live_all['fg'].skipped}", file=sys.stderr)
        cells = plan(args, list(live))
        args.duration = args.duration or (2 if args.quick else fit_duration(args, cells))
        script = wrk.write_script(root)
        print(f"measuring: {len(cells)} cells, {sum(len(n) for *_, n in cells)} target-cells x {args.repeat} "
              f"repetitions of {args.duration} s:", flush=True)
        runs, noise = measure(args, world, live, script, cells)
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        reg.stop_all()
        if world is not None:
            targets.cleanup(world.cleanup)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    cells_med = report.medians(runs)
    order = [t for t in args.targets if t in live]
    ref = report.pick_reference(cells_med, [t for t in order if t.startswith("pass-")])
    d = report.derived(cells_med, ref)
    lines = report.budget(cells_med, ref, d)
    paths = {"record": f"GET {world.loads.record} as alice ({shapes['record_bytes']} B from the CRM)",
             "listing": f"GET /session-notes?per_page=50&client_id=<alice's 25 clients> "
                        f"({shapes['listing_bytes']} B, {shapes['sealed_per_row']:.0f} sealed fields per row)",
             "write": f"PATCH {world.loads.write} {world.loads.write_body.decode()}"}
    print(report.table(cells_med, order, args.concurrency, paths))
    print(report.ratios_table(d, ref))
    print(report.budget_text(lines))
    skipped = {n: t.skipped for n, t in live_all.items() if t.skipped}
    for name, why in skipped.items():
        print(f"  skipped {name}: {why}")
    doc = {
        "meta": {**machine(), "code": code, "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                 "duration_s": args.duration, "repeat": args.repeat, "concurrency": args.concurrency,
                 "loads": paths, "server_core": targets.SERVER_CORE, "load_core": wrk.LOAD_CORE, **noise},
        "targets": {n: {"label": t.label, "kind": t.kind, "skipped": t.skipped, **t.info}
                    for n, t in live_all.items()},
        "reference_pass_through": ref, "cells": cells_med, "derived": d, "budget": lines, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"\nwrote {args.out}")
    return 0 if "fg" in live or "fg" not in args.targets else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

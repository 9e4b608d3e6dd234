"""Where FieldGuard's CPU goes under load: py-spy samples the gateway while wrk drives one route.

    python -m benchmarks.profile [--load listing] [--concurrency 64] [--seconds 20] [--top 25]

py-spy is installed with pip into a throwaway directory (never into the project's venv). Prints the
functions with the most samples on the CPU, by own time and including callees, and writes the
collapsed stacks to benchmarks/results/profile-<load>.txt (gitignored) for a flame graph.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import targets, wrk
from benchmarks.checks import check_all
from benchmarks.procs import PY, Registry, interrupt_on_signals, python_pid
from benchmarks.run import RESULTS, requests_for
from benchmarks.world import build

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def install_py_spy(root: Path) -> Path:
    site = root / "py-spy-site"
    subprocess.run([PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target", str(site),
                    "py-spy"], check=True, capture_output=True, timeout=300)
    return site / "bin" / "py-spy"


def short(frame: str) -> str:
    """`function (path:line)` -> `function (package/file.py)`."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    parts = Path(m["file"]).parts
    tail = "/".join(parts[-2:]) if len(parts) > 1 else m["file"]
    return f"{m['func']} ({tail})"


def summarise(collapsed: str, top: int) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [short(f) for f in stack.split(";") if f.strip() and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    out = [f"{total} samples on the CPU", "", "own time:"]
    out += [f"  {n / total * 100:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["", "including callees:"]
    out += [f"  {n / total * 100:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n")[0])
    p.add_argument("--load", choices=("record", "listing", "write"), default="listing")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--target", default="fg", choices=targets.ALL)
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="fg-profile-"))
    reg = Registry()
    interrupt_on_signals()
    try:
        py_spy = install_py_spy(root)
        world = build(reg, root, limit=args.seconds + 600)
        live = targets.start_targets(reg, world, [args.target], limit=args.seconds + 600)
        check_all(live, world)
        t = live[args.target]
        if t.skipped or t.proc is None:
            print(f"{args.target} not measurable: {t.skipped}")
            return 1
        script = wrk.write_script(root)
        req = requests_for(world)[args.load]
        wrk.run(script, t.url, req, args.concurrency, 2)  # warm
        raw = root / "profile.txt"
        result: dict[str, Any] = {}
        load = threading.Thread(target=lambda: result.update(
            wrk.run(script, t.url, req, args.concurrency, args.seconds + 2)))
        load.start()
        spy = [str(py_spy), "record", "--pid", str(python_pid(t.proc.pid)), "--subprocesses", "--gil",
               "--rate", "250", "--duration", str(args.seconds), "--format", "raw", "--output", str(raw)]
        subprocess.run(spy, check=True, capture_output=True, timeout=args.seconds + 60)
        load.join()
        text = raw.read_text()
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"profile-{args.load}.txt").write_text(text)
        rps = result["requests"] / (result["duration_us"] / 1e6) if result else 0.0
        print(f"{args.target}, {args.load}, c={args.concurrency}, {args.seconds} s sampled at 250 Hz "
              f"(GIL holder only), {rps:,.0f} req/s while sampled:")
        print(summarise(text, args.top))
        return 0
    finally:
        reg.stop_all()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

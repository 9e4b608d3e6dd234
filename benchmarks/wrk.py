"""wrk as the load generator: one thread on core 1, a Lua script that adds the bearer token (and the
method and body of a write) and prints the summary and latency percentiles as one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOAD_CORE = 1
MARK = "FGBENCH "
SCRIPT = r"""-- written by benchmarks/wrk.py
local token = os.getenv("FGB_TOKEN")
local body = os.getenv("FGB_BODY")
wrk.method = os.getenv("FGB_METHOD") or "GET"
if token and #token > 0 then wrk.headers["Authorization"] = "Bearer " .. token end
if body and #body > 0 then
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'FGBENCH {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
"""


@dataclass(frozen=True)
class Request:
    """What every connection sends, over and over."""

    path: str
    method: str = "GET"
    body: bytes = b""
    token: str = ""


def write_script(directory: Path) -> Path:
    path = directory / "fgbench.lua"
    path.write_text(SCRIPT)
    return path


def run(script: Path, base_url: str, req: Request, connections: int, seconds: float) -> dict[str, Any]:
    """One wrk run; its summary (requests, duration, errors, latency percentiles in µs)."""
    env = {**os.environ, "FGB_TOKEN": req.token, "FGB_METHOD": req.method, "FGB_BODY": req.body.decode()}
    argv = ["taskset", "-c", str(LOAD_CORE), "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            "--latency", "--timeout", "10s", "-s", str(script), base_url + req.path]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 60, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            result: dict[str, Any] = json.loads(line[len(MARK):])
            return result
    raise RuntimeError(f"wrk gave no summary (exit {done.returncode}): {done.stderr.strip()[:500]}")


def errors(result: dict[str, Any]) -> int:
    return int(sum(result["errors"].values()))

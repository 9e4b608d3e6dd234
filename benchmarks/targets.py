"""The servers under test, each started on core 0 in front of the CRM on core 1.

    direct          a second example CRM process on the same database (no proxy at all)
    nginx           nginx, one worker, upstream keep-alive pool
    pass-aiohttp    bare pass-through proxies (benchmarks/passthrough.py); the fastest is the reference (c)
    pass-starlette
    pass-httpx
    pass-granian    (installed into the run's temp dir from PyPI; skipped if that fails)
    fg              FieldGuard, full pipeline, durable audit store on the temp dir's disk (default settings)
    fg-tmpfs        the same with the audit store on tmpfs (/dev/shm)
    fg-noaudit      the same with `[audit] durable = false`; skipped while the gateway has no such switch
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.procs import PY, REPO, Proc, Registry, free_port
from benchmarks.world import AUDIENCE, ISSUER, World, start_crm

SERVER_CORE = 0
NGINX = "/usr/sbin/nginx"
ALL = ("direct", "nginx", "pass-aiohttp", "pass-starlette", "pass-httpx", "pass-granian", "fg", "fg-tmpfs",
       "fg-noaudit")
PEERS = ("pass-starlette", "pass-httpx", "pass-granian")  # measured on fewer cells by default
FIELDGUARD = ("fg", "fg-tmpfs", "fg-noaudit")


@dataclass
class Target:
    name: str
    kind: str  # direct | nginx | pass | fieldguard
    label: str
    url: str = ""
    proc: Proc | None = None
    skipped: str | None = None
    info: dict[str, str] = field(default_factory=dict)


def filesystem(path: Path) -> str:
    """The mount type holding `path` (tmpfs, ext4, ...), from /proc/mounts."""
    best, kind = "", "?"
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        mount = parts[1]
        if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, f"{parts[2]} ({parts[0]} on {mount})"
    return kind


def _direct(reg: Registry, w: World, t: Target, limit: float) -> None:
    t.proc, t.url = start_crm(reg, w.root, w.crm_db, SERVER_CORE, "direct", limit, seed=False)


def nginx_conf(root: Path, port: int, upstream: str) -> Path:
    """One worker, an upstream keep-alive pool, buffers large enough that no response touches disk."""
    host = upstream.split("//", 1)[1]
    conf = root / "nginx.conf"
    conf.write_text(f"""worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/nginx-body;
    proxy_temp_path {root}/nginx-proxy;
    fastcgi_temp_path {root}/nginx-fastcgi;
    uwsgi_temp_path {root}/nginx-uwsgi;
    scgi_temp_path {root}/nginx-scgi;
    upstream crm {{ server {host}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://crm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffer_size 16k;
            proxy_buffers 16 64k;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
""")
    return conf


def _nginx(reg: Registry, w: World, t: Target, limit: float) -> None:
    if not Path(NGINX).exists():
        t.skipped = f"{NGINX} not found (make bench installs nginx-light)"
        return
    port = free_port()
    conf = nginx_conf(w.root, port, w.crm_url)
    t.proc = reg.start(Proc("nginx", [NGINX, "-c", str(conf), "-e", str(w.root / "nginx-error.log"),
                                      "-g", "daemon off;"], w.root / "nginx.log", SERVER_CORE, limit))
    t.url = f"http://127.0.0.1:{port}"
    t.proc.wait_ready(t.url + "/health", timeout=20)


def _pass(app: str) -> Callable[[Registry, World, Target, float], None]:
    def start(reg: Registry, w: World, t: Target, limit: float) -> None:
        port = free_port()
        t.proc = reg.start(Proc(t.name, [PY, "-m", "benchmarks.passthrough", "--app", app, "--port", str(port),
                                         "--upstream", w.crm_url], w.root / f"{t.name}.log", SERVER_CORE, limit))
        t.url = f"http://127.0.0.1:{port}"
        t.proc.wait_ready(t.url + "/health", timeout=30)

    return start


def install_granian(root: Path) -> Path | None:
    """granian from PyPI into a throwaway directory (never into the project's venv)."""
    target = root / "granian-site"
    done = subprocess.run([PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                           "--target", str(target), "granian"], capture_output=True, timeout=180, check=False)
    return target if done.returncode == 0 and (target / "granian").is_dir() else None


def _granian(reg: Registry, w: World, t: Target, limit: float) -> None:
    site = install_granian(w.root)
    if site is None:
        t.skipped = "granian did not install from PyPI"
        return
    port = free_port()
    env = {"PYTHONPATH": f"{site}:{REPO}", "FGB_PASS_APP": "aiohttp", "FGB_PASS_UPSTREAM": w.crm_url}
    args = [PY, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port), "--http", "1",
            "--workers", "1", "--runtime-threads", "1", "--loop", "uvloop", "--no-ws", "--log-level", "warning",
            "--factory", "benchmarks.passthrough:from_env"]
    t.proc = reg.start(Proc(t.name, args, w.root / f"{t.name}.log", SERVER_CORE, limit, env=env))
    t.url = f"http://127.0.0.1:{port}"
    t.proc.wait_ready(t.url + "/health", timeout=30)


def fieldguard_conf(directory: Path, port: int, w: World, store: Path, extra: str = "") -> Path:
    """The gateway's settings: defaults, except where the run keeps its files."""
    conf = directory / "fieldguard.toml"
    conf.write_text(f"""[server]
port = {port}

[upstream]
url = "{w.crm_url}"

[policy]
dir = "{w.policies}"

[identity]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
public_key_file = "{w.public_key}"

[keys]
dir = "{w.keys}"

[audit]
log = "{directory / 'audit.jsonl'}"
store = "{store}"
{extra}
""")
    return conf


def _fieldguard(store_on: str, extra: str = "") -> Callable[[Registry, World, Target, float], None]:
    def start(reg: Registry, w: World, t: Target, limit: float) -> None:
        directory = w.root / t.name
        directory.mkdir()
        store_dir = directory
        if store_on == "tmpfs":
            shm = Path("/dev/shm")
            store_dir = Path(tempfile.mkdtemp(prefix="fg-bench-audit-", dir=shm)) if shm.is_dir() else directory
            w.cleanup.append(store_dir)
        store = store_dir / "audit.sqlite3"
        t.info["audit_store_fs"] = filesystem(store_dir)
        port = free_port()
        conf = fieldguard_conf(directory, port, w, store, extra)
        t.proc = reg.start(Proc(t.name, [PY, "-m", "proxy.cli", "serve", "--config", str(conf)],
                                directory / "gateway.log", SERVER_CORE, limit))
        t.url = f"http://127.0.0.1:{port}"
        try:
            t.proc.wait_ready(t.url + "/readyz", timeout=60)
        except RuntimeError as exc:
            if not extra:
                raise
            t.proc.stop()
            last = [line for line in str(exc).splitlines() if line.strip()]
            t.skipped = f"the gateway refused `{extra.strip()}`: {last[-1] if last else 'no output'}"

    return start


STARTERS: dict[str, tuple[str, str, Callable[[Registry, World, Target, float], None]]] = {
    "direct": ("direct", "the CRM itself (second process, same database)", _direct),
    "nginx": ("nginx", "nginx reverse proxy, 1 worker, keepalive pool", _nginx),
    "pass-aiohttp": ("pass", "uvicorn + bare ASGI + aiohttp", _pass("aiohttp")),
    "pass-starlette": ("pass", "uvicorn + Starlette + aiohttp", _pass("starlette")),
    "pass-httpx": ("pass", "uvicorn + bare ASGI + httpx", _pass("httpx")),
    "pass-granian": ("pass", "granian + bare ASGI + aiohttp", _granian),
    "fg": ("fieldguard", "FieldGuard, durable audit on disk", _fieldguard("disk")),
    "fg-tmpfs": ("fieldguard", "FieldGuard, durable audit on tmpfs", _fieldguard("tmpfs")),
    "fg-noaudit": ("fieldguard", "FieldGuard, [audit] durable = false", _fieldguard("disk", "durable = false")),
}


def start_targets(reg: Registry, w: World, names: list[str], limit: float) -> dict[str, Target]:
    """Start the named targets one after another (gateways share the keys dir: never two first starts at once)."""
    out: dict[str, Target] = {}
    for name in names:
        kind, label, starter = STARTERS[name]
        t = Target(name, kind, label)
        try:
            starter(reg, w, t, limit)
        except RuntimeError as exc:
            if t.proc is not None:
                t.proc.stop()
            t.skipped = f"did not start: {str(exc).splitlines()[0]}"
        out[name] = t
        print(f"  {name:<15} {t.skipped or t.url}", flush=True)
    return out


def cleanup(paths: list[Path]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)

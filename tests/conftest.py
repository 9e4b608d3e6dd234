"""Shared fixtures: real upstreams on loopback (the example CRM, json-server) and the gateway in front.

Nothing here is mocked. The gateway is the real one, on a loopback port: served from a thread of the
test process by default (tests/harness.py: no process start, so each branch costs milliseconds), or as
`fieldguard serve` in its own process where a test needs what only a process has (signals, kill -9,
its own PKCS#11 login, its own environment). Tests talk to it over HTTP like any client would.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.policy import PolicyBundle, load_bundle
from proxy.tokens import mint_token
from tests.harness import InProcessService, configure_logging

REPO = Path(__file__).resolve().parent.parent
ISSUER = "https://idp.test"
KEK_PASSPHRASE = "test passphrase, generated nowhere near production"
KEK_ENV = {"FIELDGUARD_KEK_PASSPHRASE": KEK_PASSPHRASE}
AUDIENCE = "fieldguard-test"
configure_logging()


HTTP = httpx.Client(timeout=30)
"""One connection pool for the whole session: a new client per call costs 16 ms of TLS set-up here."""


T = TypeVar("T")


def wait_until(check: Callable[[], T], what: str, timeout: float = 30, every: float = 0.05) -> T:
    """Poll `check` until it returns something true, and return that; fail saying `what` never held.
    For what a background poll makes true (a reload, a dropped key): a wait on the condition, not a sleep."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not so after {timeout} s")
        time.sleep(every)


def printed(service: Service, line: str) -> str:
    """The demo's output once it has printed `line` (its tokens and curl lines come once the gateway answers)."""
    def out() -> str:
        text = service.output()
        return text if line in text else ""

    return wait_until(out, f"the demo printed {line!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """A real process, started in its own session so it can be stopped with everything it spawned."""

    def __init__(self, args: list[str], log: Path, ready_url: str, cwd: Path = REPO,
                 env: dict[str, str] | None = None) -> None:
        self.args, self.log, self.ready_url, self.cwd = args, log, ready_url, cwd
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Service:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.args, cwd=self.cwd, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args[:4]} exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if HTTP.get(self.ready_url, timeout=1).status_code < 500:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.args[:4]} not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with_kill = self.proc
            os.killpg(with_kill.pid, signal.SIGKILL)
            with_kill.wait(timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_crm(directory: Path, name: str = "crm") -> tuple[Service, str]:
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    db = directory / f"{name}.sqlite3"
    svc = Service([sys.executable, "-m", "examples.crm", "--db", str(db), "--port", str(port)],
                  directory / f"{name}.log", f"http://127.0.0.1:{port}/health").start()
    return svc, f"http://127.0.0.1:{port}"


@dataclass(frozen=True)
class Ran:
    """What a `fieldguard` command did: as a shell sees it."""

    returncode: int
    stdout: str
    stderr: str


def fieldguard(config: Path | None, *args: str, env: dict[str, str] | None = None) -> Ran:
    """Run a `fieldguard` command in this process, as an operator would run it (its own environment, the
    config given), without the second or so a new Python process costs."""
    from click.testing import CliRunner

    from proxy.cli import main

    argv = [*args, "--config", str(config)] if config is not None else list(args)
    result = CliRunner(env={**KEK_ENV, **(env or {})}).invoke(main, argv, catch_exceptions=False)
    return Ran(result.exit_code, result.stdout, result.stderr)


@dataclass
class Signing:
    """Test-generated signing keys; nothing here comes from the repository."""

    directory: Path
    private_pem: bytes = b""
    public_file: Path = field(default_factory=Path)
    rsa_private_pem: bytes = b""
    rsa_public_file: Path = field(default_factory=Path)

    def token(self, sub: str, role: str | list[str], purpose: str | list[str] | None = None,
              client_id: str | None = None, ttl: int = 3600, **kw: Any) -> str:
        roles = [role] if isinstance(role, str) else role
        purposes = [purpose] if isinstance(purpose, str) else purpose
        return mint_token(self.private_pem, subject=sub, roles=roles, issuer=kw.get("issuer", ISSUER),
                          audience=kw.get("audience", AUDIENCE), purposes=purposes, client_id=client_id,
                          ttl_seconds=ttl, claims=kw.get("claims"))


@pytest.fixture(scope="session")
def signing(tmp_path_factory: pytest.TempPathFactory) -> Signing:
    d = tmp_path_factory.mktemp("signing")
    key = ec.generate_private_key(ec.SECP256R1())
    s = Signing(d)
    s.private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    s.public_file = d / "ec.pub.pem"
    s.public_file.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    rkey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    s.rsa_private_pem = rkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
    s.rsa_public_file = d / "rsa.pub.pem"
    s.rsa_public_file.write_bytes(rkey.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return s


_PROOFS: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def shared_proofs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Policy proofs remembered for this run, by every keys/ directory and every xdist worker in it (their
    temporary directories share a parent): a bundle is proved once per run, never across runs, where a
    changed compiler must prove again."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    _PROOFS.append(root / "proofs")
    _PROOFS[-1].mkdir(mode=0o700, exist_ok=True)
    return _PROOFS[-1]


def proofs_dir() -> Path:
    assert _PROOFS, "proofs_dir() is for tests and fixtures (the session fixture makes it)"
    return _PROOFS[-1]


@functools.cache
def shipped_bundle() -> PolicyBundle:
    """The shipped policies, proved once for the run."""
    return load_bundle(REPO / "policies", proofs_dir())


def make_keys(directory: Path) -> Path:
    """A keys/ directory with a file KEK sealed under the test passphrase (made here, never committed)."""
    from proxy.keys.kek import FileKek, ScryptParams

    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    FileKek.create(directory / "kek.json", KEK_PASSPHRASE.encode(), ScryptParams(n=2**14))
    (directory / "proofs").symlink_to(proofs_dir(), target_is_directory=True)
    return directory


@pytest.fixture(scope="session")
def shared_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One keys/ directory for the session's gateways, so a bundle is proved once, not per gateway.
    Tests that destroy keys use their own (`make_keys`)."""
    return make_keys(tmp_path_factory.mktemp("keys"))


def policies_copy(directory: Path, cover_for: tuple[str, str] | None = ("dana", "bob")) -> Path:
    """A copy of the shipped policies, with a live cover grant (dana covers bob) for the cover relation."""
    target = directory / "policies"
    shutil.copytree(REPO / "policies", target, ignore=shutil.ignore_patterns("tests"))
    if cover_for is not None:
        now = datetime.now(UTC)
        (target / "cover.yaml").write_text(
            "grants:\n"
            f"  - user: {cover_for[0]}\n    covers: {cover_for[1]}\n"
            f"    from: {(now - timedelta(days=1)).isoformat()}\n"
            f"    until: {(now + timedelta(days=1)).isoformat()}\n"
            "    reason: test cover while bob is away\n"
        )
    return target


@dataclass
class Gateway:
    service: Service | InProcessService
    url: str
    audit: Path
    config: Path
    signing: Signing

    def get(self, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        return self.request("GET", path, token, **kw)

    def request(self, method: str, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        return HTTP.request(method, self.url + path, headers=headers, timeout=30, **kw)

    def as_user(self, sub: str, role: str, purpose: str | None = None, client_id: str | None = None) -> str:
        default = {"counsellor": "TREAT", "supervisor": "TREAT", "admin": "HOPERAT", "service_manager": "HOPERAT",
                   "researcher": "HRESCH", "auditor": "HOPERAT", "client": "PATRQT",
                   "security_officer": "HOPERAT"}
        return self.signing.token(sub, role, purpose or default.get(role, "TREAT"), client_id)

    def readyz(self) -> dict[str, Any]:
        """/readyz as a security officer sees it: with the details (others see only each check's ok)."""
        token = self.as_user("sam", "security_officer")
        return HTTP.get(self.url + "/readyz", headers={"authorization": f"Bearer {token}"}).json()  # type: ignore[no-any-return]

    def audit_records(self) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        lines = [json.loads(line) for line in self.audit.read_text().splitlines() if line.strip()]
        return [r for r in lines if r.get("event") == "access"]  # not the checkpoint copies

    def audit_for(self, request_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for rec in self.audit_records():
                if rec["request_id"] == request_id:
                    return rec
            time.sleep(0.05)
        raise AssertionError(f"no audit record for {request_id}")


def _passphrase_file(directory: Path) -> str:
    """In-process gateways share this process's environment, so they read the test passphrase from a file."""
    path = directory / "kek-passphrase"
    path.write_text(KEK_PASSPHRASE)
    path.chmod(0o600)
    return f'passphrase_file = "{path}"\npassphrase_env = "FIELDGUARD_TEST_PASSPHRASE_FROM_FILE"'


def start_gateway(directory: Path, upstream: str, signing: Signing, keys: Path, policies: Path | None = None,
                  extra: str = "", public_key: Path | None = None, fields_file: Path | None = None,
                  upstream_extra: str = "", identity: str | None = None, keys_extra: str = "",
                  env: dict[str, str] | None = None, process: bool = False, timeout: float = 3.0,
                  sections: str = "", start: bool = True, server_extra: str = "") -> Gateway:
    """A gateway in front of `upstream`: in this process unless `process` (or an `env` of its own) asks for
    `fieldguard serve` in another; `start=False` writes its config and leaves it to the test."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    audit = directory / "audit.jsonl"
    config = directory / "fieldguard.toml"
    config.write_text(f"""
[server]
port = {port}
max_body_bytes = 65536
{server_extra}

[upstream]
url = "{upstream}"
timeout_seconds = {timeout}
{upstream_extra}

[policy]
dir = "{policies or REPO / 'policies'}"
fields_file = "{fields_file or ''}"
poll_seconds = 0.2

[identity]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
{identity or f'public_key_file = "{public_key or signing.public_file}"'}

[keys]
dir = "{keys}"
{"" if "revocation_poll_seconds" in keys_extra else "revocation_poll_seconds = 0.2"}
{_passphrase_file(directory) if "passphrase" not in keys_extra and "pkcs11" not in keys_extra else ""}
{keys_extra}

[audit]
log = "{audit}"
{extra}
{sections}
""")
    svc: Service | InProcessService
    if process or env:
        svc = Service([sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
                      directory / "gateway.log", f"http://127.0.0.1:{port}/healthz",
                      env={**KEK_ENV, **(env or {})})
    else:
        svc = InProcessService(config, port, directory / "gateway.log")
    return Gateway(svc.start() if start else svc, f"http://127.0.0.1:{port}", audit, config, signing)


@pytest.fixture(scope="session")
def crm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The example CRM, seeded, shared by read-only tests (write tests start their own)."""
    svc, url = start_crm(tmp_path_factory.mktemp("crm"))
    yield url
    svc.stop()


@pytest.fixture
def switchable(tmp_path: Path) -> Iterator[str]:
    """A small CRM of its own whose facts can be broken and mended, and whose note lists can be slowed
    (tests/upstreams/switchable.py: `POST /_control`)."""
    port = free_port()
    svc = Service([sys.executable, "-m", "tests.upstreams.switchable", str(port)], tmp_path / "switchable.log",
                  f"http://127.0.0.1:{port}/health").start()
    yield f"http://127.0.0.1:{port}"
    svc.stop()


@pytest.fixture(scope="session")
def gateway(crm: str, signing: Signing, shared_keys: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Gateway]:
    d = tmp_path_factory.mktemp("gateway")
    gw = start_gateway(d, crm, signing, shared_keys, policies=policies_copy(d))
    yield gw
    gw.service.stop()


def direct(crm_url: str, path: str) -> Any:
    """The CRM's own answer, bypassing the gateway: what the gateway is protecting."""
    r = HTTP.get(crm_url + path, timeout=10)
    r.raise_for_status()
    return r.json()


POSTGRES = os.environ.get("FIELDGUARD_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")


def _postgres_admin(sql: str) -> None:
    """One statement on the machine's PostgreSQL (making and dropping test databases), or a skip saying why not."""
    import asyncio

    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(POSTGRES, timeout=3)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(go())
    except (OSError, TimeoutError, asyncpg.CannotConnectNowError, asyncpg.InvalidCatalogNameError) as exc:
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES} ({type(exc).__name__}): the shared backend's "
                    "tests need it (set FIELDGUARD_TEST_POSTGRES to another server)")


def pg_sql(url: str, sql: str, *args: Any) -> list[Any]:
    """Run one statement against a test database, as an operator's psql would."""
    import asyncio

    import asyncpg

    async def go() -> list[Any]:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


@pytest.fixture
def postgres() -> Iterator[str]:
    """A database of its own on the machine's PostgreSQL (its URL), dropped afterwards; skipped when
    PostgreSQL is not running."""
    import secrets as _secrets

    name = f"fieldguard_test_{_secrets.token_hex(4)}"
    _postgres_admin(f'CREATE DATABASE "{name}"')
    yield f"{POSTGRES.rsplit('/', 1)[0]}/{name}"
    _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

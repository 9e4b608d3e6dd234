"""`fieldguard demo`: the example CRM behind the gateway, with a token and a curl line per demo user.

Everything the demo needs is made at run time: an ES256 signing key under keys/, a seeded CRM
database and an audit log under demo-data/. Nothing secret is ever read from the repository.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.audit import JsonLinesTrail, MultiTrail
from proxy.config import Settings, build_settings
from proxy.keys import FileKek
from proxy.secretfile import check_private, open_dir_warning, private_dir, write_private
from proxy.tokens import mint_token

REPO = Path(__file__).resolve().parent.parent
ISSUER = "https://fieldguard.demo"
AUDIENCE = "fieldguard-demo"


@dataclass(frozen=True)
class DemoUser:
    name: str
    sub: str
    role: str
    purpose: str
    shows: str
    paths: tuple[str, ...]
    client_id: str | None = None


DEMO_USERS = (
    DemoUser("ALICE", "alice", "counsellor", "TREAT", "her own client's record and notes; bob's client is refused",
             ("/clients/1", "/clients/1/session-notes", "/clients/2")),
    DemoUser("CAROL", "carol", "supervisor", "TREAT", "her supervisees' clients' notes under a pseudonym",
             ("/clients/1", "/clients/1/session-notes")),
    DemoUser("ERIN", "erin", "admin", "HOPERAT", "contact details and appointments, no notes",
             ("/clients/1", "/clients/1/appointments", "/clients/1/session-notes")),
    DemoUser("DANA", "dana", "service_manager", "HOPERAT", "oversight: clients by pseudonym, anonymised feedback",
             ("/clients?per_page=3", "/feedback?per_page=3")),
    DemoUser("RHEA", "rhea", "researcher", "HRESCH", "no identity: pseudonyms and year of birth only",
             ("/clients?per_page=3",)),
    DemoUser("OTTO", "otto", "auditor", "HOPERAT", "the audit trail, not the records (refused)",
             ("/clients/1",)),
    DemoUser("CLIENT1", "client1", "client", "PATRQT", "their own record, without third-party information",
             ("/clients/1", "/clients/1/letters"), client_id="1"),
)


def demo_keys(keys_dir: Path) -> Path:
    """An ES256 key pair for demo tokens, made once under keys/."""
    private = keys_dir / "demo-signing.pem"
    public = keys_dir / "demo-signing.pub.pem"
    if not private.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        write_private(private, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        write_private(public, key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    check_private(private)
    return private


def _private_keys_dir(keys_dir: Path) -> None:
    """The demo's keys directory, 0700: made so when missing, and tightened (saying so) when it exists open to
    others, as the repository's keys/ does after a clone (git makes directories 0755)."""
    if keys_dir.exists() and open_dir_warning(keys_dir):
        was = stat.S_IMODE(keys_dir.stat().st_mode)
        keys_dir.chmod(0o700)
        print(f"{keys_dir} was mode {was:o}; made it 700: it holds the demo's keys.", flush=True)
    private_dir(keys_dir)


def demo_kek(keys_dir: Path) -> Path:
    """A passphrase file and the file KEK sealed under it, made once under keys/ (demo only: in production
    the passphrase comes from the environment or a secrets manager, not a file beside the KEK)."""
    passphrase = keys_dir / "demo-passphrase"
    if not passphrase.exists():
        if (keys_dir / "kek.json").exists():
            raise RuntimeError(f"{keys_dir / 'kek.json'} exists but not the demo passphrase; "
                               "remove keys/kek.json and keys/keystore.sqlite3 to start the demo afresh")
        write_private(passphrase, secrets.token_urlsafe(32).encode())
    check_private(passphrase)
    if not (keys_dir / "kek.json").exists():
        FileKek.create(keys_dir / "kek.json", passphrase.read_bytes().strip())
    return passphrase


def write_config(data_dir: Path, port: int, crm_port: int, keys: Path, alerts_port: int | None = None) -> Path:
    """The demo's fieldguard.toml: the embedded defaults plus the demo's own keys and ports."""
    text = f"""# Written by `fieldguard demo`; see examples/fieldguard.toml for every setting.
[server]
port = {port}

[upstream]
url = "http://127.0.0.1:{crm_port}"

[policy]
dir = "{REPO / 'policies'}"

[identity]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
public_key_file = "{keys / 'demo-signing.pub.pem'}"
demo_signing_key_file = "{keys / 'demo-signing.pem'}"

[keys]
dir = "{keys}"
passphrase_file = "{keys / 'demo-passphrase'}"

[audit]
log = "{data_dir / 'audit.jsonl'}"
store = "{data_dir / 'audit.sqlite3'}"

[cases]
store = "{data_dir / 'cases.sqlite3'}"
alert_url = "{f'http://127.0.0.1:{alerts_port}/alerts' if alerts_port else ''}"
"""
    path = data_dir / "fieldguard.toml"
    path.write_text(text)
    return path


def start_crm(db: Path, port: int, log_file: Path) -> subprocess.Popen[bytes]:
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "examples.crm", "--db", str(db), "--port", str(port)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the example CRM exited; see {log_file}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the example CRM did not start on port {port}; see {log_file}")


def start_webhook(port: int, out: Path) -> subprocess.Popen[bytes]:
    """The demo's alert receiver (examples/webhook.py): its lines go to the demo's own output."""
    return subprocess.Popen([sys.executable, "-m", "examples.webhook", "--port", str(port), "--out", str(out)],
                            cwd=REPO, start_new_session=True)


def banner(port: int, crm_port: int, private_key: Path, data_dir: Path, alerts_port: int = 8200) -> str:
    base = f"http://127.0.0.1:{port}"
    lines = [
        "",
        "FieldGuard demo",
        f"  gateway     {base}        (every caller goes through here)",
        f"  example CRM http://127.0.0.1:{crm_port}        (what the gateway protects; no auth of its own)",
        f"  audit trail {data_dir / 'audit.sqlite3'}  (hash-linked, signed; also printed below as JSON lines)",
        "",
        "Behind the gateway the CRM holds session notes, process notes, letters, communications and GP",
        "details only as ciphertext (fg1....), one key per client. See for yourself:",
        f"  curl -s 'http://127.0.0.1:{crm_port}/clients/1/session-notes?per_page=1'; echo",
        "",
        "Demo tokens (valid 8 hours) - paste these into another shell:",
    ]
    pem = private_key.read_bytes()
    for user in DEMO_USERS:
        tok = mint_token(pem, subject=user.sub, roles=[user.role], issuer=ISSUER, audience=AUDIENCE,
                         purposes=[user.purpose], client_id=user.client_id, ttl_seconds=8 * 3600)
        lines.append(f"export {user.name}={tok}")
    lines += ["", "Then try:"]
    for user in DEMO_USERS:
        lines.append(f"  # {user.sub} ({user.role}): {user.shows}")
        for path in user.paths:
            lines.append(f"  curl -s -H \"Authorization: Bearer ${user.name}\" '{base}{path}'; echo")
    config = data_dir / "fieldguard.toml"
    lines += [
        "",
        "Break-glass: alice declares an emergency for bob's client 2 (a coded reason and her own words); for an",
        "hour she sees who the client is, how to reach them, their GP and the risk, and nothing else. The alert",
        f"goes to the demo's webhook on port {alerts_port} (printed here, kept in {data_dir / 'alerts.jsonl'}).",
        f"  curl -s -X POST -H \"Authorization: Bearer $ALICE\" -H 'content-type: application/json' -d "
        "'{\"client\": 2, \"reason\": \"risk_to_self\", \"justification\": \"Client phoned saying she has "
        f"taken tablets\"}}' '{base}/_fieldguard/break-glass'; echo",
        f"  curl -s -i -H \"Authorization: Bearer $ALICE\" '{base}/clients/2'; echo",
        "The service manager reviews it (nobody reviews their own):",
        f"  .venv/bin/fieldguard review list --config {config}",
        f"  .venv/bin/fieldguard review sign GRANT --decision justified --role service_manager --actor dana "
        f"--note 'Called the client back; risk confirmed' --config {config}",
        "", "Stop with Ctrl-C.", ""]
    return "\n".join(lines)


def run_demo(port: int, crm_port: int, data_dir: Path | None, reset: bool, keys: Path | None = None,
             alerts_port: int = 8200) -> int:
    from proxy.server import port_taken, run

    # every port before anything is printed, reset or started: a second demo says so and leaves the first alone
    taken = [t for p in (port, crm_port, alerts_port) if (t := port_taken("127.0.0.1", p))]
    if taken:
        ours = any(name in t for t in taken for name in ("fieldguard", "proxy.cli", "examples.crm", "examples.webhook"))
        named = ", ".join(taken[:-1]) + f" and {taken[-1]}" if len(taken) > 1 else taken[0]
        print(f"{named}: {'a demo is running already; ' if ours else ''}stop it (Ctrl-C in its shell), or start "
              "this one on other ports with `fieldguard demo --port N --crm-port M --alerts-port K`.",
              file=sys.stderr)
        return 1
    data_dir = (data_dir or Path.cwd() / "demo-data").resolve()
    if reset and data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    keys = (keys or REPO / "keys").resolve()
    _private_keys_dir(keys)
    private_key = demo_keys(keys)
    demo_kek(keys)
    config = write_config(data_dir, port, crm_port, keys, alerts_port)
    crm = start_crm(data_dir / "crm.sqlite3", crm_port, data_dir / "crm.log")
    webhook = start_webhook(alerts_port, data_dir / "alerts.jsonl")
    try:
        settings = build_settings(_toml(config), os.environ, data_dir)
        sealed = asyncio.run(encrypt_seeded(settings))
        if sealed:
            print(f"Encrypted {sealed} sensitive fields the example CRM held in plaintext "
                  "(fieldguard encrypt-existing).", flush=True)
        # the tokens and curl lines once the gateway answers, so that pasting them right away works
        threading.Thread(target=_when_ready, args=(f"http://127.0.0.1:{port}/healthz",
                                                   banner(port, crm_port, private_key, data_dir, alerts_port)),
                         daemon=True).start()
        trail = MultiTrail([JsonLinesTrail(str(data_dir / "audit.jsonl")), JsonLinesTrail("-")])
        # uvicorn re-raises SIGTERM once it has shut down; as SystemExit it reaches the `finally` below
        signal.signal(signal.SIGTERM, _exit_on_signal)
        return run(settings, trail)
    finally:
        for proc in (webhook, crm):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                proc.kill()


def _when_ready(url: str, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    print(text, flush=True)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


async def encrypt_seeded(settings: Settings, policies: Path = REPO / "policies") -> int:
    """What `fieldguard encrypt-existing` does, run on the freshly seeded CRM (idempotent on a restart).
    The policy is proved here once; the gateway started next reuses the proof."""
    from proxy.keys import open_kek, open_keyring
    from proxy.keys.migration import encrypt_existing
    from proxy.policy import load_bundle

    fm = load_bundle(policies, settings.keys.in_dir("proofs")).fieldmap
    ring = await open_keyring(settings.keys, open_kek(settings.keys))
    try:
        report = await encrypt_existing(settings, fm, ring, dry_run=False, rate=0, max_records=None)
    finally:
        await ring.store.close()
    return report.fields


def _toml(path: Path) -> dict[str, object]:
    import tomllib

    return tomllib.loads(path.read_text())

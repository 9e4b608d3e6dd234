"""What every target sits in front of: the example CRM, seeded and encrypted the way `fieldguard demo`
does it (`proxy.keys.migration.encrypt_existing`), with keys and a token-signing key made in a temp dir."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from benchmarks.procs import PY, REPO, Proc, Registry, free_port
from proxy.config import Settings, build_settings
from proxy.demo import encrypt_seeded
from proxy.tokens import mint_token

ISSUER = "https://idp.bench"
AUDIENCE = "fieldguard-bench"
PASSPHRASE_ENV = "FIELDGUARD_KEK_PASSPHRASE"
PASSPHRASE = "benchmark passphrase, made for this run only"
USER = "alice"
PER_PAGE = 50
NOTE_PATCH = {"summary": "Reviewed progress (benchmark write)"}


@dataclass
class Loads:
    """The three request shapes, as paths every target accepts."""

    record: str = "/clients/1"
    listing: str = ""
    write: str = ""
    write_body: bytes = field(default_factory=lambda: json.dumps(NOTE_PATCH).encode())


@dataclass
class World:
    root: Path
    keys: Path
    policies: Path
    public_key: Path
    crm: Proc
    crm_url: str
    crm_db: Path
    token: str
    loads: Loads
    sealed_fields: int = 0
    alice_clients: list[int] = field(default_factory=list)
    cleanup: list[Path] = field(default_factory=list)  # directories outside root to remove at the end


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback)
        return json.loads(resp.read())


def make_keys(directory: Path) -> Path:
    """keys/ (0700) with a file KEK sealed under the run's passphrase (cheap scrypt: not a production KEK)."""
    from proxy.keys.kek import FileKek, ScryptParams

    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    FileKek.create(directory / "kek.json", PASSPHRASE.encode(), ScryptParams(n=2**14))
    return directory


def signing_key(directory: Path) -> tuple[bytes, Path]:
    """An ES256 key pair: the private PEM (for minting) and the public key file the gateway trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = directory / "signing.pub.pem"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def settings_for(world_root: Path, keys: Path, policies: Path, crm_url: str) -> Settings:
    raw = {"upstream": {"url": crm_url}, "keys": {"dir": str(keys)}, "policy": {"dir": str(policies)}}
    return build_settings(raw, os.environ, world_root)


def start_crm(reg: Registry, root: Path, db: Path, core: int, name: str, limit: float,
              seed: bool = True) -> tuple[Proc, str]:
    """The example CRM on `core`; (process, base URL)."""
    port = free_port()
    args = [PY, "-m", "examples.crm", "--db", str(db), "--port", str(port)]
    if not seed:
        args.append("--no-seed")
    proc = reg.start(Proc(name, args, root / f"{name}.log", core, limit))
    proc.wait_ready(f"http://127.0.0.1:{port}/health", timeout=60)
    return proc, f"http://127.0.0.1:{port}"


def build(reg: Registry, root: Path, limit: float) -> World:
    """Start the CRM on core 1, encrypt it, and work out the three load paths."""
    os.environ[PASSPHRASE_ENV] = PASSPHRASE  # read by proxy.keys.custody in this process and the gateways
    keys = make_keys(root / "keys")
    private_pem, public_key = signing_key(root)
    policies = root / "policies"
    shutil.copytree(REPO / "policies", policies, ignore=shutil.ignore_patterns("tests"))
    db = root / "crm" / "crm.sqlite3"
    db.parent.mkdir()
    crm, crm_url = start_crm(reg, root, db, core=1, name="crm", limit=limit)
    sealed = asyncio.run(encrypt_seeded(settings_for(root, keys, policies, crm_url), policies))
    token = mint_token(private_pem, subject=USER, roles=["counsellor"], issuer=ISSUER, audience=AUDIENCE,
                       purposes=["TREAT"], ttl_seconds=6 * 3600)
    clients = [c["id"] for c in get_json(f"{crm_url}/clients?counsellor={USER}&per_page=500")["items"]]
    ids = ",".join(str(c) for c in clients)
    notes = get_json(f"{crm_url}/session-notes?client_id={ids}&per_page=500")["items"]
    if len(notes) <= PER_PAGE:
        raise RuntimeError(f"{USER} has only {len(notes)} session notes; the list load needs more than {PER_PAGE}")
    loads = Loads(listing=f"/session-notes?per_page={PER_PAGE}&client_id={ids}",
                  write=f"/session-notes/{notes[-1]['id']}")  # beyond the first page: the list stays as sealed
    return World(root, keys, policies, public_key, crm, crm_url, db, token, loads, sealed, clients)

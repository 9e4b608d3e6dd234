"""Settings: one TOML file, every key documented in examples/fieldguard.toml, each overridable by
an environment variable `FIELDGUARD_<SECTION>_<KEY>` (e.g. FIELDGUARD_UPSTREAM_URL).

Relative paths are resolved once, at load, against the directory of the TOML file, so a deployment
directory can be moved as a whole and every component is handed its own section with paths it can use.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ENV_PREFIX = "FIELDGUARD_"
_PATH = {"path": True}  # field metadata: a file or directory, resolved against the config's directory


def _path(default: str = "") -> Any:
    return field(default=default, metadata=_PATH)


@dataclass(frozen=True, slots=True)
class ServerSection:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 1024 * 1024
    max_header_bytes: int = 64 * 1024  # a request's line and headers; more: 431 and the connection closed
    header_timeout_seconds: float = 10.0  # a request's head must arrive within this (slowloris: 408, closed)
    body_timeout_seconds: float = 30.0  # and its body within this of the head (408)
    log_level: str = "info"
    pid_file: str = _path()  # written at start, so `fieldguard policy reload` can signal the gateway
    trusted_proxies: list[str] = field(default_factory=list)  # peers whose X-Forwarded-For is passed on


@dataclass(frozen=True, slots=True)
class UpstreamSection:
    url: str = "http://127.0.0.1:8100"
    timeout_seconds: float = 10.0
    connect_timeout_seconds: float = 2.0
    max_response_bytes: int = 32 * 1024 * 1024
    pool_size: int = 100
    max_per_route: int = 25  # requests of one route at the CRM at once: one slow endpoint cannot take the pool
    route_wait_seconds: float = 1.0  # a request over that bound waits this long for a turn, then gets 503
    headers: dict[str, str] = field(default_factory=dict)
    # Conditional headers (If-None-Match, ...) are not forwarded: they would test the CRM's
    # unredacted representation, and a 304 carries nothing to rewrite.
    forward_headers: list[str] = field(default_factory=lambda: ["accept-language", "user-agent"])


@dataclass(frozen=True, slots=True)
class PolicySection:
    dir: str = _path("policies")
    store: str = ""  # "postgresql://...": enforce the newest bundle published there (`policy publish`), not dir
    fields_file: str = _path()  # default: fields.yaml in dir
    watch: bool = True
    poll_seconds: float = 1.0
    require_signature: bool = False  # refuse a bundle without a valid bundle.sig
    signing_public_key: str = _path()  # the officers' Ed25519 public key (PEM) that bundle.sig must verify under
    shadow_dir: str = _path()  # a candidate bundle evaluated beside the active one, differences audited, never enforced
    officer_role: str = "security_officer"  # the role allowed the /_fieldguard/ endpoints (explain, reload)


@dataclass(frozen=True, slots=True)
class IdentitySection:
    issuer: str = "https://fieldguard.local"
    audience: str = "fieldguard"
    public_key_file: str = _path()
    jwks_file: str = _path()
    demo_hs256_secret_file: str = _path()
    demo: bool = False
    demo_signing_key_file: str = _path()  # private key `fieldguard token` signs with (never read by the gateway)
    roles_claim: str = "roles"
    purpose_claim: str = "purpose_of_use"
    client_claim: str = "client_id"
    user_claim: str = "sub"  # the claim naming the caller as the CRM knows them (see relations.staff_match)
    leeway_seconds: int = 30
    token_cache_size: int = 10_000  # verified tokens remembered (by hash) until they expire
    max_token_bytes: int = 16_384  # a longer bearer token is refused before it is parsed
    max_token_lifetime_seconds: int = 86_400  # exp - iat above this is refused (a token that never ends)


@dataclass(frozen=True, slots=True)
class KeysSection:
    dir: str = _path("keys")
    keystore: str = "keystore.sqlite3"  # in dir
    store: str = ""  # "postgresql://...": the keystore shared by every replica ("": the keystore file above)
    kek: str = "file"  # file | pkcs11
    kek_file: str = "kek.json"  # in dir (file backend)
    passphrase_env: str = "FIELDGUARD_KEK_PASSPHRASE"
    passphrase_file: str = _path()  # read when the environment variable is not set
    pkcs11_module: str = "/usr/lib/softhsm/libsofthsm2.so"
    pkcs11_token: str = "fieldguard"
    pkcs11_pin_env: str = "FIELDGUARD_PKCS11_PIN"
    cache_size: int = 10_000
    cache_seconds: float = 300.0
    revocation_poll_seconds: float = 0.5  # re-check for shreds and rotations (with PostgreSQL, also announced)
    revocation_max_age_seconds: float = 5.0  # not re-checked for this long: no cached key is used (503)

    def in_dir(self, name: str) -> Path:
        """A file kept in the keys directory (the keystore, the KEK file, the audit signing key)."""
        return Path(self.dir) / name


@dataclass(frozen=True, slots=True)
class RelationsSection:
    refresh_seconds: float = 30.0
    max_age_seconds: float = 120.0  # older facts than this: decisions that need them are refused (503)


@dataclass(frozen=True, slots=True)
class AuditSection:
    log: str = _path("-")  # JSON lines for a SIEM: a file path, or "-" for stdout
    store: str = _path("audit.sqlite3")  # the durable, hash-linked trail: SQLite, or "postgresql://..." shared
    replica: str = ""  # this gateway's name in a shared trail (default host:port); unique and stable
    timeout_seconds: float = 2.0  # a record not committed by then: the caller gets 503 and no data
    checkpoint_every: int = 1000  # sign the trail's head every N records ...
    checkpoint_seconds: float = 60.0  # ... or every T seconds, whichever comes first
    signing_key: str = "audit-signing.pem"  # Ed25519 checkpoint key, in keys.dir; public half beside it
    origin: str = ""  # the trail's name in checkpoints (default: the host name)
    max_bytes: int = 0  # cap on the store's size (0: none); when full, data requests get 503
    min_free_bytes: int = 100 * 1024 * 1024  # /readyz reports not ready below this much free disk
    commit_delay_ms: float = 5.0  # under load, hold a commit this long for requests still on their way
    durable: bool = True  # false: SIEM lines only, nothing verifiable (benchmarks, development); warned at start


@dataclass(frozen=True, slots=True)
class CasesSection:
    """The confidentiality workflows' state (break-glass grants, reviews, alerts) and where alerts go."""

    store: str = _path("cases.sqlite3")  # SQLite, shared by every gateway and command of the deployment
    refresh_seconds: float = 2.0  # re-read open grants this often (grants made or ended on another gateway)
    alert_url: str = ""  # webhook each break-glass alert is POSTed to as JSON ("" : the JSON log only)
    alert_headers: dict[str, str] = field(default_factory=dict)  # e.g. an Authorization for the webhook
    alert_timeout_seconds: float = 5.0
    alert_attempts: int = 8  # tries before an alert is given up (retried after 2, 4, 8 ... seconds)
    restriction_exempt_roles: list[str] = field(default_factory=lambda: ["dpo"])  # a restriction does not stop


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSection = field(default_factory=ServerSection)
    upstream: UpstreamSection = field(default_factory=UpstreamSection)
    policy: PolicySection = field(default_factory=PolicySection)
    identity: IdentitySection = field(default_factory=IdentitySection)
    keys: KeysSection = field(default_factory=KeysSection)
    relations: RelationsSection = field(default_factory=RelationsSection)
    audit: AuditSection = field(default_factory=AuditSection)
    cases: CasesSection = field(default_factory=CasesSection)
    base_dir: Path = field(default_factory=Path.cwd)

    def path(self, value: str) -> Path:
        """A path given relative to the config file's directory (configured paths are resolved already)."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)


class ConfigError(ValueError):
    pass


def load_settings(path: Path | None, env: Mapping[str, str] | None = None) -> Settings:
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        base = path.resolve().parent
    return build_settings(raw, env if env is not None else os.environ, base)


def build_settings(raw: Mapping[str, Any], env: Mapping[str, str], base_dir: Path) -> Settings:
    settings = Settings(base_dir=base_dir)
    sections = {f.name: f for f in fields(Settings) if f.name != "base_dir"}
    for name in raw:
        if name not in sections:
            raise ConfigError(f"unknown section [{name}]")
    updates: dict[str, Any] = {}
    for name in sections:
        current = getattr(settings, name)
        values = dict(raw.get(name, {}))
        known = {f.name: f for f in fields(current)}
        for key in values:
            if key not in known:
                raise ConfigError(f"unknown key {key!r} in [{name}]")
        for key in known:
            env_name = f"{ENV_PREFIX}{name}_{key}".upper()
            if env_name in env:
                values[key] = _coerce(env[env_name], getattr(current, key), env_name)
        for key, value in values.items():
            expected = getattr(current, key)
            if known[key].metadata.get("path") and isinstance(value, str) and value not in ("", "-") \
                    and "://" not in value:  # a database URL is no path
                values[key] = str(_resolve(value, base_dir))
            if isinstance(expected, bool) != isinstance(value, bool) or (
                not isinstance(expected, bool) and isinstance(expected, (int, float)) and
                not isinstance(value, (int, float))
            ) or (isinstance(expected, str) and not isinstance(value, str)):
                raise ConfigError(f"[{name}] {key} should be {type(expected).__name__}")
            if isinstance(expected, float) and isinstance(value, int):
                values[key] = float(value)
        for key, spec in known.items():  # defaults are relative to the config's directory too
            if key not in values and spec.metadata.get("path") and getattr(current, key) not in ("", "-"):
                values[key] = str(_resolve(getattr(current, key), base_dir))
        updates[name] = replace(current, **values)
    return replace(settings, **updates)


def _resolve(value: str, base_dir: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


def _coerce(text: str, default: Any, name: str) -> Any:
    try:
        if isinstance(default, bool):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, list):
            return [s.strip() for s in text.split(",") if s.strip()]
        if isinstance(default, dict):
            return dict(item.split("=", 1) for item in text.split(",") if "=" in item)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a valid {type(default).__name__}") from None
    return text

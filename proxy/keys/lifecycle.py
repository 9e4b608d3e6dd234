"""Key lifecycle: init, status, KEK rotation, per-client rotation and shredding.

Each operation supports a dry run and returns a `KeyReport`, which the command line writes to the audit
trail (who ran it, on which client by pseudonym, why, how many keys). KEK rotation re-wraps data keys
only: the CRM is not touched, and an interrupted rotation resumes where it stopped when run again.
"""

from __future__ import annotations

import asyncio
import getpass
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.config import KeysSection
from proxy.keys.custody import create_kek, open_kek, open_keyring
from proxy.keys.kek import KeyEncryptionKey
from proxy.keys.ring import BEAT_SECONDS, LIVE_SECONDS, KeyRing, wrap_aad
from proxy.keys.store import KeyStatus
from proxy.policy.fieldmap import KEY_SCOPES

Progress = Callable[[int], None]


@dataclass(slots=True)
class KeyReport:
    """What a key operation did (or, in a dry run, would do)."""

    action: str
    dry_run: bool
    counts: dict[str, int] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)


def actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


async def init(config: KeysSection) -> KeyReport:
    kek = create_kek(config)
    ring = await open_keyring(config, kek)
    await ring.store.close()
    return KeyReport("keys init", False, {}, {"kek": kek.current_id, "backend": config.kek})


async def status(config: KeysSection) -> dict[str, Any]:
    kek = open_kek(config)
    ring = await open_keyring(config, kek)
    try:
        summary = await ring.store.summary()
        gateways = await ring.store.live_gateways(LIVE_SECONDS)
    finally:
        await ring.store.close()
    return {"backend": config.kek, "current_kek": kek.current_id, "keks": kek.known_ids(), **summary,
            "gateways": gateways, "cache": {"size": config.cache_size, "seconds": config.cache_seconds}}


async def rotate_kek(config: KeysSection, dry_run: bool, retire_old: bool, progress: Progress | None = None,
                     batch: int = 500, wait_seconds: float = 3 * BEAT_SECONDS) -> KeyReport:
    """Make a new KEK current and re-wrap every data key under it; resume an interrupted rotation.

    With `retire_old`, the old versions are destroyed only once no data key and no running gateway uses
    them, checked in the keystore transaction that marks them retired (from then on no key wrapped by them
    can be stored). Gateways take up the new KEK within a beat; this waits up to `wait_seconds` for them
    and re-wraps keys they made meanwhile, then retires what it can and reports what it could not."""
    kek = open_kek(config)
    ring = await open_keyring(config, kek)
    try:
        summary = await ring.store.summary()
        by_kek: dict[str, int] = summary["wrapped_by_kek"]  # type: ignore[assignment]
        stale = sum(n for k, n in by_kek.items() if k != kek.current_id)
        resuming = stale > 0
        outcome = KeyReport("keys rotate-kek", dry_run, {"to_rewrap": stale if resuming else sum(by_kek.values())})
        if dry_run:
            outcome.detail["resuming"] = resuming
            return outcome
        if not resuming:
            outcome.detail["previous"] = kek.current_id
            kek.rotate()
        target = kek.current_id
        outcome.detail["kek"] = target
        done = await _rewrap_all(ring, kek, target, batch, progress)
        if retire_old:
            deadline = time.monotonic() + wait_seconds
            while True:
                old = [k for k in kek.known_ids() if k != target]
                retired, refused = await ring.store.retire_keks(old, LIVE_SECONDS)
                for kek_id in retired:
                    kek.retire(kek_id)
                outcome.detail.setdefault("retired", []).extend(retired)
                if not refused or time.monotonic() >= deadline:
                    outcome.detail["not_retired"] = refused
                    break
                await asyncio.sleep(0.5)
                done += await _rewrap_all(ring, kek, target, batch, progress)  # keys made under it meanwhile
        outcome.counts["rewrapped"] = done
        return outcome
    finally:
        await ring.store.close()


async def _rewrap_all(ring: KeyRing, kek: KeyEncryptionKey, target: str, batch: int,
                      progress: Progress | None) -> int:
    done = 0
    while rows := await ring.store.needing_rewrap(target, batch):
        for row in rows:
            assert row.wrapped is not None and row.kek_id is not None
            aad = wrap_aad(row.key_id, row.scope)
            wrapped, kek_id = kek.wrap(kek.unwrap(row.wrapped, aad, row.kek_id), aad)
            await ring.store.rewrap(row.key_id, wrapped, kek_id)
        done += len(rows)
        if progress is not None:
            progress(len(rows))
    return done


def _scopes(scope: str | None) -> tuple[str, ...]:
    if scope is None:
        return KEY_SCOPES
    if scope not in KEY_SCOPES:
        raise ValueError(f"unknown scope {scope!r}; one of {', '.join(KEY_SCOPES)}")
    return (scope,)


async def rotate_client(config: KeysSection, client_id: str, scope: str | None, dry_run: bool) -> KeyReport:
    """A new data-key version for the client; the old one only decrypts from now on."""
    ring = await open_keyring(config, open_kek(config))
    try:
        if await ring.store.tombstoned([client_id]):
            raise ValueError(f"client {client_id} was erased: their keys are destroyed and none is made again")
        keys = await ring.store.keys_of(client_id)
        if not keys:
            raise ValueError(f"client {client_id} has no data key to rotate; check the id")
        scopes = [s for s in _scopes(scope) if any(k.scope == s and k.status is KeyStatus.ACTIVE for k in keys)]
        outcome = KeyReport("keys rotate", dry_run, {"scopes": len(scopes)})
        outcome.detail["pseudonym"] = await ring.store.known_pseudonym(client_id) or "none yet"
        if dry_run:
            return outcome
        ids: list[str] = []
        for s in scopes:
            old = await ring.store.retire_active(client_id, s)
            new = await ring.create(client_id, s)
            ids += [k.hex_id for k in old] + [new.key.hex_id]
        outcome.detail["key_ids"] = ids
        return outcome
    finally:
        await ring.store.close()


async def shred(config: KeysSection, client_id: str, scope: str | None, reason: str, dry_run: bool) -> KeyReport:
    """Destroy every version of the client's keys (of one scope, or all and the pseudonym link)."""
    if not reason.strip():
        raise ValueError("a shred needs a reason (the legal basis, a ticket)")
    ring = await open_keyring(config, None)
    try:
        _scopes(scope)
        known = await ring.store.keys_of(client_id)
        pseudonym = await ring.store.known_pseudonym(client_id)
        erased = bool(await ring.store.tombstoned([client_id]))
        if not known and pseudonym is None and not erased:
            raise ValueError(f"client {client_id} is not known to the keystore (no key, no pseudonym): nothing to "
                             "shred; check the id")
        keys = [k for k in known if k.status is not KeyStatus.DESTROYED and (scope is None or k.scope == scope)]
        outcome = KeyReport("keys shred", dry_run, {"keys": len(keys)})
        outcome.detail["pseudonym"] = pseudonym or "erased"
        outcome.detail["already_erased"] = erased
        outcome.detail["key_ids"] = [k.hex_id for k in keys]
        if not dry_run:
            destroyed = await ring.store.destroy(client_id, scope, reason)
            outcome.counts["destroyed"] = len(destroyed)
            outcome.detail["at"] = time.time()
        return outcome
    finally:
        await ring.store.close()


"""Safe rollout of policy changes: watch, check, compile, prove, then swap atomically.

A changed file, once it has stopped changing (or SIGHUP, or `fieldguard policy reload`), triggers a
full load in a worker thread; only a bundle that passes every check replaces the one in force. A
failure keeps the old bundle, is logged with its findings and is reported by /readyz until a good
bundle loads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from proxy.policy import (
    BundleSource,
    PolicyBundle,
    PolicyError,
    bundle_digest,
    compile_bundle,
    read_bundle_files,
)

log = structlog.get_logger("fieldguard.policy")


@dataclass(slots=True)
class ReloadStatus:
    reloads: int = 0
    failures: int = 0
    last_error: str | None = None
    last_attempt: float | None = None
    errors: list[str] = field(default_factory=list)


class PolicyWatcher:
    """Holds the bundle in force and replaces it only with a proved one."""

    def __init__(
        self,
        bundle: PolicyBundle,
        proofs: Path | None,
        signed_by: Ed25519PublicKey | None = None,
        on_swap: Callable[[PolicyBundle, PolicyBundle], Awaitable[None]] | None = None,
        on_failure: Callable[[PolicyError], Awaitable[None]] | None = None,
    ) -> None:
        self.bundle = bundle
        self.source = bundle.source
        self.proofs = proofs
        self.signed_by = signed_by
        self.status = ReloadStatus()
        self._on_swap = on_swap
        self._on_failure = on_failure
        self._stamp = _stat(self.source)
        self._lock = asyncio.Lock()

    async def reload(self) -> bool:
        """Load the directory again; True when a new bundle is now in force."""
        async with self._lock:
            self.status.last_attempt = time.time()
            self._stamp = _stat(self.source)
            try:
                files = read_bundle_files(self.source)
                if bundle_digest(files) == self.bundle.digest:
                    return False
                fresh = await asyncio.to_thread(compile_bundle, self.source, files, self.proofs, self.signed_by)
            except PolicyError as exc:
                self.status.failures += 1
                self.status.last_error = str(exc)
                self.status.errors = [str(f) for f in exc.findings]
                log.error("policy reload refused; the previous policy stays in force",
                          policy=self.bundle.short_hash, findings=self.status.errors[:10])
                if self._on_failure is not None:
                    await self._on_failure(exc)
                return False
            old, self.bundle = self.bundle, fresh
            self.status.reloads += 1
            self.status.last_error = None
            self.status.errors = []
            log.info("policy reloaded", old=old.short_hash, new=fresh.short_hash, checks=fresh.proof_checks)
            if self._on_swap is not None:
                await self._on_swap(old, fresh)
            return True

    async def watch(self, every: float) -> None:
        """Reload once the files have changed and then stayed unchanged for one poll: an editor caught
        between truncating and writing a file must not have its half-written policy loaded."""
        seen = self._stamp
        while True:
            await asyncio.sleep(every)
            now = _stat(self.source)
            if now != self._stamp and now == seen:
                await self.reload()
            seen = now


def _stat(source: BundleSource) -> tuple[tuple[str, int, int], ...]:
    out = []
    for name, path in source.paths().items():
        try:
            st = path.stat()
            out.append((name, st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            out.append((name, 0, -1))
    return tuple(out)

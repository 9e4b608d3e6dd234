"""Safe rollout of policy changes: watch, check, compile, prove, then swap atomically.

A changed file, once it has stopped changing (or SIGHUP, or `fieldguard policy reload`), triggers a
full load in a worker thread; only a bundle that passes every check replaces the one in force. A
failure keeps the old bundle, is logged with its findings and is reported by /readyz until a good
bundle loads. The gateway's supervisor calls `poll` every `policy.poll_seconds`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from proxy.policy.bundle import BundleSource, PolicyBundle, bundle_digest, compile_bundle, read_bundle_files
from proxy.policy.fieldmap import parse_fieldmap
from proxy.policy.lint import Finding, PolicyError, Severity
from proxy.policy.mapdiff import unsafe_for_reload
from proxy.policy.yamlfile import MapError

log = structlog.get_logger("fieldguard.policy")


@dataclass(slots=True)
class ReloadStatus:
    failures: int = 0  # refused reloads since start
    last_error: str | None = None  # the last refusal, until a good bundle loads


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
        self._stamp = _stat(self.source)  # the files as last loaded (or tried)
        self._seen = self._stamp  # the files at the last poll
        self._requested = False
        self._lock = asyncio.Lock()

    async def reload(self) -> bool:
        """Load the directory again; True when a new bundle is now in force."""
        async with self._lock:
            self._requested = False
            self._stamp = _stat(self.source)
            try:
                files = read_bundle_files(self.source)
                if bundle_digest(files) == self.bundle.digest:
                    self.status.last_error = None
                    return False
                self._refuse_unsafe(files)  # before the proof, which takes seconds: said at once
                fresh = await asyncio.to_thread(compile_bundle, self.source, files, self.proofs, self.signed_by)
                unsafe = unsafe_for_reload(self.bundle.fieldmap, fresh.fieldmap)
                if unsafe:
                    raise PolicyError([Finding("fields.yaml", None, Severity.ERROR, p) for p in unsafe])
            except Exception as exc:
                if not isinstance(exc, PolicyError):  # a fault of ours, not the officer's: still refused, and said
                    exc = PolicyError([Finding(str(self.source.directory), None, Severity.ERROR,
                                               f"the bundle could not be loaded: {type(exc).__name__}: {exc}")])
                self.status.failures += 1
                self.status.last_error = str(exc)
                log.error("policy reload refused; the previous policy stays in force",
                          policy=self.bundle.short_hash, findings=[str(f) for f in exc.findings[:10]])
                if self._on_failure is not None:
                    await self._on_failure(exc)
                return False
            old, self.bundle = self.bundle, fresh
            self.status.last_error = None
            log.info("policy reloaded", old=old.short_hash, new=fresh.short_hash, checks=fresh.proof_checks)
            if self._on_swap is not None:
                await self._on_swap(old, fresh)
            return True

    def _refuse_unsafe(self, files: dict[str, bytes]) -> None:
        """The field map's changes a running gateway never takes up, from the new fields.yaml alone."""
        try:
            after = parse_fieldmap(files["fields.yaml"].decode("utf-8"))
        except (MapError, UnicodeDecodeError, KeyError):
            return  # the full load says what and where
        unsafe = unsafe_for_reload(self.bundle.fieldmap, after)
        if unsafe:
            raise PolicyError([Finding("fields.yaml", None, Severity.ERROR, p) for p in unsafe])

    def follow(self, source: BundleSource) -> None:
        """Load from another place from now on (a newly published version's mirror), at the next poll."""
        self.source = source
        self._requested = True

    def request_reload(self) -> None:
        """SIGHUP: the next `poll` reloads whatever the files say."""
        self._requested = True

    async def poll(self, watch: bool = True) -> None:
        """One look at the files. Reload once they have changed and then stayed unchanged for one poll (an
        editor caught between truncating and writing a file must not have its half-written policy loaded),
        or when a reload was requested."""
        now = _stat(self.source) if watch else self._stamp
        stable = now != self._stamp and now == self._seen
        self._seen = now
        if stable or self._requested:
            await self.reload()


def _stat(source: BundleSource) -> tuple[tuple[str, int, int], ...]:
    out = []
    for name, path in source.paths().items():
        try:
            st = path.stat()
            out.append((name, st.st_mtime_ns, st.st_size))
        except OSError:  # absent, or unreadable for now: a change like any other, the load will say what
            out.append((name, 0, -1))
    return tuple(out)

"""The policy published to the shared PostgreSQL (`[policy] store = "postgresql://..."`).

Officers publish a bundle that has passed check, compile and proof as a new numbered version
(`fieldguard policy publish DIR`); the newest version is the one in force. Every replica mirrors it into a
directory of its own per version (`<keys.dir>/published/v<N>`, never rewritten), loads it there exactly as it
loads files, and reports the version and hash it runs. A publish is announced after it commits; replicas
also look for a newer version at every policy poll, so a lost announcement costs one poll.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.policy.bundle import BundleSource, bundle_digest, read_bundle_files
from proxy.policy.lint import Finding, PolicyError, Severity
from proxy.postgres import Database, announce, blocking, check_schema, redact
from proxy.secretfile import private_dir

TOPIC = "policy"
KEEP_VERSIONS = 5  # mirrored versions kept on disk (the one in force and those before it, for diffs)


@dataclass(frozen=True, slots=True)
class Published:
    version: int
    digest: str
    published_by: str
    published_at: float
    note: str

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "digest": self.digest, "published_by": self.published_by,
                "published_at": self.published_at, "note": self.note}


async def latest(db: Database) -> Published | None:
    row = await db.pool.fetchrow("SELECT version, digest, published_by, published_at, note FROM policy_versions "
                                 "ORDER BY version DESC LIMIT 1")
    return Published(*row) if row else None


async def history(db: Database, limit: int = 20) -> list[Published]:
    rows = await db.pool.fetch("SELECT version, digest, published_by, published_at, note FROM policy_versions "
                               "ORDER BY version DESC LIMIT $1", limit)
    return [Published(*r) for r in rows]


async def files_of(db: Database, version: int) -> dict[str, bytes]:
    raw = await db.pool.fetchval("SELECT files FROM policy_versions WHERE version = $1", version)
    return {name: base64.b64decode(text) for name, text in json.loads(raw).items()}


async def publish(db: Database, files: dict[str, bytes], who: str, note: str) -> Published:
    """Store the bundle's files as the next version, then announce it (after the commit)."""
    digest = bundle_digest(files)
    encoded = json.dumps({name: base64.b64encode(data).decode() for name, data in sorted(files.items())})
    row = await db.pool.fetchrow(
        "INSERT INTO policy_versions (digest, files, published_by, published_at, note) VALUES ($1, $2, $3, $4, $5) "
        "RETURNING version, digest, published_by, published_at, note", digest, encoded, who, time.time(), note)
    published = Published(*row)
    await announce(db.pool, TOPIC, f"{published.version}:{digest}")
    return published


def mirror(directory: Path, version: int, files: dict[str, bytes], digest: str) -> BundleSource:
    """The version's files in `directory/v<N>`, written once (in a temporary directory, then renamed, so a
    reader never sees part of a version); a copy whose files no longer hash to `digest` is replaced."""
    private_dir(directory)
    target = directory / f"v{version}"
    source = BundleSource(target)
    if target.is_dir():
        with contextlib.suppress(PolicyError):
            if bundle_digest(read_bundle_files(source)) == digest:
                return source
        shutil.rmtree(target, ignore_errors=True)
    staging = directory / f".v{version}.{os.getpid()}.{os.urandom(3).hex()}"
    staging.mkdir(mode=0o700)
    for name, data in files.items():
        (staging / name).write_bytes(data)
    try:
        staging.rename(target)
    except OSError:  # another replica on this host mirrored it first: the same bytes
        shutil.rmtree(staging, ignore_errors=True)
    versions = sorted((int(p.name[1:]) for p in directory.glob("v*") if p.name[1:].isdigit()), reverse=True)
    for old in versions[KEEP_VERSIONS:]:
        shutil.rmtree(directory / f"v{old}", ignore_errors=True)
    return source


class PublishedPolicy:
    """A replica's link to the published policy: which version it has mirrored, and the newest one."""

    def __init__(self, url: str, directory: Path) -> None:
        self.url = url
        self.directory = directory
        self.version: int | None = None
        self.digest: str | None = None
        self._db: Database | None = None

    async def open(self) -> None:
        self._db = await Database.open(self.url, max_size=2)
        try:
            await check_schema(self._db.pool, self.url)
        except BaseException:
            await self._db.close()
            self._db = None
            raise

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def sync(self) -> BundleSource | None:
        """The newest version's mirror when it is newer than the last one mirrored; None when it is not."""
        assert self._db is not None, "open() first"
        found = await latest(self._db)
        if found is None:
            raise PolicyError([Finding(redact(self.url), None, Severity.ERROR,
                                       "no policy is published in this database",
                                       "run `fieldguard policy publish DIR` with the bundle to enforce")])
        if found.version == self.version:
            return None
        files = await files_of(self._db, found.version)
        source = await asyncio.to_thread(mirror, self.directory, found.version, files, found.digest)
        self.version, self.digest = found.version, found.digest
        return source

    def first(self) -> BundleSource:
        """At start, before the event loop serves: the newest version, mirrored (its own loop, in a thread)."""

        async def fetch() -> BundleSource:
            await self.open()
            try:
                source = await self.sync()
                assert source is not None
                return source
            finally:
                await self.close()

        return blocking(fetch)

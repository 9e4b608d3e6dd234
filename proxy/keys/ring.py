"""The key ring: data keys for the request path, from the keystore through the KEK to a bounded cache.

A response only unwraps keys for fields whose outcome is `clear`; keystore rows are fetched ahead (one
query per response, by the key ids read from the body), but unwrapping waits until a field needs it.
Unwrapped keys are kept in a cache bounded in entries and age, and dropped at once when the keystore
records a rotation or a shred (polled every `revocation_poll_seconds`, and immediately in-process).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.keys.kek import KekError, KeyEncryptionKey
from proxy.keys.store import DataKey, KeyStatus, Keystore, KeystoreConflict, KeystoreUnavailable

log = structlog.get_logger("fieldguard.keys")
BEAT_SECONDS = 5.0  # a running gateway says so in the keystore this often ...
LIVE_SECONDS = 30.0  # ... and counts as running (for KEK retirement) while its last beat is this recent
K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """An LRU bounded in entries and in age (seconds since insertion)."""

    def __init__(self, size: int, seconds: float) -> None:
        self.size, self.seconds = size, seconds
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        hit = self._data.get(key)
        if hit is None:
            return None
        born, value = hit
        if time.monotonic() - born > self.seconds:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._data[key] = (time.monotonic(), value)
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def drop(self, key: K) -> None:
        self._data.pop(key, None)

    def drop_where(self, predicate: Callable[[K, V], bool]) -> None:
        for key in [k for k, (_, v) in self._data.items() if predicate(k, v)]:
            del self._data[key]

    def __len__(self) -> int:
        return len(self._data)


class Erased(Exception):
    """The client was erased: no key is ever made for them again."""


@dataclass(frozen=True, slots=True)
class OpenKey:
    key: DataKey
    aead: AESGCM


def wrap_aad(key_id: bytes, scope: str) -> bytes:
    """Binds a wrapped key to its id and scope, so a wrapped blob cannot be swapped between rows."""
    return b"fieldguard-dek\x00" + key_id + b"\x00" + scope.encode()


class KeyRing:
    def __init__(self, store: Keystore, kek: KeyEncryptionKey | None, cache_size: int = 10_000,
                 cache_seconds: float = 300.0) -> None:
        self.store = store
        self._kek = kek
        self.rows: BoundedCache[bytes, DataKey] = BoundedCache(cache_size * 4, cache_seconds)
        self.open_keys: BoundedCache[bytes, OpenKey] = BoundedCache(cache_size, cache_seconds)
        self.writers: BoundedCache[tuple[str, str], bytes] = BoundedCache(cache_size, cache_seconds)
        self.pseudonym_cache: BoundedCache[str, str] = BoundedCache(cache_size * 10, cache_seconds)
        self._revocation_seq: int | None = None  # None: not read yet
        self.checked_at: float | None = None  # monotonic time of the last successful revocation re-check
        self.max_age: float | None = None  # set by a gateway: older than this, the caches are re-checked first
        self._kek_ids = frozenset(kek.known_ids()) if kek is not None else frozenset()
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.instance = f"{self.host}:{self.pid}:{os.urandom(4).hex()}"

    @property
    def kek(self) -> KeyEncryptionKey:
        if self._kek is None:
            raise KekError("no key-encryption key is configured")
        return self._kek

    @property
    def can_encrypt(self) -> bool:
        return self._kek is not None

    async def pseudonyms(self, client_ids: Iterable[str]) -> dict[str, str]:
        """Each client's random pseudonym (made on first use), cached; dropped when the client is shredded."""
        found: dict[str, str] = {}
        missing: list[str] = []
        for cid in client_ids:
            hit = self.pseudonym_cache.get(cid)
            if hit is None:
                missing.append(cid)
            else:
                found[cid] = hit
        if missing:
            for cid, pseudonym in (await self.store.pseudonyms(missing)).items():
                self.pseudonym_cache.put(cid, pseudonym)
                found[cid] = pseudonym
        return found

    async def known_pseudonyms(self, client_ids: Iterable[str]) -> dict[str, str]:
        """The pseudonyms these clients already have; none is made."""
        found: dict[str, str] = {}
        for cid in client_ids:
            hit = self.pseudonym_cache.get(cid)
            if hit is None:
                hit = await self.store.known_pseudonym(cid)
                if hit is not None:
                    self.pseudonym_cache.put(cid, hit)
            if hit is not None:
                found[cid] = hit
        return found

    # ----------------------------------------------------------------- the KEK beside other processes
    async def refresh_kek(self) -> bool:
        """Take up a KEK rotation or retirement made by `keys rotate-kek` in another process. Rows cached
        under a KEK version this process no longer holds are dropped, to be read again re-wrapped."""
        if self._kek is None:
            return False
        kek = self._kek
        changed = await asyncio.to_thread(kek.refresh) if kek.blocking else kek.refresh()
        if changed:
            self._kek_ids = frozenset(await asyncio.to_thread(kek.known_ids) if kek.blocking else kek.known_ids())
            self.rows.drop_where(lambda _, row: row.kek_id not in self._kek_ids)
            log.info("key-encryption keys re-read", current=kek.current_id, versions=len(self._kek_ids))
        return changed

    async def beat(self) -> str | None:
        """Say in the keystore that this gateway lives and which KEK it wraps with, so a retirement of that
        KEK waits for it (`keys rotate-kek --retire-old`)."""
        await self.refresh_kek()
        current = self._kek.current_id if self._kek is not None else None
        await self.store.beat(self.instance, self.host, self.pid, current)
        return current

    async def leave(self) -> None:
        await self.store.leave(self.instance)

    # ----------------------------------------------------------------- reading
    async def current(self) -> None:
        """Before the caches serve a request: if the revocations have not been re-checked within `max_age`
        (the keystore's database unreachable, the poll stuck), re-check now, and if that fails too use no
        cached key (`KeystoreUnavailable`): a shred made elsewhere meanwhile must not be outlived."""
        if self.max_age is None or (self.checked_at is not None and
                                    time.monotonic() - self.checked_at <= self.max_age):
            return
        try:
            await self.poll_revocations()
        except KeystoreUnavailable:
            raise
        except Exception as exc:
            raise KeystoreUnavailable(f"the keystore could not be re-checked ({type(exc).__name__})") from None

    async def prefetch(self, key_ids: Iterable[bytes]) -> None:
        """Fetch keystore rows for keys not cached: one query. Unwrapping waits for a field that needs it,
        except with a KEK on a device (`blocking`), where the token calls are made here, off the loop."""
        await self.current()
        wanted = set(key_ids)
        missing = [k for k in wanted if (row := self.rows.get(k)) is None or row.kek_id not in self._kek_ids]
        if missing:
            fetched = await self.store.get_many(missing)
            if any(row.kek_id not in self._kek_ids for row in fetched.values() if row.kek_id is not None):
                await self.refresh_kek()  # wrapped by a KEK made since: take it up
            for key_id, row in fetched.items():
                self.rows.put(key_id, row)
        if self._kek is not None and self._kek.blocking:
            closed = [k for k in wanted if self.open_keys.get(k) is None]
            if closed:
                await asyncio.to_thread(self._open_all, closed)

    def _open_all(self, key_ids: list[bytes]) -> None:
        for key_id in key_ids:
            try:
                self.opened(key_id)
            except KekError:
                continue  # refused per field, with its reason, when the field asks for it

    def opened(self, key_id: bytes) -> OpenKey | None:
        """The key, unwrapped now if its row is known; None when the keystore does not know it."""
        cached = self.open_keys.get(key_id)
        if cached is not None:
            return cached
        row = self.rows.get(key_id)
        if row is None or row.wrapped is None or row.status is KeyStatus.DESTROYED or row.kek_id is None:
            return None
        dek = self.kek.unwrap(row.wrapped, wrap_aad(row.key_id, row.scope), row.kek_id)
        opened = OpenKey(row, AESGCM(dek))
        self.open_keys.put(key_id, opened)
        return opened

    # ----------------------------------------------------------------- writing
    async def for_writing(self, client_id: str | None, scope: str) -> OpenKey:
        """The client's active key for a scope, made on first use (for a new client: unlinked for now)."""
        await self.current()
        if client_id is not None:
            cached_id = self.writers.get((client_id, scope))
            if cached_id is not None:
                cached = self.opened(cached_id)
                if cached is not None and cached.key.status is KeyStatus.ACTIVE:
                    return cached
            row = await self.store.active(client_id, scope)
            if row is not None:
                self.rows.put(row.key_id, row)
                opened = self.opened(row.key_id)
                if opened is not None:
                    self.writers.put((client_id, scope), row.key_id)
                    return opened
        return await self.create(client_id, scope)

    async def create(self, client_id: str | None, scope: str) -> OpenKey:
        """A new active key. Wrapped by the KEK current now (re-read first: a rotation elsewhere may have
        made another); if the keystore refuses it (its KEK retired meanwhile, or another writer made the
        client's key first) the KEK is re-read and the key re-made, or the other writer's key is used."""
        if client_id is not None and await self.store.tombstoned([client_id]):
            raise Erased(client_id)
        for attempt in range(3):
            await self.refresh_kek()
            key_id = os.urandom(16)
            dek = AESGCM.generate_key(256)
            kek = self.kek
            aad = wrap_aad(key_id, scope)
            wrapped, kek_id = await asyncio.to_thread(kek.wrap, dek, aad) if kek.blocking else kek.wrap(dek, aad)
            version = await self.store.next_version(client_id, scope)
            row = DataKey(key_id, client_id, scope, version, KeyStatus.ACTIVE, wrapped, kek_id, time.time())
            try:
                await self.store.add(row)
                break
            except KeystoreConflict:
                if client_id is not None:
                    winner = await self.store.active(client_id, scope)
                    if winner is not None:
                        self.rows.put(winner.key_id, winner)
                        opened = self.opened(winner.key_id)
                        if opened is not None:
                            self.writers.put((client_id, scope), winner.key_id)
                            return opened
                if attempt == 2:
                    raise KekError("no data key could be stored: the KEK keeps changing") from None
        opened = OpenKey(row, AESGCM(dek))
        self.rows.put(key_id, row)
        self.open_keys.put(key_id, opened)
        if client_id is not None:
            self.writers.put((client_id, scope), key_id)
        return opened

    async def link(self, key_id: bytes, client_id: str) -> None:
        """A new client's key, now that the CRM has said who the client is."""
        await self.store.link(key_id, client_id)
        row = self.rows.get(key_id)
        if row is not None:
            row = replace(row, client_id=client_id)
            self.rows.put(key_id, row)
            self.writers.put((client_id, row.scope), key_id)
        opened = self.open_keys.get(key_id)
        if opened is not None:
            self.open_keys.put(key_id, OpenKey(replace(opened.key, client_id=client_id), opened.aead))

    async def discard(self, key_ids: Iterable[bytes], reason: str) -> None:
        """Destroy keys made for a write the CRM refused (orphans)."""
        ids = list(key_ids)
        if ids:
            await self.store.destroy(None, None, reason, ids)
            self.forget(ids, ())

    # ----------------------------------------------------------------- revocation
    def forget(self, key_ids: Iterable[bytes], client_ids: Iterable[str]) -> None:
        ids = set(key_ids)
        clients = set(client_ids)
        for key_id in ids:
            self.rows.drop(key_id)
            self.open_keys.drop(key_id)
        self.writers.drop_where(lambda owner, key_id: key_id in ids or owner[0] in clients)
        for client in clients:
            self.pseudonym_cache.drop(client)
        if clients:
            self.rows.drop_where(lambda _, row: row.client_id in clients)
            self.open_keys.drop_where(lambda _, opened: opened.key.client_id in clients)

    @property
    def revocation_seq(self) -> int | None:
        """The last revocation this ring has caught up to (the replica's key epoch)."""
        return self._revocation_seq

    async def poll_revocations(self) -> int:
        """Drop from the caches every key and client the keystore has revoked since the last poll."""
        began = time.monotonic()
        if self._revocation_seq is None:  # the first poll, at start: nothing cached yet that could be stale
            self._revocation_seq = await self.store.latest_revocation()
            self.checked_at = began
            return self._revocation_seq
        last, keys, clients = await self.store.revocations_since(self._revocation_seq)
        self.checked_at = began
        if last != self._revocation_seq:
            self._revocation_seq = last
            self.forget(keys, clients)
            if keys or clients:
                log.info("keys dropped from cache", keys=len(keys), clients=len(clients))
        return last


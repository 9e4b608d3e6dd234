"""In-process pieces for the micro and scaling benchmarks: the shipped policy bundle, a key ring on a
file KEK in a temp dir, and the example CRM's seed records sealed exactly as the gateway seals them."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from benchmarks.procs import wait_quiet
from benchmarks.world import PASSPHRASE, PASSPHRASE_ENV, make_keys
from proxy.keys.cipher import FieldCipher
from proxy.keys.ring import KeyRing
from proxy.policy.bundle import PolicyBundle, load_bundle
from proxy.policy.decision import Relation
from proxy.redact import Disclosure, Plans, Redactor
from proxy.writes import seal_fields

REPO = Path(__file__).resolve().parent.parent
RESOURCES = {"clients": "client", "session-notes": "session_note", "process-notes": "process_note",
             "letters": "letter", "communications": "communication", "appointments": "appointment",
             "feedback": "feedback"}
CASELOAD = Relation.ANY | Relation.CASELOAD
QUIET_CORES, QUIET_WAIT_S = 0.25, 15.0  # before each measurement, wait this long at most for a quiet machine


@dataclass
class Kit:
    root: Path
    bundle: PolicyBundle
    ring: KeyRing
    cipher: FieldCipher
    data: dict[str, list[dict[str, Any]]]  # resource -> sealed records, as the CRM holds them

    def redactor(self, role: str = "counsellor", relations: Relation = CASELOAD,
                 pseudonyms: dict[str, str] | None = None) -> Redactor:
        """What one request builds: a redactor and a field cipher for one caller, every client at
        `relations`; the redaction plans are the bundle's, compiled once, as in the gateway."""
        return Redactor(self.bundle.table, role, lambda _cid: relations, (pseudonyms or {}).get, Disclosure(),
                        Plans.of(self.bundle), cipher=FieldCipher(self.ring))

    async def close(self) -> None:
        await self.ring.store.close()


async def open_kit(root: Path, resources: tuple[str, ...] = ("clients", "session-notes")) -> Kit:
    """Keys, keystore and sealed seed data under `root` (about a second per hundred clients)."""
    import os

    from examples.crm.seed import generate
    from proxy.keys.kek import FileKek
    from proxy.keys.store import SqliteKeystore

    os.environ.setdefault(PASSPHRASE_ENV, PASSPHRASE)
    keys = make_keys(root / "keys")
    bundle = load_bundle(REPO / "policies", keys / "proofs")
    ring = KeyRing(await SqliteKeystore.open(keys / "keystore.sqlite3"), FileKek(keys / "kek.json",
                                                                                 PASSPHRASE.encode()))
    fm = bundle.fieldmap
    seed = generate()
    data: dict[str, list[dict[str, Any]]] = {}
    for name in resources:
        resource = fm.resources[RESOURCES[name]]
        scopes = sorted({s for c in resource.classes if (s := fm.classes[c].key_scope) is not None})
        rows = []
        for row in seed[name]:
            cid = str(row["id"] if resource.client_field == "id" else row["client_id"])
            keys_for = {scope: await ring.for_writing(cid, scope) for scope in scopes}
            rows.append(seal_fields(resource, dict(row), fm.classes, keys_for))
        data[name] = rows
    return Kit(root, bundle, ring, FieldCipher(ring), data)


def list_body(rows: list[dict[str, Any]]) -> bytes:
    """A list page as the example CRM serves it."""
    return orjson.dumps({"items": rows, "total": len(rows), "page": 1, "per_page": len(rows)})


def best_of(fn: Callable[[], object], repeat: int = 5, min_seconds: float = 0.05) -> float:
    """Microseconds per call: calls batched to last at least `min_seconds`, best batch of `repeat`."""
    wait_quiet(QUIET_CORES, QUIET_WAIT_S)
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 >= min_seconds or n >= 1 << 22:
            break
        n *= 4
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


async def best_of_async(fn: Callable[[], Awaitable[object]], repeat: int = 5, min_seconds: float = 0.05) -> float:
    """`best_of` for coroutines, awaited one after another on the running loop."""
    wait_quiet(QUIET_CORES, QUIET_WAIT_S)
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            await fn()
        if time.perf_counter() - t0 >= min_seconds or n >= 1 << 20:
            break
        n *= 4
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            await fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6

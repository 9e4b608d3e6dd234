"""Scaling: how the per-request costs grow with the size of what the gateway handles.

    python -m benchmarks.scaling [--big] [--only rows,fields,keystore,policy] [--out benchmarks/results/scaling.json]

rows      records per response (1, 50, 500) through `Redactor.rows`, and with parse + serialise
fields    fields per record (5..100; every fifth sealed) on a synthetic resource
keystore  clients in the keystore (1k, 10k, 100k; 1M with --big): `KeyRing.prefetch` + `opened` for 50 keys,
          cold (new connection and ring) and warm
policy    rules in policy.csv (tens to thousands): parse + compile, Casbin proof (up to 350 rows; 1,000
          with --big), and `DecisionTable.view` lookups
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from benchmarks.kit import CASELOAD, REPO, Kit, best_of, best_of_async, list_body, open_kit
from proxy.keys.cipher import FieldCipher
from proxy.keys.kek import FileKek
from proxy.keys.ring import KeyRing, wrap_aad
from proxy.keys.store import DataKey, KeyStatus, SqliteKeystore
from proxy.policy.compiler import compile_table, prove
from proxy.policy.decision import ALL_RELATION_SETS, DecisionTable, Relation
from proxy.policy.fieldmap import FieldMap, parse_fieldmap
from proxy.policy.lint import parse_policy
from proxy.redact import Disclosure, Plans, Redactor
from proxy.writes import seal_fields

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("rows", "fields", "keystore", "policy")
NO_PSEUDONYMS: dict[str, str] = {}


async def rows_scaling(kit: Kit) -> list[dict[str, Any]]:
    res = kit.bundle.fieldmap.resources["session_note"]
    notes = kit.data["session-notes"]
    await kit.cipher.prefetch(list_body(notes))
    out = []
    for n in (1, 50, 500):
        rows = notes[:n]
        body = list_body(rows)
        def redact(rows: list[dict[str, Any]] = rows) -> object:
            return kit.redactor().rows(res, rows)

        walk = best_of(redact)

        def full(body: bytes = body) -> bytes:
            doc = orjson.loads(body)
            return orjson.dumps({**doc, "items": kit.redactor().rows(res, doc["items"])})

        whole = best_of(full)
        out.append({"records": n, "body_bytes": len(body), "redact_us": walk, "redact_us_per_record": walk / n,
                    "parse_redact_dump_us": whole, "per_record_us": whole / n})
    return out


def synthetic_map(n_fields: int) -> FieldMap:
    """One resource with `n_fields` fields besides id and client_id; every fifth is sealed."""
    lines = ["version: 1", "classes:", "  reference: {label: N}", "  plain: {label: N}",
             "  secret: {label: R, encrypt: record}", "list_format: {items: items, metadata: [total]}",
             "relations: {resource: thing}", "resources:", "  thing:", "    client: client_id",
             "    record_class: plain", "    fields:", "      id: reference", "      client_id: reference"]
    lines += [f"      f{i}: {'secret' if i % 5 == 4 else 'plain'}" for i in range(n_fields)]
    lines += ["    routes:", "      - GET /things: {list: true}"]
    return parse_fieldmap("\n".join(lines) + "\n")


SYNTHETIC_POLICY = """p2, counsellor, TREAT
p, counsellor, caseload, reference, read, allow
p, counsellor, caseload, plain, read, allow
p, counsellor, caseload, secret, read, allow
"""


async def fields_scaling(kit: Kit) -> list[dict[str, Any]]:
    out = []
    for n in (5, 10, 25, 50, 100):
        fm = synthetic_map(n)
        parsed = parse_policy(SYNTHETIC_POLICY, fm.classes)
        table = compile_table(parsed, fm.classes)
        resource = fm.resources["thing"]
        key = await kit.ring.for_writing("1", "record")
        record = {"id": 1, "client_id": 1, **{f"f{i}": f"value of field {i}, a short sentence" for i in range(n)}}
        sealed = seal_fields(resource, dict(record), fm.classes, {"record": key})
        plans = Plans(fm.classes)

        def walk(sealed: dict[str, Any] = sealed, table: Any = table, plans: Plans = plans,
                 resource: Any = resource, classes: Any = fm.classes) -> object:
            return Redactor(table, "counsellor", lambda _c: CASELOAD, NO_PSEUDONYMS.get, Disclosure(), plans,
                            cipher=FieldCipher(kit.ring)).record(resource, sealed)

        assert walk() == record
        us = best_of(walk)
        out.append({"fields": n + 2, "sealed": n // 5, "us_per_record": us, "us_per_field": us / (n + 2)})
    return out


async def build_keystore(path: Path, kek: FileKek, clients: int) -> list[bytes]:
    """`clients` clients with one record-scope key each, added through SqliteKeystore.add in one transaction."""
    await (await SqliteKeystore.open(path)).close()  # schema, WAL, file mode
    db = await aiosqlite.connect(path, isolation_level=None)
    store = SqliteKeystore(db)
    ids: list[bytes] = []
    now = time.time()
    await db.execute("BEGIN")
    for cid in range(1, clients + 1):
        key_id = os.urandom(16)
        wrapped, kek_id = kek.wrap(os.urandom(32), wrap_aad(key_id, "record"))
        await store.add(DataKey(key_id, str(cid), "record", 1, KeyStatus.ACTIVE, wrapped, kek_id, now))
        ids.append(key_id)
    await db.execute("COMMIT")
    await store.close()
    return ids


async def keystore_scaling(root: Path, big: bool) -> list[dict[str, Any]]:
    from benchmarks.world import PASSPHRASE, make_keys

    keys = make_keys(root / "ks-keys")
    kek = FileKek(keys / "kek.json", PASSPHRASE.encode())
    out = []
    for clients in (1_000, 10_000, 100_000, *((1_000_000,) if big else ())):
        path = keys / f"keystore-{clients}.sqlite3"
        t0 = time.perf_counter()
        ids = await build_keystore(path, kek, clients)
        built = time.perf_counter() - t0
        rng = random.Random(clients)
        cold: list[float] = []
        for _ in range(5):
            wanted = rng.sample(ids, 50)
            ring = KeyRing(await SqliteKeystore.open(path), kek)
            t0 = time.perf_counter()
            await ring.prefetch(wanted)
            assert all(ring.opened(k) is not None for k in wanted)
            cold.append((time.perf_counter() - t0) * 1e6)
            await ring.store.close()
        ring = KeyRing(await SqliteKeystore.open(path), kek)
        wanted = rng.sample(ids, 50)
        await ring.prefetch(wanted)

        async def warm(ring: KeyRing = ring, wanted: list[bytes] = wanted) -> None:
            await ring.prefetch(wanted)
            for k in wanted:
                ring.opened(k)

        warm_us = await best_of_async(warm)
        await ring.store.close()
        out.append({"clients": clients, "build_s": built, "file_mb": path.stat().st_size / 1e6,
                    "cold_50_keys_us_median": statistics.median(cold), "cold_50_keys_us_best": min(cold),
                    "warm_50_keys_us": warm_us})
        path.unlink()
    return out


def synthetic_policy(roles: int, classes: list[str]) -> str:
    """`roles` roles, each with a purpose and one rule per class (relation, action and effect varied)."""
    rels, acts = ("any", "caseload", "supervision", "cover", "self"), ("read", "pseudo", "mask", "write", "delete")
    rows = []
    for r in range(roles):
        rows.append(f"p2, role_{r}, TREAT")
        for i, cls in enumerate(classes):
            effect = "deny" if (r + i) % 11 == 0 else "allow"
            rows.append(f"p, role_{r}, {rels[(r + i) % 5]}, {cls}, {acts[(r * 3 + i) % 5]}, {effect}")
    return "\n".join(rows) + "\n"


def next_view(table: DecisionTable, keys: Iterator[tuple[str, Relation]]) -> object:
    return table.view(*next(keys))


def policy_scaling(big: bool) -> list[dict[str, Any]]:
    fm = parse_fieldmap((REPO / "policies" / "fields.yaml").read_text())
    classes = sorted(fm.classes)
    model = (REPO / "policies" / "model.conf").read_text()
    out = []
    prove_limit = 1000 if big else 350
    for roles in (2, 6, 20, 60, 200, *((600,) if big else ())):
        text = synthetic_policy(roles, classes)
        rows = sum(1 for line in text.splitlines() if line.startswith("p,"))
        t0 = time.perf_counter()
        parsed = parse_policy(text, fm.classes)
        table = compile_table(parsed, fm.classes)
        compiled = time.perf_counter() - t0
        assert not parsed.findings, parsed.findings[:3]
        proof_s: float | None = None
        checks = None
        if rows <= prove_limit:
            t0 = time.perf_counter()
            checks = prove(table, model, text, fm.classes)
            proof_s = time.perf_counter() - t0
        rng = random.Random(roles)
        keys = [(f"role_{rng.randrange(roles)}", rng.choice(ALL_RELATION_SETS)) for _ in range(1024)]
        lookup = best_of(functools.partial(next_view, table, itertools.cycle(keys)))
        out.append({"roles": roles, "rules": rows, "views": len(table.views), "parse_compile_s": compiled,
                    "prove_s": proof_s, "proof_checks": checks, "view_lookup_us": lookup})
    return out


async def run(parts: list[str], big: bool, root: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if "rows" in parts or "fields" in parts:
        kit = await open_kit(root)
        try:
            if "rows" in parts:
                results["rows"] = await rows_scaling(kit)
            if "fields" in parts:
                results["fields"] = await fields_scaling(kit)
        finally:
            await kit.close()
    if "keystore" in parts:
        results["keystore"] = await keystore_scaling(root, big)
    return results


def show(results: dict[str, Any]) -> None:
    titles = {"rows": "records per response (Redactor.rows; and parse + redact + serialise)",
              "fields": "fields per record (synthetic resource, every fifth field sealed)",
              "keystore": "clients in the keystore: KeyRing.prefetch + opened for 50 keys",
              "policy": "rules in policy.csv"}
    for part, rows in results.items():
        print(f"\n== {titles[part]}")
        head = list(rows[0])
        print("  ".join(f"{h:>22}" for h in head))
        for row in rows:
            print("  ".join(f"{_cell(row[h]):>22}" for h in head))


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if v < 10 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0])
    p.add_argument("--big", action="store_true", help="also 1M clients in the keystore and 600 policy roles")
    p.add_argument("--only", help=f"comma-separated, of: {','.join(PARTS)}")
    p.add_argument("--out", type=Path, default=RESULTS / "scaling.json")
    args = p.parse_args(argv)
    parts = args.only.split(",") if args.only else list(PARTS)
    root = Path(tempfile.mkdtemp(prefix="fg-scaling-"))
    try:
        results = asyncio.run(run(parts, args.big, root))
        if "policy" in parts:
            results["policy"] = policy_scaling(args.big)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    show(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

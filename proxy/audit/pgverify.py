"""Reading and verifying the shared trail on PostgreSQL: every replica's chain, the sealed log merging them,
and its signed checkpoints, checked together (`fieldguard audit verify` with a postgresql:// store).

The sealed log is verified as a trail of its own (`verify.verify`: sequence, entry hashes, links and
checkpoints); each replica's chain is re-hashed record by record; and every sealed entry must name a
record its replica still holds with the same hashes, in the replica's order without a gap. So a record
edited, removed, inserted or moved in any replica's chain, an entry forged or reordered in the log, or a
checkpoint re-signed, is found and named. Records the sealer has not reached yet are the unanchored tail.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from proxy.audit.checkpoints import Checkpoint
from proxy.audit.trail import GENESIS, StoredRecord, leaf_hash, link_hash
from proxy.audit.verify import Verdict, verify
from proxy.postgres import blocking, connect


@dataclass(frozen=True, slots=True)
class SharedTrail:
    """The shared trail as read in one transaction."""

    chains: dict[str, list[StoredRecord]]  # each replica's records, in its order
    recorded_at: dict[tuple[str, int], float]
    entries: list[StoredRecord]  # the sealed log
    seals: list[Checkpoint]


def read_shared(url: str) -> SharedTrail:
    async def read() -> SharedTrail:
        conn = await connect(url, "fieldguard-verify")
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                chains: dict[str, list[StoredRecord]] = {}
                at: dict[tuple[str, int], float] = {}
                for r in await conn.fetch("SELECT replica, seq, recorded_at, body, leaf, link FROM audit_records "
                                          "ORDER BY replica, seq"):
                    chains.setdefault(r["replica"], []).append(
                        StoredRecord(int(r["seq"]), bytes(r["body"]), bytes(r["leaf"]), bytes(r["link"])))
                    at[(r["replica"], int(r["seq"]))] = float(r["recorded_at"])
                entries = [StoredRecord(int(r["idx"]), bytes(r["body"]), bytes(r["leaf"]), bytes(r["link"]))
                           for r in await conn.fetch("SELECT idx, body, leaf, link FROM audit_log ORDER BY idx")]
                seals = [Checkpoint(str(r["origin"]), int(r["size"]), bytes(r["head"]), str(r["time"]),
                                    str(r["key_id"]), bytes(r["signature"]))
                         for r in await conn.fetch("SELECT origin, size, head, time, key_id, signature "
                                                   "FROM audit_seals ORDER BY size")]
        finally:
            await conn.close()
        return SharedTrail(chains, at, entries, seals)

    return blocking(read)


def last_seal(url: str) -> Checkpoint | None:
    """The shared trail's last signed checkpoint (a certificate names it)."""

    async def read() -> Checkpoint | None:
        conn = await connect(url, "fieldguard-verify")
        try:
            r = await conn.fetchrow("SELECT origin, size, head, time, key_id, signature FROM audit_seals "
                                    "ORDER BY size DESC LIMIT 1")
        finally:
            await conn.close()
        return None if r is None else Checkpoint(str(r["origin"]), int(r["size"]), bytes(r["head"]), str(r["time"]),
                                                 str(r["key_id"]), bytes(r["signature"]))

    return blocking(read)


def verify_shared(trail: SharedTrail, public: Ed25519PublicKey, anchors: Iterable[Checkpoint] = ()) -> Verdict:
    """The whole service's trail: the sealed log, every chain, and that they agree."""
    log = verify(iter(trail.entries), trail.seals, public, anchors, len(trail.entries))
    verdict = Verdict(ok=log.ok, total=sum(len(c) for c in trail.chains.values()), checkpoints=log.checkpoints,
                      last_checkpoint=log.last_checkpoint, last_checkpoint_time=log.last_checkpoint_time)
    for problem in log.problems:
        verdict.fail(f"sealed log: {problem}", log.first_bad)
    sealed: dict[str, list[tuple[int, int, bytes, bytes]]] = {}  # replica: (entry, rseq, leaf, link)
    for entry in trail.entries[:log.records]:
        content = orjson.loads(entry.body)
        sealed.setdefault(str(content["replica"]), []).append(
            (entry.seq, int(content["rseq"]), bytes.fromhex(content["leaf"]), bytes.fromhex(content["link"])))
    verified = 0
    for replica in sorted(set(trail.chains) | set(sealed)):
        chain = trail.chains.get(replica, [])
        good = _chain(replica, chain, verdict)
        by_seq = {r.seq: r for r in chain}
        for n, (idx, rseq, leaf, link) in enumerate(sealed.get(replica, []), start=1):
            if rseq != n:
                verdict.fail(f"sealed log entry {idx}: names record {rseq} of replica {replica} where record {n} "
                             "belongs (the log was reordered)", idx)
                break
            held = by_seq.get(rseq)
            if held is None:
                verdict.fail(f"replica {replica} record {rseq}: sealed in log entry {idx} but gone from its chain "
                             "(removed after it was sealed)", idx)
                break
            if held.leaf != leaf or held.link != link:
                verdict.fail(f"replica {replica} record {rseq}: does not match log entry {idx} that sealed it "
                             "(edited or replaced after it was sealed)", idx)
                break
        verified += good
    verdict.records = verified if verdict.ok else min(verified, log.records)
    if verdict.ok:
        verdict.last_checkpoint = log.last_checkpoint  # each sealed entry is one replica record
    return verdict


def _chain(replica: str, chain: list[StoredRecord], verdict: Verdict) -> int:
    """Re-hash one replica's chain; the records verified in order before the first bad one."""
    head = GENESIS
    for expected, rec in enumerate(chain, start=1):
        where = f"replica {replica} record {rec.seq}"
        if rec.seq != expected:
            verdict.fail(f"replica {replica}: record {expected} is missing (the next is {rec.seq})")
            return expected - 1
        try:
            content = orjson.loads(rec.body)
        except orjson.JSONDecodeError:
            content = None
        if not isinstance(content, dict) or content.get("seq") != rec.seq:
            verdict.fail(f"{where}: its content is not the record it should be (edited or moved)")
            return expected - 1
        leaf = leaf_hash(rec.body)
        if leaf != rec.leaf:
            verdict.fail(f"{where}: its content does not match its hash (the record was edited)")
            return expected - 1
        head = link_hash(head, leaf)
        if head != rec.link:
            verdict.fail(f"{where}: its link does not follow from record {rec.seq - 1} "
                         "(a record before it was removed, inserted or reordered)")
            return expected - 1
    return len(chain)


def shared_rows(url: str) -> Iterator[tuple[int, object, object]]:
    """Every record of the service, in the order they were recorded (the auditors' views read these)."""
    trail = read_shared(url)
    ordered = sorted(((trail.recorded_at[(replica, rec.seq)], replica, rec) for replica, chain in trail.chains.items()
                      for rec in chain), key=lambda t: (t[0], t[1], t[2].seq))
    for n, (at, _, rec) in enumerate(ordered, start=1):
        yield n, at, rec.body


def export_lines(url: str) -> Iterator[dict[str, Any]]:
    """The shared trail as an export: every replica record, the sealed log, the checkpoints."""
    trail = read_shared(url)
    for replica, chain in sorted(trail.chains.items()):
        for rec in chain:
            yield {"replica": replica, "seq": rec.seq, "body": rec.body.decode(), "leaf": rec.leaf.hex(),
                   "link": rec.link.hex()}
    for entry in trail.entries:
        yield {"log": {"seq": entry.seq, "body": entry.body.decode(), "leaf": entry.leaf.hex(),
                       "link": entry.link.hex()}}
    for cp in trail.seals:
        yield {"checkpoint": cp.as_dict()}


def from_export(lines: Iterable[dict[str, Any]]) -> SharedTrail | None:
    """A shared trail's export read back; None when the export is of a single (SQLite) trail."""
    chains: dict[str, list[StoredRecord]] = {}
    entries: list[StoredRecord] = []
    seals: list[Checkpoint] = []
    shared = False
    for item in lines:
        if "log" in item:
            shared = True
            e = item["log"]
            entries.append(StoredRecord(int(e["seq"]), str(e["body"]).encode(), bytes.fromhex(e["leaf"]),
                                        bytes.fromhex(e["link"])))
        elif "checkpoint" in item:
            seals.append(Checkpoint.from_dict(item["checkpoint"]))
        elif "replica" in item:
            shared = True
            chains.setdefault(str(item["replica"]), []).append(StoredRecord(
                int(item["seq"]), str(item["body"]).encode(), bytes.fromhex(item["leaf"]), bytes.fromhex(item["link"])))
    if not shared:
        return None
    return SharedTrail(chains, {}, entries, seals)

"""Offline verification of the audit trail, from the store or an export, with the auditor's public key.

Every record is re-hashed (not only the checkpoints: immudb's audit mode once reported "consistent" over
tampered values because it checked roots only), sequence numbers must run 1, 2, 3... without gaps, every
link must follow from the one before, every checkpoint must carry a valid signature under the trusted
key and match the chain at its size, and no checkpoint may cover more records than the trail holds. The
first failure is named: the record, or the range of records between two checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from proxy.audit.checkpoints import Checkpoint, key_id
from proxy.audit.trail import GENESIS, StoredRecord, leaf_hash, link_hash


@dataclass(slots=True)
class Verdict:
    ok: bool = True
    records: int = 0  # verified, in order, up to the first bad record (all of them when ok)
    total: int = 0  # records the trail holds
    checkpoints: int = 0
    last_checkpoint: int = 0
    last_checkpoint_time: str = ""  # when the last checkpoint the records reach was signed (ISO 8601, UTC)
    problems: list[str] = field(default_factory=list)
    first_bad: int | None = None  # sequence number of the first record found bad

    @property
    def unanchored(self) -> int:
        """Records after the last signed checkpoint: intact links, but no signature covers them yet."""
        return self.records - self.last_checkpoint

    def fail(self, message: str, seq: int | None = None) -> None:
        self.ok = False
        self.problems.append(message)
        if seq is not None and self.first_bad is None:
            self.first_bad = seq


def read_export(path: Path) -> tuple[list[StoredRecord], list[Checkpoint]]:
    """An export (`fieldguard audit export --format jsonl`): records with their hashes, and checkpoints."""
    records: list[StoredRecord] = []
    checkpoints: list[Checkpoint] = []
    for n, item in lines_of(path):
        if "checkpoint" in item:
            checkpoints.append(_checkpoint(item["checkpoint"], path, n))
        elif {"seq", "body", "leaf", "link"} <= item.keys():
            try:
                records.append(StoredRecord(int(item["seq"]), str(item["body"]).encode(),
                                            bytes.fromhex(item["leaf"]), bytes.fromhex(item["link"])))
            except (TypeError, ValueError):
                raise VerifyInputError(f"{path}:{n}: not a record of an export") from None
        else:
            raise VerifyInputError(f"{path}:{n}: neither a record nor a checkpoint of an export")
    return records, checkpoints


def read_anchors(path: Path) -> list[Checkpoint]:
    """Checkpoints kept elsewhere, from an export or from the SIEM log (its `audit checkpoint` lines; its
    access lines are ignored)."""
    found: list[Checkpoint] = []
    for n, item in lines_of(path):
        if "checkpoint" in item:
            found.append(_checkpoint(item["checkpoint"], path, n))
        elif item.get("event") == "audit checkpoint":
            found.append(_checkpoint(item, path, n))
    if not found:
        raise VerifyInputError(f"{path}: no checkpoint in it to anchor the trail to")
    return found


class VerifyInputError(ValueError):
    """A file given to verify is not what it should be: said, with its line, never a traceback."""


def lines_of(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise VerifyInputError(f"{path}:{n}: not JSON") from None
            if isinstance(item, dict):
                yield n, item


def _checkpoint(data: Any, path: Path, line: int) -> Checkpoint:
    try:
        return Checkpoint.from_dict(data)
    except (KeyError, TypeError, ValueError):
        raise VerifyInputError(f"{path}:{line}: not a checkpoint") from None


def verify(records: Iterator[StoredRecord], checkpoints: list[Checkpoint], public: Ed25519PublicKey,
           anchors: Iterable[Checkpoint] = (), total: int = 0) -> Verdict:
    verdict = Verdict(total=total)
    trusted = key_id(public)
    signed: dict[int, Checkpoint] = {}
    for candidate in [*checkpoints, *anchors]:
        if not candidate.verify(public):
            cp = candidate
            why = "signed by another key" if cp.key_id != trusted else "signature does not verify"
            verdict.fail(f"checkpoint at size {cp.size}: {why} (the trusted key is {trusted})")
            continue
        known = signed.get(candidate.size)
        if known is not None and known.head != candidate.head:
            verdict.fail(f"two validly signed checkpoints at size {candidate.size} disagree: the trail was forked")
        signed[candidate.size] = candidate
    verdict.checkpoints = len(signed)
    head = GENESIS
    expected = 1
    previous_anchor = 0
    for rec in records:
        if rec.seq != expected:
            if rec.seq > expected:
                verdict.fail(f"record {expected} is missing (the next record is {rec.seq})", expected)
            else:
                verdict.fail(f"record {rec.seq} appears again after record {expected - 1}", rec.seq)
            return _finish(verdict, expected - 1, signed)
        try:
            content = json.loads(rec.body)
        except (ValueError, RecursionError):
            content = None
        if not isinstance(content, dict):
            verdict.fail(f"record {rec.seq}: its content is not a JSON record (the record was edited)", rec.seq)
            return _finish(verdict, rec.seq, signed)
        claimed = content.get("seq")
        if claimed != rec.seq:
            verdict.fail(f"record {rec.seq}: its content says it is record {claimed} (records were moved)", rec.seq)
            return _finish(verdict, rec.seq, signed)
        leaf = leaf_hash(rec.body)
        if leaf != rec.leaf:
            verdict.fail(f"record {rec.seq}: its content does not match its hash (the record was edited)", rec.seq)
            return _finish(verdict, rec.seq, signed)
        head = link_hash(head, leaf)
        if head != rec.link:
            verdict.fail(f"record {rec.seq}: its link does not follow from record {rec.seq - 1} "
                         "(a record before it was removed, inserted or reordered)", rec.seq)
            return _finish(verdict, rec.seq, signed)
        anchor = signed.get(rec.seq)
        if anchor is not None:
            if anchor.head != head:
                verdict.fail(f"records {previous_anchor + 1} to {rec.seq} do not match the checkpoint signed at "
                             f"{anchor.time} (rewritten after it was signed)", previous_anchor + 1)
                return _finish(verdict, rec.seq, signed)
            previous_anchor = rec.seq
            verdict.last_checkpoint = rec.seq
            verdict.last_checkpoint_time = anchor.time
        verdict.records = rec.seq
        expected += 1
    return _finish(verdict, verdict.records, signed)


def _finish(verdict: Verdict, seen: int, signed: dict[int, Checkpoint]) -> Verdict:
    verdict.records = max(verdict.records, seen)
    beyond = [size for size in signed if size > verdict.records]
    if beyond and verdict.ok:
        verdict.fail(f"a checkpoint covers {max(beyond)} records but the trail holds {verdict.records} "
                     "(records were removed from its end)", verdict.records + 1)
    return verdict

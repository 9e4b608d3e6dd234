"""Micro-benchmarks: what each gateway step costs per call, in-process, with the project's own code.

    python -m benchmarks.micro [--out benchmarks/results/micro.json]

Data: the example CRM's seed records sealed as the gateway seals them (benchmarks/kit.py); the view is a
counsellor's on her own caseload (every field in clear, every ciphertext opened). µs per call, best of 5.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from benchmarks.kit import CASELOAD, Kit, best_of, best_of_async, list_body, open_kit
from proxy.audit.checkpoints import CheckpointSigner
from proxy.audit.record import AuditRecord
from proxy.audit.siem import JsonLinesTrail
from proxy.audit.trail import DurableTrail, canonical, leaf_hash, link_hash
from proxy.config import IdentitySection
from proxy.identity import TokenVerifier
from proxy.keys.envelope import associated_class, associated_where, is_sealed, open_sealed, parse, record_ref
from proxy.policy.decision import Relation
from proxy.tokens import mint_token

RESULTS = Path(__file__).resolve().parent / "results"


def padded_record(record: dict[str, Any], size: int = 2048) -> dict[str, Any]:
    """The client record with more emergency contacts (same shape) until it is about `size` bytes."""
    out = dict(record)
    contacts = list(out["emergency_contacts"]) or [{"name": "A N Other", "relationship": "friend",
                                                     "phone": "07700 900000"}]
    base = list(contacts)
    while len(orjson.dumps(out)) < size:
        contacts.append(dict(base[len(contacts) % len(base)]))
        out["emergency_contacts"] = contacts
    return out


def audit_record(kit: Kit, rows: list[dict[str, Any]]) -> AuditRecord:
    """The audit record a 50-row list response produces."""
    r = kit.redactor()
    r.rows(kit.bundle.fieldmap.resources["session_note"], rows)
    rec = AuditRecord(request_id="0123456789abcdef01234567", method="GET", user="u:alice", role="counsellor",
                      roles=["counsellor"], purpose="TREAT", token_id="abcdef0123456789", route="/session-notes",
                      status=200, policy=kit.bundle.digest, upstream_status=200, duration_ms=1.234)
    r.d.into(rec, r.summary(), {c: f"P-{int(c):016X}" for c in r.d.clients})
    return rec


def identity(root: Path) -> tuple[TokenVerifier, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    pub = root / "sig.pub.pem"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return TokenVerifier(IdentitySection("https://idp", "aud", public_key_file=str(pub))), pem


def token_costs(root: Path) -> dict[str, float]:
    verifier, pem = identity(root)
    tokens = [mint_token(pem, subject="alice", roles=["counsellor"], issuer="https://idp", audience="aud",
                         purposes=["TREAT"]) for _ in range(1000)]
    verifier.verify(tokens[0])
    hit = best_of(lambda: verifier.verify(tokens[0]))
    miss = float("inf")
    for batch in range(5):  # a token never seen before on every call
        chunk = tokens[batch * 200:(batch + 1) * 200]
        t0 = time.perf_counter()
        for tok in chunk:
            verifier.verify(tok)
        miss = min(miss, (time.perf_counter() - t0) / len(chunk) * 1e6)
    return {"token check, cache hit (TokenVerifier.verify)": hit,
            "token check, cache miss (ES256 signature + claims)": miss}


def commit_costs(directory: Path, rec: AuditRecord, label: str) -> dict[str, float]:
    trail = DurableTrail(directory / "audit.sqlite3", CheckpointSigner(directory / "cp.pem"),
                         siem=JsonLinesTrail(str(directory / "audit.jsonl")))
    trail._open_sync()  # the writer thread's own calls, run here without the event loop
    try:
        encoded = rec.encode()  # done on the event loop before queueing; the writer takes bytes
        one = best_of(lambda: trail._commit_sync([encoded]), min_seconds=0.2)
        batch = best_of(lambda: trail._commit_sync([encoded] * 64), min_seconds=0.2)
    finally:
        trail._close_sync()
    return {f"audit commit, batch of 1 (WAL, synchronous=FULL, {label})": one,
            f"audit commit, batch of 64, per batch ({label})": batch,
            f"audit commit, batch of 64, per record ({label})": batch / 64}


async def measure(kit: Kit, root: Path) -> tuple[dict[str, float], dict[str, Any]]:
    fm = kit.bundle.fieldmap
    client_res, note_res = fm.resources["client"], fm.resources["session_note"]
    alice = {c["id"] for c in kit.data["clients"] if c["counsellor"] == "alice"}
    notes = [n for n in kit.data["session-notes"] if n["client_id"] in alice][:50]
    client = kit.data["clients"][0]
    note = max(notes, key=lambda n: len(orjson.dumps(n)))
    record_2k = orjson.dumps(padded_record(client))
    body_client, body_note, body_list = orjson.dumps(client), orjson.dumps(note), list_body(notes)
    await kit.cipher.prefetch(body_list + body_client)
    sealed = note["body"]
    env = parse(sealed)
    opened = kit.ring.opened(env[1])
    assert opened is not None
    table = kit.bundle.table
    pseudonyms = await kit.ring.pseudonyms([str(c) for c in alice])
    shown_note = kit.redactor().record(note_res, note)
    shown_list = kit.redactor().rows(note_res, notes)
    rec = audit_record(kit, notes)
    out: dict[str, float] = {
        f"parse (orjson.loads) client record, {len(body_client)} B": best_of(lambda: orjson.loads(body_client)),
        f"parse session note, {len(body_note)} B": best_of(lambda: orjson.loads(body_note)),
        f"parse 2 KB record (client record, more contacts), {len(record_2k)} B":
            best_of(lambda: orjson.loads(record_2k)),
        f"parse 50-row list, {len(body_list)} B": best_of(lambda: orjson.loads(body_list)),
        "decide (DecisionTable.view lookup)": best_of(lambda: table.view("counsellor", CASELOAD)),
        f"envelope.parse (base64url decode + split), {len(sealed)}-char ciphertext": best_of(lambda: parse(sealed)),
        "decrypt one field (parse + open_sealed, cached AESGCM)":
            best_of(lambda: open_sealed(opened.aead, parse(sealed), "session_note", "body", "clinical_notes",
                                        record_ref(note.get("id")))),
        "decrypt one field (FieldCipher.open: key checks + open)":
            best_of(lambda: kit.cipher.open(sealed, str(note["client_id"]), "record",
                                            associated_where("session_note", "body"),
                                            associated_class(associated_where("session_note", "body"),
                                                             "clinical_notes"), record_ref(note.get("id")), set())),
        "pseudonym, KeyRing.pseudonyms after the first (async, cached)":
            await best_of_async(lambda: kit.ring.pseudonyms(["1"])),
        "pseudonym, per field (dict lookup)": best_of(lambda: pseudonyms.get("1")),
        "Redactor.record, session note (4 fields opened)": best_of(lambda: kit.redactor().record(note_res, note)),
        "Redactor.record, client record (1 field opened)":
            best_of(lambda: kit.redactor().record(client_res, client)),
        "Redactor.rows, 50-row list (200 fields opened), per list":
            best_of(lambda: kit.redactor().rows(note_res, notes)),
        "Redactor.record, client record, service manager's view (pseudonym, nothing opened)":
            best_of(lambda: kit.redactor("service_manager", Relation.ANY, pseudonyms).record(client_res, client)),
        "serialise (orjson.dumps) redacted session note": best_of(lambda: orjson.dumps(shown_note)),
        "serialise redacted 50-row list": best_of(lambda: orjson.dumps({"items": shown_list, "total": 50})),
        "audit record build (as_dict + canonical + leaf/link hash), 50-row list":
            best_of(lambda: link_hash(bytes(32), leaf_hash(canonical(rec.as_dict())))),
        "  of which AuditRecord.as_dict": best_of(rec.as_dict),
        **token_costs(root),
    }
    shapes = {"list_bytes": len(body_list), "sealed_fields_per_row": sum(is_sealed(v) for v in note.values()),
              "audit_record_bytes": len(canonical(rec.as_dict())), "audit_record": rec}
    return out, shapes


async def in_kit(root: Path) -> tuple[dict[str, float], dict[str, Any]]:
    kit = await open_kit(root)
    try:
        return await measure(kit, root)
    finally:
        await kit.close()


def run() -> tuple[dict[str, float], dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix="fg-micro-"))
    shm = Path(tempfile.mkdtemp(prefix="fg-micro-", dir="/dev/shm")) if Path("/dev/shm").is_dir() else None
    try:
        out, shapes = asyncio.run(in_kit(root))
        rec = shapes.pop("audit_record")
        disk = root / "commit-disk"
        disk.mkdir()
        out.update(commit_costs(disk, rec, "temp dir on disk"))
        if shm is not None:
            out.update(commit_costs(shm, rec, "tmpfs"))
        return out, shapes
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.micro", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS / "micro.json")
    args = p.parse_args(argv)
    results, shapes = run()
    width = max(len(k) for k in results)
    print(f"{'operation':<{width}}  µs/op (best of 5)")
    for name, us in results.items():
        print(f"{name:<{width}}  {us:10.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"python": platform.python_version(), "shapes": shapes, "us_per_op": results},
                                   indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

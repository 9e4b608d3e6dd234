"""Every target must answer correctly before it is measured.

Pass-through targets (direct, nginx, pass-*) must return the CRM's bytes unchanged. FieldGuard must
return, for alice on her own caseload, exactly the CRM's document with every ciphertext opened: the
harness opens them itself from the keystore (proxy.keys.ring / proxy.keys.envelope) and compares.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

from benchmarks.targets import Target
from benchmarks.world import NOTE_PATCH, PER_PAGE, World, settings_for
from proxy.keys.envelope import is_sealed, key_id_of, open_sealed, parse, record_ref

RESOURCE_OF = {"clients": "client", "session-notes": "session_note"}


def fetch(url: str, method: str = "GET", body: bytes | None = None, token: str = "") -> tuple[int, bytes]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["content-type"] = "application/json"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)  # noqa: S310 (loopback)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


async def _open_all(w: World, docs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Each ciphertext's plaintext, opened with the keystore's keys (top-level fields: that is this map)."""
    from proxy.keys.custody import open_kek, open_keyring
    from proxy.policy import load_fieldmap

    settings = settings_for(w.root, w.keys, w.policies, w.crm_url)
    fm = load_fieldmap(w.policies / "fields.yaml")
    ring = await open_keyring(settings.keys, open_kek(settings.keys))
    try:
        sealed = [(res, doc, k, v) for res, doc in docs for k, v in doc.items() if is_sealed(v)]
        await ring.prefetch(kid for _, _, _, v in sealed if (kid := key_id_of(v)) is not None)
        out: dict[str, Any] = {}
        for res, doc, path, value in sealed:
            env = parse(value)
            opened = ring.opened(env[1])
            if opened is None:
                raise AssertionError(f"no key for a {res}.{path} ciphertext")
            resource = fm.resources[res]
            spec = next(s for s in resource.specs if s.path == path)
            rid = record_ref(doc.get(resource.record_id)) if resource.record_id else None
            out[value] = open_sealed(opened.aead, env, res, path, spec.class_for(doc), rid)
        return out
    finally:
        await ring.store.close()


def _opened(doc: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    return {k: plain[v] if is_sealed(v) else v for k, v in doc.items()}


def expectations(w: World) -> dict[str, Any]:
    """The CRM's own answers (bytes) and what FieldGuard should make of them."""
    _, record = fetch(w.crm_url + w.loads.record)
    _, listing = fetch(w.crm_url + w.loads.listing)
    rec_doc, list_doc = json.loads(record), json.loads(listing)
    items = list_doc["items"]
    if len(items) != PER_PAGE:
        raise AssertionError(f"the list route gives {len(items)} rows, not {PER_PAGE}")
    sealed = sum(1 for row in items for v in row.values() if is_sealed(v))
    plain = asyncio.run(_open_all(w, [("client", rec_doc), *(("session_note", row) for row in items)]))
    return {
        "record": record, "listing": listing, "sealed_per_row": sealed / len(items),
        "record_fg": _opened(rec_doc, plain),
        "listing_fg": {**list_doc, "items": [_opened(row, plain) for row in items]},
        "record_bytes": len(record), "listing_bytes": len(listing),
    }


def check_reads(t: Target, w: World, exp: dict[str, Any]) -> None:
    """Raise AssertionError with what differs."""
    for load, path in (("record", w.loads.record), ("listing", w.loads.listing)):
        status, body = fetch(t.url + path, token=w.token)
        if status != 200:
            raise AssertionError(f"{t.name} {path}: status {status}: {body[:200]!r}")
        if t.kind != "fieldguard":
            if body != exp[load]:
                raise AssertionError(f"{t.name} {path}: body differs from the CRM's "
                                     f"({len(body)} vs {len(exp[load])} B)")
            continue
        got = json.loads(body)
        if got != exp[f"{load}_fg"]:
            raise AssertionError(f"{t.name} {path}: not the CRM's document with its ciphertexts opened")
        if b'"fg1.' in body:
            raise AssertionError(f"{t.name} {path}: a ciphertext was passed on")


def check_write(t: Target, w: World, reference: bytes | None) -> bytes:
    """PATCH the benchmark's note once; pass-through targets must answer what the CRM answered."""
    body = json.dumps(NOTE_PATCH).encode()
    status, answer = fetch(t.url + w.loads.write, "PATCH", body, w.token)
    if status != 200:
        raise AssertionError(f"{t.name} PATCH {w.loads.write}: status {status}: {answer[:200]!r}")
    if t.kind != "fieldguard":
        if reference is not None and answer != reference:
            raise AssertionError(f"{t.name} PATCH: answer differs from the CRM's")
        return answer
    if json.loads(answer).get("summary") != NOTE_PATCH["summary"]:
        raise AssertionError(f"{t.name} PATCH: the answer does not show the written summary in clear")
    _, stored = fetch(w.crm_url + w.loads.write)
    if not is_sealed(json.loads(stored).get("summary")):
        raise AssertionError(f"{t.name} PATCH: the CRM holds the summary in plaintext")
    return answer


def check_all(targets: dict[str, Target], w: World) -> dict[str, Any]:
    """Check every started target; a target that fails is marked skipped with the reason."""
    exp = expectations(w)
    _, reference = fetch(w.crm_url + w.loads.write, "PATCH", json.dumps(NOTE_PATCH).encode())
    for t in sorted(targets.values(), key=lambda x: x.kind == "fieldguard"):  # plaintext writes first
        if t.skipped:
            continue
        try:
            check_reads(t, w, exp)
            check_write(t, w, reference)
        except AssertionError as exc:
            t.skipped = f"incorrect answer: {exc}"
        print(f"  {t.name:<15} {'ok' if not t.skipped else t.skipped}", flush=True)
    return {k: exp[k] for k in ("sealed_per_row", "record_bytes", "listing_bytes")}

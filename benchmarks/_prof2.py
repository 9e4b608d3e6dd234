import asyncio, tempfile, time, timeit
from pathlib import Path
import orjson
from benchmarks.kit import open_kit
from proxy.audit import Disclosure
async def main():
    root = Path(tempfile.mkdtemp())
    kit = await open_kit(root)
    fm = kit.bundle.fieldmap
    note_res = fm.resources["session_note"]
    alice = {c["id"] for c in kit.data["clients"] if c["counsellor"] == "alice"}
    notes = [n for n in kit.data["session-notes"] if n["client_id"] in alice][:50]
    body = orjson.dumps({"items": notes})
    r = kit.redactor(); await r.cipher.prefetch(body); r.rows(note_res, notes)
    c = r.cipher; d = Disclosure()
    n = notes[0]
    def t(f, k=20000): return min(timeit.repeat(f, number=k, repeat=7))/k*1e6
    print("open body", t(lambda: c.open(n["body"], str(n["client_id"]), "session_note", "body", "clinical_notes", d)))
    print("open risk", t(lambda: c.open(n["risk"], str(n["client_id"]), "session_note", "risk", "safeguarding", d)))
    print("record", t(lambda: r.record(note_res, n)))
    print("rows", t(lambda: kit.redactor().rows(note_res, notes), 200))
    plain = r.rows(note_res, notes)
    print("rows plain (nothing sealed)", t(lambda: kit.redactor().rows(note_res, plain), 500))
    print({k: (len(v) if isinstance(v, str) else v) for k, v in n.items()})
    await kit.close()
asyncio.run(main())

"""Write ``db.json`` for json-server 0.17.4: the example CRM seed data in json-server's flat camelCase.

This stands in for a CRM nobody here wrote. Only the first 40 clients and their records are kept.
Run from anywhere: ``python examples/json-server/make_db.py [--out PATH]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
N_CLIENTS = 40

Record = dict[str, Any]


def build(data: dict[str, list[Record]], n_clients: int = N_CLIENTS) -> dict[str, list[Record]]:
    """Map the seed records (as from ``examples.crm.seed.generate()``) to json-server collections."""
    clients = [c for c in data["clients"] if c["id"] <= n_clients]
    keep = {c["id"] for c in clients}
    return {
        "clients": [
            {
                "id": c["id"],
                "caseRef": c["case_number"],
                "firstName": c["name"]["first"],
                "lastName": c["name"]["last"],
                "dob": c["date_of_birth"],
                "email": c["email"],
                "phone": c["phone"],
                "addressLine": f"{c['address']['line1']}, {c['address']['town']}",
                "postcode": c["address"]["postcode"],
                "gpName": c["gp"]["name"],
                "gpPractice": c["gp"]["surgery"],
                "heardAbout": c["referral_source"],
                "counsellor": c["counsellor"],
                "category": c["category"],
                "status": c["status"],
            }
            for c in clients
        ],
        "staff": [
            {"id": s["username"], "name": s["name"], "role": s["role"], "supervisor": s["supervisor"]}
            for s in data["staff"]
        ],
        "notes": [
            {
                "id": n["id"],
                "clientId": n["client_id"],
                "author": n["author"],
                "date": n["session_date"],
                "summary": n["summary"],
                "text": n["body"],
            }
            for n in data["session-notes"]
            if n["client_id"] in keep
        ],
        "appointments": [
            {
                "id": a["id"],
                "clientId": a["client_id"],
                "counsellor": a["counsellor"],
                "start": a["starts_at"],
                "minutes": a["duration_minutes"],
                "status": a["status"],
            }
            for a in data["appointments"]
            if a["client_id"] in keep
        ],
    }


def main(argv: list[str] | None = None) -> None:
    """Generate the seed data and write it as json-server's database file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=HERE / "db.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE.parents[1]))  # the repository root, for examples.crm
    from examples.crm.seed import generate

    db = build(generate())
    args.out.write_bytes(orjson.dumps(db, option=orjson.OPT_INDENT_2) + b"\n")
    counts = ", ".join(f"{len(rows)} {name}" for name, rows in db.items())
    print(f"wrote {args.out} ({counts})")


if __name__ == "__main__":
    main()

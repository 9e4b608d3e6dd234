"""Run the example CRM: ``python -m examples.crm --db PATH [--port 8100] [--host 127.0.0.1] [--no-seed]
[--staff-only]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn

from examples.crm.app import create_app, open_db
from examples.crm.seed import seed


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, seed a new or empty database when asked, and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m examples.crm", description="Example counselling CRM.")
    parser.add_argument("--db", required=True, help="SQLite file (created if missing)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument(
        "--seed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fill a new or empty database with fake data (default: on)",
    )
    parser.add_argument("--staff-only", action="store_true",
                        help="seed only the staff directory: a service with no client records yet")
    args = parser.parse_args(argv)

    Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    conn = open_db(args.db)
    try:
        empty = (
            conn.execute("SELECT (SELECT COUNT(*) FROM staff) + (SELECT COUNT(*) FROM clients)").fetchone()[0]
            == 0
        )
        if args.seed and empty:
            seed(conn, only=("staff",) if args.staff_only else None)
    finally:
        conn.close()

    print(f"example CRM on http://{args.host}:{args.port} (db {args.db})", file=sys.stderr, flush=True)
    uvicorn.run(create_app(args.db), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

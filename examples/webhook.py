"""A webhook receiver for FieldGuard's break-glass alerts, for the demo and for trying an alert route.

    python -m examples.webhook --port 8200 --out alerts.jsonl

Each POSTed JSON alert is appended to `--out` as one line and summarised on stdout. In production the
alert goes to the service's own channel (a chat webhook, an incident tool, the DPO's mailbox gateway);
`cases.alert_url` and `cases.alert_headers` in fieldguard.toml point there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MAX_BYTES = 64 * 1024


def handler(out: Path | None) -> type[BaseHTTPRequestHandler]:
    class Alerts(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            try:
                alert: Any = json.loads(self.rfile.read(min(length, MAX_BYTES)))
            except ValueError:
                self.send_response(400)
                self.end_headers()
                return
            if out is not None:
                with out.open("a") as f:
                    f.write(json.dumps(alert, sort_keys=True) + "\n")
            if isinstance(alert, dict):
                print(f"webhook: {alert.get('event')} {alert.get('grant')} by {alert.get('user')} "
                      f"({alert.get('role')}) for {alert.get('client')}: {alert.get('reason')}, "
                      f"until {alert.get('expires_at')}", flush=True)
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Alerts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--out", type=Path, default=None, help="append each alert here as a JSON line")
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), handler(args.out))
    print(f"webhook: listening on http://{args.host}:{args.port}/", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A small CRM whose need-to-know facts can be broken and mended while it runs, as its own process.

Clients 1 to 4, each with one session note; `POST /_control` sets who counsels whom, how the staff
list (the supervision facts) answers (`ok`, `fail`: 500, `garbage`: not a list), and how long a note
list or a new note takes (`delay`, seconds: requests that must overlap at the gateway, do);
`GET /_control` says how many note requests have arrived (counted before the delay). The records themselves
keep being served either way, as a CRM whose one endpoint has gone wrong would.
`python -m tests.upstreams.switchable PORT`.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

STATE: dict[str, Any] = {"relations": "ok", "delay": 0.0, "written": [], "arrived": 0,
                         "counsellor": {1: "alice", 2: "bob", 3: "alice", 4: "bob"}}


def _client(cid: int) -> dict[str, Any]:
    return {"id": cid, "case_number": f"FG-{cid}", "name": {"first": f"First{cid}", "last": f"Last{cid}"},
            "counsellor": STATE["counsellor"][cid], "status": "active"}


def _note(cid: int) -> dict[str, Any]:
    return {"id": 100 + cid, "client_id": cid, "author": STATE["counsellor"][cid], "session_date": "2026-11-01",
            "summary": f"summary {cid}", "body": f"note body {cid}"}


def _page(rows: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"items": rows, "total": len(rows), "page": 1, "per_page": 500})


async def staff(_: Request) -> Response:
    mode = STATE["relations"]
    if mode == "fail":
        return JSONResponse({"detail": "staff directory unavailable"}, status_code=500)
    if mode == "garbage":
        return JSONResponse({"items": "not a list"})
    return _page([{"username": u, "supervisor": "carol"} for u in ("alice", "bob")])


async def clients(_: Request) -> Response:
    return _page([_client(c) for c in sorted(STATE["counsellor"])])


async def client(request: Request) -> Response:
    cid = int(request.path_params["cid"])
    if cid not in STATE["counsellor"]:
        return JSONResponse({"detail": "not found"}, status_code=404)
    return JSONResponse(_client(cid))


async def notes(request: Request) -> Response:
    cid = int(request.path_params["cid"])
    STATE["arrived"] += 1  # counted before the delay: a test can wait until a request is in flight here
    if STATE["delay"]:
        await asyncio.sleep(STATE["delay"])
    if request.method == "POST":  # stored as sent (ciphertext and all), after the same delay
        note = {**await request.json(), "id": 1000 + len(STATE["written"]), "client_id": cid}
        STATE["written"].append(note)
        return JSONResponse(note, status_code=201)
    return _page([_note(cid)] if cid in STATE["counsellor"] else [])


async def control(request: Request) -> Response:
    if request.method == "GET":
        return JSONResponse({"arrived": STATE["arrived"]})
    body = await request.json()
    if "relations" in body:
        STATE["relations"] = body["relations"]
    if "delay" in body:
        STATE["delay"] = float(body["delay"])
    for cid, who in (body.get("assign") or {}).items():
        STATE["counsellor"][int(cid)] = who
    return JSONResponse({"relations": STATE["relations"]})


async def health(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[
    Route("/health", health), Route("/staff", staff), Route("/clients", clients),
    Route("/clients/{cid:int}", client), Route("/clients/{cid:int}/session-notes", notes, methods=["GET", "POST"]),
    Route("/_control", control, methods=["GET", "POST"]),
])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")

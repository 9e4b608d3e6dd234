"""A CRM that misbehaves on purpose, run as its own process: wrong content types, malformed JSON,
slowness, errors. `python -m tests.upstreams.misbehaving PORT`."""

from __future__ import annotations

import asyncio
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

CLIENT = {"id": 1, "case_number": "FG-1", "name": {"first": "Ada", "last": "Test"}, "email": "ada@example.org",
          "counsellor": "alice", "category": "adult", "status": "active", "secret_new_field": "leak"}


async def staff(_: Request) -> Response:
    return JSONResponse({"items": [{"username": "alice", "supervisor": "carol"}], "total": 1, "page": 1,
                         "per_page": 500})


async def clients(request: Request) -> Response:
    rows = [{**CLIENT, "id": i} for i in range(1, 11)]
    return JSONResponse({"items": rows, "total": len(rows), "page": 1, "per_page": 500, "debug_sql": "SELECT"})


async def client(request: Request) -> Response:
    cid = int(request.path_params["cid"])
    if cid == 2:
        return Response("<html>Ada Test</html>", media_type="text/html")
    if cid == 3:
        return Response(b'{"id": 3, "name": ', media_type="application/json")
    if cid == 4:
        await asyncio.sleep(3)  # past the gateway's 1 s timeout; short, so that stopping this server is quick
    if cid == 5:
        return JSONResponse({"detail": "database exploded at row Ada Test"}, status_code=500)
    if cid == 6:
        return JSONResponse([CLIENT])
    if cid == 7:
        return JSONResponse({**CLIENT, "id": 7, "name": "Ada Test"})  # an object where the map expects one
    if cid == 8:
        return JSONResponse({"detail": "client Ada Test not found"}, status_code=404)
    if cid == 9:  # what the CRM received, echoed in a field the caller may read
        return JSONResponse({**CLIENT, "id": 9, "email": dict(request.headers), "phone": request.url.path})
    if cid == 10:
        return JSONResponse({**CLIENT, "id": 10, "email": "x" * 300_000})
    return JSONResponse({**CLIENT, "id": cid})


async def health(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[
    Route("/health", health), Route("/staff", staff), Route("/clients", clients), Route("/clients/{cid:int}", client),
])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")

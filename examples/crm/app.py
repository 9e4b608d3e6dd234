"""A small counselling CRM: the upstream FieldGuard sits in front of.

It knows nothing of any gateway. Each resource lives in its own SQLite table with one column per
top-level field. Values are not type-checked beyond JSON shape, so any field may hold any JSON value
(the gateway stores ciphertext strings such as ``"fg1.AbC..."`` where a number or object normally sits).

Storage keeps the JSON type in SQLite's storage class so every value round-trips exactly:
strings are TEXT, integers INTEGER, floats REAL, null NULL, and objects, arrays and booleans are
BLOBs holding their JSON text. Columns are declared without a type, so SQLite never converts them.
"""

# ruff: noqa: S608  (table and column names are fixed constants, values are always bound parameters)

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

MAX_PER_PAGE = 500
MAX_PAGE = 10**9
DEFAULT_PER_PAGE = 50
MAX_FILTER_VALUES = 5000
_INT_RE = re.compile(r"-?[0-9]+")
_INT64 = 2**63


@dataclass(frozen=True)
class Resource:
    """One collection: its URL segment, table, key column, other fields and list filters."""

    name: str
    table: str
    fields: tuple[str, ...]
    filters: tuple[str, ...]
    key: str = "id"

    @property
    def columns(self) -> tuple[str, ...]:
        """The key column followed by the other fields, in response order."""
        return (self.key, *self.fields)

    @property
    def child(self) -> bool:
        """Whether each record belongs to a client."""
        return "client_id" in self.fields


STAFF = Resource("staff", "staff", ("name", "role", "supervisor"), ("role", "username"), key="username")
CLIENTS = Resource(
    "clients",
    "clients",
    (
        "case_number",
        "name",
        "date_of_birth",
        "address",
        "email",
        "phone",
        "gp",
        "referral_source",
        "counsellor",
        "category",
        "status",
        "opened",
        "closed",
        "emergency_contacts",
    ),
    ("id", "counsellor", "category", "status"),
)
CHILDREN: tuple[Resource, ...] = (
    Resource(
        "appointments",
        "appointments",
        ("client_id", "counsellor", "starts_at", "duration_minutes", "location", "status"),
        ("id", "client_id", "counsellor", "status"),
    ),
    Resource(
        "session-notes",
        "session_notes",
        ("client_id", "author", "session_date", "summary", "body", "risk"),
        ("id", "client_id", "author"),
    ),
    Resource(
        "process-notes",
        "process_notes",
        ("client_id", "author", "written_at", "body", "supervision_due"),
        ("id", "client_id", "author"),
    ),
    Resource(
        "feedback",
        "feedback",
        ("client_id", "submitted_at", "rating", "comments"),
        ("id", "client_id"),
    ),
    Resource(
        "letters",
        "letters",
        ("client_id", "sent_on", "recipient", "subject", "body", "third_party"),
        ("id", "client_id", "third_party"),
    ),
    Resource(
        "communications",
        "communications",
        ("client_id", "at", "channel", "direction", "party", "summary", "body", "third_party"),
        ("id", "client_id", "third_party"),
    ),
)
RESOURCES: dict[str, Resource] = {r.name: r for r in (STAFF, CLIENTS, *CHILDREN)}


class ApiError(Exception):
    """An error answered as ``{"detail": ...}`` with the given status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class JSONResponse(Response):
    """A response serialised with orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        """Serialise ``content`` to JSON bytes."""
        return orjson.dumps(content)


def to_db(value: Any) -> Any:
    """Map a JSON value to the SQLite value that stores it without loss."""
    if value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and -_INT64 <= value < _INT64:
        return value
    return orjson.dumps(value)


def from_db(value: Any) -> Any:
    """Inverse of :func:`to_db`."""
    return orjson.loads(value) if isinstance(value, bytes) else value


def _q(name: str) -> str:
    """Quote an SQL identifier (all names here are fixed, never user input)."""
    return '"' + name + '"'


def init_schema(conn: sqlite3.Connection) -> None:
    """Create the tables and indexes if they do not exist."""
    for res in RESOURCES.values():
        key = '"username" TEXT PRIMARY KEY' if res is STAFF else '"id" INTEGER PRIMARY KEY AUTOINCREMENT'
        cols = ", ".join([key, *(_q(f) for f in res.fields)])
        conn.execute(f"CREATE TABLE IF NOT EXISTS {_q(res.table)} ({cols})")
        if res.child:
            conn.execute(f"CREATE INDEX IF NOT EXISTS {res.table}_client ON {_q(res.table)} (client_id)")
    conn.execute("CREATE INDEX IF NOT EXISTS clients_counsellor ON clients (counsellor)")
    if conn.in_transaction:
        conn.commit()


def open_db(path: str) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode with WAL journaling and the schema in place."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    init_schema(conn)
    return conn


def filter_candidates(token: str) -> list[Any]:
    """The stored values a query-string token matches exactly: the string, and an int or bool it spells."""
    out: list[Any] = [token]
    if _INT_RE.fullmatch(token) and -_INT64 <= int(token) < _INT64:
        out.append(int(token))
    if token in ("true", "false"):
        out.append(orjson.dumps(token == "true"))
    return out


def case_number(record_id: int, opened: Any) -> str:
    """``FG-<year>-<id>``, the year taken from ``opened`` when it is a date, else today."""
    year = date.today().year
    if isinstance(opened, str):
        with contextlib.suppress(ValueError):
            year = date.fromisoformat(opened[:10]).year
    return f"FG-{year}-{record_id:04d}"


class Store:
    """One shared connection guarded by a lock; every call is a short synchronous transaction."""

    def __init__(self, path: str) -> None:
        self.conn = open_db(path)
        self.lock = threading.Lock()

    def close(self) -> None:
        """Close the connection."""
        with self.lock:
            self.conn.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock inside one write transaction, rolled back on any error."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    @staticmethod
    def _row(res: Resource, row: tuple[Any, ...]) -> dict[str, Any]:
        return {col: from_db(v) for col, v in zip(res.columns, row, strict=True)}

    def _get(self, res: Resource, key: Any) -> dict[str, Any] | None:
        cols = ", ".join(_q(c) for c in res.columns)
        row = self.conn.execute(
            f"SELECT {cols} FROM {_q(res.table)} WHERE {_q(res.key)} = ?", (key,)
        ).fetchone()
        return None if row is None else self._row(res, row)

    def _require_client(self, client_id: Any) -> None:
        if type(client_id) is not int or self._get(CLIENTS, client_id) is None:
            raise ApiError(422, "client_id must refer to an existing client")

    def get(self, res: Resource, key: Any) -> dict[str, Any] | None:
        """One record by key, or None."""
        with self.lock:
            return self._get(res, key)

    def client_exists(self, client_id: int) -> bool:
        """Whether the client exists."""
        return self.get(CLIENTS, client_id) is not None

    def find(
        self, res: Resource, filters: list[tuple[str, list[Any]]], page: int, per_page: int
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of records matching every filter (each an any-of list), and the total count."""
        where = " AND ".join(f"{_q(col)} IN ({', '.join('?' * len(vals))})" for col, vals in filters)
        where_sql = f" WHERE {where}" if where else ""
        params = [v for _, vals in filters for v in vals]
        cols = ", ".join(_q(c) for c in res.columns)
        with self.lock:
            (total,) = self.conn.execute(
                f"SELECT COUNT(*) FROM {_q(res.table)}{where_sql}", params
            ).fetchone()
            rows = self.conn.execute(
                f"SELECT {cols} FROM {_q(res.table)}{where_sql} ORDER BY rowid LIMIT ? OFFSET ?",
                [*params, per_page, (page - 1) * per_page],
            ).fetchall()
        return [self._row(res, r) for r in rows], int(total)

    def insert(self, res: Resource, values: dict[str, Any]) -> dict[str, Any]:
        """Create a record (id assigned here) and return it."""
        with self._tx() as conn:
            if res.child:
                self._require_client(values.get("client_id"))
            cols = [f for f in res.fields if f in values]
            if cols:
                sql = (
                    f"INSERT INTO {_q(res.table)} ({', '.join(_q(c) for c in cols)}) "
                    f"VALUES ({', '.join('?' * len(cols))})"
                )
                cur = conn.execute(sql, [to_db(values[c]) for c in cols])
            else:
                cur = conn.execute(f"INSERT INTO {_q(res.table)} DEFAULT VALUES")
            new_id = cur.lastrowid
            if res is CLIENTS and values.get("case_number") is None:
                number = case_number(int(new_id or 0), values.get("opened"))
                conn.execute("UPDATE clients SET case_number = ? WHERE id = ?", (number, new_id))
            record = self._get(res, new_id)
        assert record is not None
        return record

    def update(
        self, res: Resource, key: int, values: dict[str, Any], *, partial: bool
    ) -> dict[str, Any] | None:
        """PATCH (``partial``) merges top-level fields; PUT replaces them. None if the record is missing.

        A PUT without ``case_number`` (clients) or ``client_id`` (sub-records) keeps the stored value.
        """
        with self._tx() as conn:
            if self._get(res, key) is None:
                return None
            if partial:
                new = values
            else:
                kept = {"case_number", "client_id"}
                new = {f: values.get(f) for f in res.fields if f in values or f not in kept}
            if res.child and "client_id" in new:
                self._require_client(new["client_id"])
            if new:
                sets = ", ".join(f"{_q(c)} = ?" for c in new)
                conn.execute(
                    f"UPDATE {_q(res.table)} SET {sets} WHERE id = ?",
                    [*(to_db(v) for v in new.values()), key],
                )
            return self._get(res, key)

    def delete(self, res: Resource, key: int) -> bool:
        """Delete a record (a client with all its sub-records); False if it was missing."""
        with self._tx() as conn:
            if res is CLIENTS:
                for child in CHILDREN:
                    conn.execute(f"DELETE FROM {_q(child.table)} WHERE client_id = ?", (key,))
            cur = conn.execute(f"DELETE FROM {_q(res.table)} WHERE {_q(res.key)} = ?", (key,))
            return cur.rowcount > 0


def _pdf_text(text: str) -> bytes:
    """Escape text for a PDF string literal (Latin-1, one line)."""
    text = " ".join(text.split())[:200]
    text = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return text.encode("latin-1", errors="replace")


def make_pdf(title: str) -> bytes:
    """A tiny one-page PDF 1.4 showing ``title``."""
    content = b"BT /F1 14 Tf 72 770 Td (" + _pdf_text(title) + b") Tj ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "invalid JSON") from None


def _fields(res: Resource, body: Any, *, own_id: int | None = None) -> dict[str, Any]:
    """Check a request body against the resource's fields; ``id`` may only repeat the record's own id."""
    if not isinstance(body, dict):
        raise ApiError(422, "request body must be a JSON object")
    for name in body:
        if name == "id":
            if own_id is None or type(body["id"]) is not int or body["id"] != own_id:
                raise ApiError(422, "id is assigned by the CRM")
        elif name not in res.fields:
            raise ApiError(422, f"unknown field: {name}")
    return {k: v for k, v in body.items() if k != "id"}


def _paging(request: Request, res: Resource) -> tuple[list[tuple[str, list[Any]]], int, int]:
    """Parse ``page``, ``per_page`` and the resource's filters; unknown parameters are refused."""
    page, per_page = 1, DEFAULT_PER_PAGE
    tokens: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        if name == "page":
            if not _INT_RE.fullmatch(value) or not 1 <= int(value) <= MAX_PAGE:
                raise ApiError(400, "page must be a positive integer")
            page = int(value)
        elif name == "per_page":
            if not _INT_RE.fullmatch(value) or not 1 <= int(value) <= MAX_PER_PAGE:
                raise ApiError(400, f"per_page must be an integer from 1 to {MAX_PER_PAGE}")
            per_page = int(value)
        elif name in res.filters:
            tokens.setdefault(name, []).extend(value.split(","))
        else:
            raise ApiError(400, f"unknown query parameter: {name}")
    if sum(len(t) for t in tokens.values()) > MAX_FILTER_VALUES:
        raise ApiError(400, "too many filter values")
    filters = [(col, [c for t in toks for c in filter_candidates(t)]) for col, toks in tokens.items()]
    return filters, page, per_page


Endpoint = Callable[[Request], Awaitable[Response]]


def _listing(store: Store, res: Resource, request: Request, client_id: int | None = None) -> Response:
    filters, page, per_page = _paging(request, res)
    if client_id is not None:
        filters.append(("client_id", [client_id]))
    items, total = store.find(res, filters, page, per_page)
    return JSONResponse({"items": items, "total": total, "page": page, "per_page": per_page})


def _collection(store: Store, res: Resource) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        if request.method == "POST":
            return JSONResponse(store.insert(res, _fields(res, await _json_body(request))), status_code=201)
        return _listing(store, res, request)

    return endpoint


def _item(store: Store, res: Resource) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        key = request.path_params["key"]
        if request.method == "DELETE":
            if not store.delete(res, key):
                raise ApiError(404, f"{res.name} {key} not found")
            return Response(status_code=204)
        if request.method in ("PUT", "PATCH"):
            values = _fields(res, await _json_body(request), own_id=key)
            record = store.update(res, key, values, partial=request.method == "PATCH")
        else:
            record = store.get(res, key)
        if record is None:
            raise ApiError(404, f"{res.name} {key} not found")
        return JSONResponse(record)

    return endpoint


def _nested(store: Store, res: Resource) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        client_id = request.path_params["client_id"]
        if not store.client_exists(client_id):
            raise ApiError(404, f"clients {client_id} not found")
        if request.method == "POST":
            values = _fields(res, await _json_body(request))
            body_id = values.get("client_id", client_id)
            if type(body_id) is not int or body_id != client_id:
                raise ApiError(422, "client_id in the body does not match the path")
            return JSONResponse(store.insert(res, {**values, "client_id": client_id}), status_code=201)
        return _listing(store, res, request, client_id)

    return endpoint


def _staff_item(store: Store) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        username = request.path_params["username"]
        record = store.get(STAFF, username)
        if record is None:
            raise ApiError(404, f"staff {username} not found")
        return JSONResponse(record)

    return endpoint


def _letter_pdf(store: Store) -> Endpoint:
    letters = RESOURCES["letters"]

    async def endpoint(request: Request) -> Response:
        key = request.path_params["key"]
        letter = store.get(letters, key)
        if letter is None:
            raise ApiError(404, f"letters {key} not found")
        subject = letter["subject"] if isinstance(letter["subject"], str) else ""
        return Response(
            make_pdf(subject),
            media_type="application/pdf",
            headers={"Content-Disposition": f'inline; filename="letter-{key}.pdf"'},
        )

    return endpoint


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def create_app(db_path: str) -> Starlette:
    """The CRM as an ASGI app over the SQLite file ``db_path`` (created with its schema if missing)."""
    store = Store(db_path)
    item_methods = ["GET", "PUT", "PATCH", "DELETE"]
    routes = [
        Route("/health", _health, methods=["GET"]),
        Route("/staff", _collection(store, STAFF), methods=["GET"]),
        Route("/staff/{username}", _staff_item(store), methods=["GET"]),
        Route("/clients", _collection(store, CLIENTS), methods=["GET", "POST"]),
        Route("/clients/{key:int}", _item(store, CLIENTS), methods=item_methods),
        Route("/letters/{key:int}/pdf", _letter_pdf(store), methods=["GET"]),
    ]
    for res in CHILDREN:
        routes += [
            Route(f"/{res.name}", _collection(store, res), methods=["GET", "POST"]),
            Route(f"/{res.name}/{{key:int}}", _item(store, res), methods=item_methods),
            Route(f"/clients/{{client_id:int}}/{res.name}", _nested(store, res), methods=["GET", "POST"]),
        ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        store.close()

    return Starlette(
        routes=routes,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error},
        lifespan=lifespan,
    )

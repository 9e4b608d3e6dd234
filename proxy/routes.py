"""Routes: which CRM endpoint a request is, after the path has been normalised once.

The path the gateway authorises is the path it forwards: `normalise_path` decodes and cleans the raw
path, and the upstream receives that same path re-encoded. Anything ambiguous (an encoded slash, a
matrix parameter, double encoding, a dot segment climbing above the root) is refused, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import quote, unquote_to_bytes

from proxy.errors import GatewayError

_PARAM = re.compile(r"^\{([a-z_][a-z0-9_]*)(?::(int|str))?\}$")
PSEUDONYM = re.compile(r"^P-[0-9A-F]{16}$")
MAX_INT_DIGITS = 19  # a 64-bit id
MAX_PARAM_CHARS = 128
"""A client's pseudonym, as a caller who may not know the client's CRM id gives it in its place
(`GET /clients/P-7Q2M...`); the gateway resolves it to the CRM id before anything else."""
_SAFE_SEGMENT = "-._~!$&'()*+,=:@"


class Shape(StrEnum):
    RECORD = "record"
    LIST = "list"
    OPAQUE = "opaque"


class Verb(StrEnum):
    READ = "read"
    CREATE = "create"
    UPDATE = "update"
    REPLACE = "replace"
    DELETE = "delete"


VERBS: Mapping[str, Verb] = {
    "GET": Verb.READ,
    "POST": Verb.CREATE,
    "PATCH": Verb.UPDATE,
    "PUT": Verb.REPLACE,
    "DELETE": Verb.DELETE,
}


@dataclass(frozen=True, slots=True)
class Route:
    """One declared endpoint of the CRM and how to treat it."""

    method: str
    template: str
    resource: str
    shape: Shape
    verb: Verb
    filter_param: str | None = None  # list rows: query parameter that filters by client id (push-down)
    query: Mapping[str, str | None] = field(default_factory=dict)  # allowed query params -> class revealed
    opaque_field: str | None = None  # opaque routes: the located record's field whose class guards the bytes
    locate: str | None = None  # record routes: template of the GET that finds the record's client
    merge: str = "shallow"  # PATCH: how the CRM applies a partial body (shallow, deep or replace; see writes)
    public: bool = False
    source: str = ""  # "fields.yaml:40"
    segments: tuple[str, ...] = ()
    params: tuple[tuple[int, str, str], ...] = ()  # (segment index, name, kind)

    @property
    def client_param(self) -> str | None:
        return "client_id" if any(name == "client_id" for _, name, _ in self.params) else None

    def render(self, template: str, values: Mapping[str, str]) -> str:
        """Fill a template (this route's `locate`, say) with the matched parameters, encoded."""
        return "/" + "/".join(
            quote(values[m.group(1)], safe=_SAFE_SEGMENT) if (m := _PARAM.match(s)) else s
            for s in template.strip("/").split("/")
        )


def compile_route(
    method: str,
    template: str,
    resource: str,
    shape: Shape,
    **options: object,
) -> Route:
    """Parse a template such as `/clients/{client_id:int}/session-notes` into matchable parts."""
    method = method.upper()
    if method not in VERBS:
        raise ValueError(f"unsupported method {method}")
    if not template.startswith("/"):
        raise ValueError(f"route path must start with '/': {template}")
    segments = tuple(s for s in template.strip("/").split("/") if s != "")
    params: list[tuple[int, str, str]] = []
    for i, seg in enumerate(segments):
        if "{" in seg or "}" in seg:
            m = _PARAM.match(seg)
            if not m:
                raise ValueError(f"bad parameter segment {seg!r} in {template}")
            params.append((i, m.group(1), m.group(2) or "str"))
    names = [p[1] for p in params]
    if len(set(names)) != len(names):
        raise ValueError(f"repeated parameter name in {template}")
    return Route(
        method=method,
        template="/" + "/".join(segments),
        resource=resource,
        shape=shape,
        verb=VERBS[method],
        segments=segments,
        params=tuple(params),
        **options,  # type: ignore[arg-type]
    )


_PLAIN_PATH = re.compile(rb"[A-Za-z0-9_~/-]*")


def normalise_path(raw_path: bytes) -> tuple[str, ...]:
    """Decode a raw request path into segments, refusing every ambiguous form.

    Percent-decoding happens exactly once. Encoded '/', '\\' and NUL are refused (they would mean one
    thing here and another upstream), as is '%' left after decoding (double encoding) and ';'
    (matrix parameters some servers strip). Empty and '.' segments are dropped, '..' climbs one.
    """
    if not raw_path.startswith(b"/"):
        raise GatewayError(400, "path must be absolute")
    if _PLAIN_PATH.fullmatch(raw_path):  # nothing to decode, no dot segments: the common case
        return tuple(s for s in raw_path.decode("ascii").split("/") if s)
    segments: list[str] = []
    for raw in raw_path.split(b"/"):
        if raw in (b"", b"."):
            continue
        lowered = raw.lower()
        if b";" in raw or b"%2f" in lowered or b"%5c" in lowered or b"%00" in lowered:
            raise GatewayError(400, "path holds an encoded separator or parameter")
        try:
            seg = unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise GatewayError(400, "path is not valid UTF-8") from None
        if "%" in seg or "\\" in seg or "\x00" in seg or any(ord(ch) < 0x20 for ch in seg):
            raise GatewayError(400, "path holds double encoding or control characters")
        if seg == "..":
            if not segments:
                raise GatewayError(400, "path climbs above the root")
            segments.pop()
            continue
        if seg == ".":
            continue
        segments.append(seg)
    return tuple(segments)


def encode_path(segments: tuple[str, ...]) -> str:
    """The normalised path as the upstream receives it."""
    return "/" + "/".join(quote(s, safe=_SAFE_SEGMENT) for s in segments)


@dataclass(slots=True)
class RouteTable:
    """Routes indexed by method and segment count; literal segments win over parameters."""

    routes: list[Route]
    _index: dict[tuple[str, int], list[Route]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for route in self.routes:
            self._index.setdefault((route.method, len(route.segments)), []).append(route)
        for candidates in self._index.values():
            # More literal segments first, so /clients/new beats /clients/{client_id}.
            candidates.sort(key=lambda r: -(len(r.segments) - len(r.params)))

    def match(self, method: str, segments: tuple[str, ...]) -> tuple[Route, dict[str, str]] | None:
        for route in self._index.get((method.upper(), len(segments)), ()):
            values = _bind(route, segments)
            if values is not None:
                return route, values
        return None

    def overlaps(self) -> list[tuple[Route, Route]]:
        """Pairs of routes that can match the same request at the same precedence."""
        found: list[tuple[Route, Route]] = []
        for candidates in self._index.values():
            for i, a in enumerate(candidates):
                for b in candidates[i + 1 :]:
                    if len(a.params) == len(b.params) and _can_collide(a, b):
                        found.append((a, b))
        return found


def _bind(route: Route, segments: tuple[str, ...]) -> dict[str, str] | None:
    values: dict[str, str] = {}
    param_at = {i: (name, kind) for i, name, kind in route.params}
    for i, (pattern, actual) in enumerate(zip(route.segments, segments, strict=True)):
        if i in param_at:
            name, kind = param_at[i]
            if len(actual) > (MAX_INT_DIGITS if kind == "int" else MAX_PARAM_CHARS) and not PSEUDONYM.match(actual):
                return None  # an id is short: a 50 KB "id" is refused before it names anything
            if kind == "int" and not (actual.isascii() and actual.isdigit()) and not (
                    name == "client_id" and PSEUDONYM.match(actual)):
                return None
            values[name] = actual
        elif pattern != actual:
            return None
    return values


def _can_collide(a: Route, b: Route) -> bool:
    a_params = {i for i, _, _ in a.params}
    b_params = {i for i, _, _ in b.params}
    for i, (sa, sb) in enumerate(zip(a.segments, b.segments, strict=True)):
        if i in a_params or i in b_params:
            continue
        if sa != sb:
            return False
    return True

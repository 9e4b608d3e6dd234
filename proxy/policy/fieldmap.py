"""The field map: which JSON paths of the CRM hold which field class, and which routes exist.

`fields.yaml` is the gateway's knowledge of the CRM's shape. Casbin decides on field classes; this
map turns each record into classes and tells the response rewriter what to keep. A path the map
does not classify is removed, so a new CRM field stays hidden until a security officer classifies it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from proxy.masks import MASKS
from proxy.policy.yamlfile import MapError, line_of, load_yaml
from proxy.routes import Route, Shape, compile_route

LABELS = ("N", "R", "V")
GATEWAY_SETS = ("user", "now")
"""Fields the gateway fills on create, from the caller (`user`: their id in the CRM) or the clock (`now`),
and that no caller may set: a note's author is whoever wrote it, not whoever the body says."""
MERGES = ("shallow", "deep", "replace")
"""How a CRM applies a PATCH body: `shallow` replaces each top-level value it is given (json-server, most
CRMs: a nested object sent whole replaces the stored one), `deep` merges nested objects too (RFC 7396),
`replace` replaces the whole record. Lists are replaced whole in all three."""
KEY_SCOPES = ("record", "process_notes")


@dataclass(frozen=True, slots=True)
class FieldClass:
    """A kind of information the policy decides on (identity, clinical_notes, ...)."""

    name: str
    label: str = "R"  # FHIR confidentiality: N normal, R restricted, V very restricted
    key_scope: str | None = None  # encrypted with the client's data key of this scope
    description: str = ""
    plaintext: str = ""  # why the class is deliberately not encrypted (needed to drop `encrypt:` on reload)
    withheld_from_subject: str = ""  # why a subject access export leaves the class out (third parties' information)
    portable: bool = True  # in the client's portable copy (Art. 20): false for the service's own assessments


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """How one JSON path is classified and what pseudonymising or masking it means."""

    path: str
    field_class: str
    pseudonym: bool = False  # under PSEUDONYM, replaced by the client's pseudonym (else removed)
    mask: str | None = None  # under MASK, the mask applied (else removed)
    flag: str | None = None  # a record field that, unless exactly false, reclassifies this one
    flag_class: str | None = None
    line: int | None = None
    set_by_gateway: str | None = None  # "user" or "now": filled by the gateway on create, set by no caller
    client_name: bool = False  # one of the client's own names: scrubbed from free text for pseudonymising views

    def class_for(self, record: Mapping[str, Any]) -> str:
        if self.flag is not None and record.get(self.flag) is not False:
            return self.flag_class or self.field_class
        return self.field_class


@dataclass(slots=True)
class Node:
    """One step of a resource's classification tree: a leaf, an object, or an array of nodes."""

    spec: FieldSpec | None = None
    children: dict[str, Node] | None = None
    items: Node | None = None


@dataclass(frozen=True, slots=True)
class Resource:
    """A kind of CRM record and the tree that classifies its fields."""

    name: str
    client_field: str | None  # top-level key holding the client id; None: not client data
    record_class: str  # a record is visible only where this class shows; it also guards delete
    root: Node
    specs: tuple[FieldSpec, ...]
    record_id: str | None = None  # top-level field holding the CRM's stable id of the record (bound into ciphertexts)
    dated: str | None = None  # top-level field dating the record (ISO 8601): disclosure ranges, retention

    @property
    def classes(self) -> frozenset[str]:
        found = {s.field_class for s in self.specs} | {s.flag_class for s in self.specs if s.flag_class}
        return frozenset(found) | {self.record_class}

    @property
    def gateway_set(self) -> dict[str, str]:
        """Top-level fields the gateway fills, and from what."""
        return {s.path: s.set_by_gateway for s in self.specs if s.set_by_gateway is not None}

    @property
    def flags(self) -> dict[str, frozenset[str]]:
        """Each flag field (a top-level field that reclassifies others) and every class it can select."""
        found: dict[str, set[str]] = {}
        for s in self.specs:
            if s.flag is not None:
                found.setdefault(s.flag, set()).update({s.field_class, s.flag_class or s.field_class})
        return {flag: frozenset(classes) for flag, classes in found.items()}


@dataclass(frozen=True, slots=True)
class ListFormat:
    """How this CRM shapes a list response."""

    items: str = "items"  # key of the rows; "." for a bare JSON array
    metadata: tuple[str, ...] = ("total", "page", "per_page")  # kept beside the rows
    total: str | None = "total"  # the count the gateway keeps consistent when rows are dropped
    total_header: str | None = None  # e.g. X-Total-Count
    paging_query: tuple[str, ...] = ("page", "per_page")
    filter_style: str = "comma"  # "comma": a=1,2   "repeat": a=1&a=2


@dataclass(frozen=True, slots=True)
class RelationSource:
    """Where the gateway reads the need-to-know facts (who is assigned to whom), wherever the CRM keeps them.

    Caseload: on each client's row (`counsellor`: one practitioner or a list), or in a resource of links
    of its own (`caseload_path`, rows of `caseload_client`, `caseload_practitioner`). Supervision: on the
    supervisee's staff row (`supervisor`), on the supervisor's (`supervises`), each one or a list, or in a
    resource of links (`supervision_path`, rows of `supervision_supervisor`, `supervision_supervisee`).
    Cover: `cover.yaml`, and grants the CRM keeps (`cover_path`, rows of user, covers, from, until, reason).
    An empty name turns a source off. A caller is matched to their staff row by `staff_match` (default:
    `staff_user`, the staff id) against the token's `identity.user_claim`."""

    clients_path: str = "/clients"
    client_id: str = "id"
    counsellor: str = "counsellor"
    staff_path: str = "/staff"
    staff_user: str = "username"
    supervisor: str = "supervisor"
    supervises: str = ""
    staff_match: str = ""
    caseload_path: str = ""
    caseload_client: str = "client_id"
    caseload_practitioner: str = "practitioner"
    supervision_path: str = ""
    supervision_supervisor: str = "supervisor"
    supervision_supervisee: str = "supervisee"
    cover_path: str = ""  # cover grants kept in the CRM (besides cover.yaml): rows of these fields
    cover_user: str = "user"
    cover_covers: str = "covers"
    cover_from: str = "from"
    cover_until: str = "until"
    cover_reason: str = "reason"
    page_param: str = "page"
    size_param: str = "per_page"
    page_size: int = 500
    resource: str = "client"  # records of this resource refresh the facts as they pass


_REQUIRED_RELATION_KEYS = frozenset({"client_id", "staff_user", "page_param", "size_param", "resource"})


@dataclass(frozen=True, slots=True)
class FieldMap:
    classes: Mapping[str, FieldClass]
    resources: Mapping[str, Resource]
    routes: tuple[Route, ...]
    list_format: ListFormat
    relations: RelationSource

    @property
    def client_resource(self) -> Resource:
        """The client's own record (relations.resource): where the client's identity lives."""
        return self.resources[self.relations.resource]

    @property
    def identifying(self) -> frozenset[str]:
        """The classes of the client's record that name the client (its fields marked pseudonym: a view
        that shows one of them as a pseudonym does not identify the client, anywhere)."""
        return frozenset(s.field_class for s in self.client_resource.specs if s.pseudonym)

    @property
    def client_names(self) -> tuple[str, ...]:
        """Paths of the client's own names in their record (client_name: true)."""
        return tuple(s.path for s in self.client_resource.specs if s.client_name)


def load_fieldmap(path: Path) -> FieldMap:
    return parse_fieldmap(path.read_text(encoding="utf-8"))


def parse_fieldmap(text: str) -> FieldMap:
    doc = load_yaml(text)
    if not isinstance(doc, dict):
        raise MapError(1, "fields.yaml must be a mapping")
    _known(doc, {"version", "classes", "resources", "list_format", "relations", "public"}, "top level")
    if doc.get("version") != 1:
        raise MapError(line_of(doc, "version"), "version must be 1")
    classes = _parse_classes(doc.get("classes"), line_of(doc, "classes"))
    list_format = _parse_list_format(doc.get("list_format") or {})
    resources: dict[str, Resource] = {}
    routes: list[Route] = []
    raw_resources = doc.get("resources")
    if not isinstance(raw_resources, dict) or not raw_resources:
        raise MapError(line_of(doc, "resources"), "resources must be a non-empty mapping")
    for name, body in raw_resources.items():
        resource, resource_routes = _parse_resource(str(name), body, classes, raw_resources)
        resources[resource.name] = resource
        routes.extend(resource_routes)
    relations = _parse_relations(doc.get("relations") or {}, resources)
    for resource in resources.values():
        for spec in resource.specs:
            if spec.client_name and resource.name != relations.resource:
                raise MapError(spec.line, f"resource {resource.name}: field {spec.path}: client_name marks the "
                                          f"client's names in their own record ({relations.resource})")
    routes.extend(_parse_public(doc.get("public") or [], line_of(doc, "public"), resources))
    served = {r.resource for r in routes}
    for name in resources:
        if name not in served:
            raise MapError(line_of(raw_resources, name), f"resource {name}: routes must be a non-empty list")
    return FieldMap(classes, resources, tuple(routes), list_format, relations)


ANONYMOUS = "anonymous"  # the role a public route is decided for: policy rows grant it what it may see


def _parse_public(raw: Any, line: int | None, resources: Mapping[str, Resource]) -> list[Route]:
    """Routes served without identity (a status page, say): opt-in only, GET of a literal path, and decided
    like every other route: the named resource classifies the body, and the policy's rows for the role
    `anonymous` say which of its classes are shown. Client data is never public."""
    if not isinstance(raw, list):
        raise MapError(line, "public must be a list of 'GET /path resource' entries")
    routes = []
    for entry in raw:
        words = str(entry).split()
        if len(words) != 3 or words[0] != "GET" or "{" in words[1]:
            raise MapError(line, f"public route {entry!r}: write 'GET /literal/path resource' (the resource "
                                 f"classifies what the route returns; rows for role {ANONYMOUS} decide it)")
        resource = resources.get(words[2])
        if resource is None:
            raise MapError(line, f"public route {entry!r}: unknown resource {words[2]}")
        if resource.client_field is not None:
            raise MapError(line, f"public route {entry!r}: {resource.name} records are client data and are "
                                 "never served without identity")
        routes.append(compile_route("GET", words[1], resource.name, Shape.RECORD, public=True,
                                    source=f"fields.yaml:{line}" if line else "fields.yaml"))
    return routes


def _known(mapping: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise MapError(line_of(mapping, key), f"unknown key {key!r} in {where}")


def _parse_classes(raw: Any, line: int | None) -> dict[str, FieldClass]:
    if not isinstance(raw, dict) or not raw:
        raise MapError(line, "classes must be a non-empty mapping")
    classes: dict[str, FieldClass] = {}
    for name, body in raw.items():
        body = body or {}
        if not isinstance(body, dict):
            raise MapError(line_of(raw, name), f"class {name}: expected a mapping")
        _known(body, {"label", "encrypt", "description", "plaintext", "withheld_from_subject", "portable"},
               f"class {name}")
        label = body.get("label", "R")
        if label not in LABELS:
            raise MapError(line_of(body, "label"), f"class {name}: label must be one of {', '.join(LABELS)}")
        scope = body.get("encrypt")
        if scope is not None and scope not in KEY_SCOPES:
            raise MapError(line_of(body, "encrypt"), f"class {name}: encrypt must be one of {KEY_SCOPES}")
        plaintext = body.get("plaintext", "")
        if plaintext and scope is not None:
            raise MapError(line_of(body, "plaintext"), f"class {name}: plaintext (why it is not encrypted) and "
                                                       "encrypt cannot both be set")
        if not isinstance(plaintext, str):
            raise MapError(line_of(body, "plaintext"), f"class {name}: plaintext is the reason, as text")
        withheld = body.get("withheld_from_subject", "")
        if not isinstance(withheld, str):
            raise MapError(line_of(body, "withheld_from_subject"), f"class {name}: withheld_from_subject is the "
                                                                   "reason the client is not given it, as text")
        portable = body.get("portable", True)
        if not isinstance(portable, bool):
            raise MapError(line_of(body, "portable"), f"class {name}: portable is true or false")
        classes[str(name)] = FieldClass(str(name), label, scope, str(body.get("description", "")), plaintext.strip(),
                                        withheld.strip(), portable)
    return classes


def _parse_list_format(raw: Any) -> ListFormat:
    if not isinstance(raw, dict):
        raise MapError(None, "list_format must be a mapping")
    _known(raw, {"items", "metadata", "total", "total_header", "paging_query", "filter_style"}, "list_format")
    style = raw.get("filter_style", "comma")
    if style not in ("comma", "repeat"):
        raise MapError(line_of(raw, "filter_style"), "filter_style must be comma or repeat")
    default = ListFormat()
    return ListFormat(
        items=str(raw.get("items", default.items)),
        metadata=tuple(raw.get("metadata", default.metadata)),
        total=raw.get("total", default.total),
        total_header=raw.get("total_header"),
        paging_query=tuple(raw.get("paging_query", default.paging_query)),
        filter_style=style,
    )


def _parse_relations(raw: Any, resources: Mapping[str, Resource]) -> RelationSource:
    if not isinstance(raw, dict):
        raise MapError(None, "relations must be a mapping")
    defaults = RelationSource()
    _known(raw, {f.name for f in fields(RelationSource)}, "relations")
    for key, value in raw.items():
        expected = type(getattr(defaults, key))
        empty = expected is str and not value and key in _REQUIRED_RELATION_KEYS
        if type(value) is not expected or empty or (expected is int and value < 1):
            what = "a positive whole number" if expected is int else "a name" if key not in \
                _REQUIRED_RELATION_KEYS else "a non-empty name"
            raise MapError(line_of(raw, key), f"relations.{key} must be {what}")
    source = RelationSource(**{k: raw[k] for k in raw})
    if source.resource not in resources:
        raise MapError(line_of(raw, "resource"), f"relations.resource names unknown resource {source.resource}")
    if not source.caseload_path and not (source.clients_path and source.counsellor):
        raise MapError(None, "relations: say where caseloads are kept: clients_path and counsellor (on the "
                             "client's row), or caseload_path (a resource of links)")
    if (source.supervisor or source.supervises or source.staff_match) and not source.staff_path:
        raise MapError(line_of(raw, "staff_path"), "relations.staff_path is needed to read supervisor, supervises "
                                                   "or staff_match from the staff rows")
    return source


def _parse_resource(
    name: str, body: Any, classes: Mapping[str, FieldClass], parent: Mapping[str, Any]
) -> tuple[Resource, list[Route]]:
    where = f"resource {name}"
    if not isinstance(body, dict):
        raise MapError(line_of(parent, name), f"{where}: expected a mapping")
    _known(body, {"client", "record_class", "fields", "routes", "record_id", "dated"}, where)
    record_class = body.get("record_class")
    if record_class not in classes:
        raise MapError(line_of(body, "record_class"), f"{where}: record_class {record_class!r} is not a class")
    raw_fields = body.get("fields")
    if not isinstance(raw_fields, dict) or not raw_fields:
        raise MapError(line_of(body, "fields"), f"{where}: fields must be a non-empty mapping")
    root = Node(children={})
    specs: list[FieldSpec] = []
    for path, raw_spec in raw_fields.items():
        spec = _parse_spec(str(path), raw_spec, classes, line_of(raw_fields, path), where)
        _insert(root, spec, where)
        specs.append(spec)
    for spec in specs:
        if spec.flag is None:
            continue
        flag = next((f for f in specs if f.path == spec.flag), None)
        if flag is None:
            raise MapError(spec.line, f"{where}: field {spec.path}: when.flag {spec.flag!r} is not a classified "
                                      "top-level field")
        if classes[flag.field_class].key_scope is not None or flag.flag is not None:
            raise MapError(flag.line, f"{where}: field {flag.path} decides other fields' class, so its own class "
                                      "must not be encrypted or conditional")
    client = body.get("client")
    if client is not None and (not isinstance(client, str) or client not in (root.children or {})):
        raise MapError(line_of(body, "client"), f"{where}: client must name a top-level classified field")
    record_id = body.get("record_id")
    if record_id is not None and (not isinstance(record_id, str) or record_id not in (root.children or {})
                                  or (root.children or {})[record_id].spec is None):
        raise MapError(line_of(body, "record_id"), f"{where}: record_id must name a top-level classified field "
                                                   "(the CRM's stable id of the record)")
    dated = body.get("dated")
    if dated is not None and (not isinstance(dated, str) or dated not in (root.children or {})
                              or (root.children or {})[dated].spec is None):
        raise MapError(line_of(body, "dated"), f"{where}: dated must name a top-level classified field "
                                               "(the record's date, ISO 8601)")
    resource = Resource(name, client, str(record_class), root, tuple(specs), record_id, dated)
    routes = _parse_routes(resource, body.get("routes"), line_of(body, "routes"), where)
    return resource, routes


def _parse_spec(
    path: str, raw: Any, classes: Mapping[str, FieldClass], line: int | None, where: str
) -> FieldSpec:
    if isinstance(raw, str):
        raw = {"class": raw}
    if not isinstance(raw, dict):
        raise MapError(line, f"{where}: field {path}: expected a class name or a mapping")
    _known(raw, {"class", "pseudonym", "mask", "when", "set", "client_name"}, f"{where} field {path}")
    cls = raw.get("class")
    if cls not in classes:
        raise MapError(line, f"{where}: field {path}: unknown class {cls!r}")
    mask = raw.get("mask")
    if mask is not None and mask not in MASKS:
        raise MapError(line, f"{where}: field {path}: unknown mask {mask!r} (known: {', '.join(sorted(MASKS))})")
    flag = flag_class = None
    when = raw.get("when")
    if when is not None:
        if not isinstance(when, dict) or set(when) != {"flag", "class"}:
            raise MapError(line, f"{where}: field {path}: when needs exactly flag and class")
        flag, flag_class = str(when["flag"]), str(when["class"])
        if flag_class not in classes:
            raise MapError(line, f"{where}: field {path}: unknown class {flag_class!r} in when")
    set_by = raw.get("set")
    if set_by is not None and (set_by not in GATEWAY_SETS or "." in path or "[" in path):
        raise MapError(line, f"{where}: field {path}: set must be one of {', '.join(GATEWAY_SETS)}, "
                             "on a top-level field")
    return FieldSpec(path, str(cls), bool(raw.get("pseudonym", False)), mask, flag, flag_class, line,
                     str(set_by) if set_by is not None else None, bool(raw.get("client_name", False)))


def _insert(root: Node, spec: FieldSpec, where: str) -> None:
    node = root
    parts = spec.path.split(".")
    for i, part in enumerate(parts):
        is_array = part.endswith("[]")
        key = part[:-2] if is_array else part
        if not key or "[" in key or "]" in key:
            raise MapError(spec.line, f"{where}: bad path {spec.path!r}")
        if node.spec is not None:
            raise MapError(spec.line, f"{where}: {spec.path} overlaps a path classified as a whole")
        if node.items is not None:
            raise MapError(spec.line, f"{where}: {spec.path} is an object here and an array elsewhere")
        if node.children is None:
            node.children = {}
        child = node.children.setdefault(key, Node())
        if is_array:
            if child.spec is not None or child.children is not None:
                raise MapError(spec.line, f"{where}: {spec.path} is an array here and an object elsewhere")
            child.items = child.items or Node()
            child = child.items
        last = i == len(parts) - 1
        if last:
            if child.spec is not None or child.children or child.items:
                raise MapError(spec.line, f"{where}: {spec.path} is classified twice or overlaps a deeper path")
            child.spec = spec
        node = child


def _parse_routes(resource: Resource, raw: Any, line: int | None, where: str) -> list[Route]:
    if raw is None:
        return []  # served by a public route only (checked once those are read)
    if not isinstance(raw, list) or not raw:
        raise MapError(line, f"{where}: routes must be a non-empty list")
    routes: list[Route] = []
    for entry in raw:
        options: dict[str, Any] = {}
        entry_line = line
        if isinstance(entry, dict) and len(entry) == 1:
            ((decl, options),) = entry.items()
            entry_line = line_of(entry, decl)
            options = options or {}
        elif isinstance(entry, str):
            decl = entry
        else:
            raise MapError(line, f"{where}: a route is 'METHODS /path' or a one-key mapping of it")
        words = str(decl).split()
        if len(words) < 2:
            raise MapError(entry_line, f"{where}: route {decl!r} needs methods and a path")
        *methods, template = words
        _known(options, {"list", "filter", "query", "opaque", "locate", "merge"}, f"{where} route {decl}")
        for method in methods:
            routes.append(_route(resource, method, template, options, entry_line, where))
    return routes


def _route(
    resource: Resource, method: str, template: str, options: Mapping[str, Any], line: int | None, where: str
) -> Route:
    method = method.upper()
    shape = Shape.RECORD
    if options.get("list"):
        shape = Shape.LIST
    if options.get("opaque"):
        shape = Shape.OPAQUE
    query = options.get("query") or {}
    if not isinstance(query, dict):
        raise MapError(line, f"{where}: query must map parameter names to the class they reveal")
    filter_param = options.get("filter")
    if filter_param is not None and filter_param != resource.client_field:
        raise MapError(line, f"{where}: filter must be the resource's client field ({resource.client_field}): "
                             "it is the query parameter that limits rows to the caller's clients")
    has_item_param = "{" in template
    locate = options.get("locate")
    if locate is None and has_item_param and "{client_id" not in template and method != "GET":
        locate = template  # learn the record's client from the record itself before changing it
    if shape is Shape.OPAQUE and locate is None:
        raise MapError(line, f"{where}: opaque route {template} needs locate: the record it belongs to")
    merge = options.get("merge", "shallow")
    if merge not in MERGES:
        raise MapError(line, f"{where}: merge must be one of {', '.join(MERGES)} (how the CRM applies a PATCH)")
    try:
        return compile_route(
            method,
            template,
            resource.name,
            shape,
            filter_param=filter_param,
            query={str(k): (str(v) if v is not None else None) for k, v in query.items()},
            opaque_field=options.get("opaque") if isinstance(options.get("opaque"), str) else None,
            locate=locate,
            merge=str(merge),
            source=f"fields.yaml:{line}" if line else "fields.yaml",
        )
    except ValueError as exc:
        raise MapError(line, f"{where}: {exc}") from None


def values_at(doc: Any, path: str) -> list[Any]:
    """Every value at a map path ("a.b[].c") in a document; [] where the path is absent."""
    found = [doc]
    for part in path.split("."):
        is_array = part.endswith("[]")
        key = part[:-2] if is_array else part
        nxt: list[Any] = []
        for node in found:
            if isinstance(node, dict) and key in node:
                value = node[key]
                if is_array:
                    nxt.extend(value if isinstance(value, list) else [])
                else:
                    nxt.append(value)
        found = nxt
    return found


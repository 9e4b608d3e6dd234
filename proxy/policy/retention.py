"""Retention schedules: how long each kind of client's records are kept, and from which event.

`policies/retention.yaml` is the officers' file. `events` say where each date comes from: a date field of
the client's record (`{field: closed}`), the latest dated record of some resources
(`{latest_of: [appointment, session_note]}`), an event recorded with `fieldguard retention event`
(`{recorded: death}`), the record's own date (`record_date`) or its author's first supervision session
after it (`next_supervision`). `schedules` are tried for every client: a client schedule (no `classes`)
applies to the whole client by `category` (the client record's `category_field`) and/or `holds` (a record
field with one of some values); a record schedule (`classes`) applies to each record of those record
classes. The client is due when every client schedule that applies to them is; one that applies with no
date for its event keeps them. A schedule with `blocks_erasure: true` is a legal minimum: `fieldguard
erase` refuses within it, naming it.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import date
from typing import Any

from proxy.policy.fieldmap import FieldMap
from proxy.policy.yamlfile import MapError, line_of, load_rules

FILE = "retention.yaml"
_KEYS = {"category_field", "events", "schedules", "erasure"}
RECORD_EVENTS = ("record_date", "next_supervision")  # dated per record, not per client
_PERIOD = re.compile(r"^(\d{1,3}) (day|days|month|months|year|years)$")


@dataclass(frozen=True, slots=True)
class Period:
    count: int
    unit: str  # days | months | years

    def after(self, start: date) -> date:
        """`start` plus the period; 29 February plus a year is 28 February."""
        if self.unit == "days":
            return date.fromordinal(start.toordinal() + self.count)
        months = self.count * (12 if self.unit == "years" else 1)
        year, month = divmod(start.month - 1 + months, 12)
        year, month = start.year + year, month + 1
        return date(year, month, min(start.day, calendar.monthrange(year, month)[1]))

    def __str__(self) -> str:
        return f"{self.count} {self.unit}"


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    field: str | None = None  # a date field of the client's record
    latest_of: tuple[str, ...] = ()  # resources: the latest of their records' dates
    recorded: str | None = None  # recorded with `fieldguard retention event`
    per_record: str | None = None  # record_date | next_supervision


@dataclass(frozen=True, slots=True)
class Schedule:
    name: str
    keep: Period
    event: str
    categories: frozenset[str] = frozenset()  # empty: any category
    holds: tuple[str, str, frozenset[str]] | None = None  # (resource, field path, values)
    classes: frozenset[str] = frozenset()  # a record schedule: records of these record classes
    blocks_erasure: bool = False
    line: int | None = None

    @property
    def per_record(self) -> bool:
        return bool(self.classes)


@dataclass(frozen=True, slots=True)
class RetentionRules:
    category_field: str | None
    events: dict[str, Event]
    schedules: tuple[Schedule, ...]
    erasure_keeps: frozenset[str] = frozenset({"reference", "service"})  # classes of the client record kept
    approvers: frozenset[str] = frozenset({"dpo"})

    @property
    def client_schedules(self) -> tuple[Schedule, ...]:
        return tuple(s for s in self.schedules if not s.per_record)

    @property
    def record_schedules(self) -> tuple[Schedule, ...]:
        return tuple(s for s in self.schedules if s.per_record)


NONE = RetentionRules(None, {}, ())  # no file: nothing is ever due, and erasure is checked against holds only


def parse_period(text: object) -> Period | None:
    found = _PERIOD.match(str(text).strip()) if isinstance(text, (str, int)) else None
    if found is None:
        return None
    unit = found.group(2) if found.group(2).endswith("s") else found.group(2) + "s"
    return Period(int(found.group(1)), unit)


def parse_retention(text: str, fm: FieldMap, file: str = FILE) -> RetentionRules:
    """The schedules, checked against the field map, or a `MapError` at the line of the first problem."""
    doc = load_rules(text, file, _KEYS)
    if doc is None:
        return NONE
    client_fields = {s.path for s in fm.client_resource.specs}
    category = doc.get("category_field")
    if category is not None and category not in client_fields:
        raise MapError(line_of(doc, "category_field"), f"category_field {category!r} is not a field of the "
                                                       f"client's record ({fm.client_resource.name})", file)
    events = _events(doc.get("events") or {}, line_of(doc, "events"), fm, client_fields, file)
    raw = doc.get("schedules") or []
    if not isinstance(raw, list):
        raise MapError(line_of(doc, "schedules"), "schedules must be a list", file)
    schedules = [_schedule(s, i, events, category, fm, file, line_of(doc, "schedules")) for i, s in enumerate(raw)]
    names = [s.name for s in schedules]
    if dup := next((n for n in names if names.count(n) > 1), None):
        raise MapError(line_of(doc, "schedules"), f"schedule {dup} is named twice", file)
    erasure = doc.get("erasure") or {}
    if not isinstance(erasure, dict) or set(erasure) - {"keep_classes", "approvers"}:
        raise MapError(line_of(doc, "erasure"), "erasure may say keep_classes and approvers", file)
    keeps = erasure.get("keep_classes", ["reference", "service"])
    if not isinstance(keeps, list) or (bad := next((c for c in keeps if c not in fm.classes), None)) is not None:
        raise MapError(line_of(erasure, "keep_classes"), "keep_classes must list classes of the field map"
                       + (f" ({bad!r} is not one)" if isinstance(keeps, list) else ""), file)
    approvers = erasure.get("approvers", ["dpo"])
    if not isinstance(approvers, list) or not approvers or not all(isinstance(r, str) for r in approvers):
        raise MapError(line_of(erasure, "approvers"), "approvers must list role names", file)
    return RetentionRules(category, events, tuple(schedules), frozenset(keeps), frozenset(approvers))


def _events(raw: Any, line: int | None, fm: FieldMap, client_fields: set[str], file: str) -> dict[str, Event]:
    if not isinstance(raw, dict):
        raise MapError(line, "events must map a name to where its date comes from", file)
    out: dict[str, Event] = {}
    for name, spec in raw.items():
        at = line_of(raw, name)
        if spec in RECORD_EVENTS:
            out[name] = Event(name, per_record=spec)
            continue
        if not isinstance(spec, dict) or len(spec) != 1:
            raise MapError(at, f"event {name}: one of {{field: F}}, {{latest_of: [resources]}}, {{recorded: NAME}}, "
                               f"{', '.join(RECORD_EVENTS)}", file)
        (kind, value), = spec.items()
        if kind == "field":
            if value not in client_fields:
                raise MapError(at, f"event {name}: {value!r} is not a field of the client's record", file)
            out[name] = Event(name, field=str(value))
        elif kind == "latest_of":
            if not isinstance(value, list) or not value:
                raise MapError(at, f"event {name}: latest_of lists resources", file)
            for r in value:
                if r not in fm.resources or fm.resources[r].dated is None:
                    raise MapError(at, f"event {name}: {r!r} is not a resource with a dated: field", file)
            out[name] = Event(name, latest_of=tuple(value))
        elif kind == "recorded":
            if not isinstance(value, str) or not re.fullmatch(r"[a-z_]{1,32}", value):
                raise MapError(at, f"event {name}: recorded names the event (lower-case letters and _)", file)
            out[name] = Event(name, recorded=value)
        else:
            raise MapError(at, f"event {name}: unknown source {kind!r}", file)
    return out


_SCHEDULE_KEYS = {"name", "category", "holds", "classes", "keep", "from", "blocks_erasure"}


def _schedule(raw: Any, index: int, events: dict[str, Event], category: str | None, fm: FieldMap, file: str,
              line: int | None) -> Schedule:
    at = line_of(raw, "name") if isinstance(raw, dict) else line
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
        raise MapError(at, f"schedule {index + 1}: a mapping with a name", file)
    name = raw["name"]
    if unknown := sorted(set(raw) - _SCHEDULE_KEYS):
        raise MapError(line_of(raw, unknown[0]), f"schedule {name}: unknown key {unknown[0]!r}", file)
    keep = parse_period(raw.get("keep"))
    if keep is None:
        raise MapError(line_of(raw, "keep"), f"schedule {name}: keep is a period: '20 years', '6 months', "
                                             "'0 days'", file)
    event = raw.get("from")
    if event not in events:
        raise MapError(line_of(raw, "from"), f"schedule {name}: from {event!r} is not one of the events "
                                             f"({', '.join(sorted(events)) or 'none defined'})", file)
    classes = raw.get("classes") or []
    if not isinstance(classes, list) or (bad := next((c for c in classes if c not in fm.classes), None)):
        raise MapError(line_of(raw, "classes"), f"schedule {name}: unknown class {bad!r}" if isinstance(classes, list)
                       else f"schedule {name}: classes is a list", file)
    if events[event].per_record and not classes:
        raise MapError(line_of(raw, "from"), f"schedule {name}: {event} dates a record, so the schedule needs "
                                             "classes (a record schedule)", file)
    cats = raw.get("category")
    cats = [cats] if isinstance(cats, str) else cats or []
    if cats and category is None:
        raise MapError(line_of(raw, "category"), f"schedule {name}: category needs category_field", file)
    holds = _holds(raw, name, fm, file)
    if classes and (cats or holds):
        raise MapError(line_of(raw, "classes"), f"schedule {name}: a record schedule (classes) takes no "
                                                "category or holds", file)
    blocks = raw.get("blocks_erasure", False)
    if not isinstance(blocks, bool):
        raise MapError(line_of(raw, "blocks_erasure"), f"schedule {name}: blocks_erasure is true or false", file)
    return Schedule(name, keep, event, frozenset(cats), holds, frozenset(classes), blocks, at)


def _holds(raw: dict[str, Any], name: str, fm: FieldMap, file: str) -> tuple[str, str, frozenset[str]] | None:
    spec = raw.get("holds")
    if spec is None:
        return None
    at = line_of(raw, "holds")
    if not isinstance(spec, dict) or set(spec) != {"resource", "field", "in"} or not isinstance(spec["in"], list):
        raise MapError(at, f"schedule {name}: holds is {{resource: R, field: PATH, in: [values]}}", file)
    resource = fm.resources.get(spec["resource"])
    if resource is None or resource.client_field is None:
        raise MapError(at, f"schedule {name}: {spec['resource']!r} is not a resource of client data", file)
    path = str(spec["field"])
    if not any(path == s.path or path.startswith(s.path + ".") for s in resource.specs):
        raise MapError(at, f"schedule {name}: {spec['field']!r} is not a field of {resource.name}", file)
    return resource.name, str(spec["field"]), frozenset(str(v) for v in spec["in"])

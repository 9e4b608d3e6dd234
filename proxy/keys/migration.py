"""Moving a CRM into FieldGuard and out again, through the CRM's own API.

`encrypt_existing` walks every resource with encrypted classes, page by page, and rewrites each record's
plaintext sensitive fields as ciphertext with a PATCH of just those fields. It is idempotent (a sealed
value is never sealed again), resumable (the last finished page of each resource is remembered under
keys/), rate-limited, and can stop after a set number of records for a maintenance window.
`decrypt_export` is the reverse, for leaving FieldGuard: back into the CRM, or into a JSON-lines file.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson

from proxy.config import Settings
from proxy.keys.cipher import CipherFailure, FieldCipher
from proxy.keys.envelope import associated_class, associated_where, is_sealed, record_ref, seal
from proxy.keys.ring import KeyRing, OpenKey
from proxy.policy.fieldmap import FieldClass, FieldMap, Node, Resource
from proxy.routes import Route, Shape, Verb
from proxy.secretfile import write_private

Progress = Callable[[int], None]


@dataclass(slots=True)
class Walk:
    """One resource's routes for a migration: its flat list and its PATCH by id."""

    resource: Resource
    listing: Route
    patch: Route


@dataclass(slots=True)
class MigrationReport:
    action: str
    dry_run: bool
    records: int = 0
    changed_records: int = 0
    fields: int = 0
    failures: int = 0  # records whose PATCH the CRM refused, after retries: their page is done again next run
    unowned: int = 0  # records holding plaintext of an encrypted class but naming no client: left as they are
    by_resource: dict[str, int] = field(default_factory=dict)
    complete: bool = True  # every record walked, and every one that holds plaintext sealed
    failed_ids: list[str] = field(default_factory=list)  # "resource id", never a value (first 20)


def walks(fieldmap: FieldMap) -> list[Walk]:
    """Resources holding encrypted classes, with the routes to page through and patch them."""
    found: list[Walk] = []
    for resource in fieldmap.resources.values():
        if not any(fieldmap.classes[c].key_scope for c in resource.classes):
            continue
        routes = [r for r in fieldmap.routes if r.resource == resource.name]
        listing = next((r for r in routes if r.shape is Shape.LIST and not r.params), None)
        patch = next((r for r in routes if r.verb is Verb.UPDATE and [p[1] for p in r.params] in (["id"],
                                                                                                   ["client_id"])),
                     None)
        if listing is None or patch is None:
            raise ValueError(f"resource {resource.name} holds encrypted classes but has no flat list route "
                             "or no PATCH-by-id route in fields.yaml")
        found.append(Walk(resource, listing, patch))
    return found


class ResumePoint:
    """The last page finished for each resource, so an interrupted run resumes instead of restarting."""

    def __init__(self, path: Path, action: str, upstream: str) -> None:
        self.path, self.key = path, f"{action} {upstream}"
        doc = json.loads(path.read_text()) if path.exists() else {}
        self.pages: dict[str, int] = doc.get(self.key, {})
        self._doc = doc

    def done(self, resource: str) -> int:
        return self.pages.get(resource, 0)

    def save(self, resource: str, page: int) -> None:
        self.pages[resource] = page
        self._doc[self.key] = self.pages
        write_private(self.path, json.dumps(self._doc).encode())

    def clear(self) -> None:
        self._doc.pop(self.key, None)
        write_private(self.path, json.dumps(self._doc).encode())


async def _pages(client: httpx.AsyncClient, fm: FieldMap, walk: Walk, start: int
                 ) -> AsyncIterator[tuple[int, list[dict[str, Any]]]]:
    source, fmt = fm.relations, fm.list_format
    page = start + 1
    while True:
        params = {source.page_param: page, source.size_param: source.page_size}
        r = await client.get(walk.listing.template, params=params)
        r.raise_for_status()
        body = r.json()
        rows = body if fmt.items == "." else body.get(fmt.items)
        if not isinstance(rows, list):
            raise ValueError(f"{walk.listing.template}: not a list")
        yield page, [row for row in rows if isinstance(row, dict)]
        if len(rows) < source.page_size:
            return
        page += 1


async def _total(client: httpx.AsyncClient, fm: FieldMap, walk: Walk) -> int:
    source, fmt = fm.relations, fm.list_format
    r = await client.get(walk.listing.template, params={source.page_param: 1, source.size_param: 1})
    r.raise_for_status()
    if fmt.total_header and fmt.total_header in r.headers:
        return int(r.headers[fmt.total_header])
    body = r.json()
    return int(body.get(fmt.total, 0)) if isinstance(body, dict) and fmt.total else 0


def _crm(settings: Settings) -> httpx.AsyncClient:
    """The CRM itself, directly: migrations run beside the gateway, not through it."""
    return httpx.AsyncClient(base_url=settings.upstream.url, timeout=settings.upstream.timeout_seconds,
                             headers=dict(settings.upstream.headers))


async def _plan(client: httpx.AsyncClient, fm: FieldMap, totals: Callable[[int], None] | None) -> list[Walk]:
    plan = walks(fm)
    if totals is not None:
        totals(sum([await _total(client, fm, w) for w in plan]))
    return plan


PATCH_ATTEMPTS = 3


async def _patch(client: httpx.AsyncClient, limiter: RateLimit, walk: Walk, row: dict[str, Any],
                 body: dict[str, Any]) -> bool:
    """PATCH the record; a refusal or a fault is tried again (a CRM busy for a moment), then reported."""
    path = walk.patch.render(walk.patch.template, _ids(walk.patch, row, walk.resource.record_id))
    for attempt in range(PATCH_ATTEMPTS):
        await limiter.wait()
        try:
            r = await client.patch(path, content=orjson.dumps(body), headers={"content-type": "application/json"})
            if r.status_code < 400:
                return True
            if r.status_code < 500 and r.status_code not in (408, 409, 429):
                return False  # refused for good: retrying will not change the answer
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2 * (attempt + 1))
    return False


def _failed(report: MigrationReport, walk: Walk, row: dict[str, Any]) -> None:
    report.failures += 1
    if len(report.failed_ids) < 20:
        ids = _ids(walk.patch, row, walk.resource.record_id)
        report.failed_ids.append(f"{walk.resource.name} {'/'.join(ids.values())}")


class RateLimit:
    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self._next = time.monotonic()

    async def wait(self) -> None:
        if self.interval:
            now = time.monotonic()
            if self._next > now:
                await asyncio.sleep(self._next - now)
            self._next = max(self._next, now) + self.interval


def _changes(node_children: dict[str, Node], record: dict[str, Any], resource: str, classes: dict[str, FieldClass],
             transform: Callable[[str, str, Any], Any]) -> dict[str, Any]:
    """The top-level keys whose (possibly nested) encrypted values `transform` changes, with new values."""
    changed: dict[str, Any] = {}
    for key, value in record.items():
        child = node_children.get(key)
        if child is None:
            continue
        new = _transform(child, value, record, resource, classes, transform)
        if new is not value:
            changed[key] = new
    return changed


def _transform(node: Node, value: Any, record: dict[str, Any], resource: str, classes: dict[str, FieldClass],
               transform: Callable[[str, str, Any], Any]) -> Any:
    if node.spec is not None:
        cls = node.spec.class_for(record)
        if classes[cls].key_scope is None or value is None:
            return value
        return transform(cls, node.spec.path, value)
    if node.children is not None and isinstance(value, dict):
        out = dict(value)
        touched = False
        for key, item in value.items():
            child = node.children.get(key)
            if child is not None:
                new = _transform(child, item, record, resource, classes, transform)
                if new is not item:
                    out[key], touched = new, True
        return out if touched else value
    if node.items is not None and isinstance(value, list):
        items = [_transform(node.items, v, record, resource, classes, transform) for v in value]
        return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
    return value


async def encrypt_existing(settings: Settings, fm: FieldMap, ring: KeyRing, *, dry_run: bool, rate: float,
                           max_records: int | None, progress: Progress | None = None,
                           totals: Callable[[int], None] | None = None) -> MigrationReport:
    report = MigrationReport("encrypt-existing", dry_run)
    resume = ResumePoint(settings.keys.in_dir("migration.json"), "encrypt-existing",
                          settings.upstream.url)
    limiter = RateLimit(rate)
    classes = dict(fm.classes)
    async with _crm(settings) as client:
        for walk in await _plan(client, fm, totals):
            name = walk.resource.name
            assert walk.resource.root.children is not None
            clean = True  # every page so far went through: the resume point may advance
            async for page, rows in _pages(client, fm, walk, 0 if dry_run else resume.done(name)):
                page_failed = False
                for row in rows:
                    if max_records is not None and report.records >= max_records:
                        report.complete = False
                        return report
                    report.records += 1
                    cid = _client_of(walk.resource, row)
                    rid = record_ref(row.get(walk.resource.record_id)) if walk.resource.record_id else None
                    keys: dict[str, OpenKey] = {}
                    pending: list[tuple[str, str, Any]] = []

                    def plan_seal(cls: str, path: str, value: Any, into: list[tuple[str, str, Any]] = pending,
                                  rid: bytes | None = rid) -> Any:
                        if is_sealed(value):
                            return value
                        scope = classes[cls].key_scope
                        assert scope is not None
                        into.append((scope, path, value))
                        return _Marker(scope, path, value, cls, rid)

                    changed = _changes(walk.resource.root.children, row, name, classes, plan_seal)
                    if changed and cid is None:
                        report.unowned += 1  # no client, so no client's key: said, never sealed under a guess
                        page_failed = True  # and its page is walked again by the next run
                    elif changed:
                        report.changed_records += 1
                        report.fields += len(pending)
                        report.by_resource[name] = report.by_resource.get(name, 0) + len(pending)
                        if not dry_run:
                            for scope in {p[0] for p in pending}:
                                keys[scope] = await ring.for_writing(cid, scope)
                            if not await _patch(client, limiter, walk, row, _resolve_markers(changed, keys, name)):
                                _failed(report, walk, row)
                                page_failed = True
                    if progress is not None:
                        progress(1)
                clean = clean and not page_failed
                if not dry_run and clean:  # a page not wholly sealed is done again by the next run
                    resume.save(name, page)
        if not dry_run and not report.failures and not report.unowned:
            resume.clear()
    report.complete = not report.failures and not report.unowned
    return report


class _Marker:
    """A value to be sealed once its key is known (keys are fetched asynchronously)."""

    __slots__ = ("field_class", "path", "record_id", "scope", "value")

    def __init__(self, scope: str, path: str, value: Any, field_class: str, record_id: bytes | None) -> None:
        self.scope, self.path, self.value = scope, path, value
        self.field_class, self.record_id = field_class, record_id


def _resolve_markers(value: Any, keys: dict[str, OpenKey], resource: str) -> Any:
    if isinstance(value, _Marker):
        opened = keys[value.scope]
        return seal(opened.aead, opened.key.key_id, value.value, resource, value.path, value.field_class,
                    value.record_id)
    if isinstance(value, dict):
        return {k: _resolve_markers(v, keys, resource) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_markers(v, keys, resource) for v in value]
    return value


def _client_of(resource: Resource, row: dict[str, Any]) -> str | None:
    value = row.get(resource.client_field) if resource.client_field else None
    return str(value) if value is not None and not isinstance(value, (dict, list, bool)) else None


def _ids(route: Route, row: dict[str, Any], id_field: str | None = None) -> dict[str, str]:
    """The PATCH route's one parameter, from the record's id field (`record_id`, else `id`)."""
    return {name: str(row.get(id_field or "id")) for _, name, _ in route.params}


async def decrypt_export(settings: Settings, fm: FieldMap, ring: KeyRing, *, dry_run: bool, rate: float,
                         output: Path | None, progress: Progress | None = None,
                         totals: Callable[[int], None] | None = None) -> MigrationReport:
    """Open every sealed field and write it back to the CRM in plaintext, or export records to a file."""
    report = MigrationReport("decrypt-export", dry_run)
    cipher = FieldCipher(ring)
    limiter = RateLimit(rate)
    classes = dict(fm.classes)
    sink = (os.fdopen(os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8")
            if output is not None and not dry_run else None)
    try:
        async with _crm(settings) as client:
            for walk in await _plan(client, fm, totals):
                name = walk.resource.name
                assert walk.resource.root.children is not None
                async for _, rows in _pages(client, fm, walk, 0):
                    await cipher.prefetch(orjson.dumps(rows))
                    for row in rows:
                        report.records += 1
                        opened = [0]
                        rid = record_ref(row.get(walk.resource.record_id)) if walk.resource.record_id else None
                        unseal = partial(_unseal, cipher, classes, _client_of(walk.resource, row), rid, name, report,
                                         opened)
                        changed = _changes(walk.resource.root.children, row, name, classes, unseal)
                        report.fields += opened[0]
                        if changed:
                            report.changed_records += 1
                            report.by_resource[name] = report.by_resource.get(name, 0) + opened[0]
                        if sink is not None:
                            sink.write(orjson.dumps({"resource": name, "record": {**row, **changed}}).decode() + "\n")
                        elif changed and not dry_run and not await _patch(client, limiter, walk, row, changed):
                            _failed(report, walk, row)
                        if progress is not None:
                            progress(1)
    finally:
        if sink is not None:
            sink.close()
    return report


def _unseal(cipher: FieldCipher, classes: dict[str, FieldClass], client_id: str | None, record_id: bytes | None,
            resource: str, report: MigrationReport, opened: list[int], cls: str, path: str, value: Any) -> Any:
    if not is_sealed(value):
        return value
    try:
        known = classes.get(cls)
        scope = (known.key_scope or "") if known is not None else ""
        where = associated_where(resource, path)
        plain = cipher.open(value, client_id, scope, where, associated_class(where, cls), record_id, set())
    except CipherFailure:
        report.failures += 1
        return value
    opened[0] += 1
    return plain


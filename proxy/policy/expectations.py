"""`fieldguard policy test`: the officers' expectations, checked like `opa test`.

Expectation files (`policies/tests/*.yaml`) hold three kinds of case:
- `decisions`: one (role, relation, purpose, class[, action]) and the outcome (or allow/deny) expected;
- `matrix`: one (role, relation, purpose) and the outcome of every class (unlisted classes: remove);
- `requests`: "as this user, GET /clients/7: these paths visible, these removed, this status", run through
  a real gateway in this process, in front of a recorded upstream (`upstream: recordings/....json`). The
  caller hands in the gateway to build (`App`): the policy package never imports the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from proxy.config import Settings
from proxy.policy.bundle import BundleSource, PolicyBundle
from proxy.policy.decision import Action, DecisionTable, Relation
from proxy.policy.fieldmap import values_at
from proxy.policy.review import explain_class


class Served(Protocol):
    """An ASGI gateway with its own start and stop (proxy.app.Gateway)."""

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None: ...


App = Callable[..., Served]  # App(settings, bundle=bundle)


@dataclass(slots=True)
class CaseResult:
    file: str
    name: str
    passed: bool
    detail: list[str] = field(default_factory=list)


def _relations(value: Any) -> Relation:
    names = value if isinstance(value, list) else [value or "any"]
    rels = Relation.ANY
    for name in names:
        rels |= Relation.parse(str(name))
    return rels


def run_decision(table: DecisionTable, case: dict[str, Any]) -> list[str]:
    role, cls, purpose = str(case["role"]), str(case["class"]), case.get("purpose")
    rels = _relations(case.get("relation"))
    expect = str(case["expect"])
    if "action" in case:
        action = Action(str(case["action"]))
        ok = table.purpose_allowed(role, purpose) if purpose else True
        got = "allow" if ok and table.allows(role, rels, cls, action) else "deny"
    else:
        got = explain_class(table, role, rels, purpose, cls).outcome
    if got == expect:
        return []
    why = explain_class(table, role, rels, purpose, cls)
    return [f"{role} / {rels.label} / {cls}: expected {expect}, got {got}", f"because: {why.reason}"]


def run_matrix(table: DecisionTable, classes: list[str], case: dict[str, Any]) -> list[str]:
    role, purpose = str(case["role"]), case.get("purpose")
    rels = _relations(case.get("relation"))
    wanted: dict[str, str] = {c: "remove" for c in classes}
    for outcome in ("clear", "pseudonym", "mask", "remove"):
        listed = case.get("expect", {}).get(outcome, [])
        for c in (classes if listed == "all" else listed):
            if c not in wanted:
                return [f"unknown class {c!r} in the expectation"]
            wanted[c] = outcome
    problems = []
    for cls, expect in wanted.items():
        got = explain_class(table, role, rels, purpose, cls)
        if got.outcome != expect:
            problems.append(f"{role} / {rels.label} / {cls}: expected {expect}, got {got.outcome} ({got.reason})")
    return problems


def load_cases(directory: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted((directory / "tests").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text()) or {}
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected a mapping")
        yield path, doc


def run_tests(bundle: PolicyBundle, source: BundleSource, app: App | None = None) -> list[CaseResult]:
    """Every case of every file under `tests/` of the bundle directory."""
    results: list[CaseResult] = []
    classes = sorted(bundle.fieldmap.classes)
    request_files: list[tuple[Path, dict[str, Any]]] = []
    for path, doc in load_cases(source.directory):
        for case in doc.get("decisions", []) or []:
            problems = run_decision(bundle.table, case)
            results.append(CaseResult(path.name, str(case.get("name", case)), not problems, problems))
        for case in doc.get("matrix", []) or []:
            problems = run_matrix(bundle.table, classes, case)
            name = case.get("name") or f"{case['role']} / {_relations(case.get('relation')).label}"
            results.append(CaseResult(path.name, str(name), not problems, problems))
        if doc.get("requests"):
            request_files.append((path, doc))
    for path, doc in request_files:
        if app is None:
            results.append(CaseResult(path.name, "requests", False, ["request cases need a gateway to run them"]))
            continue
        results += asyncio.run(_run_requests(bundle, source, path, doc, app))
    return results


# ---------------------------------------------------------------------------------------------- requests
async def _run_requests(bundle: PolicyBundle, source: BundleSource, path: Path, doc: dict[str, Any], app: App
                        ) -> list[CaseResult]:
    """A real gateway in this process, in front of the recorded upstream, each case a real request."""
    import httpx
    from aiohttp import web
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from proxy.config import build_settings
    from proxy.keys.kek import FileKek, ScryptParams
    from proxy.tokens import mint_token

    recording = json.loads((path.parent / str(doc["upstream"])).read_text())
    upstream = web.Application()
    upstream.router.add_route("*", "/{tail:.*}", _replay(recording))
    runner = web.AppRunner(upstream, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    results: list[CaseResult] = []
    with tempfile.TemporaryDirectory(prefix="fieldguard-policy-test-") as tmp:
        d = Path(tmp)
        keys = d / "keys"
        keys.mkdir(mode=0o700)
        passphrase = os.urandom(16).hex()
        FileKek.create(keys / "kek.json", passphrase.encode(), ScryptParams(n=2**14))
        (d / "pass").write_text(passphrase)
        (d / "pass").chmod(0o600)
        signer = ec.generate_private_key(ec.SECP256R1())
        (d / "id.pub.pem").write_bytes(signer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        pem = signer.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
        raw = {"upstream": {"url": f"http://127.0.0.1:{port}"},
               "policy": {"dir": str(source.directory), "fields_file": str(source.fields_file or ""),
                          "watch": False},
               "identity": {"issuer": "policy-test", "audience": "policy-test",
                            "public_key_file": str(d / "id.pub.pem")},
               "keys": {"dir": str(keys), "passphrase_file": str(d / "pass"),
                        "passphrase_env": "FIELDGUARD_POLICY_TEST_UNSET"},
               "audit": {"log": str(d / "audit.jsonl"), "store": str(d / "audit.sqlite3")}}
        settings: Settings = build_settings(raw, {}, d)
        gateway = app(settings, bundle=bundle)
        await gateway.startup()
        try:
            transport = httpx.ASGITransport(app=gateway)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                for case in doc["requests"]:
                    who = case["as"]
                    token = mint_token(pem, subject=str(who["user"]), roles=[str(who["role"])],
                                       issuer="policy-test", audience="policy-test",
                                       purposes=[str(who["purpose"])] if who.get("purpose") else None,
                                       client_id=str(who["client_id"]) if who.get("client_id") else None)
                    method, target = str(case["request"]).split(maxsplit=1)
                    kwargs: dict[str, Any] = {"headers": {"authorization": f"Bearer {token}"}}
                    if "body" in case:
                        kwargs["json"] = case["body"]
                    r = await client.request(method, target, **kwargs)
                    problems = _check_response(r, case.get("expect", {}))
                    results.append(CaseResult(path.name, str(case.get("name", case["request"])), not problems,
                                              problems))
        finally:
            await gateway.shutdown()
            await runner.cleanup()
    return results


def _replay(recording: dict[str, Any]) -> Any:
    from aiohttp import web

    answers: dict[str, dict[str, Any]] = {}
    for item in recording.get("responses", []):
        query = f"?{item['query']}" if item.get("query") else ""
        answers[f"{item['method']} {item['path']}{query}"] = item

    async def handler(request: web.Request) -> web.Response:
        query = f"?{request.query_string}" if request.query_string else ""
        item = answers.get(f"{request.method} {request.path}{query}")
        if item is None:
            return web.json_response({"detail": "not recorded"}, status=404)
        return web.json_response(item.get("body"), status=int(item.get("status", 200)))

    return handler


def _check_response(r: Any, expect: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    if "status" in expect and r.status_code != int(expect["status"]):
        error = ""
        with contextlib.suppress(ValueError, AttributeError):
            error = f" ({r.json().get('error')})" if r.json().get("error") else ""
        problems.append(f"status: expected {expect['status']}, got {r.status_code}{error}")
        return problems
    body: Any = None
    with contextlib.suppress(ValueError):
        body = r.json()
    if "error_contains" in expect:
        text = str(body.get("error", "")) if isinstance(body, dict) else ""
        if str(expect["error_contains"]) not in text:
            problems.append(f"error: expected it to mention {expect['error_contains']!r}, got {text!r}")
    rows: list[Any]
    if isinstance(body, dict) and isinstance(body.get("items"), list):
        rows = body["items"]
    else:
        rows = body if isinstance(body, list) else [body]
    if "rows" in expect and len(rows) != int(expect["rows"]):
        problems.append(f"rows: expected {expect['rows']}, got {len(rows)}")
    for row in rows:
        for p in expect.get("visible", []):
            if not values_at(row, p):
                problems.append(f"{p}: expected visible, was removed")
        for p in expect.get("removed", []):
            if values_at(row, p):
                problems.append(f"{p}: expected removed, was shown")
        for p in expect.get("pseudonymised", []):
            vals = values_at(row, p)
            if not vals or not all(isinstance(v, str) and v.startswith("P-") for v in vals):
                problems.append(f"{p}: expected a pseudonym, got {'nothing' if not vals else 'the value'}")
    return sorted(set(problems))


def render(results: list[CaseResult]) -> str:
    lines: list[str] = []
    current = None
    for res in results:
        if res.file != current:
            current = res.file
            lines.append(f"{current}:")
        lines.append(f"  {'PASS' if res.passed else 'FAIL'}  {res.name}")
        lines += [f"        {d}" for d in res.detail]
    failed = sum(1 for r in results if not r.passed)
    lines.append(f"{len(results) - failed} passed, {failed} failed")
    return "\n".join(lines)

"""The policy bundle: the files in `policies/`, checked, compiled and proved before use.

Loading is all-or-nothing. The Casbin files are linted for pycasbin's silent pitfalls, compiled into a
`DecisionTable`, and the table is then proved equal to `enforcer.enforce` on every (role, relation set,
class, action) and every (role, purpose). Only a bundle that passes every step replaces the one in
force; the swap is one reference assignment, so no request ever sees half a policy.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import casbin
from casbin.persist.adapter import Adapter, load_policy_line
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from proxy.decision import (
    ALL_RELATION_SETS,
    PURPOSES,
    RELATIONS,
    Action,
    DecisionTable,
    Effect,
    Relation,
    Rule,
    build_table,
)
from proxy.fieldmap import FieldMap, MapError, parse_fieldmap
from proxy.lint import Finding, ParsedPolicy, RoleLink, Severity, lint_model, parse_policy
from proxy.policytool import coverage_warnings
from proxy.redact import Plans
from proxy.relations import CoverGrant, parse_cover
from proxy.routes import RouteTable

BUNDLE_FILES = ("model.conf", "policy.csv", "fields.yaml", "cover.yaml")
SIGNATURE_FILE = "bundle.sig"  # optional: an officer's Ed25519 signature over the bundle's digest
REQUIRED_FILES = ("model.conf", "policy.csv", "fields.yaml")


class PolicyError(Exception):
    """The bundle cannot be used; `findings` say where and why."""

    def __init__(self, findings: list[Finding]) -> None:
        super().__init__("; ".join(str(f) for f in findings[:5]))
        self.findings = findings


@dataclass(frozen=True, slots=True)
class PolicyBundle:
    """Everything derived from one consistent read of `policies/`."""

    source: BundleSource
    digest: str  # SHA-256 over the files, stamped into every audit record
    fieldmap: FieldMap
    routes: RouteTable
    table: DecisionTable
    rules: tuple[Rule, ...]
    cover: tuple[CoverGrant, ...]
    warnings: tuple[Finding, ...]
    loaded_at: float
    proof_checks: int
    plans: Plans = field(compare=False)  # compiled redaction, made on first use

    @property
    def directory(self) -> Path:
        return self.source.directory

    @property
    def short_hash(self) -> str:
        return self.digest[:16]


@dataclass(frozen=True, slots=True)
class BundleSource:
    """Where a bundle's files live: one directory, optionally with the field map kept elsewhere
    (the same policy in front of a different CRM)."""

    directory: Path
    fields_file: Path | None = None

    def paths(self) -> dict[str, Path]:
        paths = {name: self.directory / name for name in (*BUNDLE_FILES, SIGNATURE_FILE)}
        if self.fields_file is not None:
            paths["fields.yaml"] = self.fields_file
        return paths


def read_bundle_files(source: BundleSource) -> dict[str, bytes]:
    """Read every bundle file once; the hash and the parse use these same bytes."""
    found: dict[str, bytes] = {}
    for name, path in source.paths().items():
        if path.exists():
            found[name] = path.read_bytes()
    missing = [n for n in REQUIRED_FILES if n not in found]
    if missing:
        raise PolicyError([Finding(str(source.directory), None, Severity.ERROR, f"missing {', '.join(missing)}")])
    return found


PROVED_FILES = ("model.conf", "policy.csv", "fields.yaml")
"""What the proof depends on. Cover grants change whenever someone goes on leave; they are checked
when loaded and never change the decision table, so editing them does not cost a new proof."""


def bundle_digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(n for n in files if n != SIGNATURE_FILE):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def load_bundle(source: BundleSource | Path, proofs: Path | None = None,
                signed_by: Ed25519PublicKey | None = None) -> PolicyBundle:
    if isinstance(source, Path):
        source = BundleSource(source)
    return compile_bundle(source, read_bundle_files(source), proofs, signed_by)


def sign_bundle(files: dict[str, bytes], key: Ed25519PrivateKey) -> bytes:
    """The signature file's content: the digest it covers, and the signature over it."""
    digest = bundle_digest(files)
    return f"{digest}\n{base64.b64encode(key.sign(digest.encode())).decode()}\n".encode()


def check_signature(files: dict[str, bytes], public: Ed25519PublicKey) -> Finding | None:
    raw = files.get(SIGNATURE_FILE)
    if raw is None:
        return Finding(SIGNATURE_FILE, None, Severity.ERROR, "the bundle is not signed and policy.require_signature "
                       "is on", "fieldguard policy sign --key officer.pem")
    try:
        digest, signature = raw.decode().split()
        public.verify(base64.b64decode(signature), digest.encode())
    except (ValueError, InvalidSignature, UnicodeDecodeError):
        return Finding(SIGNATURE_FILE, None, Severity.ERROR, "the bundle's signature is not valid for the trusted "
                       "officer key")
    if digest != bundle_digest(files):
        return Finding(SIGNATURE_FILE, None, Severity.ERROR, "the bundle changed after it was signed",
                       "review the change, then sign it again")
    return None


def compile_bundle(source: BundleSource, files: dict[str, bytes], proofs: Path | None = None,
                   signed_by: Ed25519PublicKey | None = None) -> PolicyBundle:
    """Lint, compile and prove; raise `PolicyError` with every finding on failure.

    `proofs` is a directory remembering bundles already proved by this version of FieldGuard and
    pycasbin, so restarting on an unchanged bundle skips the seconds-long proof; a changed byte in
    the model, the policy or the field map gives a new proof.
    """
    findings: list[Finding] = []
    if signed_by is not None and (bad := check_signature(files, signed_by)) is not None:
        raise PolicyError([bad])
    try:
        fieldmap = parse_fieldmap(files["fields.yaml"].decode("utf-8"))
    except (MapError, UnicodeDecodeError) as exc:
        line = exc.line if isinstance(exc, MapError) else None
        message = exc.detail if isinstance(exc, MapError) else "not UTF-8"
        raise PolicyError([Finding("fields.yaml", line, Severity.ERROR, message)]) from None
    cover: tuple[CoverGrant, ...] = ()
    if "cover.yaml" in files:
        try:
            cover = parse_cover(files["cover.yaml"].decode("utf-8"))
        except MapError as exc:
            findings.append(Finding("cover.yaml", exc.line, Severity.ERROR, exc.detail))
    model_text = files["model.conf"].decode("utf-8", errors="replace")
    policy_text = files["policy.csv"].decode("utf-8", errors="replace")
    findings += lint_model(model_text)
    parsed = parse_policy(policy_text, fieldmap.classes)
    findings += parsed.findings
    routes = RouteTable(list(fieldmap.routes))
    for a, b in routes.overlaps():
        findings.append(Finding("fields.yaml", _line(b.source), Severity.ERROR,
                                f"{b.method} {b.template} overlaps {a.method} {a.template} ({a.source})"))
    errors = [f for f in findings if f.severity is Severity.ERROR]
    if errors:
        raise PolicyError(errors)
    table = compile_table(parsed, fieldmap.classes)
    digest = bundle_digest(files)
    stamp = _proof_stamp(proofs, bundle_digest({n: files[n] for n in PROVED_FILES if n in files}))
    if stamp is not None and stamp.exists():
        checks = int(stamp.read_text() or 0)
    else:
        checks = prove(table, model_text, policy_text, fieldmap.classes)
        if stamp is not None:
            stamp.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            stamp.write_text(str(checks))
    return PolicyBundle(
        plans=Plans(fieldmap.classes),
        source=source,
        digest=digest,
        fieldmap=fieldmap,
        routes=routes,
        table=table,
        rules=tuple(parsed.rules),
        cover=cover,
        warnings=(*(f for f in findings if f.severity is Severity.WARNING),
                  *coverage_warnings(fieldmap, table, parsed.rules)),
        loaded_at=time.time(),
        proof_checks=checks,
    )


def _proof_stamp(proofs: Path | None, digest: str) -> Path | None:
    if proofs is None:
        return None
    versions = f"{digest}:{version('fieldguard')}:{version('pycasbin')}"
    return proofs / hashlib.sha256(versions.encode()).hexdigest()


def _line(source: str) -> int | None:
    tail = source.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def ancestors(role: str, links: Iterable[RoleLink]) -> set[str]:
    """The role and every role it inherits through g rows."""
    parents: dict[str, list[str]] = {}
    for link in links:
        parents.setdefault(link.role, []).append(link.parent)
    found, stack = set(), [role]
    while stack:
        r = stack.pop()
        if r not in found:
            found.add(r)
            stack.extend(parents.get(r, []))
    return found


def compile_table(parsed: ParsedPolicy, classes: Iterable[str]) -> DecisionTable:
    """Fold the rows into (role, relation, class, action) -> effect, with inheritance and deny-override."""
    roles = {r.role for r in parsed.rules} | {p.role for p in parsed.purposes}
    roles |= {link.role for link in parsed.links} | {link.parent for link in parsed.links}
    grants: dict[tuple[str, Relation, str, Action], tuple[Effect, Rule]] = {}
    purposes: dict[str, frozenset[str]] = {}
    for role in roles:
        inherited = ancestors(role, parsed.links)
        for rule in parsed.rules:
            if rule.role not in inherited:
                continue
            key = (role, rule.relation, rule.field_class, rule.action)
            held = grants.get(key)
            if held is None or (rule.effect is Effect.DENY and held[0] is Effect.ALLOW):
                grants[key] = (rule.effect, rule)
        purposes[role] = frozenset(p.purpose for p in parsed.purposes if p.role in inherited)
    return build_table(grants, roles, classes, purposes)


class _TextAdapter(Adapter):  # type: ignore[misc]
    """Feeds Casbin the same bytes the gateway parsed, line by line as its file adapter does."""

    def __init__(self, text: str) -> None:
        self._text = text

    def load_policy(self, model: Any) -> None:
        for line in self._text.splitlines():
            load_policy_line(line.strip(), model)

    def save_policy(self, model: Any) -> bool:
        return False  # never rewrite the officers' file (it would drop their comments)


def casbin_enforcer(model_text: str, policy_text: str) -> Any:
    model = casbin.Enforcer.new_model(text=model_text)
    enforcer = casbin.Enforcer(model, _TextAdapter(policy_text))
    enforcer.enable_auto_save(False)
    return enforcer


def probe_client(relations: Relation) -> str:
    return f"c:probe:{int(relations)}"


def prove(table: DecisionTable, model_text: str, policy_text: str, classes: Iterable[str]) -> int:
    """Check the compiled table against Casbin on the whole request matrix; return the checks made.

    The gateway passes the caller's active role as `sub` and states the relations it holds to the
    client as g2 facts (client, relation:role); every combination is enumerated here.
    """
    try:
        enforcer = casbin_enforcer(model_text, policy_text)
        for role in table.roles:
            for rels in ALL_RELATION_SETS:
                for rel in RELATIONS:
                    if rel is not Relation.ANY and rel in rels:
                        enforcer.add_named_grouping_policy("g2", probe_client(rels), f"{rel.label}:{role}")
        ctx = enforcer.new_enforce_context("2")
    except Exception as exc:
        raise PolicyError([Finding("model.conf", None, Severity.ERROR,
                                   f"Casbin cannot load the model and policy: {type(exc).__name__}: {exc}")]) from None
    checks = 0
    mismatches: list[Finding] = []
    class_list = sorted(set(classes))
    try:
        for role in sorted(table.roles):
            for rels in ALL_RELATION_SETS:
                cli = probe_client(rels)
                for cls in class_list:
                    for action in Action:
                        expected = table.allows(role, rels, cls, action)
                        actual = bool(enforcer.enforce(role, cli, cls, action.value))
                        checks += 1
                        if expected != actual and len(mismatches) < 10:
                            mismatches.append(Finding("model.conf", None, Severity.ERROR,
                                f"Casbin says {'allow' if actual else 'deny'} but the compiled table says "
                                f"{'allow' if expected else 'deny'} for ({role}, {rels.label}, {cls}, {action})",
                                "the model must keep the meaning FieldGuard compiles; see the comments in it"))
            for purpose in sorted(PURPOSES):
                expected = table.purpose_allowed(role, purpose)
                actual = bool(enforcer.enforce(ctx, role, purpose))
                checks += 1
                if expected != actual and len(mismatches) < 10:
                    mismatches.append(Finding("model.conf", None, Severity.ERROR,
                        f"Casbin and the compiled table disagree on purpose {purpose} for role {role}"))
    except Exception as exc:
        raise PolicyError([Finding("model.conf", None, Severity.ERROR,
                                   f"Casbin failed while proving the policy: {type(exc).__name__}: {exc}")]) from None
    if mismatches:
        raise PolicyError(mismatches)
    return checks

"""The policy bundle: the files in `policies/`, checked, compiled and proved before use.

Loading is all-or-nothing. The Casbin files are linted for pycasbin's silent pitfalls, compiled into a
`DecisionTable`, and the table is then proved equal to `enforcer.enforce` on every (role, relation set,
class, action) and every (role, purpose). Only a bundle that passes every step replaces the one in
force; the swap is one reference assignment, so no request ever sees half a policy.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from proxy.config import PolicySection
from proxy.policy.breakglass import NONE, BreakGlassRules, parse_breakglass
from proxy.policy.compiler import compile_table, prove
from proxy.policy.decision import DecisionTable, Outcome, Relation, Rule
from proxy.policy.disclosure import NONE as NO_DISCLOSURE
from proxy.policy.disclosure import DisclosureRules, parse_disclosure
from proxy.policy.fieldmap import FieldMap, parse_fieldmap
from proxy.policy.lint import (
    Finding,
    PolicyError,
    Severity,
    coverage_warnings,
    line_of_source,
    lint_model,
    parse_policy,
)
from proxy.policy.relations import CoverGrant, parse_cover
from proxy.policy.retention import NONE as NO_RETENTION
from proxy.policy.retention import RetentionRules, parse_retention
from proxy.policy.yamlfile import MapError, decode
from proxy.routes import RouteTable
from proxy.secretfile import private_dir

BUNDLE_FILES = ("model.conf", "policy.csv", "fields.yaml", "cover.yaml", "breakglass.yaml",
                "disclosure.yaml", "retention.yaml")
SIGNATURE_FILE = "bundle.sig"  # optional: an officer's Ed25519 signature over the bundle's digest
REQUIRED_FILES = ("model.conf", "policy.csv", "fields.yaml")


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
    breakglass: BreakGlassRules
    disclosure: DisclosureRules
    retention: RetentionRules
    warnings: tuple[Finding, ...]
    loaded_at: float
    proof_checks: int
    memo: dict[Any, Any] = field(default_factory=dict, compare=False)
    """What the bundle's users compile from it on first use (the rewriter's plans), kept with it so that
    a new bundle starts afresh and a request still holding the old one keeps what matches it."""

    @property
    def directory(self) -> Path:
        return self.source.directory

    @property
    def short_hash(self) -> str:
        return self.digest[:16]


@dataclass(frozen=True, slots=True)
class BundleSource:
    """Where a bundle's files live: one directory, optionally with the field map kept elsewhere
    (the same policy in front of a different CRM), and then the retention schedules beside it if there are
    any there (they name that CRM's fields and resources)."""

    directory: Path
    fields_file: Path | None = None

    @classmethod
    def configured(cls, policy: PolicySection) -> BundleSource:
        """The bundle a deployment's `[policy]` section names."""
        return cls(Path(policy.dir), Path(policy.fields_file) if policy.fields_file else None)

    def paths(self) -> dict[str, Path]:
        paths = {name: self.directory / name for name in (*BUNDLE_FILES, SIGNATURE_FILE)}
        if self.fields_file is not None:
            paths["fields.yaml"] = self.fields_file
            beside = self.fields_file.parent / "retention.yaml"  # schedules name that CRM's fields, so they
            if beside.exists():                                   # travel with its field map
                paths["retention.yaml"] = beside
        return paths


def read_bundle_files(source: BundleSource) -> dict[str, bytes]:
    """Read every bundle file once; the hash and the parse use these same bytes."""
    found: dict[str, bytes] = {}
    for name, path in source.paths().items():
        try:
            found[name] = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:  # unreadable, a directory, gone mid-read: a finding, never a crash
            raise PolicyError([Finding(name, None, Severity.ERROR, f"cannot be read: {exc.strerror or exc}")]) from None
    missing = [n for n in REQUIRED_FILES if n not in found]
    if missing:
        raise PolicyError([Finding(str(source.directory), None, Severity.ERROR, f"missing {', '.join(missing)}")])
    return found


def proved_digest(model_text: str, policy_text: str, classes: Iterable[str]) -> str:
    """What the proof is a function of, beside the compiled table: the model, the rows and the class names.
    Nothing else reaches Casbin: cover grants (which change whenever someone is away) and the rest of
    fields.yaml (paths, encryption, relation sources) cost no new proof; a class added or removed does."""
    return bundle_digest({"model.conf": model_text.encode(), "policy.csv": policy_text.encode(),
                          "classes": "\n".join(sorted(classes)).encode()})


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
    the model, the policy or the field map, or a compiler that makes another table of them, gives a
    new proof.
    """
    findings: list[Finding] = []
    if signed_by is not None and (bad := check_signature(files, signed_by)) is not None:
        raise PolicyError([bad])
    try:
        fieldmap = parse_fieldmap(decode(files["fields.yaml"], "fields.yaml"))
    except MapError as exc:
        raise PolicyError([Finding(exc.file, exc.line, Severity.ERROR, exc.detail)]) from None
    cover: tuple[CoverGrant, ...] = ()
    glass, release, keeping = NONE, NO_DISCLOSURE, NO_RETENTION
    texts: dict[str, str] = {}
    for name in ("cover.yaml", "breakglass.yaml", "disclosure.yaml", "retention.yaml", "model.conf", "policy.csv"):
        if name not in files:
            continue
        try:
            texts[name] = decode(files[name], name)
            if name == "cover.yaml":
                cover = parse_cover(texts[name])
            elif name == "breakglass.yaml":
                glass = parse_breakglass(texts[name])
            elif name == "disclosure.yaml":
                release = parse_disclosure(texts[name])
            elif name == "retention.yaml":
                keeping = parse_retention(texts[name], fieldmap)
        except MapError as exc:
            findings.append(Finding(exc.file, exc.line, Severity.ERROR, exc.detail))
    if "model.conf" not in texts or "policy.csv" not in texts:
        raise PolicyError(findings)
    model_text, policy_text = texts["model.conf"], texts["policy.csv"]
    findings += lint_model(model_text)
    parsed = parse_policy(policy_text, fieldmap.classes)
    findings += parsed.findings
    routes = RouteTable(list(fieldmap.routes))
    for a, b in routes.overlaps():
        findings.append(Finding("fields.yaml", line_of_source(b.source), Severity.ERROR,
                                f"{b.method} {b.template} overlaps {a.method} {a.template} ({a.source})"))
    errors = [f for f in findings if f.severity is Severity.ERROR]
    if errors:
        raise PolicyError(errors)
    table = compile_table(parsed, fieldmap.classes)
    if errors := _breakglass_findings(glass, table, texts.get("breakglass.yaml", "")):
        raise PolicyError(errors)
    digest = bundle_digest(files)
    stamp = proof_stamp(proofs, proved_digest(model_text, policy_text, fieldmap.classes), table.digest())
    checks = _proved(stamp, lambda: prove(table, model_text, policy_text, fieldmap.classes))
    return PolicyBundle(
        source=source,
        digest=digest,
        fieldmap=fieldmap,
        routes=routes,
        table=table,
        rules=tuple(parsed.rules),
        cover=cover,
        breakglass=glass,
        disclosure=release,
        retention=keeping,
        warnings=(*(f for f in findings if f.severity is Severity.WARNING),
                  *coverage_warnings(fieldmap, table, parsed.rules)),
        loaded_at=time.time(),
        proof_checks=checks,
    )


def opened_by_breakglass(table: DecisionTable, role: str) -> list[str]:
    """What a break-glass grant shows `role` that it would not see of any client without one: each class by
    name when shown in clear, else with its outcome ("clinical_notes (mask)")."""
    glass, base = table.view(role, Relation.ANY | Relation.BREAKGLASS), table.view(role, Relation.ANY)
    if glass is None:
        return []
    opened = [c for c in glass.classes if glass.shows(c) and (base is None or glass.outcome(c) != base.outcome(c))]
    return sorted(c if glass.outcome(c) is Outcome.CLEAR else f"{c} ({glass.outcome(c)})" for c in opened)


def _breakglass_findings(glass: BreakGlassRules, table: DecisionTable, text: str) -> list[Finding]:
    """A role allowed to break the glass must get something by it, for the purposes its reasons carry: a
    grant that opens nothing, or that its own purpose rule then refuses, is a rule written wrong."""
    out: list[Finding] = []
    line = next((n for n, row in enumerate(text.splitlines(), 1) if row.startswith("roles")), None)
    for role in sorted(glass.roles):
        if role not in table.roles:
            out.append(Finding("breakglass.yaml", line, Severity.ERROR, f"role {role} is not in policy.csv"))
            continue
        if not opened_by_breakglass(table, role):
            out.append(Finding("breakglass.yaml", line, Severity.ERROR,
                               f"role {role} may break the glass, but policy.csv opens nothing to it under "
                               "relation breakglass (add rows: p, ROLE, breakglass, CLASS, read, allow)"))
        for purpose in sorted({r.purpose for r in glass.reasons.values()}):
            if not table.purpose_allowed(role, purpose):
                out.append(Finding("breakglass.yaml", line, Severity.ERROR,
                                   f"role {role} may break the glass for {purpose}, which policy.csv does not "
                                   f"allow it (add: p2, {role}, {purpose})"))
    return out


def _proved(stamp: Path | None, run: Callable[[], int]) -> int:
    """The proof's check count: remembered in `stamp`, or run now. Gateways and commands starting together
    on one keys directory prove a bundle once: the first holds the lock, the others then read its stamp."""
    if stamp is None:
        return run()
    if stamp.exists():
        return int(stamp.read_text() or 0)
    private_dir(stamp.parent)  # keys/proofs, and keys/ if missing: 0700
    with (stamp.parent / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if stamp.exists():
                return int(stamp.read_text() or 0)
            checks = run()
            tmp = stamp.with_name(stamp.name + ".tmp")
            tmp.write_text(str(checks))
            tmp.replace(stamp)  # never a half-written stamp for a reader
            return checks
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def proof_stamp(proofs: Path | None, digest: str, table: str) -> Path | None:
    """Where the proof of these files, compiled to this table, by these versions, is remembered."""
    if proofs is None:
        return None
    versions = f"{digest}:{table}:{version('fieldguard')}:{version('pycasbin')}"
    return proofs / hashlib.sha256(versions.encode()).hexdigest()


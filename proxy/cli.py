"""The `fieldguard` command line: serve, demo, token (and, as they land, keys, audit, policy)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import click

from proxy.config import ConfigError, Settings, load_settings

PURPOSE_PREFERENCE = ("TREAT", "HOPERAT", "HRESCH", "PATRQT", "ETREAT", "HLEGAL")


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.version_option(package_name="fieldguard")
def main() -> None:
    """FieldGuard: need-to-know field redaction, encryption and audit in front of a client CRM."""


@main.command()
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="fieldguard.toml (see examples/fieldguard.toml)")
def serve(config: Path | None) -> None:
    """Run the gateway."""
    from proxy.server import run

    settings = _settings(config)
    sys.exit(run(settings))


@main.command()
@click.option("--sub", required=True, help="the user, as the CRM knows them (alice)")
@click.option("--role", "roles", multiple=True, required=True, help="a role; repeat for several")
@click.option("--purpose", "purposes", multiple=True,
              help="purpose of use (default: the first the policy allows the role)")
@click.option("--client-id", help="for the client role: the client's CRM id")
@click.option("--ttl", default=3600, show_default=True, help="seconds until the token expires")
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def token(sub: str, roles: tuple[str, ...], purposes: tuple[str, ...], client_id: str | None, ttl: int,
          config: Path | None) -> None:
    """Mint a demo token signed with identity.demo_signing_key_file."""
    from proxy.identity import mint_token
    from proxy.policy import load_bundle

    settings = _settings(config)
    key_file = settings.identity.demo_signing_key_file
    if not key_file:
        raise click.ClickException("identity.demo_signing_key_file is not set (tokens come from your IdP)")
    chosen = list(purposes)
    if not chosen:
        from proxy.gateway import policy_source

        table = load_bundle(policy_source(settings), settings.path(settings.keys.dir) / "proofs").table
        allowed = {p for r in roles for p in table.purposes.get(r, frozenset())}
        chosen = [next((p for p in PURPOSE_PREFERENCE if p in allowed), sorted(allowed)[0])] if allowed else []
    click.echo(mint_token(
        settings.path(key_file).read_bytes(), subject=sub, roles=list(roles), issuer=settings.identity.issuer,
        audience=settings.identity.audience, purposes=chosen, client_id=client_id, ttl_seconds=ttl,
    ))


@main.command()
@click.option("--port", default=8000, show_default=True, help="gateway port on 127.0.0.1")
@click.option("--crm-port", default=8100, show_default=True, help="example CRM port on 127.0.0.1")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where the demo keeps its CRM database and audit log (default: ./demo-data)")
@click.option("--reset", is_flag=True, help="start from a freshly seeded CRM")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where the demo keeps its keys (default: keys/ in the repository)")
def demo(port: int, crm_port: int, data_dir: Path | None, reset: bool, keys_dir: Path | None) -> None:
    """Start the example CRM and the gateway in front of it; print a curl line per demo user."""
    from proxy.demo import run_demo

    sys.exit(run_demo(port=port, crm_port=crm_port, data_dir=data_dir, reset=reset, keys=keys_dir))


# ---------------------------------------------------------------------------------------------- keys
CONFIG = click.option("--config", "config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                      help="fieldguard.toml")
DRY_RUN = click.option("--dry-run", is_flag=True, help="say what would change; change nothing")
ACTOR = click.option("--actor", default=None, help="who is running this, for the audit record (default: $USER)")


def _run(coro: Any) -> Any:
    from proxy.kek import KekError

    try:
        return asyncio.run(coro)
    except (KekError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


def _echo(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@main.group()
def keys() -> None:
    """Key-encryption key and per-client data keys: init, status, rotation, shredding."""


@keys.command("init")
@CONFIG
@click.option("--generate-passphrase", "generate", type=click.Path(dir_okay=False, path_type=Path),
              help="write a new random passphrase to this file (0600) and use it (file backend)")
@DRY_RUN
@ACTOR
def keys_init(config: Path | None, generate: Path | None, dry_run: bool, actor: str | None) -> None:
    """Create the KEK (sealed file or PKCS#11 token key) and the keystore."""
    from proxy import keytool
    from proxy.secretfile import write_private

    settings = _settings(config)
    if dry_run:
        k = settings.keys
        where = settings.path(k.dir) / k.kek_file if k.kek == "file" else f"token {k.pkcs11_token}"
        click.echo(f"would create a {k.kek} KEK ({where}) and the keystore {settings.path(k.dir) / k.keystore}")
        return
    if generate is not None:
        if generate.exists():
            raise click.ClickException(f"{generate} exists; refusing to overwrite a passphrase")
        write_private(generate, secrets.token_urlsafe(32).encode())
        os.environ[settings.keys.passphrase_env] = generate.read_text().strip()
    report = _run(keytool.init(settings))
    _run(keytool.audit(settings, report.action, report, who=actor or keytool.actor()))
    click.echo(f"KEK {report.detail['kek']} created ({report.detail['backend']}); keystore ready in "
               f"{settings.path(settings.keys.dir)}")


@keys.command("status")
@CONFIG
def keys_status(config: Path | None) -> None:
    """KEKs, data keys by scope and status, keys still wrapped by an old KEK."""
    from proxy import keytool

    _echo(_run(keytool.status(_settings(config))))


@keys.command("rotate-kek")
@CONFIG
@DRY_RUN
@click.option("--retire-old", is_flag=True, help="afterwards, destroy KEKs that no longer wrap any key "
              "(backups of the keystore made before then become unreadable)")
@ACTOR
def keys_rotate_kek(config: Path | None, dry_run: bool, retire_old: bool, actor: str | None) -> None:
    """Make a new KEK current and re-wrap every data key (no CRM traffic); rerun to resume."""
    from proxy import keytool

    settings = _settings(config)
    preview = _run(keytool.rotate_kek(settings, True, False))
    if dry_run:
        _run(keytool.audit(settings, preview.action, preview, who=actor or keytool.actor()))
        _echo({"would_rewrap": preview.counts["to_rewrap"], "resuming": preview.detail["resuming"]})
        return
    with click.progressbar(length=preview.counts["to_rewrap"], label="re-wrapping data keys") as bar:
        report = _run(keytool.rotate_kek(settings, False, retire_old, bar.update))
    _run(keytool.audit(settings, report.action, report, who=actor or keytool.actor()))
    _echo({"kek": report.detail["kek"], "rewrapped": report.counts["rewrapped"],
           "retired": report.detail.get("retired", [])})


@keys.command("rotate")
@CONFIG
@click.option("--client", "client_id", required=True, help="the client's CRM id")
@click.option("--scope", default=None, help="record or process_notes (default: every scope)")
@DRY_RUN
@ACTOR
def keys_rotate(config: Path | None, client_id: str, scope: str | None, dry_run: bool, actor: str | None) -> None:
    """A new data-key version for one client; the old version only decrypts from now on."""
    from proxy import keytool

    settings = _settings(config)
    report = _run(keytool.rotate_client(settings, client_id, scope, dry_run))
    _run(keytool.audit(settings, report.action, report, who=actor or keytool.actor(),
                       clients=[report.detail["pseudonym"]]))
    _echo({"client": report.detail["pseudonym"], "scopes_rotated": report.counts["scopes"], "dry_run": dry_run})


@keys.command("shred")
@CONFIG
@click.option("--client", "client_id", required=True, help="the client's CRM id")
@click.option("--scope", default=None, help="record or process_notes (default: every scope and the pseudonym)")
@click.option("--reason", required=True, help="the legal basis or ticket (no client details)")
@DRY_RUN
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@ACTOR
def keys_shred(config: Path | None, client_id: str, scope: str | None, reason: str, dry_run: bool, yes: bool,
               actor: str | None) -> None:
    """Destroy a client's data keys: their encrypted fields become unreadable everywhere, backups included."""
    from proxy import keytool

    settings = _settings(config)
    if not dry_run and not yes:
        click.confirm(f"Destroy every {scope or 'data'} key of client {client_id}? This cannot be undone",
                      abort=True)
    report = _run(keytool.shred(settings, client_id, scope, reason, dry_run))
    _run(keytool.audit(settings, report.action, report, who=actor or keytool.actor(), reason=reason,
                       clients=[report.detail["pseudonym"]]))
    _echo({"client": report.detail["pseudonym"], "keys": report.counts["keys"],
           "destroyed": report.counts.get("destroyed", 0), "dry_run": dry_run})


# ---------------------------------------------------------------------------------------------- migration
def _migration(settings: Settings, dry_run: bool, rate: float, run: Any, label: str, **kw: Any) -> Any:
    from proxy.custody import open_kek, open_keyring
    from proxy.gateway import policy_source
    from proxy.policy import load_bundle

    fm = load_bundle(policy_source(settings), settings.path(settings.keys.dir) / "proofs").fieldmap

    async def go() -> Any:
        ring = await open_keyring(settings, open_kek(settings))
        bar_holder: dict[str, Any] = {}
        try:
            def totals(n: int) -> None:
                bar_holder["bar"] = click.progressbar(length=n, label=label, file=sys.stderr)
                bar_holder["bar"].__enter__()

            def progress(n: int) -> None:
                if "bar" in bar_holder:
                    bar_holder["bar"].update(n)

            return await run(settings, fm, ring, dry_run=dry_run, rate=rate, progress=progress, totals=totals, **kw)
        finally:
            if "bar" in bar_holder:
                bar_holder["bar"].__exit__(None, None, None)
            await ring.store.close()

    return _run(go())


def _report_migration(settings: Settings, report: Any, actor: str | None) -> None:
    from proxy import keytool

    counts = {"records": report.records, "changed_records": report.changed_records, "fields": report.fields,
              "failures": report.failures}
    _run(keytool.audit(settings, report.action, keytool.KeyReport(report.action, report.dry_run, counts),
                       who=actor or keytool.actor()))
    _echo({**counts, "by_resource": report.by_resource, "complete": report.complete, "dry_run": report.dry_run})
    if report.failures:
        raise click.ClickException(f"{report.failures} records could not be processed; see the CRM's log")


@main.command("encrypt-existing")
@CONFIG
@DRY_RUN
@click.option("--rate", default=50.0, show_default=True, help="CRM writes per second (0: unlimited)")
@click.option("--max-records", type=int, default=None, help="stop after this many records (rerun to resume)")
@ACTOR
def encrypt_existing(config: Path | None, dry_run: bool, rate: float, max_records: int | None,
                     actor: str | None) -> None:
    """Encrypt the sensitive fields a CRM already holds in plaintext, through its own API."""
    from proxy.migrate import encrypt_existing as run

    settings = _settings(config)
    report = _migration(settings, dry_run, rate, run, "encrypting", max_records=max_records)
    _report_migration(settings, report, actor)


@main.command("decrypt-export")
@CONFIG
@DRY_RUN
@click.option("--rate", default=50.0, show_default=True, help="CRM writes per second (0: unlimited)")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write decrypted records to this JSON-lines file (0600) instead of back into the CRM")
@ACTOR
def decrypt_export(config: Path | None, dry_run: bool, rate: float, output: Path | None, actor: str | None) -> None:
    """Leave FieldGuard: decrypt every sealed field back into the CRM (or into a file)."""
    from proxy.migrate import decrypt_export as run

    settings = _settings(config)
    report = _migration(settings, dry_run, rate, run, "decrypting", output=output)
    _report_migration(settings, report, actor)


# ---------------------------------------------------------------------------------------------- policy
@main.group()
def policy() -> None:
    """The policy bundle: check, test, diff, explain, sign, reload."""


POLICY_DIR = click.argument("directory", required=False, type=click.Path(exists=True, file_okay=False,
                                                                           path_type=Path))
FIELDS = click.option("--fields", "fields_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                      default=None, help="a field map kept outside the directory (same policy, another CRM)")


def _source(directory: Path | None, fields_file: Path | None, config: Path | None = None) -> Any:
    from proxy.gateway import policy_source
    from proxy.policy import BundleSource

    if directory is None:
        if config is None and Path("fieldguard.toml").exists():
            config = Path("fieldguard.toml")
        if config is not None:
            return policy_source(_settings(config))
        directory = Path("policies")
    return BundleSource(directory, fields_file)


def _load(source: Any) -> Any:
    """The bundle, or every finding as `file:line: message (hint)` and exit 1."""
    from proxy.policy import PolicyError, load_bundle

    try:
        return load_bundle(source, _proof_cache())
    except PolicyError as exc:
        for finding in exc.findings:
            click.echo(f"{source.directory}/{finding}", err=True)
        click.echo(f"{len(exc.findings)} error(s): the bundle cannot be used", err=True)
        sys.exit(1)


def _proof_cache() -> Path | None:
    keys = Path("keys")
    return keys / "proofs" if keys.is_dir() else None


@policy.command("check")
@POLICY_DIR
@FIELDS
@CONFIG
def policy_check(directory: Path | None, fields_file: Path | None, config: Path | None) -> None:
    """Validate every file of the bundle together (lint, compile, prove); exit 1 on errors."""
    source = _source(directory, fields_file, config)
    bundle = _load(source)
    for warning in bundle.warnings:
        click.echo(f"{source.directory}/{warning}")
    click.echo(f"ok: {len(bundle.rules)} rules, {len(bundle.table.roles)} roles, {len(bundle.fieldmap.classes)} "
               f"classes, {len(bundle.routes.routes)} routes; proved equal to Casbin on {bundle.proof_checks} "
               f"requests; {len(bundle.warnings)} warning(s); hash {bundle.short_hash}")


@policy.command("test")
@POLICY_DIR
@FIELDS
@CONFIG
def policy_test(directory: Path | None, fields_file: Path | None, config: Path | None) -> None:
    """Run the expectation files in DIR/tests/*.yaml; exit 1 if any case fails."""
    from proxy import logs
    from proxy.policytests import render, run_tests

    logs.configure("warning")
    source = _source(directory, fields_file, config)
    bundle = _load(source)
    results = run_tests(bundle, source)
    if not results:
        raise click.ClickException(f"no cases in {source.directory / 'tests'}")
    click.echo(render(results))
    if any(not r.passed for r in results):
        sys.exit(1)


@policy.command("diff")
@click.argument("old", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("new", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["table", "markdown"]), default="table", show_default=True)
def policy_diff(old: Path, new: Path, fmt: str) -> None:
    """What each role gains and loses between two bundles (role x relation x class x action)."""
    from proxy.policy import BundleSource
    from proxy.policytool import diff, purpose_diff, render_diff

    before, after = _load(BundleSource(old)), _load(BundleSource(new))
    changes = diff(before.table, after.table)
    click.echo(render_diff(changes, purpose_diff(before.table, after.table), markdown=fmt == "markdown"))


@policy.command("explain")
@click.option("--role", required=True)
@click.option("--purpose", default=None, help="default: the role's only purpose, if it has one")
@click.option("--relation", "relations", multiple=True,
              help="relation held to the client (caseload, supervision, cover, self); repeat; default any")
@click.option("--user", default=None, help="work the relations out from the CRM for this user (needs --config)")
@click.option("--client-id", default=None, help="for the client role: the caller's own client id")
@click.option("--method", default="GET", show_default=True)
@click.option("--path", "target", default=None, help="a route, e.g. /clients/7")
@click.option("--class", "field_class", default=None, help="one field class instead of a route")
@CONFIG
@POLICY_DIR
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def policy_explain(role: str, purpose: str | None, relations: tuple[str, ...], user: str | None,
                   client_id: str | None, method: str, target: str | None, field_class: str | None,
                   config: Path | None, directory: Path | None, fmt: str) -> None:
    """Why each field of a route (or one class) is shown, pseudonymised, masked or removed for a role."""
    from proxy.decision import Relation
    from proxy.policytool import explain_class, explain_resource, render_explanations
    from proxy.routes import normalise_path

    source = _source(directory, None, config)
    bundle = _load(source)
    table = bundle.table
    if purpose is None:
        allowed = sorted(table.purposes.get(role, frozenset()))
        purpose = allowed[0] if len(allowed) == 1 else None
    rels = Relation.ANY
    for name in relations:
        rels |= Relation.parse(name)
    if field_class is not None:
        e = explain_class(table, role, rels, purpose, field_class)
        click.echo(json.dumps(e.as_dict(), indent=2) if fmt == "json" else f"{field_class}: {e.outcome} - {e.reason}")
        return
    if target is None:
        raise click.ClickException("give --path (a route) or --class")
    matched = bundle.routes.match(method, normalise_path(target.split("?", 1)[0].encode()))
    if matched is None:
        raise click.ClickException(f"{method} {target}: no such route in the field map: it would be refused (403)")
    route, params = matched
    if user is not None:
        if config is None:
            raise click.ClickException("--user needs --config, to read the caseload facts from the CRM")
        client = params.get("client_id")
        if client is None:
            raise click.ClickException("--user works on routes with the client in the path (e.g. /clients/7)")
        rels = _run(_relations_from_crm(_settings(config), user, client_id, client, bundle))
    resource = bundle.fieldmap.resources[route.resource]
    items = explain_resource(table, bundle.fieldmap, route.resource, role, rels, purpose)
    visible = explain_class(table, role, rels, purpose, resource.record_class).outcome != "remove"
    if fmt == "json":
        click.echo(json.dumps({"route": f"{route.method} {route.template}", "relations": rels.label,
                               "purpose": purpose, "visible": visible, "fields": [e.as_dict() for e in items]},
                              indent=2))
    else:
        click.echo(f"{role} ({purpose or 'no purpose'}) holding {rels.label}: {route.method} {route.template}")
        click.echo(render_explanations(items, visible, resource.name, resource.record_class))


async def _relations_from_crm(settings: Settings, user: str, own_client: str | None, client: str, bundle: Any) -> Any:
    from datetime import UTC, datetime

    from proxy.identity import Principal
    from proxy.relations import RelationIndex
    from proxy.upstream import Upstream, UpstreamSettings

    upstream = Upstream(UpstreamSettings(url=settings.upstream.url, headers=settings.upstream.headers))
    await upstream.start()
    try:
        index = RelationIndex()
        fm = bundle.fieldmap
        await index.sync(fm.relations, fm.list_format.items, upstream.get_json)
    finally:
        await upstream.close()
    who = Principal(subject=user, roles=frozenset(), role="", purpose="", client_id=own_client)
    return index.relations(who, client, bundle.cover, datetime.now(UTC))


@policy.command("record")
@click.option("--out", "output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.argument("paths", nargs=-1, required=True)
@CONFIG
def policy_record(output: Path, paths: tuple[str, ...], config: Path | None) -> None:
    """Record the CRM's answers to PATHS (and the caseload facts) for `policy test` request cases."""
    settings = _settings(config)
    source = _source(None, None, config)
    bundle = _load(source)

    async def go() -> list[dict[str, Any]]:
        import httpx

        rel = bundle.fieldmap.relations
        sync = [f"{p}?{rel.page_param}=1&{rel.size_param}={rel.page_size}" for p in (rel.clients_path,
                                                                                      rel.staff_path)]
        keep = {rel.clients_path: (rel.client_id, rel.counsellor), rel.staff_path: (rel.staff_user, rel.supervisor)}
        items = bundle.fieldmap.list_format.items
        out = []
        async with httpx.AsyncClient(base_url=settings.upstream.url, timeout=30) as client:
            for n, target in enumerate([*sync, *paths]):
                r = await client.get(target)
                path, _, query = target.partition("?")
                body = r.json()
                if n < len(sync):  # the caseload facts: only the fields the gateway reads from them
                    rows = body if items == "." else body[items]
                    rows[:] = [{k: row.get(k) for k in keep[path]} for row in rows]
                out.append({"method": "GET", "path": path, "query": query, "status": r.status_code, "body": body})
        return out

    responses = _run(go())
    output.write_text(json.dumps({"responses": responses}) + "\n")
    click.echo(f"{len(responses)} answers recorded in {output}")


@policy.command("keygen")
@click.option("--out", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="the officer's private key (0600); the public key is written beside it (.pub.pem)")
def policy_keygen(output: Path) -> None:
    """An Ed25519 key pair for signing policy bundles."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from proxy.checkpoints import public_path, public_pem
    from proxy.secretfile import write_private

    if output.exists():
        raise click.ClickException(f"{output} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    write_private(output, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    public_path(output).write_bytes(public_pem(key.public_key()))
    click.echo(f"private key {output}; give the gateway {public_path(output)} (policy.signing_public_key)")


@policy.command("sign")
@POLICY_DIR
@click.option("--key", "key_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def policy_sign(directory: Path | None, key_file: Path) -> None:
    """Sign the bundle as reviewed: writes DIR/bundle.sig over the digest of every file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from proxy.policy import SIGNATURE_FILE, BundleSource, bundle_digest, read_bundle_files, sign_bundle
    from proxy.secretfile import check_private

    source = BundleSource(directory or Path("policies"))
    _load(source)  # only a bundle that loads is worth signing
    check_private(key_file)
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise click.ClickException(f"{key_file} is not an Ed25519 private key")
    files = read_bundle_files(source)
    (source.directory / SIGNATURE_FILE).write_bytes(sign_bundle(files, key))
    click.echo(f"signed {bundle_digest(files)[:16]} -> {source.directory / SIGNATURE_FILE}")


@policy.command("reload")
@CONFIG
def policy_reload(config: Path | None) -> None:
    """Ask the running gateway to load the bundle again (SIGHUP to server.pid_file)."""
    import signal

    settings = _settings(config)
    if not settings.server.pid_file:
        raise click.ClickException("server.pid_file is not set; send SIGHUP to the gateway yourself")
    pid_file = settings.path(settings.server.pid_file)
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot signal the gateway from {pid_file}: {exc}") from None
    click.echo(f"reload requested (pid {pid}); /readyz shows the policy hash in force and any refusal")


# ---------------------------------------------------------------------------------------------- audit
@main.group()
def audit() -> None:
    """The audit trail: verify it, query it, answer subject access requests, export it."""


def _store(settings: Settings, store: Path | None) -> Path:
    path = store or settings.path(settings.audit.store)
    if not path.exists():
        raise click.ClickException(f"no audit store at {path}")
    return path


async def _pseudonym_of(settings: Settings, client_id: str) -> str:
    from proxy.custody import open_keyring

    ring = await open_keyring(settings, None)
    try:
        found = await ring.store.known_pseudonym(client_id)
    finally:
        await ring.store.close()
    if found is None:
        raise click.ClickException(f"client {client_id} has no pseudonym: never accessed, or erased (keys shredded)")
    return found


async def _record_review(settings: Settings, action: str, actor: str | None, counts: dict[str, int],
                         clients: list[str] | None = None) -> None:
    """Reading the trail is an access too: it leaves a record of who looked, and at what."""
    from proxy import keytool

    await keytool.audit(settings, action, keytool.KeyReport(action, False, counts), who=actor or keytool.actor(),
                        clients=clients)


@audit.command("verify")
@CONFIG
@click.option("--store", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="the SQLite store (default: audit.store from the config)")
@click.option("--export", "export_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="verify a JSON-lines export instead of the store")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="the checkpoint public key you were given (default: the one beside the signing key)")
@click.option("--anchor", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="checkpoints kept elsewhere (an earlier export, the SIEM): the trail must still match them")
def audit_verify(config: Path | None, store: Path | None, export_file: Path | None, public_key: Path | None,
                 anchor: Path | None) -> None:
    """Re-hash every record and check sequence, links and signed checkpoints; exit 1 on any tampering."""
    from proxy.checkpoints import load_public, public_path
    from proxy.verify import read_export, verify_export, verify_store

    settings = _settings(config)
    key_file = public_key or public_path(settings.path(settings.keys.dir) / settings.audit.signing_key)
    if public_key is None:
        click.echo(f"note: trusting {key_file}; pass --public-key with the key you were given", err=True)
    public = load_public(key_file)
    anchors = read_export(anchor)[1] if anchor is not None else []
    if export_file is not None:
        verdict = verify_export(export_file, public, anchors)
    else:
        verdict = verify_store(_store(settings, store), public, anchors)
    _echo({"ok": verdict.ok, "records": verdict.records, "checkpoints": verdict.checkpoints,
           "last_checkpoint": verdict.last_checkpoint, "unanchored": verdict.unanchored,
           "first_bad_record": verdict.first_bad, "problems": verdict.problems})
    if not verdict.ok:
        sys.exit(1)


QUERY_OPTIONS = [
    click.option("--client", "client_id", default=None, help="the client's CRM id (resolved to their pseudonym)"),
    click.option("--user", default=None), click.option("--role", default=None),
    click.option("--purpose", default=None), click.option("--since", default=None, help="ISO 8601"),
    click.option("--until", default=None, help="ISO 8601"),
    click.option("--outcome", type=click.Choice(["allowed", "denied", "error", "dry-run", "break-glass"]),
                 default=None),
    click.option("--limit", default=1000, show_default=True),
]


def _query_options(f: Any) -> Any:
    for option in reversed(QUERY_OPTIONS):
        f = option(f)
    return f


@audit.command("query")
@CONFIG
@_query_options
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@ACTOR
def audit_query(config: Path | None, client_id: str | None, user: str | None, role: str | None,
                purpose: str | None, since: str | None, until: str | None, outcome: str | None, limit: int,
                fmt: str, actor: str | None) -> None:
    """Records by client, user, role, purpose, time and outcome."""
    from proxy.auditviews import Query, query, table

    settings = _settings(config)
    pseudonym = _run(_pseudonym_of(settings, client_id)) if client_id else None
    records = query(_store(settings, None), Query(pseudonym, user, role, purpose, since, until, outcome, limit))
    _run(_record_review(settings, "audit query", actor, {"records": len(records)}, [pseudonym] if pseudonym else None))
    click.echo(json.dumps(records, indent=2) if fmt == "json" else table(records))


@audit.command("report")
@CONFIG
@click.option("--client", "client_id", required=True, help="the client's CRM id")
@click.option("--format", "fmt", type=click.Choice(["html", "json"]), default="html", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@ACTOR
def audit_report(config: Path | None, client_id: str, fmt: str, output: Path | None, actor: str | None) -> None:
    """"Who accessed my record": for a subject access request."""
    from proxy.auditviews import Query, access_report, query, report_html

    settings = _settings(config)
    pseudonym = _run(_pseudonym_of(settings, client_id))
    records = [r for r in query(_store(settings, None), Query(pseudonym=pseudonym, limit=1_000_000))
               if r.get("method") != "CLI"]
    report = access_report(records, pseudonym)
    text = report_html(report) if fmt == "html" else json.dumps(report, indent=2)
    _run(_record_review(settings, "audit report", actor, {"records": len(records)}, [pseudonym]))
    if output is None:
        click.echo(text)
    else:
        output.write_text(text)
        click.echo(f"{report['count']} accesses written to {output}", err=True)


@audit.command("export")
@CONFIG
@click.option("--format", "fmt", type=click.Choice(["jsonl", "fhir", "ecs"]), default="jsonl", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@ACTOR
def audit_export(config: Path | None, fmt: str, output: Path | None, actor: str | None) -> None:
    """The whole trail: jsonl (verifiable offline), FHIR R4 AuditEvent (IHE BALP), or Elastic Common Schema."""
    import socket

    from proxy.auditviews import all_records, ecs_event, export_jsonl, fhir_audit_event

    settings = _settings(config)
    store = _store(settings, None)
    origin = settings.audit.origin or socket.gethostname()
    if fmt == "jsonl":
        lines = export_jsonl(store)
    elif fmt == "fhir":
        lines = (json.dumps(fhir_audit_event(r, origin)) for r in all_records(store))
    else:
        lines = (json.dumps(ecs_event(r)) for r in all_records(store))
    count = 0
    with output.open("w") if output else contextlib.nullcontext(sys.stdout) as out:
        for line in lines:
            out.write(line + "\n")
            count += 1
    _run(_record_review(settings, f"audit export {fmt}", actor, {"lines": count}))


@audit.command("public-key")
@CONFIG
def audit_public_key(config: Path | None) -> None:
    """Print the checkpoint public key, to hand to auditors out of band."""
    from proxy.checkpoints import CheckpointSigner, public_pem

    settings = _settings(config)
    signer = CheckpointSigner(settings.path(settings.keys.dir) / settings.audit.signing_key)
    click.echo(public_pem(signer.public).decode(), nl=False)
    click.echo(f"key id {signer.key_id}", err=True)


if __name__ == "__main__":
    main()

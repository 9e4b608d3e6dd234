"""`fieldguard policy ...`: the security officer's tools. check, test, diff, explain, record, keygen, sign,
reload, publish: every one reads the bundle the way the gateway does, and exits 1 on a finding."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from proxy.cli.options import ACTOR, CONFIG, DRY_RUN, operator, run, settings_of
from proxy.config import Settings
from proxy.errors import GatewayError
from proxy.policy import (
    BundleSource,
    PolicyBundle,
    PolicyError,
    Relation,
    RelationIndex,
    load_bundle,
    read_bundle_files,
)


@click.group()
def policy() -> None:
    """The policy bundle: check, test, diff, explain, sign, reload, publish."""


POLICY_DIR = click.argument("directory", required=False, type=click.Path(exists=True, file_okay=False,
                                                                           path_type=Path))
FIELDS = click.option("--fields", "fields_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                      default=None, help="a field map kept outside the directory (same policy, another CRM)")


def _source(directory: Path | None, fields_file: Path | None, config: Path | None = None) -> BundleSource:
    if directory is None:
        if config is None and Path("fieldguard.toml").exists():
            config = Path("fieldguard.toml")
        if config is not None:
            return BundleSource.configured(settings_of(config).policy)
        directory = Path("policies")
    return BundleSource(directory, fields_file)


def _load(source: BundleSource, proofs: Path | None = None) -> PolicyBundle:
    """The bundle, or every finding as `file:line: message (hint)` and exit 1."""
    try:
        return load_bundle(source, proofs or _proof_cache())
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
    if config is not None:  # the relation sources, read from the CRM as the gateway will read them
        settings = settings_of(config)
        try:
            index = run(_read_relations(settings, bundle))
        except GatewayError as exc:
            raise click.ClickException(f"the relations could not be read from the CRM at {settings.upstream.url}: "
                                       f"{exc.message}") from None
        click.echo(f"relations: {len(index.counsellor_of)} clients with a practitioner, {index.staff_rows} staff "
                   f"rows, {index.supervision_links} supervision links, {len(index.cover)} cover grants from the CRM")
        source_of = bundle.fieldmap.relations
        if not index.counsellor_of:
            click.echo(f"warning: the relation source matched no client ({source_of.clients_path or ''} "
                       f"{source_of.counsellor or source_of.caseload_path}): every decision that needs a relation "
                       "will be refused")
        if (source_of.supervisor or source_of.supervises or source_of.supervision_path) and not index.supervision_links:
            click.echo("warning: the supervision source matched no link: no one will hold supervision")


async def _read_relations(settings: Settings, bundle: PolicyBundle) -> RelationIndex:
    from proxy.upstream import Upstream

    upstream = Upstream(settings.upstream)
    await upstream.start()
    try:
        index = RelationIndex()
        await index.sync(bundle.fieldmap.relations, bundle.fieldmap.list_format.items, upstream.get_json)
        return index
    finally:
        await upstream.close()


@policy.command("test")
@POLICY_DIR
@FIELDS
@CONFIG
def policy_test(directory: Path | None, fields_file: Path | None, config: Path | None) -> None:
    """Run the expectation files in DIR/tests/*.yaml; exit 1 if any case fails."""
    from proxy import logs
    from proxy.app import Gateway
    from proxy.policy.expectations import render, run_tests

    logs.configure("warning")
    source = _source(directory, fields_file, config)
    bundle = _load(source)
    results = run_tests(bundle, source, Gateway)
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
    """What each role gains and loses between two bundles (role x relation set x class x action), and what
    changed in the field map: paths moved between classes, classes no longer encrypted, routes added."""
    from proxy.policy.mapdiff import fieldmap_diff, unsafe_for_reload
    from proxy.policy.review import diff, purpose_diff, render_diff

    before, after = _load(BundleSource(old)), _load(BundleSource(new))
    changes = diff(before.table, after.table)
    mapped = fieldmap_diff(before.fieldmap, after.fieldmap, (before.table, after.table))
    click.echo(render_diff(changes, purpose_diff(before.table, after.table), markdown=fmt == "markdown",
                           mapped=mapped))
    for problem in unsafe_for_reload(before.fieldmap, after.fieldmap):
        click.echo(f"a running gateway refuses this change on reload: {problem}", err=True)


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
    from proxy.policy.review import explain_class, explain_resource, explain_write, render_explanations, render_writes
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
        rels = run(_relations_from_crm(settings_of(config), user, client_id, client, bundle))
    resource = bundle.fieldmap.resources[route.resource]
    if route.method in ("POST", "PATCH", "PUT"):
        writes = explain_write(table, bundle.fieldmap, route.resource, route.method, role, rels, purpose)
        if fmt == "json":
            click.echo(json.dumps({"route": f"{route.method} {route.template}", "relations": rels.label,
                                   "purpose": purpose, "fields": [e.as_dict() for e in writes]}, indent=2))
        else:
            click.echo(f"{role} ({purpose or 'no purpose'}) holding {rels.label}: {route.method} {route.template}")
            click.echo(render_writes(writes))
        return
    items = explain_resource(table, bundle.fieldmap, route.resource, role, rels, purpose)
    visible = explain_class(table, role, rels, purpose, resource.record_class).outcome != "remove"
    if fmt == "json":
        click.echo(json.dumps({"route": f"{route.method} {route.template}", "relations": rels.label,
                               "purpose": purpose, "visible": visible, "fields": [e.as_dict() for e in items]},
                              indent=2))
    else:
        click.echo(f"{role} ({purpose or 'no purpose'}) holding {rels.label}: {route.method} {route.template}")
        click.echo(render_explanations(items, visible, resource.name, resource.record_class))


async def _relations_from_crm(settings: Settings, user: str, own_client: str | None, client: str,
                              bundle: PolicyBundle) -> Relation:
    from datetime import UTC, datetime

    index = await _read_relations(settings, bundle)
    return index.relations(user, own_client, client, (*bundle.cover, *index.cover), datetime.now(UTC))


@policy.command("record")
@click.option("--out", "output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.argument("paths", nargs=-1, required=True)
@CONFIG
def policy_record(output: Path, paths: tuple[str, ...], config: Path | None) -> None:
    """Record the CRM's answers to PATHS (and the caseload facts) for `policy test` request cases."""
    settings = settings_of(config)
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

    responses = run(go())
    output.write_text(json.dumps({"responses": responses}) + "\n")
    click.echo(f"{len(responses)} answers recorded in {output}")


@policy.command("keygen")
@click.option("--out", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="the officer's private key (0600); the public key is written beside it (.pub.pem)")
def policy_keygen(output: Path) -> None:
    """An Ed25519 key pair for signing policy bundles."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from proxy.audit import public_path, public_pem
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

    from proxy.policy import SIGNATURE_FILE, bundle_digest, read_bundle_files, sign_bundle
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

    settings = settings_of(config)
    if not settings.server.pid_file:
        raise click.ClickException("server.pid_file is not set; send SIGHUP to the gateway yourself")
    pid_file = Path(settings.server.pid_file)
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot signal the gateway from {pid_file}: {exc}") from None
    click.echo(f"reload requested (pid {pid}); /readyz shows the policy hash in force and any refusal")


@policy.command("publish")
@POLICY_DIR
@FIELDS
@CONFIG
@click.option("--note", default="", help="why: the change request, for the version's history")
@DRY_RUN
@ACTOR
def policy_publish(directory: Path | None, fields_file: Path | None, config: Path | None, note: str, dry_run: bool,
                   actor: str | None) -> None:
    """Publish a bundle to the shared PostgreSQL (policy.store) as the next version, after check, compile
    and proof; every replica loads it within a second (and at its next policy poll if the announcement is lost)."""
    settings = settings_of(config) if config is not None else None
    if settings is None or not settings.policy.store:
        raise click.ClickException("policy.store is not set in the config: nowhere to publish to")
    source = _source(directory, fields_file, config) if directory is not None else BundleSource(
        Path(settings.policy.dir), Path(settings.policy.fields_file) if settings.policy.fields_file else None)
    who = operator(actor)
    try:
        files = read_bundle_files(source)
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from None
    run(_refuse_unsafe(settings, files, who))  # cheap, and what a replica would refuse: before the proof
    bundle = _load(source, settings.keys.in_dir("proofs"))
    click.echo(run(_publish(settings, files, bundle, who, note, dry_run)))


async def _refuse_unsafe(settings: Settings, files: dict[str, bytes], who: str) -> None:
    """A change every replica's reload would refuse (a class losing its encryption unannounced), refused
    here against the version in force, before anyone depends on it."""
    from proxy.audit import record_operation
    from proxy.policy.fieldmap import parse_fieldmap
    from proxy.policy.mapdiff import unsafe_for_reload
    from proxy.policy.published import files_of, latest
    from proxy.policy.yamlfile import MapError
    from proxy.postgres import Database, check_schema

    db = await Database.open(settings.policy.store, max_size=1)
    try:
        await check_schema(db.pool, settings.policy.store)
        current = await latest(db)
        if current is None:
            return
        before = parse_fieldmap((await files_of(db, current.version))["fields.yaml"].decode())
    finally:
        await db.close()
    try:
        after = parse_fieldmap(files["fields.yaml"].decode())
    except (MapError, UnicodeDecodeError):
        return  # the full check below says where
    unsafe = unsafe_for_reload(before, after)
    if unsafe:
        await record_operation(settings, "policy publish", who=who, denied="; ".join(unsafe)[:500])
        raise click.ClickException(f"not published (version {current.version} stays in force): " + "; ".join(unsafe))


async def _publish(settings: Settings, files: dict[str, bytes], bundle: PolicyBundle, who: str, note: str,
                   dry_run: bool) -> str:
    from proxy.audit import record_operation
    from proxy.policy.published import latest, publish
    from proxy.postgres import Database, check_schema, redact

    db = await Database.open(settings.policy.store, max_size=1)
    try:
        await check_schema(db.pool, settings.policy.store)
        current = await latest(db)
        if current is not None and current.digest == bundle.digest:
            return f"already published as version {current.version} ({bundle.short_hash}): nothing to do"
        if dry_run:
            return (f"would publish {bundle.short_hash} as version {(current.version if current else 0) + 1} "
                    f"to {redact(settings.policy.store)}")
        published = await publish(db, files, who, note)
    finally:
        await db.close()
    await record_operation(settings, "policy publish", who=who,
                           reason=f"version {published.version}: {published.digest}" + (f" ({note})" if note else ""))
    return (f"published version {published.version} ({bundle.short_hash}) to {redact(settings.policy.store)}; "
            "`fieldguard status` shows which replicas run it")

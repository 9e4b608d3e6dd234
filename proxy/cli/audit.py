"""`fieldguard audit ...`: the auditors' tools. verify, query, report, export, public-key. Reading the trail
is an access too: each query, report and export leaves its own record of who looked, and at what."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import click

from proxy.cli.options import ACTOR, CONFIG, echo, record, run, settings_of
from proxy.config import Settings


@click.group()
def audit() -> None:
    """The audit trail: verify it, query it, answer subject access requests, export it."""


def _store(settings: Settings, store: Path | None) -> Path:
    path = store or Path(settings.audit.store)
    if not path.exists():
        raise click.ClickException(f"no audit store at {path}")
    return path


async def _pseudonym_of(settings: Settings, client_id: str) -> str:
    from proxy.keys import open_keyring

    ring = await open_keyring(settings.keys, None)
    try:
        found = await ring.store.known_pseudonym(client_id)
    finally:
        await ring.store.close()
    if found is None:
        raise click.ClickException(f"client {client_id} has no pseudonym: never accessed, or erased (keys shredded)")
    return found


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
    from proxy.audit import load_public, public_path, read_export, verify_export, verify_store

    settings = settings_of(config)
    key_file = public_key or public_path(settings.keys.in_dir(settings.audit.signing_key))
    if public_key is None:
        click.echo(f"note: trusting {key_file}; pass --public-key with the key you were given", err=True)
    public = load_public(key_file)
    anchors = read_export(anchor)[1] if anchor is not None else []
    if export_file is not None:
        verdict = verify_export(export_file, public, anchors)
    else:
        verdict = verify_store(_store(settings, store), public, anchors)
    echo({"ok": verdict.ok, "records": verdict.records, "checkpoints": verdict.checkpoints,
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
    from proxy.audit.views import Query, query, table

    settings = settings_of(config)
    pseudonym = run(_pseudonym_of(settings, client_id)) if client_id else None
    records = query(_store(settings, None), Query(pseudonym, user, role, purpose, since, until, outcome, limit))
    record(settings, "audit query", actor, counts={"records": len(records)}, clients=[pseudonym] if pseudonym else None)
    click.echo(json.dumps(records, indent=2) if fmt == "json" else table(records))


@audit.command("report")
@CONFIG
@click.option("--client", "client_id", required=True, help="the client's CRM id")
@click.option("--format", "fmt", type=click.Choice(["html", "json"]), default="html", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@ACTOR
def audit_report(config: Path | None, client_id: str, fmt: str, output: Path | None, actor: str | None) -> None:
    """"Who accessed my record": for a subject access request."""
    from proxy.audit.views import Query, access_report, query, report_html

    settings = settings_of(config)
    pseudonym = run(_pseudonym_of(settings, client_id))
    records = [r for r in query(_store(settings, None), Query(pseudonym=pseudonym, limit=1_000_000))
               if r.get("method") != "CLI"]
    report = access_report(records, pseudonym)
    text = report_html(report) if fmt == "html" else json.dumps(report, indent=2)
    record(settings, "audit report", actor, counts={"records": len(records)}, clients=[pseudonym])
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

    from proxy.audit.views import all_records, ecs_event, export_jsonl, fhir_audit_event

    settings = settings_of(config)
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
    record(settings, f"audit export {fmt}", actor, counts={"lines": count})


@audit.command("public-key")
@CONFIG
def audit_public_key(config: Path | None) -> None:
    """Print the checkpoint public key, to hand to auditors out of band."""
    from proxy.audit import CheckpointSigner, public_pem

    settings = settings_of(config)
    signer = CheckpointSigner(settings.keys.in_dir(settings.audit.signing_key))
    click.echo(public_pem(signer.public).decode(), nl=False)
    click.echo(f"key id {signer.key_id}", err=True)

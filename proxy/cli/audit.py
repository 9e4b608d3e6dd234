"""`fieldguard audit ...`: the auditors' tools. verify, query, report, export, public-key. Reading the trail
is an access too: each query, report and export leaves its own record of who looked, and at what."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from proxy.cli.options import ACTOR, CONFIG, echo, record, run, settings_of
from proxy.config import Settings

if TYPE_CHECKING:
    from proxy.audit import AuditStore
    from proxy.audit.views import Integrity


@click.group()
def audit() -> None:
    """The audit trail: verify it, query it, answer subject access requests, export it."""


def _store(settings: Settings, store: Path | None) -> AuditStore:
    from proxy.audit import store_exists, store_of

    path = store or store_of(settings)
    if not store_exists(path):
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


def _integrity(settings: Settings, store: AuditStore, public_key: Path | None) -> Integrity:
    from proxy.audit.views import integrity_of

    return integrity_of(settings, store, public_key)


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)


def _reason(integrity: Integrity) -> str | None:
    """For the view's own audit record: that it was made from a trail that does not verify."""
    return f"the trail did not verify: {integrity.problems[0]}"[:300] if not integrity.ok and integrity.problems \
        else None


PUBLIC_KEY = click.option("--public-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                          help="the checkpoint public key you were given, to verify the trail with before showing "
                               "it (default: the one beside the signing key)")


@audit.command("verify")
@CONFIG
@click.option("--store", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="the SQLite store (default: audit.store from the config)")
@click.option("--export", "export_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="verify a JSON-lines export instead of the store")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="the checkpoint public key you were given (default: the one beside the signing key)")
@click.option("--anchor", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="checkpoints kept elsewhere (an earlier export, the SIEM log): the trail must still match them")
@click.option("--allow-unanchored", is_flag=True,
              help="records no signed checkpoint covers yet (a running gateway's last minute) are not an error")
def audit_verify(config: Path | None, store: Path | None, export_file: Path | None, public_key: Path | None,
                 anchor: Path | None, allow_unanchored: bool) -> None:
    """Re-hash every record and check sequence, links and signed checkpoints; exit 1 on any tampering.

    Records that no signed checkpoint covers prove nothing on their own (a trail rewritten with its
    checkpoints deleted re-links perfectly): without --anchor they are an error, unless --allow-unanchored."""
    from proxy.audit import (
        VerifyInputError,
        load_public,
        public_path,
        read_anchors,
        verify_export,
        verify_store,
    )

    settings = settings_of(config)
    key_file = public_key or public_path(settings.keys.in_dir(settings.audit.signing_key))
    if public_key is None:
        click.echo(f"note: trusting {key_file}; pass --public-key with the key you were given", err=True)
    try:
        public = load_public(key_file)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{key_file} cannot be read ({exc.strerror or exc})") from None
    try:
        anchors = read_anchors(anchor) if anchor is not None else []
        if export_file is not None:
            verdict = verify_export(export_file, public, anchors)
        else:
            verdict = verify_store(_store(settings, store), public, anchors)
    except VerifyInputError as exc:
        raise click.ClickException(str(exc)) from None
    from proxy.audit.views import tail_pending

    pending = tail_pending(verdict, settings)
    if verdict.ok and anchor is None and not allow_unanchored:
        if verdict.total == 0:
            verdict.fail("the trail holds no record: nothing was verified (an emptied store looks like this)")
        elif verdict.unanchored and not pending:
            covered = f"only records 1 to {verdict.last_checkpoint} are" if verdict.last_checkpoint else "none is"
            verdict.fail(f"{verdict.unanchored} records are covered by no recent signed checkpoint ({covered}): a "
                         "trail re-linked with its checkpoints deleted would look the same; pass --anchor with "
                         "checkpoints kept elsewhere (the SIEM log), or --allow-unanchored after an unclean stop; "
                         "a running gateway signs new records within seconds of a quiet spell, so run it again")
    echo({"ok": verdict.ok, "records": verdict.total, "verified": verdict.records, "checkpoints": verdict.checkpoints,
          "last_checkpoint": verdict.last_checkpoint, "last_checkpoint_time": verdict.last_checkpoint_time or None,
          "unanchored": verdict.unanchored, "pending": pending, "first_bad_record": verdict.first_bad,
          "problems": verdict.problems})
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
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table: fits a terminal (cells shortened); json: every field of every record")
@PUBLIC_KEY
@ACTOR
def audit_query(config: Path | None, client_id: str | None, user: str | None, role: str | None,
                purpose: str | None, since: str | None, until: str | None, outcome: str | None, limit: int,
                fmt: str, public_key: Path | None, actor: str | None) -> None:
    """Records by client, user, role, purpose, time and outcome. Says (on stderr, and above the table) when
    the trail does not verify, and which records could not be read."""
    from proxy.audit.views import Query, query, table

    settings = settings_of(config)
    store = _store(settings, None)
    pseudonym = run(_pseudonym_of(settings, client_id)) if client_id else None
    integrity = _integrity(settings, store, public_key)
    try:
        found = query(store, Query(pseudonym, user, role, purpose, since, until, outcome, limit))
    except ValueError as exc:
        raise click.ClickException(f"--since/--until: not an ISO 8601 date or time ({exc})") from None
    warnings = integrity.warnings(found.unreadable)
    _warn(warnings)
    record(settings, "audit query", actor, counts={"records": len(found.records)},
           clients=[pseudonym] if pseudonym else None, reason=_reason(integrity))
    click.echo(json.dumps(found.records, indent=2) if fmt == "json" else table(found.records, warnings))


@audit.command("report")
@CONFIG
@click.option("--client", "client_id", required=True, help="the client's CRM id")
@click.option("--format", "fmt", type=click.Choice(["html", "json"]), default="html", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@PUBLIC_KEY
@ACTOR
def audit_report(config: Path | None, client_id: str, fmt: str, output: Path | None, public_key: Path | None,
                 actor: str | None) -> None:
    """"Who accessed my record": for a subject access request. A trail that does not verify is said in the
    report itself (and on stderr)."""
    from proxy.audit.views import report_html
    from proxy.subject_access import history

    settings = settings_of(config)
    _store(settings, None)
    pseudonym = run(_pseudonym_of(settings, client_id))
    report = history(settings, pseudonym, public_key)
    problems = report["trail"]["problems"]
    _warn(report["warnings"])
    text = report_html(report) if fmt == "html" else json.dumps(report, indent=2)
    record(settings, "audit report", actor, counts={"records": report["count"]}, clients=[pseudonym],
           reason=f"the trail did not verify: {problems[0]}"[:300] if problems else None)
    if output is None:
        click.echo(text)
    else:
        output.write_text(text)
        click.echo(f"{report['count']} accesses written to {output}", err=True)


@audit.command("export")
@CONFIG
@click.option("--format", "fmt", type=click.Choice(["jsonl", "fhir", "ecs"]), default="jsonl", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@PUBLIC_KEY
@ACTOR
def audit_export(config: Path | None, fmt: str, output: Path | None, public_key: Path | None,
                 actor: str | None) -> None:
    """The whole trail as NDJSON (one JSON document a line): jsonl (records with their hashes and the
    checkpoints, verifiable offline), FHIR R4 AuditEvent (IHE BALP), or Elastic Common Schema. Records that
    cannot be read are left out of fhir and ecs, and counted; a trail that does not verify is said on stderr."""
    import socket

    from proxy.audit.exports import Unexportable, ecs_event, export_jsonl, fhir_audit_event, fhir_consent
    from proxy.audit.views import all_records

    settings = settings_of(config)
    store = _store(settings, None)
    origin = settings.audit.origin or socket.gethostname()
    integrity = _integrity(settings, store, public_key)
    unreadable: list[int] = []
    unexportable: list[str] = []

    consents: dict[str, dict[str, Any]] = {}  # recorded in the trail, for FHIR: the last word on each
    withdrawn: set[str] = set()

    def converted(convert: Any) -> Any:
        for r in all_records(store, unreadable):
            held = r.get("consent")
            if isinstance(held, dict) and r.get("outcome") == "allowed" and isinstance(held.get("consent"), str):
                if held.get("withdrawn"):
                    withdrawn.add(held["consent"])
                else:
                    consents[held["consent"]] = held
            try:
                yield json.dumps(convert(r))
            except Unexportable as exc:
                unexportable.append(f"record {r.get('seq')}: {exc}")
        if fmt == "fhir":  # then a FHIR Consent for each consent recorded (inactive once withdrawn)
            yield from (json.dumps(fhir_consent(held, cid in withdrawn)) for cid, held in consents.items())

    if fmt == "jsonl":
        lines = export_jsonl(store)
    elif fmt == "fhir":
        lines = converted(lambda r: fhir_audit_event(r, origin))
    else:
        lines = converted(lambda r: ecs_event(r, origin))
    count = 0
    with output.open("w") if output else contextlib.nullcontext(sys.stdout) as out:
        for line in lines:
            out.write(line + "\n")
            count += 1
    warnings = integrity.warnings(unreadable)
    if unexportable:
        warnings.append(f"{len(unexportable)} records could not be put in {fmt} and are left out: "
                        + "; ".join(unexportable[:10]) + ("; ..." if len(unexportable) > 10 else ""))
    _warn(warnings)
    record(settings, f"audit export {fmt}", actor, counts={"lines": count, "left_out": len(unreadable)
                                                           + len(unexportable)} if fmt != "jsonl" else
           {"lines": count}, reason=_reason(integrity))


@audit.command("public-key")
@CONFIG
def audit_public_key(config: Path | None) -> None:
    """Print the checkpoint public key, to hand to auditors out of band."""
    from proxy.audit import CheckpointSigner, public_pem

    settings = settings_of(config)
    signer = CheckpointSigner(settings.keys.in_dir(settings.audit.signing_key))
    click.echo(public_pem(signer.public).decode(), nl=False)
    click.echo(f"key id {signer.key_id}", err=True)

"""`fieldguard db upgrade` and `fieldguard status`: the shared PostgreSQL's schema, and what every replica
sharing it runs and has caught up to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from proxy.cli.options import ACTOR, CONFIG, DRY_RUN, echo, record, run, settings_of
from proxy.config import Settings

URL = click.option("--url", default=None, help="the database (default: the configured PostgreSQL store)")


def _url(settings: Settings, url: str | None) -> str:
    from proxy.postgres import is_postgres
    from proxy.runtime import shared_database

    chosen = url or shared_database(settings)
    if not chosen:
        raise click.ClickException("no PostgreSQL store is configured ([keys] store = \"postgresql://...\"); "
                                   "or give --url")
    if not is_postgres(chosen):
        raise click.ClickException("--url must be a postgresql:// URL")
    return chosen


def _database_errors(coro: Any) -> Any:
    from proxy.postgres import DatabaseError

    try:
        return run(coro)
    except DatabaseError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def db() -> None:
    """The shared PostgreSQL database: its schema."""


@db.command("upgrade")
@CONFIG
@URL
@DRY_RUN
def db_upgrade(config: Path | None, url: str | None, dry_run: bool) -> None:
    """Bring the database's schema to this FieldGuard's version (each step in its own transaction)."""
    from proxy.postgres import SCHEMA_VERSION, redact, upgrade

    chosen = _url(settings_of(config), url)
    found, todo = _database_errors(upgrade(chosen, dry_run=dry_run))
    verb = "would apply" if dry_run else "applied"
    for m in todo:
        click.echo(f"{verb} {m.version}: {m.description}")
    click.echo(f"{redact(chosen)}: schema version {found if dry_run else SCHEMA_VERSION}"
               + ("" if todo else " (up to date)"))


@db.command("import-keystore")
@CONFIG
@URL
@DRY_RUN
@ACTOR
def db_import_keystore(config: Path | None, url: str | None, dry_run: bool, actor: str | None) -> None:
    """Copy the keystore file ([keys] dir/keystore) into the shared database, when moving from one gateway
    to several: every key wrapped as it was, every pseudonym and tombstone; refused if the database holds keys."""
    from proxy.keys import KeystoreConflict
    from proxy.keys.pgstore import import_keystore

    settings = settings_of(config)
    chosen = _url(settings, url)
    source = settings.keys.in_dir(settings.keys.keystore)
    try:
        counts = _database_errors(import_keystore(source, chosen, dry_run))
    except KeystoreConflict as exc:
        raise click.ClickException(str(exc)) from None
    verb = "would copy" if dry_run else "copied"
    click.echo(f"{verb} {counts['data_keys']} data keys, {counts['client_pseudonyms']} pseudonyms, "
               f"{counts['tombstones']} tombstones and {counts['retired_keks']} retired KEKs from {source}")
    if not dry_run:
        click.echo("now set [keys] store to the database in every gateway's config, and keep the file as a backup")
    record(settings, "db import-keystore", actor, counts=counts, dry_run=dry_run)


@click.command()
@CONFIG
@URL
@click.option("--within", default=60.0, show_default=True, help="only replicas seen in the last this many seconds")
def status(config: Path | None, url: str | None, within: float) -> None:
    """Every replica sharing the database: the policy it enforces, its key epoch, its listener, audit lag."""
    from proxy.postgres import Database, check_schema
    from proxy.postgres import replicas as rows

    chosen = _url(settings_of(config), url)

    async def read() -> dict[str, object]:
        database = await Database.open(chosen, max_size=1)
        try:
            version = await check_schema(database.pool, chosen)
            found = await rows.read_all(database, within)
            latest = await database.pool.fetchval("SELECT COALESCE(MAX(seq), 0) FROM revocations")
        finally:
            await database.close()
        policies = {r.get("policy") for r in found}
        return {"schema": version, "key_epoch": int(latest), "replicas": found,
                "agree": len(policies) <= 1 and all(r.get("key_epoch") == latest for r in found)}

    echo(_database_errors(read()))

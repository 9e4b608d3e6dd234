"""`fieldguard keys ...`, `encrypt-existing` and `decrypt-export`: the data-protection officer's and the
operator's key work. Every command that changes keys or the CRM leaves an audit record."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any

import click

from proxy.cli.options import ACTOR, CONFIG, DRY_RUN, echo, record, run, settings_of
from proxy.config import Settings


@click.group()
def keys() -> None:
    """Key-encryption key and per-client data keys: init, status, rotation, shredding."""


def _audit(settings: Settings, report: Any, actor: str | None, *, reason: str | None = None,
           clients: list[str] | None = None) -> None:
    record(settings, report.action, actor, dry_run=report.dry_run, counts=report.counts, reason=reason,
           clients=clients, key_ids=report.detail.get("key_ids"))


@keys.command("init")
@CONFIG
@click.option("--generate-passphrase", "generate", type=click.Path(dir_okay=False, path_type=Path),
              help="write a new random passphrase to this file (0600) and use it (file backend)")
@DRY_RUN
@ACTOR
def keys_init(config: Path | None, generate: Path | None, dry_run: bool, actor: str | None) -> None:
    """Create the KEK (sealed file or PKCS#11 token key) and the keystore."""
    from proxy.keys import lifecycle
    from proxy.keys.custody import keystore_where
    from proxy.secretfile import write_private

    settings = settings_of(config)
    k = settings.keys
    if dry_run:
        where = k.in_dir(k.kek_file) if k.kek == "file" else f"token {k.pkcs11_token}"
        click.echo(f"would create a {k.kek} KEK ({where}) and the keystore {keystore_where(k)}")
        return
    if generate is not None:
        if generate.exists():
            raise click.ClickException(f"{generate} exists; refusing to overwrite a passphrase")
        write_private(generate, secrets.token_urlsafe(32).encode())
        os.environ[k.passphrase_env] = generate.read_text().strip()
    report = run(lifecycle.init(k))
    _audit(settings, report, actor)
    click.echo(f"KEK {report.detail['kek']} created ({report.detail['backend']}); keystore ready ({keystore_where(k)})")
    _warn_open_dir(Path(k.dir))


def _warn_open_dir(directory: Path) -> None:
    from proxy.secretfile import open_dir_warning

    warning = open_dir_warning(directory)
    if warning:
        click.echo(f"warning: {warning}", err=True)


@keys.command("status")
@CONFIG
def keys_status(config: Path | None) -> None:
    """KEKs, data keys by scope and status, keys still wrapped by an old KEK."""
    from proxy.keys import lifecycle

    echo(run(lifecycle.status(settings_of(config).keys)))


@keys.command("rotate-kek")
@CONFIG
@DRY_RUN
@click.option("--retire-old", is_flag=True, help="afterwards, destroy KEKs that no longer wrap any key and no "
              "running gateway uses (backups of the keystore made before then become unreadable)")
@click.option("--wait", "wait_seconds", type=click.FloatRange(0, 600), default=15.0, show_default=True,
              help="with --retire-old: how long to wait for running gateways to take up the new KEK")
@ACTOR
def keys_rotate_kek(config: Path | None, dry_run: bool, retire_old: bool, wait_seconds: float,
                    actor: str | None) -> None:
    """Make a new KEK current and re-wrap every data key (no CRM traffic); rerun to resume."""
    from proxy.keys import lifecycle

    settings = settings_of(config)
    preview = run(lifecycle.rotate_kek(settings.keys, True, False))
    if dry_run:
        _audit(settings, preview, actor)
        echo({"would_rewrap": preview.counts["to_rewrap"], "resuming": preview.detail["resuming"]})
        return
    with click.progressbar(length=preview.counts["to_rewrap"], label="re-wrapping data keys",
                           file=sys.stderr) as bar:
        report = run(lifecycle.rotate_kek(settings.keys, False, retire_old, bar.update, wait_seconds=wait_seconds))
    _audit(settings, report, actor)
    refused: dict[str, str] = report.detail.get("not_retired", {})
    echo({"kek": report.detail["kek"], "rewrapped": report.counts["rewrapped"],
          "retired": report.detail.get("retired", []), "not_retired": refused})
    if refused:
        raise click.ClickException("some old KEKs were kept: " + "; ".join(f"{k}: {why}" for k, why in refused.items())
                                   + " (they are retired by the next `keys rotate-kek --retire-old`)")


@keys.command("rotate")
@CONFIG
@click.option("--client", "client_id", required=True, help="the client's CRM id")
@click.option("--scope", default=None, help="record or process_notes (default: every scope)")
@DRY_RUN
@ACTOR
def keys_rotate(config: Path | None, client_id: str, scope: str | None, dry_run: bool, actor: str | None) -> None:
    """A new data-key version for one client; the old version only decrypts from now on."""
    from proxy.keys import lifecycle

    settings = settings_of(config)
    report = run(lifecycle.rotate_client(settings.keys, client_id, scope, dry_run))
    _audit(settings, report, actor, clients=[report.detail["pseudonym"]])
    echo({"client": report.detail["pseudonym"], "scopes_rotated": report.counts["scopes"], "dry_run": dry_run})


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
    from proxy.keys import lifecycle

    settings = settings_of(config)
    if not dry_run and not yes:
        click.confirm(f"Destroy every {scope or 'data'} key of client {client_id}? This cannot be undone",
                      abort=True)
    report = run(lifecycle.shred(settings.keys, client_id, scope, reason, dry_run))
    _audit(settings, report, actor, reason=reason, clients=[report.detail["pseudonym"]])
    echo({"client": report.detail["pseudonym"], "keys": report.counts["keys"],
          "destroyed": report.counts.get("destroyed", 0), "dry_run": dry_run})


# ---------------------------------------------------------------------------------------------- migration
def _migration(settings: Settings, dry_run: bool, rate: float, step: Any, label: str, **kw: Any) -> Any:
    from proxy.keys import open_kek, open_keyring
    from proxy.policy import BundleSource, load_bundle

    fm = load_bundle(BundleSource.configured(settings.policy), settings.keys.in_dir("proofs")).fieldmap

    async def go() -> Any:
        ring = await open_keyring(settings.keys, open_kek(settings.keys))
        bar_holder: dict[str, Any] = {}
        try:
            def totals(n: int) -> None:
                bar_holder["bar"] = click.progressbar(length=n, label=label, file=sys.stderr)
                bar_holder["bar"].__enter__()

            def progress(n: int) -> None:
                if "bar" in bar_holder:
                    bar_holder["bar"].update(n)

            return await step(settings, fm, ring, dry_run=dry_run, rate=rate, progress=progress, totals=totals, **kw)
        finally:
            if "bar" in bar_holder:
                bar_holder["bar"].__exit__(None, None, None)
            await ring.store.close()

    return run(go())


def _report_migration(settings: Settings, report: Any, actor: str | None) -> None:
    from proxy.keys.migration import PATCH_ATTEMPTS

    counts = {"records": report.records, "changed_records": report.changed_records, "fields": report.fields,
              "failures": report.failures, "unowned": report.unowned}
    record(settings, report.action, actor, dry_run=report.dry_run, counts=counts)
    echo({**counts, "by_resource": report.by_resource, "complete": report.complete, "dry_run": report.dry_run,
          "failed": report.failed_ids})
    problems = []
    if report.failures:
        problems.append(f"{report.failures} records could not be written (tried {PATCH_ATTEMPTS} times; see the "
                        "CRM's log): their pages are done again by the next run")
    if report.unowned:
        problems.append(f"{report.unowned} records hold plaintext of encrypted classes but name no client, so no "
                        "client's key can seal them: left as they are; give them a client in the CRM and run again")
    if problems:
        raise click.ClickException("; ".join(problems))


@click.command("encrypt-existing")
@CONFIG
@DRY_RUN
@click.option("--rate", default=50.0, show_default=True, help="CRM writes per second (0: unlimited)")
@click.option("--max-records", type=int, default=None, help="stop after this many records (rerun to resume)")
@ACTOR
def encrypt_existing(config: Path | None, dry_run: bool, rate: float, max_records: int | None,
                     actor: str | None) -> None:
    """Encrypt the sensitive fields a CRM already holds in plaintext, through its own API."""
    from proxy.keys.migration import encrypt_existing as step

    settings = settings_of(config)
    report = _migration(settings, dry_run, rate, step, "encrypting", max_records=max_records)
    _report_migration(settings, report, actor)


@click.command("decrypt-export")
@CONFIG
@DRY_RUN
@click.option("--rate", default=50.0, show_default=True, help="CRM writes per second (0: unlimited)")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write decrypted records to this JSON-lines file (0600) instead of back into the CRM")
@ACTOR
def decrypt_export(config: Path | None, dry_run: bool, rate: float, output: Path | None, actor: str | None) -> None:
    """Leave FieldGuard: decrypt every sealed field back into the CRM (or into a file)."""
    from proxy.keys.migration import decrypt_export as step

    settings = settings_of(config)
    report = _migration(settings, dry_run, rate, step, "decrypting", output=output)
    _report_migration(settings, report, actor)

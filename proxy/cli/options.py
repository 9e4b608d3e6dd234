"""What every `fieldguard` command shares: the options, reading the settings, running a coroutine, and
the audit record an operator's command leaves."""

from __future__ import annotations

import asyncio
import getpass
import json
from pathlib import Path
from typing import Any, NoReturn

import click

from proxy.config import ConfigError, Settings, load_settings

CONFIG = click.option("--config", "config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                      help="fieldguard.toml (see examples/fieldguard.toml)")
DRY_RUN = click.option("--dry-run", is_flag=True, help="say what would change; change nothing")
ACTOR = click.option("--actor", default=None, help="who is running this, for the audit record (default: $USER)")


def settings_of(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def run(coro: Any) -> Any:
    """Run a command's coroutine; the faults an operator can fix become one line, not a traceback."""
    import httpx

    from proxy.keys import KekError, KeystoreUnavailable
    from proxy.postgres import DatabaseError

    try:
        return asyncio.run(coro)
    except (KekError, ValueError, OSError, DatabaseError, KeystoreUnavailable) as exc:
        raise click.ClickException(str(exc)) from None
    except httpx.HTTPError as exc:  # the CRM down, refusing or answering an error: said, nothing half-done hidden
        where = exc.request.url.copy_with(query=None) if isinstance(exc, httpx.HTTPStatusError) else "the CRM"
        raise click.ClickException(f"the CRM could not be read ({type(exc).__name__} at {where}): nothing was "
                                   "changed by this step; try again when it answers") from None


def echo(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def operator(actor: str | None) -> str:
    """Who runs the command, for its audit record: --actor, else the login name."""
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def refuse(settings: Settings, action: str, actor: str | None, why: str, *, clients: list[str] | None = None
           ) -> NoReturn:
    """A refused command: audited as a denial, then one line on stderr and exit 1."""
    record(settings, action, actor, denied=why, clients=clients)
    raise click.ClickException(why)


def record(settings: Settings, action: str, actor: str | None, *, dry_run: bool = False,
           counts: dict[str, int] | None = None, reason: str | None = None, clients: list[str] | None = None,
           key_ids: list[str] | None = None, break_glass: str | None = None,
           disclosure: dict[str, Any] | None = None, denied: str | None = None,
           consent: dict[str, Any] | None = None) -> None:
    """The operator's command into the durable trail, beside a running gateway."""
    from proxy.audit import record_operation

    run(record_operation(settings, action, who=operator(actor), dry_run=dry_run, counts=counts, reason=reason,
                         clients=clients, key_ids=key_ids, break_glass=break_glass, disclosure=disclosure,
                         denied=denied, consent=consent))


# ------------------------------------------------------------------ what the case commands share
def bundle_of(settings: Settings) -> Any:
    """The policy bundle the deployment runs (proved once per keys/proofs, as the gateway does)."""
    from proxy.policy import BundleSource, load_bundle

    return load_bundle(BundleSource.configured(settings.policy), settings.keys.in_dir("proofs"))


async def client_facts(settings: Settings, client_id: str, fm: Any = None) -> tuple[str | None, bool, bool]:
    """(pseudonym, erased, known to the CRM) of a client, asked of the field map's client record route (`fm`:
    the bundle's, if the caller has it loaded). A pseudonym is made only for a client the CRM has."""
    import httpx

    from proxy.keys import open_keyring

    fm = fm if fm is not None else bundle_of(settings).fieldmap
    route = next((r for r in fm.routes if r.resource == fm.relations.resource and r.method == "GET"
                  and [p[1] for p in r.params] == ["client_id"] and r.shape.name == "RECORD"), None)
    known = False
    if route is not None and (route.params[0][2] != "int" or client_id.isdigit()):
        async with httpx.AsyncClient(base_url=settings.upstream.url, headers=dict(settings.upstream.headers),
                                     timeout=settings.upstream.timeout_seconds) as crm:
            known = (await crm.get(route.render(route.template, {"client_id": client_id}))).status_code == 200
    ring = await open_keyring(settings.keys, None)
    try:
        erased = bool(await ring.store.tombstoned([client_id]))
        pseudonym = (await ring.pseudonyms([client_id]))[client_id] if known and not erased else None
    finally:
        await ring.store.close()
    return pseudonym, erased, known


async def open_cases(settings: Settings) -> Any:
    from proxy.cases import CasesStore

    return await CasesStore.open(Path(settings.cases.store))


async def with_cases(settings: Settings, work: Any) -> Any:
    """`work(store)` on the deployment's cases store, opened and closed around it."""
    store = await open_cases(settings)
    try:
        return await work(store)
    finally:
        await store.close()

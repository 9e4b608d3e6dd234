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
    from proxy.keys import KekError

    try:
        return asyncio.run(coro)
    except (KekError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


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

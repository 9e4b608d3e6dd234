"""`fieldguard restrict` and `unrestrict`: the data-protection officer's tools for clients' rights.

A restricted client's records (UK GDPR Art. 18: accuracy contested, processing unlawful but erasure
opposed, kept for a legal claim, an objection pending) are kept and not processed: every role but those
`cases.restriction_exempt_roles` names is refused them (403, audited), lists leave the client out, and
nothing is written for them; an emergency declared for the client still opens what break-glass opens.
Running gateways take a restriction up within `cases.refresh_seconds`.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from proxy.cli.options import (
    ACTOR,
    CONFIG,
    DRY_RUN,
    client_facts,
    operator,
    record,
    refuse,
    run,
    settings_of,
    with_cases,
)


@click.command()
@click.option("--client", "client_id", required=True, help="the client's CRM id")
@click.option("--reason", required=True, help="the ground (accuracy contested, objection pending, ...) and request")
@CONFIG
@DRY_RUN
@ACTOR
def restrict(client_id: str, reason: str, config: Path | None, dry_run: bool, actor: str | None) -> None:
    """Restrict processing of a client's records: kept, refused to everyone but the DPO."""
    settings = settings_of(config)
    pseudonym, erased, known = run(client_facts(settings, client_id))
    if erased or not known:
        refuse(settings, "restrict", actor, f"client {client_id} {'was erased' if erased else 'is not in the CRM'}")
    if len(reason.strip()) < 10:
        refuse(settings, "restrict", actor, "--reason must give the ground and the request (at least 10 characters)",
               clients=[str(pseudonym)])
    if not dry_run and not run(with_cases(settings, lambda s: s.restrict(
            client_id, str(pseudonym), reason.strip(), f"u:{operator(actor)}", time.time()))):
        refuse(settings, "restrict", actor, f"client {client_id} is restricted already", clients=[str(pseudonym)])
    record(settings, "restrict", actor, dry_run=dry_run, clients=[str(pseudonym)], reason=reason.strip())
    click.echo(f"{'would restrict' if dry_run else 'restricted'} client {client_id} ({pseudonym}); running gateways "
               f"refuse their records within {settings.cases.refresh_seconds:g} s")


@click.command()
@click.option("--client", "client_id", required=True, help="the client's CRM id")
@click.option("--reason", required=True, help="why it is lifted (the client was told first: Art. 18(3))")
@CONFIG
@DRY_RUN
@ACTOR
def unrestrict(client_id: str, reason: str, config: Path | None, dry_run: bool, actor: str | None) -> None:
    """Lift a restriction (tell the client before: Art. 18(3))."""
    settings = settings_of(config)
    held = run(with_cases(settings, lambda s: s.restricted()))
    if client_id not in held:
        refuse(settings, "unrestrict", actor, f"client {client_id} is not restricted")
    pseudonym = held[client_id]["client"]
    if not dry_run:
        run(with_cases(settings, lambda s: s.unrestrict(client_id)))
    record(settings, "unrestrict", actor, dry_run=dry_run, clients=[pseudonym], reason=reason)
    click.echo(f"{'would lift' if dry_run else 'lifted'} the restriction of client {client_id} ({pseudonym})")

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
    bundle_of,
    client_facts,
    echo,
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


@click.group()
def rectify() -> None:
    """Rectification (Art. 16): record a client's correction; a practitioner applies or refuses it through
    the gateway (GET /_fieldguard/rectifications)."""


@rectify.command("request")
@click.option("--client", "client_id", required=True, help="the client's CRM id")
@click.option("--resource", required=True, help="the field map's resource (client, session_note, ...)")
@click.option("--record", "record_id", required=True, help="the record's id in the CRM")
@click.option("--field", "path", required=True, help="the field's path in the field map (address.line1, ...)")
@click.option("--correction", required=True, help="what the client says it should be, in their words")
@click.option("--reference", default="", help="the service's reference for the request")
@CONFIG
@DRY_RUN
@ACTOR
def rectify_request(client_id: str, resource: str, record_id: str, path: str, correction: str, reference: str,
                    config: Path | None, dry_run: bool, actor: str | None) -> None:
    """Record a correction the client asks for; the due date is a month away, as for subject access."""
    import secrets
    from datetime import UTC, datetime

    from proxy.cases import RightsRequest
    from proxy.keys import open_kek, open_keyring
    from proxy.rectification import seal_correction
    from proxy.subject_access import due_date

    settings = settings_of(config)
    bundle = bundle_of(settings)
    act = "rectify request"
    fm = bundle.fieldmap
    found = fm.resources.get(resource)
    if found is None or found.client_field is None:
        refuse(settings, act, actor, f"unknown resource {resource!r} (the field map's client data: "
                                     f"{', '.join(n for n, r in fm.resources.items() if r.client_field)})")
    if path not in {s.path for s in found.specs}:
        refuse(settings, act, actor, f"{resource} has no field {path!r}")
    pseudonym, erased, known = run(client_facts(settings, client_id, fm))
    if erased or not known:
        refuse(settings, act, actor, f"client {client_id} {'was erased' if erased else 'is not in the CRM'}")
    if not correction.strip():
        refuse(settings, act, actor, "--correction is empty", clients=[str(pseudonym)])
    today = datetime.now(UTC).date()
    request_id = "rr-" + secrets.token_hex(6)

    async def sealed() -> str:
        ring = await open_keyring(settings.keys, open_kek(settings.keys))
        try:
            return await seal_correction(ring, client_id, request_id, correction.strip())
        finally:
            await ring.store.close()

    r = RightsRequest(request_id, "rectification", client_id, str(pseudonym), today.isoformat(),
                      due_date(today).isoformat(), reference, f"u:{operator(actor)}", time.time(),
                      {"resource": resource, "record": record_id, "field": path,
                       "correction": "" if dry_run else run(sealed())})
    if not dry_run:
        run(with_cases(settings, lambda s: s.record_request(r)))
    record(settings, act, actor, dry_run=dry_run, clients=[str(pseudonym)],
           reason=f"correction of {resource}.{path} asked")
    echo({"request": request_id, "client": client_id, "resource": resource, "record": record_id, "field": path,
          "due": r.due, "recorded": not dry_run})


@rectify.command("list")
@click.option("--all", "everything", is_flag=True, help="closed requests too")
@CONFIG
@ACTOR
def rectify_list(everything: bool, config: Path | None, actor: str | None) -> None:
    """The correction requests, with their state and the outcome (applied: the paths written; refused: why)."""
    settings = settings_of(config)
    found = run(with_cases(settings, lambda s: s.requests(kind="rectification", open_only=not everything)))
    record(settings, "rectify list", actor, counts={"requests": len(found)})
    echo([{"request": r.request_id, "client": r.client_id, "resource": r.detail.get("resource"),
           "record": r.detail.get("record"), "field": r.detail.get("field"), "received": r.received, "due": r.due,
           "status": r.status, "by": r.closed_by, "outcome": r.outcome} for r in found])

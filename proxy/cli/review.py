"""`fieldguard review ...`: the break-glass review queue, for the service manager and the DPO.

Every break-glass grant waits here until a reviewer signs it justified or unjustified, with a note. `show`
gives the reviewer what they need to decide: the coded reason and the practitioner's own words, what the
grant opened, every request made under it (from the trail) and whether the alert was delivered. Every
command leaves an audit record; nobody signs the review of their own grant.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from proxy.cli.options import ACTOR, CONFIG, DRY_RUN, echo, operator, record, run, settings_of
from proxy.config import Settings


@click.group()
def review() -> None:
    """Break-glass uses waiting for review, and the reviewers' sign-off."""


@review.command("list")
@CONFIG
@click.option("--all", "everything", is_flag=True, help="signed reviews too (default: those waiting)")
@click.option("--json", "as_json", is_flag=True, help="JSON for machines (default: a table)")
@ACTOR
def review_list(config: Path | None, everything: bool, as_json: bool, actor: str | None) -> None:
    """The grants waiting for review (overdue first), or every grant with --all."""
    settings = settings_of(config)
    rows = run(_grants(settings, unreviewed=not everything))
    now = time.time()
    listed = [_summary(g, r, now) for g, r in rows]
    listed.sort(key=lambda x: (x["status"] != "overdue", x["opened_at"]))
    record(settings, "review list", actor, counts={"grants": len(listed)})
    if as_json:
        echo(listed)
        return
    if not listed:
        click.echo("no break-glass use waits for review" if not everything else "no break-glass use yet")
        return
    head = ("grant", "opened", "user", "role", "client", "reason", "status", "review by")
    cells = [(x["grant"], x["opened_at"][:16], x["user"], x["role"], x["client"], x["reason"], x["status"],
              x["review_by"][:10]) for x in listed]
    widths = [max(len(str(c[i])) for c in (head, *cells)) for i in range(len(head))]
    for line in (head, *cells):
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
    overdue = sum(x["status"] == "overdue" for x in listed)
    if overdue:
        click.echo(f"{overdue} overdue: past the review_days of breakglass.yaml")


@review.command("show")
@click.argument("grant_id")
@CONFIG
@ACTOR
def review_show(grant_id: str, config: Path | None, actor: str | None) -> None:
    """One grant: reason and justification, what it opened, the requests made under it, its alert."""
    settings = settings_of(config)
    shown = run(_show(settings, grant_id))
    record(settings, "review show", actor, clients=[shown["client"]], break_glass=grant_id)
    echo(shown)


@review.command("sign")
@click.argument("grant_id")
@click.option("--decision", required=True, type=click.Choice(["justified", "unjustified"]))
@click.option("--note", required=True, help="why: what the reviewer checked and concluded")
@click.option("--role", "role", required=True, type=click.Choice(["service_manager", "dpo"]),
              help="the role the reviewer signs in")
@CONFIG
@DRY_RUN
@ACTOR
def review_sign(grant_id: str, decision: str, note: str, role: str, config: Path | None, dry_run: bool,
                actor: str | None) -> None:
    """Sign a grant's review. An unjustified use still open is ended at once (running gateways drop it within
    cases.refresh_seconds); it is for the service's incident process to take up."""
    settings = settings_of(config)
    reviewer = operator(actor)
    if len(note.strip()) < 10:
        raise click.ClickException("--note must say what was checked (at least 10 characters)")
    grant = run(_signed(settings, grant_id, reviewer, role, decision, note.strip(), dry_run))
    record(settings, "review sign", actor, dry_run=dry_run, clients=[grant.pseudonym], break_glass=grant_id,
           reason=f"break-glass review: {decision}")
    verb = "would sign" if dry_run else "signed"
    click.echo(f"{verb} {grant_id} {decision} as {role} {reviewer}")


# ---------------------------------------------------------------------------------------------- the work
async def _grants(settings: Settings, unreviewed: bool) -> list[Any]:
    from proxy.cases import CasesStore

    store = await CasesStore.open(Path(settings.cases.store))
    try:
        return await store.grants(unreviewed=unreviewed)
    finally:
        await store.close()


def _summary(grant: Any, review: Any, now: float) -> dict[str, Any]:
    from proxy.cases import iso

    if review is not None:
        status = review.decision
    elif grant.review_due < now:
        status = "overdue"
    elif grant.open_at(now):
        status = "open"
    else:
        status = "waiting"
    return {"grant": grant.grant_id, "opened_at": iso(grant.opened_at), "closes_at": iso(grant.closes_at),
            "user": grant.user, "role": grant.role, "client": grant.pseudonym, "reason": grant.reason,
            "purpose": grant.purpose, "classes": list(grant.classes), "status": status,
            "review_by": iso(grant.review_due),
            "review": None if review is None else {"reviewer": review.reviewer, "role": review.role,
                                                   "decision": review.decision, "note": review.note,
                                                   "signed_at": iso(review.signed_at)}}


async def _show(settings: Settings, grant_id: str) -> dict[str, Any]:
    from proxy.cases import CasesStore

    store = await CasesStore.open(Path(settings.cases.store))
    try:
        grant = await store.grant(grant_id)
        if grant is None:
            raise ValueError(f"no break-glass grant {grant_id}")
        review = await store.review_of(grant_id)
        alerts = await store.alerts_of(grant_id)
    finally:
        await store.close()
    shown = _summary(grant, review, time.time())
    shown["justification"] = await _justification(settings, grant)
    shown["alerts"] = alerts
    shown["uses"] = _uses(settings, grant_id)
    return shown


async def _justification(settings: Settings, grant: Any) -> str:
    """The practitioner's words, opened with the client's key (gone if the client's keys were shredded)."""
    from proxy.keys import PREFIX, KekError, open_kek, open_keyring
    from proxy.keys.envelope import EnvelopeError, open_sealed, parse

    text: str = grant.justification
    if not text.startswith(PREFIX):
        return text
    try:
        envelope = parse(text)
        ring = await open_keyring(settings.keys, open_kek(settings.keys))
    except (EnvelopeError, KekError) as exc:
        return f"(sealed; not opened: {exc})"
    try:
        await ring.prefetch([envelope[1]])
        opened = ring.opened(envelope[1])
        if opened is None or opened.key.client_id != grant.client_id:
            return "(sealed under a key that no longer exists: the client's keys were shredded)"
        return str(open_sealed(opened.aead, envelope, "breakglass", "justification", "breakglass",
                               grant.grant_id.encode()))
    except (EnvelopeError, KekError) as exc:
        return f"(sealed; not opened: {exc})"
    finally:
        await ring.store.close()


def _uses(settings: Settings, grant_id: str) -> dict[str, Any]:
    """What the trail says was done under the grant: requests, outcomes, the classes and paths shown."""
    from proxy.audit import store_exists, store_of
    from proxy.audit.views import Query, query

    store = store_of(settings)
    records = [r for r in query(store, Query(outcome="break-glass", limit=100_000)).records
               if grant_id in str(r.get("break_glass") or "").split(",") and r.get("method") != "CLI"
               and not str(r.get("route") or "").startswith("/_fieldguard/")] if store_exists(store) else []
    shown: dict[str, set[str]] = {}
    for r in records:
        for cls, paths in (r.get("shown") or {}).items():
            shown.setdefault(cls, set()).update(paths)
    return {"requests": len(records), "denied": sum(r.get("outcome") != "allowed" for r in records),
            "first": records[0].get("time") if records else None, "last": records[-1].get("time") if records else None,
            "shown": {cls: sorted(paths) for cls, paths in sorted(shown.items())},
            "routes": sorted({str(r.get("route")) for r in records})}


async def _signed(settings: Settings, grant_id: str, reviewer: str, role: str, decision: str, note: str,
                  dry_run: bool) -> Any:
    from proxy.cases import AlreadySigned, CasesStore, Review

    store = await CasesStore.open(Path(settings.cases.store))
    try:
        grant = await store.grant(grant_id)
        if grant is None:
            raise ValueError(f"no break-glass grant {grant_id}")
        if grant.user == f"u:{reviewer}":
            raise ValueError(f"{grant_id} was opened by {reviewer}: nobody reviews their own break-glass")
        if not dry_run:
            now = time.time()
            try:
                await store.sign(Review(grant_id, f"u:{reviewer}", role, decision, note, now))
            except AlreadySigned:
                raise ValueError(f"{grant_id} is already signed; see `fieldguard review show {grant_id}`") from None
            if decision == "unjustified" and grant.open_at(now):  # an unjustified use stops now
                await store.end_grant(grant_id, f"u:{reviewer}", now)
        return grant
    finally:
        await store.close()

"""`fieldguard retention ...` and `fieldguard erase`: the schedules of `retention.yaml`, and the right to erasure.

`retention plan` lists what falls due by schedule; `retention run` destroys it (one audit record per client,
a certificate of destruction for the run), resumable by running it again, at a bounded rate; `retention
hold|release` keeps a client whatever the schedules say; `retention event` records what a schedule runs from
(a death: it relaxes nothing, confidentiality continues); `retention supervision` records a counsellor's
supervision session and destroys at once the process notes it makes due. `erase` records a client's
erasure request after checking holds and the schedules that are a legal minimum, and carries it out when a
second person approves it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import click

from proxy.cli.options import (
    ACTOR,
    CONFIG,
    DRY_RUN,
    bundle_of,
    echo,
    open_cases,
    operator,
    record,
    refuse,
    run,
    settings_of,
    with_cases,
)
from proxy.cli.sar import day, live_client
from proxy.config import Settings

OUT = click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("certificates"),
                   show_default=True, help="where the certificate of destruction is written")


READ_AHEAD = 8  # clients read from the CRM at once


@click.group()
def retention() -> None:
    """Retention schedules: plan, run, hold, release, record events and supervision sessions."""


@dataclass(slots=True)
class ClientPlan:
    client_id: str
    pseudonym: str
    verdict: Any  # proxy.retention.Verdict
    records: list[Any]  # proxy.retention.RecordDue
    found: Any  # proxy.release.Gathered


async def survey(settings: Settings, bundle: Any, ring: Any, as_of: date, ids: list[str] | None = None,
                 resources: frozenset[str] | None = None, author: str | None = None,
                 also_supervised: tuple[str, str] | None = None) -> AsyncIterator[ClientPlan | str]:
    """Each client's plan in turn (or the id of one already erased), read fresh from the CRM; a dry run of a
    supervision session passes it as `also_supervised` (counsellor, date) rather than recording it."""
    from proxy.release import crm_client
    from proxy.retention import client_ids, read_client, records_due, verdict

    fm, rules = bundle.fieldmap, bundle.retention
    cases = await open_cases(settings)
    try:
        holds, restricted = await cases.holds(), await cases.restricted()
        events, supervision = await cases.events(), await cases.supervision_sessions()
        if also_supervised is not None:
            supervision.setdefault(also_supervised[0], []).append(also_supervised[1])
            supervision[also_supervised[0]].sort()
    finally:
        await cases.close()
    wanted = ids if ids is not None else await client_ids(settings, fm)
    erased = await ring.store.tombstoned(wanted)
    live = [c for c in wanted if c not in erased]
    names = await ring.pseudonyms(live) if live else {}
    for cid in sorted(erased, key=wanted.index):
        yield cid
    async with crm_client(settings) as crm:
        for start in range(0, len(live), READ_AHEAD):  # a few clients read at once; decided in order
            batch = live[start:start + READ_AHEAD]
            read = await asyncio.gather(*(read_client(settings, fm, c, names[c], ring, resources, crm)
                                          for c in batch))
            for cid, found in zip(batch, read, strict=True):
                held = (f"on legal hold: {holds[cid]['reason']}" if cid in holds else
                        f"restricted (Art. 18): {restricted[cid]['reason']}" if cid in restricted else None)
                v = verdict(rules, fm, cid, found, events.get(cid, {}), as_of, held)
                due = [] if held else records_due(rules, fm, cid, found, supervision, as_of, author)
                yield ClientPlan(cid, names[cid], v, due, found)


async def _keyring(settings: Settings) -> Any:
    from proxy.keys import open_kek, open_keyring

    return await open_keyring(settings.keys, open_kek(settings.keys))


@retention.command("plan")
@click.option("--as-of", "as_of", default=None, help="decide as on this day, YYYY-MM-DD (default: today)")
@CONFIG
@ACTOR
def retention_plan(as_of: str | None, config: Path | None, actor: str | None) -> None:
    """What falls due by the day, by schedule, with counts; what is kept and why."""
    settings = settings_of(config)
    bundle = bundle_of(settings)
    on = day(settings, "retention plan", actor, "--as-of", as_of)
    plan = run(_plan(settings, bundle, on))
    record(settings, "retention plan", actor, counts={"clients": plan["clients"], "due": plan["clients_due"]},
           reason=f"as of {on}")
    echo(plan)


async def _plan(settings: Settings, bundle: Any, on: date) -> dict[str, Any]:
    ring = await _keyring(settings)
    by: dict[str, dict[str, Any]] = {s.name: {"due": 0, "kept": 0, "due_clients": []}
                                     for s in bundle.retention.schedules}
    out: dict[str, Any] = {"as_of": on.isoformat(), "clients": 0, "clients_due": 0, "schedules": by,
                           "unscheduled": 0, "kept_open_ended": 0, "held": [], "erased": 0}
    try:
        async for p in survey(settings, bundle, ring, on):
            out["clients"] += 1
            if isinstance(p, str):
                out["erased"] += 1
                continue
            v = p.verdict
            if v.held:
                out["held"].append({"client": p.client_id, "why": v.why})
            elif v.schedule is None:
                out["unscheduled"] += 1
            else:
                entry = by[v.schedule]
                entry["due" if v.due else "kept"] += 1
                if v.due:
                    entry["due_clients"].append({"client": p.client_id, "since": str(v.until)})
                    out["clients_due"] += 1
                elif v.until is None:
                    out["kept_open_ended"] += 1
            for r in p.records:
                if not v.due:
                    by[r.schedule]["due"] += 1
                    by[r.schedule]["due_clients"].append({"client": p.client_id, r.resource: r.record_id})
    finally:
        await ring.store.close()
    return out


@retention.command("run")
@click.option("--as-of", "as_of", default=None, help="decide as on this day, YYYY-MM-DD (default: today)")
@click.option("--rate", default=5.0, show_default=True, help="clients destroyed per second at most (0: no limit)")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@OUT
@CONFIG
@DRY_RUN
@ACTOR
def retention_run(as_of: str | None, rate: float, yes: bool, out_dir: Path, config: Path | None, dry_run: bool,
                  actor: str | None) -> None:
    """Destroy what is due: the clients' keys shredded, their records deleted and their own record blanked
    through the CRM, or single due records deleted; a certificate of destruction for the run. Stopped part-way,
    it is resumed by running it again."""
    settings = settings_of(config)
    bundle = bundle_of(settings)
    on = day(settings, "retention run", actor, "--as-of", as_of)
    if not dry_run and not yes:
        click.confirm(f"Destroy, for good, everything the schedules make due by {on}?", abort=True)
    who = f"u:{operator(actor)}"
    done, counts, stopped = run(_run(settings, bundle, on, rate, dry_run, actor))
    if dry_run:
        record(settings, "retention run", actor, dry_run=True, counts=counts, reason=f"as of {on}")
        echo({"as_of": on.isoformat(), "would_destroy": done, **counts})
        return
    facts = {"as_of": on.isoformat(), "run_by": who, **({"stopped": stopped} if stopped else {})}
    path = _write_certificate(settings, bundle, out_dir, "retention", done, **facts)  # what was done, even if cut
    record(settings, "retention run", actor, counts=counts, reason=f"as of {on}: certificate {path.name}"
           + (f"; stopped: {stopped}" if stopped else ""))
    echo({"as_of": on.isoformat(), **counts, "certificate": str(path)})
    if stopped:
        raise click.ClickException(f"stopped after {len(done)} client(s): {stopped}; the certificate holds what was "
                                   "destroyed; run it again to resume")


async def _run(settings: Settings, bundle: Any, on: date, rate: float, dry_run: bool, actor: str | None
               ) -> tuple[list[Any], dict[str, int], str | None]:
    """What was destroyed, the counts, and why the run stopped early (the CRM failing), if it did."""
    import sys

    import httpx

    from proxy.audit import record_operation
    from proxy.retention import client_ids, destroy_client, destroy_records

    ring = await _keyring(settings)
    done: list[Any] = []
    counts = {"clients_destroyed": 0, "records_destroyed": 0, "skipped_erased": 0}
    stopped = None
    ids = await client_ids(settings, bundle.fieldmap)
    bar = click.progressbar(length=len(ids), label="clients", file=sys.stderr)
    try:
        async for p in survey(settings, bundle, ring, on, ids):
            bar.update(1)
            if isinstance(p, str):
                counts["skipped_erased"] += 1
                continue
            if not p.verdict.due and not p.records:
                continue
            if dry_run:
                done.append({"client": p.client_id, "why": p.verdict.why} if p.verdict.due else
                            {"client": p.client_id, "records": [(r.resource, r.record_id) for r in p.records]})
                continue
            if p.verdict.due:
                why = f"retention: {p.verdict.why}"
                d = await destroy_client(settings, bundle, ring, p.client_id, p.found, why)
                counts["clients_destroyed"] += 1
            else:
                why = f"retention: {', '.join(sorted({r.schedule for r in p.records}))} due"
                d = await destroy_records(settings, bundle.fieldmap, ring, p.records, p.found, why)
                counts["records_destroyed"] += sum(len(v) for v in d.deleted.values())
            done.append(d)
            await record_operation(settings, "retention run", who=operator(actor), clients=[p.pseudonym],
                                   reason=why, key_ids=d.keys_destroyed,
                                   counts={"deleted": sum(len(v) for v in d.deleted.values())})
            click.echo(f"\n  {p.client_id}: {why}" + (f" ({len(d.failed)} not done: see the certificate)"
                                                      if d.failed else ""), err=True)
            if rate > 0:
                await asyncio.sleep(1 / rate)
    except httpx.HTTPError as exc:
        stopped = f"the CRM could not be read ({type(exc).__name__})"
    finally:
        bar.render_finish()
        await ring.store.close()
    return done, counts, stopped


def _write_certificate(settings: Settings, bundle: Any, out_dir: Path, kind: str, done: list[Any],
                       **facts: Any) -> Path:
    from proxy.retention import certificate
    from proxy.secretfile import private_dir, write_private

    cert = certificate(kind, settings, bundle, done, **facts)
    private_dir(out_dir)
    path = out_dir / f"{cert['id']}.json"
    write_private(path, json.dumps(cert, indent=2).encode())
    return path


def _held_ok(settings: Settings, action: str, actor: str | None, client_id: str) -> tuple[str, dict[str, Any]]:
    pseudonym = live_client(settings, action, actor, client_id)
    return pseudonym, run(with_cases(settings, lambda s: s.holds()))


@retention.command("hold")
@click.option("--client", "client_id", required=True, help="the client's CRM id")
@click.option("--reason", required=True, help="the legal hold: a claim, an inquiry, a court's order")
@CONFIG
@DRY_RUN
@ACTOR
def retention_hold(client_id: str, reason: str, config: Path | None, dry_run: bool, actor: str | None) -> None:
    """Keep a client whatever the schedules say, and refuse their erasure, until released."""
    settings = settings_of(config)
    pseudonym, holds = _held_ok(settings, "retention hold", actor, client_id)
    if len(reason.strip()) < 10:
        refuse(settings, "retention hold", actor, "--reason must name the hold (at least 10 characters)",
               clients=[pseudonym])
    if client_id in holds:
        refuse(settings, "retention hold", actor, f"client {client_id} is on hold already", clients=[pseudonym])
    if not dry_run:
        run(with_cases(settings, lambda s: s.hold(client_id, pseudonym, reason.strip(), f"u:{operator(actor)}",
                                                   time.time())))
    record(settings, "retention hold", actor, dry_run=dry_run, clients=[pseudonym], reason=reason.strip())
    click.echo(f"{'would hold' if dry_run else 'held'} client {client_id}: kept, and erasure refused, until released")


@retention.command("release")
@click.option("--client", "client_id", required=True, help="the client's CRM id")
@click.option("--reason", required=True, help="why the hold ends")
@CONFIG
@DRY_RUN
@ACTOR
def retention_release(client_id: str, reason: str, config: Path | None, dry_run: bool, actor: str | None) -> None:
    """End a legal hold: the schedules apply again."""
    settings = settings_of(config)
    holds = run(with_cases(settings, lambda s: s.holds()))
    if client_id not in holds:
        refuse(settings, "retention release", actor, f"client {client_id} is not on hold")
    pseudonym = holds[client_id]["pseudonym"]
    if not dry_run:
        run(with_cases(settings, lambda s: s.release_hold(client_id)))
    record(settings, "retention release", actor, dry_run=dry_run, clients=[pseudonym], reason=reason)
    click.echo(f"{'would release' if dry_run else 'released'} the hold on client {client_id}")


@retention.command("event")
@click.option("--client", "client_id", required=True, help="the client's CRM id")
@click.option("--event", "event", required=True, help="a recorded event retention.yaml names (death, ...)")
@click.option("--date", "on", required=True, help="when it happened, YYYY-MM-DD")
@CONFIG
@DRY_RUN
@ACTOR
def retention_event(client_id: str, event: str, on: str, config: Path | None, dry_run: bool,
                    actor: str | None) -> None:
    """Record an event a schedule runs from. A death relaxes nothing: confidentiality continues."""
    settings = settings_of(config)
    bundle = bundle_of(settings)
    act = "retention event"
    known = sorted(e.recorded for e in bundle.retention.events.values() if e.recorded)
    if event not in known:
        refuse(settings, act, actor, f"unknown event {event!r} (retention.yaml records: {', '.join(known) or 'none'})")
    when = day(settings, act, actor, "--date", on)
    if when > datetime.now(UTC).date():
        refuse(settings, act, actor, f"--date {when} is in the future")
    pseudonym = live_client(settings, act, actor, client_id, bundle.fieldmap)
    if not dry_run and not run(with_cases(settings, lambda s: s.record_event(
            client_id, event, when.isoformat(), f"u:{operator(actor)}", time.time()))):
        refuse(settings, act, actor, f"client {client_id}: {event} is recorded already", clients=[pseudonym])
    record(settings, act, actor, dry_run=dry_run, clients=[pseudonym], reason=f"{event} on {when}")
    click.echo(f"{'would record' if dry_run else 'recorded'} {event} of client {client_id} on {when}")


@retention.command("supervision")
@click.option("--counsellor", required=True, help="whose supervision session (as the CRM names them)")
@click.option("--date", "on", required=True, help="the day of the session, YYYY-MM-DD")
@CONFIG
@DRY_RUN
@ACTOR
def retention_supervision(counsellor: str, on: str, config: Path | None, dry_run: bool, actor: str | None) -> None:
    """Record a supervision session; the counsellor's process notes written on or before it are destroyed
    now (the record schedules that run from next_supervision)."""
    from proxy.retention import record_resources

    settings = settings_of(config)
    bundle = bundle_of(settings)
    act = "retention supervision"
    when = day(settings, act, actor, "--date", on)
    if when > datetime.now(UTC).date():
        refuse(settings, act, actor, f"--date {when} is in the future")
    if not dry_run:
        run(with_cases(settings, lambda s: s.record_supervision(counsellor, when.isoformat(), f"u:{operator(actor)}",
                                                                  time.time())))
    today = datetime.now(UTC).date()
    resources = record_resources(bundle.retention, bundle.fieldmap)
    done = run(_supervised(settings, bundle, today, resources, counsellor, dry_run, actor, when))
    record(settings, act, actor, dry_run=dry_run, counts={"records": sum(done.values())},
           reason=f"supervision of {counsellor} on {when}")
    echo({"counsellor": counsellor, "date": when.isoformat(), "destroyed" if not dry_run else "would_destroy": done})


async def _supervised(settings: Settings, bundle: Any, today: date, resources: frozenset[str], counsellor: str,
                      dry_run: bool, actor: str | None, when: date) -> dict[str, int]:
    from proxy.audit import record_operation
    from proxy.retention import destroy_records

    ring = await _keyring(settings)
    done: dict[str, int] = {}
    reading = resources | {bundle.fieldmap.client_resource.name}
    try:
        async for p in survey(settings, bundle, ring, today, resources=reading, author=counsellor,
                              also_supervised=(counsellor, when.isoformat()) if dry_run else None):
            if isinstance(p, str) or not p.records:
                continue
            if dry_run:
                done[p.client_id] = len(p.records)
                continue
            why = f"retention: supervision of {counsellor} on {when}"
            d = await destroy_records(settings, bundle.fieldmap, ring, p.records, p.found, why)
            done[p.client_id] = sum(len(v) for v in d.deleted.values())
            await record_operation(settings, "retention supervision", who=operator(actor), clients=[p.pseudonym],
                                   reason=why, key_ids=d.keys_destroyed, counts={"deleted": done[p.client_id]})
    finally:
        await ring.store.close()
    return done


# ---------------------------------------------------------------------------------------------- erasure
@click.command()
@click.option("--client", "client_id", required=True, help="the client's CRM id")
@click.option("--request", "reference", required=True, help="the client's request (a letter, a ticket)")
@click.option("--approve", is_flag=True, help="approve and carry out the erasure asked for (a second person)")
@click.option("--role", default=None, help="the approver's role (retention.yaml erasure.approvers)")
@OUT
@CONFIG
@DRY_RUN
@ACTOR
def erase(client_id: str, reference: str, approve: bool, role: str | None, out_dir: Path, config: Path | None,
          dry_run: bool, actor: str | None) -> None:
    """The right to erasure (UK GDPR Art. 17): asked for first, checked against legal holds and the schedules
    that are a legal minimum, then carried out when a second person approves: the client's keys shredded,
    their records deleted and their identity blanked through the CRM, a certificate of destruction."""
    settings = settings_of(config)
    bundle = bundle_of(settings)
    act = "erase"
    pseudonym = live_client(settings, act, actor, client_id, bundle.fieldmap)
    plan = _check_erasable(settings, bundle, act, actor, client_id, pseudonym)
    asked = [r for r in run(with_cases(settings, lambda s: s.requests(kind="erasure", client_id=client_id,
                                                                       open_only=True))) if r.reference == reference]
    who = f"u:{operator(actor)}"
    if not approve:
        if asked:
            refuse(settings, act, actor, f"erasure {asked[0].request_id} for request {reference!r} already awaits "
                                         "approval", clients=[pseudonym])
        _ask(settings, act, actor, client_id, pseudonym, reference, who, dry_run)
        return
    if not asked:
        refuse(settings, act, actor, f"no erasure of client {client_id} for request {reference!r} awaits approval: "
                                     "ask for it first (without --approve)", clients=[pseudonym])
    r = asked[0]
    approvers = bundle.retention.approvers
    if role not in approvers:
        refuse(settings, act, actor, f"--role must be one of {', '.join(sorted(approvers))} to approve an erasure",
               clients=[pseudonym])
    if r.recorded_by == who:
        refuse(settings, act, actor, f"{r.request_id} was asked for by {who}: a second person approves it",
               clients=[pseudonym])
    if dry_run:
        record(settings, act, actor, dry_run=True, clients=[pseudonym], reason=f"would erase client {client_id}")
        echo({"request": r.request_id, "would_destroy": {"records": plan.found.ids(bundle.fieldmap)}})
        return
    done = run(_erase(settings, bundle, client_id, plan, f"erasure: request {reference}"))
    path = _write_certificate(settings, bundle, out_dir, "erasure", [done], request=r.request_id,
                              reference=reference, requested_by=r.recorded_by, approved_by=who, approver_role=role)
    run(with_cases(settings, lambda s: s.update_request(r.request_id, "completed", closed_by=who,
                                                         closed_at=time.time(), outcome=path.name)))
    record(settings, act, actor, clients=[pseudonym], key_ids=done.keys_destroyed,
           reason=f"erased: request {reference}, certificate {path.name}",
           counts={"deleted": sum(len(v) for v in done.deleted.values()), "keys": len(done.keys_destroyed)})
    echo({"request": r.request_id, "erased": client_id, "certificate": str(path), **done.as_dict()})


def _check_erasable(settings: Settings, bundle: Any, act: str, actor: str | None, client_id: str,
                    pseudonym: str) -> ClientPlan:
    async def one() -> ClientPlan:
        ring = await _keyring(settings)
        try:
            async for p in survey(settings, bundle, ring, datetime.now(UTC).date(), [client_id]):
                assert not isinstance(p, str)
                return p
        finally:
            await ring.store.close()
        raise AssertionError("unreachable")

    plan: ClientPlan = run(one())
    holds = run(with_cases(settings, lambda s: s.holds()))
    if client_id in holds:
        refuse(settings, act, actor, f"client {client_id} is on legal hold ({holds[client_id]['reason']}): "
                                     "erasure refused", clients=[pseudonym])
    if plan.verdict.blocks_erasure:
        refuse(settings, act, actor, f"retention schedule {plan.verdict.blocks_erasure} keeps this client's records "
                                     "(a legal minimum): erasure refused, UK GDPR Art. 17(3)", clients=[pseudonym])
    return plan


def _ask(settings: Settings, act: str, actor: str | None, client_id: str, pseudonym: str, reference: str, who: str,
         dry_run: bool) -> None:
    from proxy.cases import RightsRequest
    from proxy.subject_access import due_date

    today = datetime.now(UTC).date()
    r = RightsRequest("er-" + secrets.token_hex(6), "erasure", client_id, pseudonym, today.isoformat(),
                      due_date(today).isoformat(), reference, who, time.time(), status="awaiting approval")
    if not dry_run:
        run(with_cases(settings, lambda s: s.record_request(r)))
    record(settings, act, actor, dry_run=dry_run, clients=[pseudonym], reason=f"erasure asked: request {reference}")
    echo({"request": r.request_id, "client": client_id, "status": r.status, "due": r.due,
          "next": f"fieldguard erase --client {client_id} --request '{reference}' --approve --role dpo "
                  "--actor <a second person>"})


async def _erase(settings: Settings, bundle: Any, client_id: str, plan: ClientPlan, why: str) -> Any:
    from proxy.retention import destroy_client

    ring = await _keyring(settings)
    try:
        return await destroy_client(settings, bundle, ring, client_id, plan.found, why)
    finally:
        await ring.store.close()

"""`fieldguard sar ...`: subject access (UK GDPR Art. 15) and portability (Art. 20), from receipt to answer.

`sar request` records a request on the day it was received and its due date (one calendar month: see
`proxy.subject_access.due_date`); `sar list` shows the open ones and the days left; `sar extend` adds the two
months Art. 12(3) allows a complex request, once, with the reason; `sar export` produces the package (or the
portable copy) and closes the request it answers. Every step is an audit record.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

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
from proxy.config import Settings


@click.group()
def sar() -> None:
    """Subject access and portability requests: record, list, extend, export."""


def day(settings: Settings, action: str, actor: str | None, option: str, value: str | None) -> date:
    """An ISO date option (today when absent), or a refusal naming the option."""
    if value is None:
        return datetime.now(UTC).date()
    try:
        return date.fromisoformat(value)
    except ValueError:
        refuse(settings, action, actor, f"{option} {value!r} is not a date (YYYY-MM-DD)")


def live_client(settings: Settings, action: str, actor: str | None, client_id: str, fm: Any = None) -> str:
    """The pseudonym of a client the CRM has and who was not erased; a refusal otherwise."""
    pseudonym, erased, known = run(client_facts(settings, client_id, fm))
    if erased:
        refuse(settings, action, actor, f"client {client_id} was erased (keys shredded): nothing is held to give")
    if not known or pseudonym is None:
        refuse(settings, action, actor, f"client {client_id} is not in the CRM")
    return str(pseudonym)


def _kind(portable: bool) -> str:
    return "portability" if portable else "access"


@sar.command("request")
@click.option("--client", "client_id", required=True, help="the client's CRM id")
@click.option("--received", default=None, help="the day the service received it, YYYY-MM-DD (default: today)")
@click.option("--reference", default="", help="the service's own reference for the request (a letter, a ticket)")
@click.option("--portable", is_flag=True, help="a portability request (Art. 20) rather than subject access")
@CONFIG
@DRY_RUN
@ACTOR
def sar_request(client_id: str, received: str | None, reference: str, portable: bool, config: Path | None,
                dry_run: bool, actor: str | None) -> None:
    """Record a request the day it was received; the due date follows from it."""
    from proxy.cases import RightsRequest
    from proxy.subject_access import due_date

    settings = settings_of(config)
    act = "sar request"
    on = day(settings, act, actor, "--received", received)
    if on > datetime.now(UTC).date():
        refuse(settings, act, actor, f"--received {on} is in the future")
    pseudonym = live_client(settings, act, actor, client_id)
    due = due_date(on)
    r = RightsRequest("sar-" + secrets.token_hex(6), _kind(portable), client_id, pseudonym, on.isoformat(),
                      due.isoformat(), reference.strip(), f"u:{operator(actor)}", time.time())
    if not dry_run:
        run(with_cases(settings, lambda s: s.record_request(r)))
    record(settings, act, actor, dry_run=dry_run, clients=[pseudonym],
           reason=f"{r.kind} request received {r.received}, due {r.due}")
    echo({"request": r.request_id, "kind": r.kind, "client": client_id, "received": r.received, "due": r.due,
          "days_left": (due - datetime.now(UTC).date()).days, "recorded": not dry_run})


@sar.command("list")
@click.option("--all", "everything", is_flag=True, help="closed requests too")
@click.option("--as-of", "as_of", default=None, help="count the days left from this day (default: today)")
@CONFIG
@ACTOR
def sar_list(everything: bool, as_of: str | None, config: Path | None, actor: str | None) -> None:
    """The requests still owed an answer, soonest due first, with the days left (negative: overdue)."""
    settings = settings_of(config)
    today = day(settings, "sar list", actor, "--as-of", as_of)
    found = [r for r in run(with_cases(settings, lambda s: s.requests(open_only=not everything)))
             if r.kind in ("access", "portability")]
    record(settings, "sar list", actor, counts={"requests": len(found)})
    echo([{"request": r.request_id, "kind": r.kind, "client": r.client_id, "received": r.received, "due": r.due,
           "days_left": (date.fromisoformat(r.due) - today).days if r.is_open else None,
           "overdue": r.is_open and date.fromisoformat(r.due) < today, "status": r.status,
           "reference": r.reference, "extended": r.detail.get("extended")} for r in found])


@sar.command("extend")
@click.argument("request_id")
@click.option("--reason", required=True, help="why the request is complex (Art. 12(3)); the client is told")
@CONFIG
@DRY_RUN
@ACTOR
def sar_extend(request_id: str, reason: str, config: Path | None, dry_run: bool, actor: str | None) -> None:
    """Extend a complex request by two further months, once, before it falls due."""
    from proxy.subject_access import due_date

    settings = settings_of(config)
    act = "sar extend"
    r = run(with_cases(settings, lambda s: s.request(request_id)))
    if r is None or r.kind not in ("access", "portability"):
        refuse(settings, act, actor, f"no subject access request {request_id}")
    if not r.is_open or r.detail.get("extended"):
        refuse(settings, act, actor, f"{request_id} is {r.status}" if not r.is_open
               else f"{request_id} was extended already", clients=[r.pseudonym])
    if len(reason.strip()) < 10:
        refuse(settings, act, actor, "--reason must say why the request is complex (at least 10 characters)",
               clients=[r.pseudonym])
    due = due_date(due_date(date.fromisoformat(r.received)))  # three months in all from receipt
    due = max(due, due_date(date.fromisoformat(r.due)))
    if not dry_run:
        run(with_cases(settings, lambda s: s.update_request(
            request_id, r.status, detail={**r.detail, "extended": reason.strip()}, due=due.isoformat())))
    record(settings, act, actor, dry_run=dry_run, clients=[r.pseudonym], reason=f"due {due}: {reason.strip()}")
    echo({"request": request_id, "due": due.isoformat(), "extended": not dry_run})


@sar.command("export")
@click.option("--client", "client_id", required=True, help="the client's CRM id")
@click.option("--request", "request_id", default=None,
              help="the request it answers (default: the client's open one of that kind, if any)")
@click.option("--format", "fmt", type=click.Choice(["json", "html", "pdf"]), default="html", show_default=True,
              help="beside the JSON, which is always written: a printable HTML page or a PDF")
@click.option("--portable", is_flag=True, help="the portable copy: JSON and a CSV per resource (Art. 20)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("sar"),
              show_default=True, help="where the package is written (a directory only you can read)")
@CONFIG
@DRY_RUN
@ACTOR
def sar_export(client_id: str, request_id: str | None, fmt: str, portable: bool, out_dir: Path,
               config: Path | None, dry_run: bool, actor: str | None) -> None:
    """Everything held on the client, decrypted, in one package; what came from third parties withheld
    with a note of why, never its content. With --dry-run, say what it would hold and write nothing."""
    from proxy.keys import open_kek, open_keyring
    from proxy.secretfile import private_dir, write_private
    from proxy.subject_access import history, package

    settings = settings_of(config)
    act = "sar export"
    bundle = bundle_of(settings)
    pseudonym = live_client(settings, act, actor, client_id, bundle.fieldmap)
    kind = _kind(portable)
    answering = _answering(settings, act, actor, client_id, pseudonym, kind, request_id)
    who = f"u:{operator(actor)}"
    head: dict[str, Any] = {"request": answering.request_id if answering else None,
                            "received": answering.received if answering else None,
                            "due": answering.due if answering else None, "produced_by": who}
    report = None if portable else history(settings, pseudonym)

    async def go() -> Any:
        ring = await open_keyring(settings.keys, open_kek(settings.keys))
        try:
            return await package(settings, bundle, ring, client_id, pseudonym, head, report, portable=portable)
        finally:
            await ring.store.close()

    made = run(go())
    withheld = made.document.get("withheld", [])
    if dry_run:
        record(settings, act, actor, dry_run=True, clients=[pseudonym], counts={"records": made.count},
               reason=f"would answer a {kind} request")
        echo({"client": client_id, "kind": kind, "would_include": made.records, "records": made.count,
              "withheld": withheld})
        return
    private_dir(out_dir)
    stem = out_dir / f"{answering.request_id if answering else 'sar-' + client_id}-{kind}"
    written = [stem.with_suffix(".json")]
    write_private(written[0], made.json_bytes)
    if portable:
        for name, data in made.csv.items():
            written.append(stem.parent / f"{stem.name}-{name}.csv")
            write_private(written[-1], data)
    elif fmt == "html":
        written.append(stem.with_suffix(".html"))
        write_private(written[-1], made.html.encode())
    elif fmt == "pdf":
        from proxy.subject_access import render_pdf

        written.append(stem.with_suffix(".pdf"))
        write_private(written[-1], render_pdf(made.document))
    if answering is not None:
        run(with_cases(settings, lambda s: s.update_request(
            answering.request_id, "completed", closed_by=who, closed_at=time.time(), outcome=made.sha256)))
    record(settings, act, actor, clients=[pseudonym], counts={"records": made.count},
           reason=f"{kind} answered: sha256 {made.sha256}")
    echo({"client": client_id, "kind": kind, "request": head["request"], "records": made.count,
          "files": [str(p) for p in written], "sha256": made.sha256, "withheld": withheld})


def _answering(settings: Settings, act: str, actor: str | None, client_id: str, pseudonym: str, kind: str,
               request_id: str | None) -> Any:
    """The open request an export answers: the one named, else the client's open one of that kind."""
    if request_id is None:
        open_ones = run(with_cases(settings, lambda s: s.requests(kind=kind, client_id=client_id, open_only=True)))
        return open_ones[0] if open_ones else None
    r = run(with_cases(settings, lambda s: s.request(request_id)))
    if r is None or r.kind not in ("access", "portability"):
        refuse(settings, act, actor, f"no subject access request {request_id}", clients=[pseudonym])
    if r.client_id != client_id:
        refuse(settings, act, actor, f"{request_id} is another client's request", clients=[pseudonym])
    if r.kind != kind:
        refuse(settings, act, actor, f"{request_id} is a {r.kind} request: "
               + ("add --portable" if r.kind == "portability" else "leave out --portable"), clients=[pseudonym])
    if not r.is_open:
        refuse(settings, act, actor, f"{request_id} is {r.status}", clients=[pseudonym])
    return r

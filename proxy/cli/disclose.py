"""`fieldguard disclose ...` and `fieldguard consent ...`: releasing a client's records by the book.

A grant records what may be released (to whom, on which basis of `policies/disclosure.yaml`, which classes,
of which dates, until when, whether the client is told); a second person approves it where the basis says
so; `export` produces exactly that, as JSON and a printable HTML bundle, and enters the release in the
disclosure register (the trail). Consent is recorded as data, and withdrawing it stops the grants resting
on it. Every command is audited, and every refusal says why.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from datetime import UTC, date, datetime, timedelta
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

DAY = 86400


@click.group()
def disclose() -> None:
    """Disclosure grants, their approval and export, and the disclosure register."""


@click.group()
def consent() -> None:
    """Clients' informed, written consent to share, and its withdrawal."""


# ---------------------------------------------------------------------------------------------- helpers
def _classes(settings: Settings, action: str, actor: str | None, text: str, bundle: Any) -> tuple[str, ...]:
    classes = tuple(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))
    unknown = [c for c in classes if c not in bundle.fieldmap.classes]
    if not classes or unknown:
        refuse(settings, action, actor, f"unknown class {unknown[0]!r} (the field map's: "
                                        f"{', '.join(sorted(bundle.fieldmap.classes))})" if unknown
               else "name at least one class")
    return classes


def _day(settings: Settings, action: str, actor: str | None, name: str, text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        refuse(settings, action, actor, f"{name} {text!r} is not a date (YYYY-MM-DD)")


def _end_of(day: str) -> float:
    return datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() + DAY


def _register_entry(g: Any, now: float) -> dict[str, Any]:
    from proxy.cases import iso

    return {"grant": g.grant_id, "client": g.pseudonym, "recipient": g.recipient, "basis": g.basis,
            "reference": g.reference, "classes": list(g.classes), "from": g.date_from, "until": g.date_until,
            "expires": iso(g.expires_at), "state": g.state(now), "granted_by": g.granted_by,
            "approved_by": g.approved_by, "client_told": g.notify, "exemption": g.exemption,
            "consent": g.consent_id, "revoked": g.revoked_reason}


def _grant_audit(g: Any) -> dict[str, Any]:
    return {"grant": g.grant_id, "recipient": g.recipient, "basis": g.basis, "reference": g.reference,
            "classes": list(g.classes), "from": g.date_from, "until": g.date_until, "client_told": g.notify,
            "exemption": g.exemption, "consent": g.consent_id, "approved_by": g.approved_by}


# ---------------------------------------------------------------------------------------------- disclose
@disclose.command("grant")
@click.option("--client", "client_id", required=True, help="the client's CRM id")
@click.option("--recipient", required=True, help='who receives it ("Derby Family Court")')
@click.option("--basis", required=True, help="one of disclosure.yaml's bases (court_order, consent, ...)")
@click.option("--reference", required=True, help='the order, summons or request ("case 2026/1234")')
@click.option("--classes", required=True, help="comma-separated field classes (clinical_notes,letters)")
@click.option("--from", "date_from", help="records dated from (YYYY-MM-DD)")
@click.option("--until", "date_until", help="records dated until (YYYY-MM-DD, inclusive)")
@click.option("--expires", help="the grant ends (YYYY-MM-DD; default 30 days, at most max_days)")
@click.option("--no-notify", is_flag=True, help="the client is not told (needs --notify-exempt)")
@click.option("--notify-exempt", help="the exemption that makes telling the client an offence (terrorism_act, poca)")
@click.option("--consent", "consent_id", help="the recorded consent a `consent` basis rests on")
@CONFIG
@DRY_RUN
@ACTOR
def disclose_grant(client_id: str, recipient: str, basis: str, reference: str, classes: str, date_from: str | None,
                   date_until: str | None, expires: str | None, no_notify: bool, notify_exempt: str | None,
                   consent_id: str | None, config: Path | None, dry_run: bool, actor: str | None) -> None:
    """Record what may be released of one client, on what basis, to whom."""
    from proxy.cases import DisclosureGrant, iso

    settings = settings_of(config)
    bundle = bundle_of(settings)
    rules = bundle.disclosure
    act = "disclose grant"
    if basis in rules.refused:
        refuse(settings, act, actor, f"{basis} is not a basis for disclosure: {rules.refused[basis]}")
    if basis not in rules.bases:
        refuse(settings, act, actor, f"unknown basis {basis!r} (disclosure.yaml's: {', '.join(sorted(rules.bases))})")
    chosen = rules.bases[basis]
    named = _classes(settings, act, actor, classes, bundle)
    start, end = _day(settings, act, actor, "--from", date_from), _day(settings, act, actor, "--until", date_until)
    if start and end and start > end:
        refuse(settings, act, actor, f"the date range is inverted: --from {start} is after --until {end}")
    now = time.time()
    ends = _day(settings, act, actor, "--expires", expires)
    expires_at = _end_of(ends) if ends else now + 30 * DAY
    if expires_at <= now:
        refuse(settings, act, actor, f"--expires {ends} is not in the future")
    if expires_at > now + rules.max_days * DAY:
        refuse(settings, act, actor, f"--expires is more than max_days ({rules.max_days}) away")
    if no_notify != (notify_exempt is not None):
        refuse(settings, act, actor, "--no-notify and --notify-exempt go together: the client is told unless an "
                                     "exemption makes telling them an offence")
    if notify_exempt is not None and notify_exempt not in rules.notify_exempt:
        refuse(settings, act, actor, f"unknown exemption {notify_exempt!r} (disclosure.yaml's: "
                                     f"{', '.join(sorted(rules.notify_exempt))})")
    pseudonym, erased, known = run(client_facts(settings, client_id, bundle.fieldmap))
    if erased:
        refuse(settings, act, actor, f"client {client_id} was erased (keys shredded): nothing is left to disclose")
    if not known:
        refuse(settings, act, actor, f"client {client_id} is not in the CRM")
    if chosen.consent:
        if consent_id is None:
            refuse(settings, act, actor, f"basis {basis} needs --consent: the client's recorded consent "
                                         "(`fieldguard consent record`)", clients=[pseudonym])
        held = run(with_cases(settings, lambda s: s.consent(consent_id)))
        problem = _consent_problem(held, client_id, recipient, named, now)
        if problem:
            refuse(settings, act, actor, f"consent {consent_id} {problem}", clients=[pseudonym])
    elif consent_id is not None:
        refuse(settings, act, actor, f"--consent is for the consent basis; {basis} does not rest on one")
    grant = DisclosureGrant(
        grant_id="dg-" + secrets.token_hex(8), client_id=client_id, pseudonym=str(pseudonym), recipient=recipient,
        basis=basis, reference=reference, classes=named, date_from=start, date_until=end, expires_at=expires_at,
        notify=not no_notify, exemption=notify_exempt, consent_id=consent_id, granted_by=f"u:{operator(actor)}",
        granted_at=now, needs_approval=chosen.approval)
    if not dry_run:
        run(with_cases(settings, lambda s: s.grant_disclosure(grant)))
    record(settings, act, actor, dry_run=dry_run, clients=[grant.pseudonym], disclosure=_grant_audit(grant),
           reason=f"disclosure granted: {basis}")
    shown = _register_entry(grant, now)
    shown["state"] = "would be granted" if dry_run else shown["state"]
    echo(shown)
    if chosen.approval and not dry_run:
        click.echo(f"needs approval by {' or '.join(sorted(rules.approvers))} before export: "
                   f"fieldguard disclose approve {grant.grant_id}; expires {iso(expires_at)}", err=True)


def _consent_problem(held: Any, client_id: str, recipient: str, classes: tuple[str, ...], now: float) -> str | None:
    if held is None:
        return "is not recorded"
    if held.client_id != client_id:
        return "is another client's"
    if held.withdrawn_at is not None:
        return "was withdrawn"
    if not held.in_force(now):
        return "has expired"
    if held.recipient.casefold() != recipient.casefold():
        return f"is for {held.recipient!r}, not {recipient!r}"
    beyond = [c for c in classes if c not in held.classes]
    if beyond:
        return f"does not cover {', '.join(beyond)} (it covers {', '.join(held.classes)})"
    return None


@disclose.command("approve")
@click.argument("grant_id")
@click.option("--role", required=True, type=click.Choice(["service_manager", "dpo"]), help="the approver's role")
@CONFIG
@DRY_RUN
@ACTOR
def disclose_approve(grant_id: str, role: str, config: Path | None, dry_run: bool, actor: str | None) -> None:
    """The second person's approval of a grant, before anything is exported."""
    settings = settings_of(config)
    rules = bundle_of(settings).disclosure
    act = "disclose approve"
    g = run(with_cases(settings, lambda s: s.disclosure(grant_id)))
    if g is None:
        refuse(settings, act, actor, f"no disclosure grant {grant_id}")
    who = f"u:{operator(actor)}"
    if role not in rules.approvers:
        refuse(settings, act, actor, f"role {role} may not approve disclosures (disclosure.yaml's approvers: "
                                     f"{', '.join(sorted(rules.approvers))})", clients=[g.pseudonym])
    if g.granted_by == who:
        refuse(settings, act, actor, f"{grant_id} was granted by {operator(actor)}: a second person approves it",
               clients=[g.pseudonym])
    state = g.state(time.time())
    if state != "awaiting approval":
        refuse(settings, act, actor, f"{grant_id} is {state}: nothing to approve", clients=[g.pseudonym])
    if not dry_run:
        run(with_cases(settings, lambda s: s.approve_disclosure(grant_id, who, time.time())))
    record(settings, act, actor, dry_run=dry_run, clients=[g.pseudonym],
           disclosure={**_grant_audit(g), "approved_by": who}, reason=f"disclosure approved as {role}")
    click.echo(f"{'would approve' if dry_run else 'approved'} {grant_id} as {role} {operator(actor)}")


@disclose.command("revoke")
@click.argument("grant_id")
@click.option("--reason", required=True)
@CONFIG
@DRY_RUN
@ACTOR
def disclose_revoke(grant_id: str, reason: str, config: Path | None, dry_run: bool, actor: str | None) -> None:
    """Stop a grant: nothing more is exported under it."""
    settings = settings_of(config)
    g = run(with_cases(settings, lambda s: s.disclosure(grant_id)))
    if g is None:
        refuse(settings, "disclose revoke", actor, f"no disclosure grant {grant_id}")
    if not dry_run and not run(with_cases(settings, lambda s: s.revoke_disclosure(grant_id, reason, time.time()))):
        refuse(settings, "disclose revoke", actor, f"{grant_id} is revoked already", clients=[g.pseudonym])
    record(settings, "disclose revoke", actor, dry_run=dry_run, clients=[g.pseudonym],
           disclosure=_grant_audit(g), reason=reason)
    click.echo(f"{'would revoke' if dry_run else 'revoked'} {grant_id}")


@disclose.command("export")
@click.argument("grant_id")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="where the bundle's .json and .html are written (0600)")
@CONFIG
@DRY_RUN
@ACTOR
def disclose_export(grant_id: str, out_dir: Path, config: Path | None, dry_run: bool, actor: str | None) -> None:
    """Produce exactly what the grant names, decrypted, as JSON and a printable HTML bundle. With --dry-run,
    say what would be released and withheld, and write nothing."""
    from proxy.cases import Alert, Release
    from proxy.keys import open_kek, open_keyring
    from proxy.release import export, render_pdf
    from proxy.secretfile import private_dir, write_private

    settings = settings_of(config)
    bundle = bundle_of(settings)
    act = "disclose export"
    now = time.time()
    g = run(with_cases(settings, lambda s: s.disclosure(grant_id)))
    if g is None:
        refuse(settings, act, actor, f"no disclosure grant {grant_id}")
    state = g.state(now)
    if state != "approved":
        why = {"awaiting approval": "it awaits a second person's approval (fieldguard disclose approve)",
               "expired": "it has expired", "revoked": f"it was revoked ({g.revoked_reason})"}[state]
        refuse(settings, act, actor, f"{grant_id} cannot be exported: {why}", clients=[g.pseudonym])
    if g.consent_id is not None:
        held = run(with_cases(settings, lambda s: s.consent(g.consent_id)))
        if held is None or not held.in_force(now):
            refuse(settings, act, actor, f"{grant_id} cannot be exported: consent {g.consent_id} is no longer in "
                                         "force", clients=[g.pseudonym])
    basis = bundle.disclosure.bases.get(g.basis)
    who = operator(actor)

    async def go() -> Any:
        ring = await open_keyring(settings.keys, open_kek(settings.keys))
        try:
            if await ring.store.tombstoned([g.client_id]):
                raise ValueError(f"client of {grant_id} was erased (keys shredded): nothing is left to disclose")
            return await export(settings, bundle, g, ring, f"u:{who}", basis.label if basis else g.basis)
        finally:
            await ring.store.close()

    made = run(go())
    count = sum(len(v) for v in made.records.values())
    if dry_run:
        record(settings, act, actor, dry_run=True, clients=[g.pseudonym], counts={"records": count},
               disclosure=_grant_audit(g), reason=f"would disclose to {g.recipient}")
        echo({"grant": grant_id, "would_release": made.records, "records": count, "withheld": made.withheld})
        return
    private_dir(out_dir)
    n = len(run(with_cases(settings, lambda s: s.releases(grant_id)))) + 1
    stem = out_dir / f"{grant_id}-{n}"
    write_private(stem.with_suffix(".json"), made.json_bytes)
    write_private(stem.with_suffix(".html"), made.html.encode())
    pdf = render_pdf(made.document)
    write_private(stem.with_suffix(".pdf"), pdf)
    pdf_sha256 = hashlib.sha256(pdf).hexdigest()
    release = Release("dr-" + secrets.token_hex(8), grant_id, f"u:{who}", now, made.records, made.sha256,
                      made.html_sha256)
    alert = Alert("al-" + secrets.token_hex(8), grant_id, {
        "event": "disclosure released", "grant": grant_id, "release": release.release_id, "client": g.pseudonym,
        "recipient": g.recipient, "basis": g.basis, "reference": g.reference, "classes": list(g.classes),
        "records": count, "by": f"u:{who}", "approved_by": g.approved_by, "client_told": g.notify,
        "sha256": made.sha256}, 0)

    async def keep(s: Any) -> None:  # the service manager is told: the running gateway delivers the alert
        await s.record_release(release)
        await s.queue_alert(alert, now)

    run(with_cases(settings, keep))
    record(settings, act, actor, clients=[g.pseudonym], reason=f"disclosed to {g.recipient}",
           counts={"records": count}, disclosure={**_grant_audit(g), "release": release.release_id,
                                                  "records": made.records, "sha256": made.sha256,
                                                  "html_sha256": made.html_sha256, "pdf_sha256": pdf_sha256})
    echo({"grant": grant_id, "release": release.release_id, "records": count, "json": str(stem.with_suffix(".json")),
          "html": str(stem.with_suffix(".html")), "pdf": str(stem.with_suffix(".pdf")), "sha256": made.sha256,
          "html_sha256": made.html_sha256, "pdf_sha256": pdf_sha256, "withheld": made.withheld})


@disclose.command("list")
@click.option("--client", "client_id", help="one client's (CRM id)")
@click.option("--json", "as_json", is_flag=True, help="JSON for machines (default: a table)")
@CONFIG
@ACTOR
def disclose_list(client_id: str | None, as_json: bool, config: Path | None, actor: str | None) -> None:
    """The disclosure register: grants and their releases, and break-glass uses."""
    from proxy.cases import iso

    settings = settings_of(config)
    now = time.time()

    async def gather(s: Any) -> tuple[list[Any], list[Any], list[Any]]:
        grants = await s.disclosures(client_id)
        releases = await s.releases()
        glass = [g for g, _ in await s.grants() if client_id is None or g.client_id == client_id]
        return grants, releases, glass

    grants, releases, glass = run(with_cases(settings, gather))
    by_grant: dict[str, list[Any]] = {}
    for r in releases:
        by_grant.setdefault(r.grant_id, []).append(r)
    entries = []
    for g in grants:
        entry = _register_entry(g, now)
        entry["releases"] = [{"release": r.release_id, "at": iso(r.released_at), "by": r.released_by,
                              "records": sum(len(v) for v in r.records.values()), "sha256": r.sha256}
                             for r in by_grant.get(g.grant_id, [])]
        entries.append(entry)
    entries += [{"grant": g.grant_id, "client": g.pseudonym, "recipient": f"{g.user} ({g.role})",
                 "basis": f"break-glass: {g.reason}", "reference": "", "classes": list(g.classes),
                 "state": "open" if g.open_at(now) else "closed", "at": iso(g.opened_at)} for g in glass]
    record(settings, "disclose list", actor, counts={"entries": len(entries)})
    if as_json:
        echo(entries)
        return
    for e in entries:
        released = sum(r["records"] for r in e.get("releases", []))
        click.echo(f"{e['grant']}  {e['client']}  {e['basis']:<24}  {e['state']:<18}  to {e['recipient']}"
                   f"{'  released ' + str(released) + ' record(s)' if e.get('releases') else ''}")
    if not entries:
        click.echo("the register is empty")


# ---------------------------------------------------------------------------------------------- consent
@consent.command("record")
@click.option("--client", "client_id", required=True, help="the client's CRM id")
@click.option("--scope", required=True, help="comma-separated field classes the client agrees to share")
@click.option("--recipient", required=True, help="to whom")
@click.option("--purpose", required=True, help="why, as the form says")
@click.option("--form", required=True, help='the form signed ("Release of Counselling Notes")')
@click.option("--evidence", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="the signed form (its SHA-256 is kept; the file is not copied)")
@click.option("--until", "until", required=True, help="the consent ends (YYYY-MM-DD)")
@CONFIG
@DRY_RUN
@ACTOR
def consent_record(client_id: str, scope: str, recipient: str, purpose: str, form: str, evidence: Path, until: str,
                   config: Path | None, dry_run: bool, actor: str | None) -> None:
    """Record a client's informed, written consent to share what, with whom, why, until when."""
    from proxy.cases import Consent

    settings = settings_of(config)
    bundle = bundle_of(settings)
    act = "consent record"
    classes = _classes(settings, act, actor, scope, bundle)
    ends = _day(settings, act, actor, "--until", until)
    now = time.time()
    if ends is None or _end_of(ends) <= now:
        refuse(settings, act, actor, f"--until {until} is not in the future")
    pseudonym, erased, known = run(client_facts(settings, client_id, bundle.fieldmap))
    if erased or not known:
        refuse(settings, act, actor, f"client {client_id} {'was erased' if erased else 'is not in the CRM'}")
    held = Consent("cs-" + secrets.token_hex(8), client_id, str(pseudonym), classes, recipient, purpose, form,
                   hashlib.sha256(evidence.read_bytes()).hexdigest(), f"u:{operator(actor)}", now,
                   _end_of(str(ends)))
    if not dry_run:
        run(with_cases(settings, lambda s: s.record_consent(held)))
    shown = {"consent": held.consent_id, "client": held.pseudonym, "classes": list(classes), "recipient": recipient,
             "purpose": purpose, "form": form, "evidence_sha256": held.evidence_sha256,
             "recorded_at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
             "until": (datetime.fromtimestamp(held.valid_until, UTC) - timedelta(seconds=1)).date().isoformat()}
    record(settings, act, actor, dry_run=dry_run, clients=[held.pseudonym], reason=f"consent to share with {recipient}",
           consent=shown)
    echo({**shown, "recorded": not dry_run})


@consent.command("withdraw")
@click.argument("consent_id")
@click.option("--reason", required=True)
@CONFIG
@DRY_RUN
@ACTOR
def consent_withdraw(consent_id: str, reason: str, config: Path | None, dry_run: bool, actor: str | None) -> None:
    """Withdraw a consent: every grant resting on it is revoked at once."""
    settings = settings_of(config)
    held = run(with_cases(settings, lambda s: s.consent(consent_id)))
    if held is None:
        refuse(settings, "consent withdraw", actor, f"no consent {consent_id}")
    if held.withdrawn_at is not None:
        refuse(settings, "consent withdraw", actor, f"consent {consent_id} was withdrawn already",
               clients=[held.pseudonym])
    revoked: list[str] = []
    if not dry_run:
        revoked = run(with_cases(settings, lambda s: s.withdraw_consent(consent_id, f"u:{operator(actor)}", reason,
                                                                         time.time())))
    record(settings, "consent withdraw", actor, dry_run=dry_run, clients=[held.pseudonym], reason=reason,
           counts={"grants_revoked": len(revoked)}, consent={"consent": consent_id, "withdrawn": True})
    echo({"consent": consent_id, "withdrawn": not dry_run, "grants_revoked": revoked})


@consent.command("list")
@click.option("--client", "client_id", help="one client's (CRM id)")
@CONFIG
@ACTOR
def consent_list(client_id: str | None, config: Path | None, actor: str | None) -> None:
    """Consents recorded, in force or not."""
    from proxy.cases import iso

    settings = settings_of(config)
    now = time.time()
    held = run(with_cases(settings, lambda s: s.consents(client_id)))
    record(settings, "consent list", actor, counts={"consents": len(held)})
    echo([{"consent": c.consent_id, "client": c.pseudonym, "classes": list(c.classes), "recipient": c.recipient,
           "purpose": c.purpose, "form": c.form, "until": iso(c.valid_until), "in_force": c.in_force(now),
           "withdrawn": c.withdrawn_reason} for c in held])


"""Disclosure grants, consent and the register, against the example CRM with its sensitive fields sealed:
a court order for two classes and one year exports exactly that and nothing more, decrypted; a solicitor's
request is refused; consent is recorded and its withdrawal stops the grant resting on it; the release is
in the client's access report (unless exempt) and in the FHIR export."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Gateway,
    Signing,
    direct,
    fieldguard,
    make_keys,
    policies_copy,
    start_crm,
    start_gateway,
    wait_until,
)
from tests.test_breakglass import Webhook


@pytest.fixture(scope="module")
def world(signing: Signing, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("disclosure")
    crm, url = start_crm(d / "crm")
    hook = Webhook()
    gw = start_gateway(d / "gw", url, signing, make_keys(d / "keys"), policies=policies_copy(d / "gw"),
                       sections=f'[cases]\nalert_url = "{hook.url}"\n')
    sealed = fieldguard(gw.config, "encrypt-existing", "--rate", "0")
    assert sealed.returncode == 0, sealed.stderr
    yield {"gw": gw, "url": url, "dir": d, "hook": hook}
    gw.service.stop()
    crm.stop()
    hook.server.shutdown()


def cli(gw: Gateway, *args: str) -> Any:
    return fieldguard(gw.config, *args)


def grant(gw: Gateway, *extra: str, client: str = "1", basis: str = "court_order",
          classes: str = "clinical_notes,letters", actor: str = "sam") -> Any:
    return cli(gw, "disclose", "grant", "--client", client, "--recipient", "Derby Family Court", "--basis", basis,
               "--reference", "case 2026/1234", "--classes", classes, "--actor", actor, *extra)


def last_record(gw: Gateway, route: str) -> dict[str, Any]:
    return [r for r in gw.audit_records() if r["route"] == route][-1]


def test_a_court_order_for_two_classes_and_one_year_exports_exactly_that(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    alice = gw.as_user("alice", "counsellor")

    def write(path: str, body: dict[str, Any]) -> int:
        r = gw.request("POST", path, alice, json=body)
        assert r.status_code == 201, r.text
        return int(r.json()["id"])

    note = {"summary": "s", "risk": {"level": "low", "factors": []}}
    inside = {write("/clients/1/session-notes", {**note, "session_date": day, "body": f"court-year note {day}"}): day
              for day in ("2025-02-03", "2025-11-20")}
    outside = write("/clients/1/session-notes", {**note, "session_date": "2024-12-31", "body": "the year before"})
    letter = {"recipient": "GP", "subject": "update", "body": "letter in the year"}
    own_letter = write("/clients/1/letters", {**letter, "sent_on": "2025-06-01", "third_party": False})
    third = write("/clients/1/letters", {**letter, "sent_on": "2025-07-01", "third_party": True,
                                         "body": "what the school told us"})
    assert direct(world["url"], f"/session-notes/{outside}")["body"].startswith("fg1.")  # sealed at the CRM

    made = grant(gw, "--from", "2025-01-01", "--until", "2025-12-31", "--expires", "2027-06-30")
    assert made.returncode == 0, made.stderr
    g = json.loads(made.stdout)
    assert g["state"] == "awaiting approval" and "needs approval by dpo or service_manager" in made.stderr

    early = cli(gw, "disclose", "export", g["grant"], "--out", str(world["dir"] / "out"))
    assert early.returncode == 1 and "awaits a second person's approval" in early.stderr
    assert last_record(gw, "disclose export")["outcome"] == "denied"
    own = cli(gw, "disclose", "approve", g["grant"], "--role", "service_manager", "--actor", "sam")
    assert own.returncode == 1 and "a second person approves it" in own.stderr
    ok = cli(gw, "disclose", "approve", g["grant"], "--role", "service_manager", "--actor", "dana")
    assert ok.returncode == 0, ok.stderr

    dry = cli(gw, "disclose", "export", g["grant"], "--out", str(world["dir"] / "dry"), "--dry-run")
    assert dry.returncode == 0 and json.loads(dry.stdout)["records"] == 4, dry.stdout + dry.stderr
    assert not (world["dir"] / "dry").exists() and last_record(gw, "disclose export")["outcome"] == "dry-run"
    out = cli(gw, "disclose", "export", g["grant"], "--out", str(world["dir"] / "out"), "--actor", "dana")
    assert out.returncode == 0, out.stderr
    made_export = json.loads(out.stdout)
    pdf = Path(made_export["pdf"]).read_bytes()
    assert hashlib.sha256(pdf).hexdigest() == made_export["pdf_sha256"]
    assert last_record(gw, "disclose export")["disclosure"]["pdf_sha256"] == made_export["pdf_sha256"]
    from pypdf import PdfReader

    printed = " ".join((p.extract_text() or "") for p in PdfReader(Path(made_export["pdf"])).pages)
    assert "Derby Family Court" in printed and "court-year note 2025-02-03" in printed
    assert "the year before" not in printed and "what the school told us" not in printed
    data = Path(made_export["json"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == made_export["sha256"]
    bundle = json.loads(data)
    released = bundle["records"]
    assert set(released) == {"session_note", "letter"}  # the client's own record, appointments ...: not named
    assert {n["id"]: n["session_date"] for n in released["session_note"]} == inside  # 2025 only, nothing seeded
    for n in released["session_note"]:
        assert n["body"] == f"court-year note {n['session_date']}"  # decrypted
        assert "risk" not in n  # safeguarding: not named
    letters = {row["id"]: row for row in released["letter"]}
    assert set(letters) == {own_letter, third} and letters[own_letter]["body"] == "letter in the year"
    assert "body" not in letters[third] and "subject" not in letters[third]  # third-party information: not named
    withheld = {w.get("class") or w.get("resource"): w for w in bundle["withheld"]}
    assert {"safeguarding", "third_party", "client", "process_note"} <= set(withheld)
    assert "the year before" not in data.decode() and "what the school told us" not in data.decode()
    assert any(w.get("resource") == "session_note" and w["why"] == "dated outside the grant's range"
               for w in bundle["withheld"])
    page = Path(made_export["html"]).read_text()
    assert "Derby Family Court" in page and "case 2026/1234" in page and "Withheld" in page
    assert hashlib.sha256(page.encode()).hexdigest() == made_export["html_sha256"]

    rec = last_record(gw, "disclose export")
    assert rec["outcome"] == "allowed" and rec["disclosure"]["sha256"] == made_export["sha256"]
    assert sorted(rec["disclosure"]["records"]["session_note"]) == sorted(str(i) for i in inside)
    assert "court-year note" not in json.dumps(rec)  # names, never values

    hook: Webhook = world["hook"]  # the service manager is told, through the running gateway's alerts
    told_manager = wait_until(lambda: next((a for a in hook.received if a["grant"] == g["grant"]), None),
                              "the release's alert at the webhook", timeout=15)
    assert told_manager["event"] == "disclosure released" and told_manager["records"] == 4
    assert "court-year note" not in json.dumps(told_manager)

    register = json.loads(cli(gw, "disclose", "list", "--json", "--client", "1").stdout)
    entry = next(e for e in register if e["grant"] == g["grant"])
    assert entry["approved_by"] == "u:dana" and entry["releases"][0]["sha256"] == made_export["sha256"]

    report = cli(gw, "audit", "report", "--client", "1", "--format", "json")
    assert report.returncode == 0, report.stderr
    told = json.loads(report.stdout)["disclosures"]
    assert any(d["to"] == "Derby Family Court" and d["basis"] == "court_order" for d in told)


@pytest.mark.parametrize(("args", "message"), [
    (("--basis", "solicitor_request"), "solicitor_request is not a basis for disclosure: a solicitor's letter is "
                                       "not enough"),
    (("--basis", "curiosity"), "unknown basis 'curiosity'"),
    (("--classes", "clinical_notes,diary"), "unknown class 'diary'"),
    (("--from", "2025-12-31", "--until", "2025-01-01"), "the date range is inverted"),
    (("--from", "31/12/2025"), "--from '31/12/2025' is not a date (YYYY-MM-DD)"),
    (("--no-notify",), "--no-notify and --notify-exempt go together"),
    (("--no-notify", "--notify-exempt", "gossip"), "unknown exemption 'gossip'"),
    (("--client", "99999"), "client 99999 is not in the CRM"),
    (("--basis", "consent"), "basis consent needs --consent"),
])
def test_a_grant_the_rules_do_not_allow_is_refused_and_audited(world: dict[str, Any], args: tuple[str, ...],
                                                                message: str) -> None:
    gw: Gateway = world["gw"]
    out = cli(gw, "disclose", "grant", "--client", "2", "--basis", "court_order", "--classes", "clinical_notes",
              "--recipient", "X", "--reference", "r", "--actor", "sam", *args)  # the last of an option counts
    assert out.returncode == 1 and message in out.stderr, out.stderr
    rec = last_record(gw, "disclose grant")
    assert rec["outcome"] == "denied" and message in rec["reason"]


def test_consent_is_recorded_and_its_withdrawal_stops_the_grant_on_it(world: dict[str, Any], tmp_path: Path) -> None:
    gw: Gateway = world["gw"]
    form = tmp_path / "signed-form.pdf"
    form.write_bytes(b"%PDF- the signed form")
    recorded = cli(gw, "consent", "record", "--client", "3", "--scope", "clinical_notes", "--recipient",
                   "Dr Patel, Riverside Medical Practice", "--purpose", "continuity of care", "--form",
                   "Release of Counselling Notes", "--evidence", str(form), "--until", "2027-12-31", "--actor", "chen")
    assert recorded.returncode == 0, recorded.stderr
    held = json.loads(recorded.stdout)
    assert held["evidence_sha256"] == hashlib.sha256(form.read_bytes()).hexdigest()

    wider = grant(gw, "--consent", held["consent"], "--recipient", "Dr Patel, Riverside Medical Practice",
                  client="3", basis="consent", classes="clinical_notes,letters")
    assert wider.returncode == 1 and "does not cover letters" in wider.stderr
    other = cli(gw, "disclose", "grant", "--client", "3", "--recipient", "Acme Insurance", "--basis", "consent",
                "--reference", "r", "--classes", "clinical_notes", "--consent", held["consent"], "--actor", "chen")
    assert other.returncode == 1 and "is for 'Dr Patel, Riverside Medical Practice'" in other.stderr
    ok = cli(gw, "disclose", "grant", "--client", "3", "--recipient", "Dr Patel, Riverside Medical Practice",
             "--basis", "consent", "--reference", "letter of 2026-11-30", "--classes", "clinical_notes",
             "--consent", held["consent"], "--actor", "chen")
    assert ok.returncode == 0, ok.stderr
    g = json.loads(ok.stdout)
    assert g["state"] == "approved"  # consent: no second approver (disclosure.yaml)

    withdrawn = cli(gw, "consent", "withdraw", held["consent"], "--reason", "client phoned to withdraw",
                    "--actor", "chen")
    assert withdrawn.returncode == 0 and json.loads(withdrawn.stdout)["grants_revoked"] == [g["grant"]]
    stopped = cli(gw, "disclose", "export", g["grant"], "--out", str(tmp_path))
    assert stopped.returncode == 1 and f"consent {held['consent']} withdrawn" in stopped.stderr
    assert not list(tmp_path.glob("dg-*"))


def test_an_exempt_release_is_in_the_register_but_not_in_the_clients_report(world: dict[str, Any],
                                                                               tmp_path: Path) -> None:
    gw: Gateway = world["gw"]
    made = cli(gw, "disclose", "grant", "--client", "4", "--recipient", "Counter Terrorism Policing NE",
               "--basis", "statute", "--reference", "s.38B request 77", "--classes", "contact,identity",
               "--no-notify", "--notify-exempt", "terrorism_act", "--actor", "sam")
    assert made.returncode == 0, made.stderr
    g = json.loads(made.stdout)
    assert cli(gw, "disclose", "approve", g["grant"], "--role", "dpo", "--actor", "pat").returncode == 0
    out = cli(gw, "disclose", "export", g["grant"], "--out", str(tmp_path), "--actor", "pat")
    assert out.returncode == 0, out.stderr
    bundle = json.loads(Path(json.loads(out.stdout)["json"]).read_text())
    assert set(bundle["records"]) == {"client"} and "name" in bundle["records"]["client"][0]
    assert bundle["disclosure"]["client_told"] is False and bundle["disclosure"]["exemption"] == "terrorism_act"
    register = json.loads(cli(gw, "disclose", "list", "--json").stdout)
    assert any(e["grant"] == g["grant"] and e["exemption"] == "terrorism_act" for e in register)
    report = json.loads(cli(gw, "audit", "report", "--client", "4", "--format", "json").stdout)
    assert report["disclosures"] == [] and all(a["disclosed_to"] is None for a in report["accesses"])


def test_a_grant_on_an_erased_client_is_refused(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    shred = cli(gw, "keys", "shred", "--client", "5", "--reason", "Art.17 request T-5", "--yes")
    assert shred.returncode == 0, shred.stderr
    out = grant(gw, client="5")
    assert out.returncode == 1 and "client 5 was erased" in out.stderr


def test_the_register_exports_as_valid_fhir_disclosures_and_consents(world: dict[str, Any], tmp_path: Path) -> None:
    """Run after the tests above made grants, releases and consents: every resource of the FHIR export is
    valid R4 (fhir.resources' R4B models, the official R4 JSON schema); a release is a BALP PrivacyDisclosure
    (Export, subtype disclose, the recipient as destination), a consent a Consent, inactive once withdrawn."""
    from fhir.resources.R4B.consent import Consent
    from pydantic import ValidationError

    from tests.test_audit_views import fhir_problems, fhir_schema

    gw: Gateway = world["gw"]
    out = cli(gw, "audit", "export", "--format", "fhir", "--output", str(tmp_path / "trail.ndjson"))
    assert out.returncode == 0, out.stderr
    resources = [json.loads(line) for line in (tmp_path / "trail.ndjson").read_text().splitlines()]
    events = [r for r in resources if r["resourceType"] == "AuditEvent"]
    consents = [r for r in resources if r["resourceType"] == "Consent"]
    bad = {e.get("id"): p for e in events if (p := fhir_problems(e))}
    assert not bad, bad
    whole, _ = fhir_schema()
    for c in consents:
        try:
            Consent.model_validate(c)
        except ValidationError as exc:
            raise AssertionError(f"{c['id']}: {exc}") from None
        assert whole.is_valid(c), [e.message[:160] for e in whole.iter_errors(c)][:3]
    releases = [e for e in events if e["type"]["code"] == "110106"]
    court = next(e for e in releases if any(d.get("valueString") == "court_order"
                                            for x in e["entity"] for d in x.get("detail", [])))
    assert court["subtype"][0]["code"] == "disclose" and court["action"] == "R"
    assert court["purposeOfEvent"][0]["coding"][0]["code"] == "HLEGAL"
    destination = [a for a in court["agent"] if a["type"]["coding"][0]["code"] == "110152"]
    assert destination[0]["who"]["display"] == "Derby Family Court"
    assert any(a.get("who", {}).get("identifier", {}).get("value") == "u:dana" for a in court["agent"])
    assert consents and all(c["status"] == "inactive" for c in consents)  # the one recorded above was withdrawn
    assert consents[0]["provision"]["actor"][0]["reference"]["display"] == "Dr Patel, Riverside Medical Practice"

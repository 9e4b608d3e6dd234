"""Subject access and portability, against the example CRM with its sensitive fields sealed: a request is
recorded with its ICO due date and counted overdue in /metrics; the package holds everything on the client,
decrypted, except what came from third parties (a note says why, never the content), with the access
history; the portable copy is the client's own data as documented JSON and CSV; the client reads the same
through the gateway with their own token; bad input is refused, audited, with the reason."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from proxy.policy.fieldmap import MapError, parse_fieldmap
from proxy.policy.mapdiff import fieldmap_diff
from proxy.subject_access import due_date
from tests.conftest import (
    REPO,
    Gateway,
    Signing,
    fieldguard,
    make_keys,
    policies_copy,
    start_crm,
    start_gateway,
    wait_until,
)

SECRET_FROM_SCHOOL = "the school says the step-father shouts"
OWN_LETTER = "your appointments are confirmed"


@pytest.fixture(scope="module")
def world(signing: Signing, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("sar")
    crm, url = start_crm(d / "crm")
    gw = start_gateway(d / "gw", url, signing, make_keys(d / "keys"), policies=policies_copy(d / "gw"),
                       sections="[cases]\nrefresh_seconds = 0.5\n")
    sealed = fieldguard(gw.config, "encrypt-existing", "--rate", "0")
    assert sealed.returncode == 0, sealed.stderr
    alice = gw.as_user("alice", "counsellor")
    for body in ({"sent_on": "2026-10-01", "recipient": "Client", "subject": "appointments", "third_party": False,
                  "body": OWN_LETTER},
                 {"sent_on": "2026-10-02", "recipient": "us", "subject": "school", "third_party": True,
                  "body": SECRET_FROM_SCHOOL}):
        assert gw.request("POST", "/clients/9/letters", alice, json=body).status_code == 201
    note = {"session_date": "2026-10-05", "summary": "s", "body": "we talked about the move",
            "risk": {"level": "low", "factors": []}}
    assert gw.request("POST", "/clients/9/session-notes", alice, json=note).status_code == 201
    assert gw.get("/clients/9", alice).status_code == 200  # an access the history must show
    yield {"gw": gw, "dir": d}
    gw.service.stop()
    crm.stop()


def cli(gw: Gateway, *args: str) -> Any:
    return fieldguard(gw.config, *args)


def last(gw: Gateway, route: str) -> dict[str, Any]:
    return [r for r in gw.audit_records() if r["route"] == route][-1]


def test_the_due_date_is_one_calendar_month_on_a_working_day() -> None:
    assert due_date(date(2026, 9, 3)) == date(2026, 10, 5)  # 3 October 2026 is a Saturday: the Monday
    assert due_date(date(2026, 11, 4)) == date(2026, 12, 4)
    assert due_date(date(2027, 1, 31)) == date(2027, 3, 1)  # no 31 February: the 28th, a Sunday: the Monday
    assert due_date(date(2026, 12, 15)) == date(2027, 1, 15)


def test_a_request_is_tracked_and_an_overdue_one_counted(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    today = datetime.now(UTC).date()
    old = (today - timedelta(days=45)).isoformat()
    late = cli(gw, "sar", "request", "--client", "2", "--received", old, "--reference", "letter 17")
    assert late.returncode == 0, late.stderr
    made = json.loads(late.stdout)
    assert made["due"] == due_date(date.fromisoformat(old)).isoformat() and made["days_left"] < 0
    assert last(gw, "sar request")["reason"] == f"access request received {old}, due {made['due']}"
    listed = {r["request"]: r for r in json.loads(cli(gw, "sar", "list").stdout)}
    assert listed[made["request"]]["overdue"] is True and listed[made["request"]]["status"] == "open"
    wait_until(lambda: "fieldguard_rights_requests_overdue 1" in gw.get("/metrics").text,
               "the overdue request counted in /metrics")
    assert gw.readyz()["checks"]["rights"]["requests_overdue"] == 1
    extended = cli(gw, "sar", "extend", made["request"], "--reason", "thirty years of records across two systems")
    assert extended.returncode == 0, extended.stderr
    again = cli(gw, "sar", "extend", made["request"], "--reason", "thirty years of records across two systems")
    assert again.returncode == 1 and "was extended already" in again.stderr
    assert last(gw, "sar extend")["outcome"] == "denied"


def test_bad_input_is_refused_with_the_reason_and_audited(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    unknown = cli(gw, "sar", "request", "--client", "99999")
    assert unknown.returncode == 1 and "client 99999 is not in the CRM" in unknown.stderr
    assert last(gw, "sar request")["reason"] == "client 99999 is not in the CRM"
    bad = cli(gw, "sar", "request", "--client", "1", "--received", "2026-13-01")
    assert bad.returncode == 1 and "'2026-13-01' is not a date (YYYY-MM-DD)" in bad.stderr
    future = (datetime.now(UTC).date() + timedelta(days=3)).isoformat()
    assert "is in the future" in cli(gw, "sar", "request", "--client", "1", "--received", future).stderr
    other = json.loads(cli(gw, "sar", "request", "--client", "3").stdout)["request"]
    wrong = cli(gw, "sar", "export", "--client", "9", "--request", other, "--out", str(world["dir"] / "x"))
    assert wrong.returncode == 1 and "is another client's request" in wrong.stderr
    assert not (world["dir"] / "x").exists()


def test_a_crm_that_does_not_answer_is_said_in_one_line(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    down = fieldguard(gw.config, "sar", "export", "--client", "9", "--out", str(world["dir"] / "down"),
                      env={"FIELDGUARD_UPSTREAM_URL": "http://127.0.0.1:9"})
    assert down.returncode == 1 and "the CRM could not be read (ConnectError" in down.stderr
    assert "Traceback" not in down.stderr and not (world["dir"] / "down").exists()


def test_the_package_holds_everything_but_what_came_from_third_parties(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    asked = json.loads(cli(gw, "sar", "request", "--client", "9").stdout)
    dry = cli(gw, "sar", "export", "--client", "9", "--dry-run", "--out", str(world["dir"] / "dry"))
    assert dry.returncode == 0 and json.loads(dry.stdout)["records"] > 3 and not (world["dir"] / "dry").exists()
    out = cli(gw, "sar", "export", "--client", "9", "--format", "html", "--out", str(world["dir"] / "sar"),
              "--actor", "dana")
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    assert made["request"] == asked["request"]
    data = Path(made["files"][0]).read_text()
    page = Path(made["files"][1]).read_text()
    package = json.loads(data)
    records = package["records"]
    assert {"client", "session_note", "letter", "appointment"} <= set(records)
    assert records["client"][0]["id"] == 9 and "gp" in records["client"][0]  # decrypted, the real id
    assert any(n.get("body") == "we talked about the move" for n in records["session_note"])
    assert any(n.get("risk", {}).get("level") == "low" for n in records["session_note"])  # safeguarding too
    assert OWN_LETTER in data and OWN_LETTER in page
    assert SECRET_FROM_SCHOOL not in data and SECRET_FROM_SCHOOL not in page  # never the third party's words
    third = next(w for w in package["withheld"] if w.get("class") == "third_party")
    assert "body" in third["paths"] and "information from a third party" in third["why"]
    assert "information from a third party" in page and "Who accessed your record" in page
    assert any(a["who"] == "u:alice" and a["action"] == "GET /clients/{client_id:int}"
               for a in package["access_history"])
    assert package["subject_access"]["due"] == asked["due"]
    done = {r["request"]: r for r in json.loads(cli(gw, "sar", "list", "--all").stdout)}[asked["request"]]
    assert done["status"] == "completed" and done["days_left"] is None
    assert last(gw, "sar export")["reason"] == f"access answered: sha256 {made['sha256']}"


def test_the_package_prints_as_a_pdf_without_the_third_party_words(world: dict[str, Any]) -> None:
    from pypdf import PdfReader

    gw: Gateway = world["gw"]
    out = cli(gw, "sar", "export", "--client", "9", "--format", "pdf", "--out", str(world["dir"] / "pdf"))
    assert out.returncode == 0, out.stderr
    pdf = next(Path(f) for f in json.loads(out.stdout)["files"] if f.endswith(".pdf"))
    text = " ".join((page.extract_text() or "") for page in PdfReader(pdf).pages)
    assert "The records we hold about you" in text and "Who accessed your record" in text
    assert " ".join(OWN_LETTER.split()) in " ".join(text.split()) and "we talked about the move" in text
    assert "the step-father" not in text and "information from a third party" in " ".join(text.split())
    assert oct(pdf.stat().st_mode & 0o777) == "0o600"


def test_the_portable_copy_is_the_clients_own_data_as_json_and_csv(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    out = cli(gw, "sar", "export", "--client", "9", "--portable", "--out", str(world["dir"] / "port"))
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    doc = json.loads(Path(made["files"][0]).read_text())
    assert doc["format"] == "fieldguard-portable/1" and doc["client"] == "9"
    assert "session_note" not in doc["records"]  # the counsellor's notes: the package has them, not the copy
    assert "access_history" not in doc and doc["fields"]["client"]["email"].startswith("address, email")
    sheets = {Path(f).name.rsplit("-", 1)[-1]: Path(f) for f in made["files"][1:]}
    rows = list(csv.DictReader(io.StringIO(sheets["appointment.csv"].read_text())))
    assert rows and {"id", "starts_at", "status"} <= set(rows[0])
    assert len(rows) == len(doc["records"]["appointment"])
    assert SECRET_FROM_SCHOOL not in "".join(p.read_text() for p in sheets.values())


def test_the_client_reads_their_own_copy_through_the_gateway(world: dict[str, Any]) -> None:
    gw: Gateway = world["gw"]
    me = gw.as_user("client9", "client", client_id="9")
    r = gw.get("/_fieldguard/subject-access", me)
    assert r.status_code == 200, r.text
    mine = r.json()
    assert mine["subject_access"]["client"] == "9" and OWN_LETTER in r.text and SECRET_FROM_SCHOOL not in r.text
    assert gw.audit_for(r.headers["x-request-id"])["reason"].startswith("subject access: the client's own copy")
    page = gw.get("/_fieldguard/subject-access?format=html", me)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    staff = gw.get("/_fieldguard/subject-access", gw.as_user("alice", "counsellor"))
    assert staff.status_code == 403
    assert gw.audit_for(staff.headers["x-request-id"])["reason"] == "subject access: not the client"
    odd = gw.get("/_fieldguard/subject-access?format=pdf", me)
    assert odd.status_code == 400 and odd.json()["error"] == "format is json, html or portable"


def test_the_field_map_option_is_checked_and_its_removal_shown_as_weaker() -> None:
    text = (REPO / "policies" / "fields.yaml").read_text()
    with pytest.raises(MapError) as bad:
        parse_fieldmap(text.replace('withheld_from_subject: "information from a third party',
                                    'withheld_from_subject: 3, x: "'))
    assert "unknown key 'x'" in bad.value.detail or "withheld_from_subject" in bad.value.detail
    before = parse_fieldmap(text)
    start = text.index("\n                    withheld_from_subject:")
    after = parse_fieldmap(text[:start] + "}" + text[text.index("}", start) + 1:])
    changes = [c for c in fieldmap_diff(before, after) if c.what == "class third_party"]
    assert [c.as_row() for c in changes] == [("weaker", "class third_party",
                                              "now GIVEN TO THE CLIENT in a subject access export")]

"""Every role x relation x field class outcome of the shipped policy, through the gateway.

Each scenario fetches a client's record and every kind of sub-record through the gateway and
compares it, path by path, with what the CRM holds (read directly, bypassing the gateway): `clear`
must be the stored value, `pseudonym` the client's pseudonym, `mask` the masked value, `remove`
absent. The expected outcomes below are the services' confidentiality rules, written out by hand.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.masks import MASKS
from proxy.policy.decision import Outcome, Relation
from proxy.policy.fieldmap import Resource, load_fieldmap, values_at
from tests.conftest import REPO, Gateway, direct, shipped_bundle

FIELDMAP = load_fieldmap(REPO / "policies" / "fields.yaml")
CLASSES = sorted(FIELDMAP.classes)
CLEAR, PSEUDO, MASK = "clear", "pseudonym", "mask"


def outcomes(**kw: str) -> dict[str, str]:
    return {c: kw.get(c, "remove") for c in CLASSES}


FULL = {c: CLEAR for c in CLASSES}
EXPECTED: dict[tuple[str, str], dict[str, str]] = {
    ("counsellor", "caseload"): FULL,
    ("counsellor", "any"): outcomes(staff=CLEAR),
    ("supervisor", "supervision"): outcomes(staff=CLEAR, reference=CLEAR, identity=PSEUDO, service=CLEAR,
                                            appointments=CLEAR, clinical_notes=CLEAR, safeguarding=CLEAR,
                                            process_notes=CLEAR),
    ("supervisor", "any"): outcomes(staff=CLEAR),
    ("admin", "any"): outcomes(staff=CLEAR, reference=CLEAR, identity=CLEAR, contact=CLEAR, gp=CLEAR,
                               referral=CLEAR, service=CLEAR, appointments=CLEAR),
    ("service_manager", "any"): outcomes(staff=CLEAR, reference=CLEAR, identity=PSEUDO, service=CLEAR,
                                         appointments=CLEAR, feedback=CLEAR),
    ("service_manager", "cover"): outcomes(staff=CLEAR, reference=CLEAR, identity=CLEAR, contact=CLEAR, gp=CLEAR,
                                           referral=CLEAR, service=CLEAR, appointments=CLEAR,
                                           clinical_notes=CLEAR, safeguarding=CLEAR, letters=CLEAR,
                                           communications=CLEAR, third_party=CLEAR, feedback=CLEAR),
    # break-glass: who the client is, how to reach them, their GP and the risk; notes listed, their text removed
    ("counsellor", "breakglass"): outcomes(staff=CLEAR, reference=CLEAR, identity=CLEAR, contact=CLEAR, gp=CLEAR,
                                           safeguarding=CLEAR, clinical_notes=MASK),
    ("supervisor", "breakglass"): outcomes(staff=CLEAR, reference=CLEAR, identity=CLEAR, contact=CLEAR, gp=CLEAR,
                                           safeguarding=CLEAR, clinical_notes=MASK),
    ("service_manager", "breakglass"): outcomes(staff=CLEAR, reference=CLEAR, identity=CLEAR, contact=CLEAR,
                                                gp=CLEAR, service=CLEAR, appointments=CLEAR, feedback=CLEAR,
                                                safeguarding=CLEAR, clinical_notes=MASK),
    ("researcher", "any"): outcomes(reference=PSEUDO, identity=MASK, service=CLEAR, referral=CLEAR,
                                    appointments=MASK, feedback=CLEAR),
    ("auditor", "any"): outcomes(),
    ("security_officer", "any"): outcomes(),  # the policy, the trail's health: no client's record
    ("client", "self"): {**FULL, "third_party": "remove", "staff": "remove"},
    ("client", "any"): outcomes(),
}

SUB_RESOURCES = {
    "appointments": "appointment",
    "session-notes": "session_note",
    "process-notes": "process_note",
    "feedback": "feedback",
    "letters": "letter",
    "communications": "communication",
}
PSEUDONYM = re.compile(r"^P-[0-9A-F]{16}$")


def test_compiled_table_matches_the_written_rules() -> None:
    table = shipped_bundle().table
    for (role, relation), expected in EXPECTED.items():
        view = table.view(role, Relation.ANY | Relation.parse(relation))
        assert view is not None, role
        got = {c: view.outcome(c).value for c in CLASSES}
        assert got == expected, f"{role}/{relation}"


def anonymous(expected: dict[str, str]) -> bool:
    """The view pseudonymises the client (their id or their name is a pseudonym): then nothing in it may
    identify them: their CRM id is their pseudonym in every field that holds it, and their names are
    their pseudonym in every text."""
    return PSEUDO in (expected["identity"], expected["reference"])


def scrubbed(value: Any, names: list[str], pseudonym: str) -> Any:
    """The documented scrubbing: each name, and each word of two letters or more in it, as a whole word in
    any case, becomes the pseudonym."""
    if not isinstance(value, str):
        return value
    words = {n for n in names if n} | {w for n in names for w in re.findall(r"\w{2,}", n)}
    for word in sorted(words, key=len, reverse=True):
        value = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", pseudonym, value, flags=re.IGNORECASE)
    return value


def check(raw: dict[str, Any], shown: dict[str, Any], resource: Resource, expected: dict[str, str], where: str,
          names: list[str] | None = None) -> None:
    """`names`: the client's names, when the view is anonymous (the test reads them from the CRM)."""
    pseudonym = next((v for s in resource.specs if s.path == resource.client_field
                      for v in values_at(shown, s.path)), None)
    if names is not None and pseudonym is not None:
        assert isinstance(pseudonym, str) and PSEUDONYM.match(pseudonym), f"{where}: client id {pseudonym!r} shown"
    for spec in resource.specs:
        cls = spec.class_for(raw)
        outcome = expected[cls]
        have, want = values_at(shown, spec.path), values_at(raw, spec.path)
        label = f"{where}: {spec.path} ({cls}, {outcome})"
        if names is not None and spec.path == resource.client_field and outcome != "remove":
            assert have == [pseudonym], label
        elif outcome == CLEAR:
            if names is not None:  # a record that does not link to its client names them "[client]"
                want = [scrubbed(v, names, pseudonym or "[client]") for v in want]
            assert have == want, label
        elif outcome == PSEUDO and spec.pseudonym:
            assert have and all(isinstance(v, str) and PSEUDONYM.match(v) for v in have), label
        elif outcome == MASK and spec.mask:
            masked = [m for m in (MASKS[spec.mask](v) for v in want) if m is not None]
            assert have == masked, label
        else:
            assert have == [], label
    unknown = set(shown) - {s.path.split(".")[0].removesuffix("[]") for s in resource.specs}
    assert not unknown, f"{where}: unclassified keys {unknown}"


def _clients(crm: str) -> dict[str, int]:
    """Clients 1 (alice's) and 2 (bob's), and the first of fatima's with every kind of record."""
    fatima = next(
        c["id"] for c in direct(crm, "/clients?counsellor=fatima&per_page=500")["items"]
        if all(direct(crm, f"/clients/{c['id']}/{p}?per_page=1")["total"] for p in SUB_RESOURCES)
    )
    return {"alice's": 1, "bob's": 2, "fatima's": fatima}


SCENARIOS = [
    ("alice", "counsellor", None, "alice's", "caseload"),
    ("alice", "counsellor", None, "bob's", "any"),
    ("carol", "supervisor", None, "alice's", "supervision"),
    ("carol", "supervisor", None, "fatima's", "any"),
    ("erin", "admin", None, "alice's", "any"),
    ("dana", "service_manager", None, "alice's", "any"),
    ("dana", "service_manager", None, "bob's", "cover"),
    ("rhea", "researcher", None, "alice's", "any"),
    ("otto", "auditor", None, "alice's", "any"),
    ("sam", "security_officer", None, "alice's", "any"),
    ("client1", "client", "1", "alice's", "self"),
    ("client1", "client", "1", "bob's", "any"),
    ("alice", "counsellor", None, "bob's", "breakglass"),
    ("carol", "supervisor", None, "fatima's", "breakglass"),
    ("dana", "service_manager", None, "alice's", "breakglass"),
]


@pytest.mark.parametrize(("sub", "role", "client_claim", "whose", "relation"), SCENARIOS)
def test_every_class_outcome_through_the_gateway(
    gateway: Gateway, crm: str, sub: str, role: str, client_claim: str | None, whose: str, relation: str
) -> None:
    client = _clients(crm)[whose]
    expected = EXPECTED[(role, relation)]
    token = gateway.as_user(sub, role, client_id=client_claim)
    with breaking_glass(gateway, token, client, relation):
        _scenario(gateway, crm, token, client, role, expected)


@contextlib.contextmanager
def breaking_glass(gateway: Gateway, token: str, client: int | str, relation: str) -> Iterator[None]:
    """For a `breakglass` scenario: the emergency declared for this client, and ended when the scenario is done
    (the module's other tests see the caller's usual relations)."""
    if relation != "breakglass":
        yield
        return
    declared = gateway.request("POST", "/_fieldguard/break-glass", token, json={
        "client": client, "reason": "risk_to_others", "justification": "Threat to a named person reported."})
    assert declared.status_code == 201, declared.text
    try:
        yield
    finally:
        gateway.request("DELETE", f"/_fieldguard/break-glass/{declared.json()['grant']}", token)


def _scenario(gateway: Gateway, crm: str, token: str, client: int, role: str, expected: dict[str, str]) -> None:
    record = direct(crm, f"/clients/{client}")
    names = [record["name"]["first"], record["name"]["last"]] if anonymous(expected) else None
    checked = 0
    # the client record itself
    resource = FIELDMAP.resources["client"]
    r = gateway.get(f"/clients/{client}", token)
    visible = expected[resource.record_class] != "remove"
    assert r.status_code == (200 if visible else 403), r.text
    if visible:
        check(record, r.json(), resource, expected, f"{role} /clients/{client}", names)
        checked += 1
    # every kind of sub-record: nested list, flat list filtered by client, and the item route
    for path, name in SUB_RESOURCES.items():
        resource = FIELDMAP.resources[name]
        visible = expected[resource.record_class] != "remove"
        raw_rows = direct(crm, f"/clients/{client}/{path}")["items"]
        assert raw_rows, f"seed gives client {client} some {path}"
        nested = gateway.get(f"/clients/{client}/{path}", token)
        item = gateway.get(f"/{path}/{raw_rows[0]['id']}", token)
        if not visible:
            assert nested.status_code == 403, (path, nested.text)
            assert item.status_code == 403, (path, item.text)
            continue
        locator = next(s for s in resource.specs if s.path == resource.client_field)
        if expected[locator.field_class] == "remove":  # shown without whom it is about: never per client
            assert nested.status_code == 403, (path, nested.text)
            assert nested.json()["error"].endswith(f"anonymised for role {role}: they are not served per client")
            assert item.status_code == 200, (path, item.text)
            check(raw_rows[0], item.json(), resource, expected, f"{role} /{path}/{raw_rows[0]['id']}", names)
            checked += 1
            continue
        assert nested.status_code == 200, (path, nested.text)
        shown_rows = nested.json()["items"]
        assert len(shown_rows) == len(raw_rows)
        assert nested.json()["total"] == len(raw_rows)
        for raw, shown in zip(raw_rows, shown_rows, strict=True):
            check(raw, shown, resource, expected, f"{role} /clients/{client}/{path}", names)
            checked += 1
        assert item.status_code == 200, (path, item.text)
        check(raw_rows[0], item.json(), resource, expected, f"{role} /{path}/{raw_rows[0]['id']}", names)
    if any(v != "remove" for k, v in expected.items() if k != "staff"):
        assert checked > 0


def test_pseudonym_is_stable_and_differs_between_clients(gateway: Gateway) -> None:
    token = gateway.as_user("carol", "supervisor")
    a1 = gateway.get("/clients/1", token).json()["name"]["first"]
    a2 = gateway.get("/clients/1", token).json()["name"]["first"]
    b = gateway.get("/clients/2", token).json()["name"]["first"]
    assert a1 == a2 and a1 != b and PSEUDONYM.match(a1)
    # the researcher sees the same pseudonym in place of the id, linking records without identity
    rhea = gateway.as_user("rhea", "researcher")
    assert gateway.get("/clients/1", rhea).json()["id"] == a1


def test_lists_show_only_rows_with_a_relation_and_paging_counts_them(gateway: Gateway, crm: str) -> None:
    expectations = {
        ("alice", "counsellor"): {"alice"},
        ("carol", "supervisor"): {"alice", "bob", "chen", "dev"},
        ("dana", "service_manager"): None,  # oversight of every client, by pseudonym
        ("erin", "admin"): None,
    }
    everyone = direct(crm, "/clients?per_page=1")["total"]
    for (sub, role), counsellors in expectations.items():
        token = gateway.as_user(sub, role)
        body = gateway.get("/clients?per_page=500", token).json()
        seen = {row["counsellor"] for row in body["items"]}
        if counsellors is None:
            assert body["total"] == everyone == len(body["items"])
        else:
            want = sum(direct(crm, f"/clients?counsellor={c}&per_page=1")["total"] for c in counsellors)
            assert seen == counsellors and body["total"] == want == len(body["items"]), sub
        # paging stays consistent: page 2 of 10 holds the next ten of the same filtered set
        page2 = gateway.get("/clients?per_page=10&page=2", token).json()
        assert page2["total"] == body["total"]
        assert [r["id"] for r in page2["items"]] == [r["id"] for r in body["items"][10:20]]


def test_flat_note_lists_are_filtered_to_the_caseload(gateway: Gateway, crm: str) -> None:
    token = gateway.as_user("alice", "counsellor")
    caseload = {c["id"] for c in direct(crm, "/clients?counsellor=alice&per_page=500")["items"]}
    body = gateway.get("/session-notes?per_page=500", token).json()
    assert body["items"] and {n["client_id"] for n in body["items"]} <= caseload
    ids = ",".join(str(c) for c in sorted(caseload))
    assert body["total"] == direct(crm, f"/session-notes?client_id={ids}&per_page=1")["total"]
    # asking for someone else's client gives an empty list, not their notes
    other = gateway.get("/session-notes?client_id=2", token)
    assert other.status_code == 200 and other.json()["items"] == [] and other.json()["total"] == 0


def test_a_client_sees_their_letters_without_third_party_information(gateway: Gateway, crm: str) -> None:
    token = gateway.as_user("client1", "client", client_id="1")
    raw = direct(crm, "/clients/1/letters")["items"]
    shown = {row["id"]: row for row in gateway.get("/clients/1/letters", token).json()["items"]}
    assert any(r["third_party"] for r in raw) and any(not r["third_party"] for r in raw)
    for row in raw:
        if row["third_party"]:
            assert "body" not in shown[row["id"]] and "subject" not in shown[row["id"]]
        else:
            assert shown[row["id"]]["body"] == row["body"]


def test_query_parameters_are_allow_listed_and_filters_reveal_nothing_hidden(gateway: Gateway) -> None:
    alice = gateway.as_user("alice", "counsellor")
    assert gateway.get("/clients?status=active", alice).status_code == 200
    r = gateway.get("/clients?email=x@example.org", alice)
    assert r.status_code == 400 and "email" in r.json()["error"]
    assert gateway.get("/clients/1?_embed=session-notes", alice).status_code == 400


def test_letter_pdf_is_all_or_nothing(gateway: Gateway, crm: str) -> None:
    letters = direct(crm, "/clients/1/letters")["items"]
    own = next(r for r in letters if not r["third_party"])
    third = next(r for r in letters if r["third_party"])
    alice = gateway.as_user("alice", "counsellor")
    r = gateway.get(f"/letters/{own['id']}/pdf", alice)
    assert r.status_code == 200 and r.headers["content-type"] == "application/pdf" and r.content.startswith(b"%PDF")
    client = gateway.as_user("client1", "client", client_id="1")
    assert gateway.get(f"/letters/{own['id']}/pdf", client).status_code == 200
    assert gateway.get(f"/letters/{third['id']}/pdf", client).status_code == 403
    assert gateway.get(f"/letters/{own['id']}/pdf", gateway.as_user("erin", "admin")).status_code == 403


def test_the_written_rules_leave_no_view_of_the_policy_out() -> None:
    """The table test above checks each written expectation, the gateway test each scenario; neither sees
    what EXPECTED leaves out. Here: every role the shipped policy knows has an expectation, every relation
    that changes what a role sees has one of its own, every outcome the policy gives is expected somewhere,
    and every expectation is exercised through the gateway by a scenario."""
    table = shipped_bundle().table
    assert table.roles == {role for role, _ in EXPECTED}, "roles of the policy without an expectation, or the reverse"
    for role in table.roles:
        alone = table.view(role, Relation.ANY)
        assert alone is not None and set(alone.classes) == set(CLASSES), role
        for relation in Relation:
            view = table.view(role, Relation.ANY | relation)
            assert view is not None, (role, relation.label)
            if (role, relation.name.lower()) not in EXPECTED:
                changed = {c for c in CLASSES if view.outcome(c) is not alone.outcome(c)}
                assert not changed, f"{role}/{relation.name.lower()} changes {sorted(changed)}: not written out"
    used = {d.outcome.value for v in table.views.values() for d in v.classes.values()}
    assert used == {o.value for o in Outcome}, "an outcome no view gives: check() never tests it"
    assert used == {v for e in EXPECTED.values() for v in e.values()}
    assert {(role, relation) for _, role, _, _, relation in SCENARIOS} == set(EXPECTED), \
        "an expectation no scenario checks through the gateway"


def test_a_supervisor_sees_no_crm_id_and_no_name_of_the_client_and_may_address_them_by_pseudonym(
        gateway: Gateway, crm: str) -> None:
    carol, alice = gateway.as_user("carol", "supervisor"), gateway.as_user("alice", "counsellor")
    record = direct(crm, "/clients/1")
    first, last = record["name"]["first"], record["name"]["last"]
    client = gateway.get("/clients/1", carol).json()
    pseudonym = client["id"]
    assert PSEUDONYM.match(pseudonym) and client["name"] == {"first": pseudonym}
    theirs = gateway.get("/clients/1/session-notes", alice).json()["items"]
    named = [n for n in theirs if re.search(rf"\b{first}\b", n["body"], re.IGNORECASE)]
    assert named, "the seed names the client in some of their notes (as counsellors write them)"
    shown = gateway.get("/clients/1/session-notes", carol).json()
    text = json.dumps(shown)
    assert not re.search(rf"\b({first}|{last})\b", text, re.IGNORECASE) and '"client_id": 1' not in text
    by_id = {n["id"]: n for n in shown["items"]}
    for note in named:
        assert by_id[note["id"]]["body"] == re.sub(rf"\b{first}\b", pseudonym, note["body"], flags=re.IGNORECASE)
        assert by_id[note["id"]]["client_id"] == pseudonym
    # the pseudonym is an address: the CRM id is resolved inside the gateway, never shown
    assert gateway.get(f"/clients/{pseudonym}", carol).json() == client
    assert gateway.get(f"/clients/{pseudonym}/session-notes", carol).json() == shown
    r = gateway.get("/clients/P-0000000000000000", carol)
    assert r.status_code == 404 and r.json()["error"] == "no such client"
    assert gateway.audit_for(r.headers["x-request-id"])["reason"] == "unknown pseudonym"
    # the counsellor, who knows her client, still reads her own words
    assert gateway.get("/clients/1/session-notes", alice).json()["items"] == theirs


def test_an_empty_list_of_a_class_the_view_removes_is_removed_too(gateway: Gateway, crm: str) -> None:
    """`emergency_contacts: []` would tell a supervisor, who sees no contact details, that the client gave none."""
    clients = direct(crm, "/clients?per_page=500")["items"]
    none_given = next(c for c in clients if c["emergency_contacts"] == [] and c["counsellor"] in ("alice", "bob"))
    some_given = next(c for c in clients if c["emergency_contacts"] and c["counsellor"] in ("alice", "bob"))
    carol = gateway.as_user("carol", "supervisor")
    for client in (none_given, some_given):
        shown = gateway.get(f"/clients/{client['id']}", carol).json()
        assert "emergency_contacts" not in shown and "address" not in shown
    admin = gateway.get(f"/clients/{none_given['id']}", gateway.as_user("erin", "admin")).json()
    assert admin["emergency_contacts"] == []  # a view that shows contacts still sees that there are none


def test_anonymised_rows_are_shuffled_and_never_served_per_client(gateway: Gateway, crm: str) -> None:
    dana = gateway.as_user("dana", "service_manager")
    stored = [r["id"] for r in direct(crm, "/feedback?per_page=100")["items"]]
    orders = [[r["id"] for r in gateway.get("/feedback?per_page=100", dana).json()["items"]] for _ in range(3)]
    assert all(sorted(o) == sorted(stored) for o in orders) and any(o != stored for o in orders)
    assert all("client_id" not in r for r in gateway.get("/feedback?per_page=100", dana).json()["items"])
    r = gateway.get("/clients/1/feedback", dana)
    assert r.status_code == 403 and gateway.audit_for(r.headers["x-request-id"])["reason"] == "unlinkable for this role"

"""Loading a bundle: each pycasbin pitfall is caught with its line; the proof refuses a changed meaning."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from proxy.policy import RelationIndex, RelationSource, load_fieldmap
from proxy.policy.bundle import (
    BundleSource,
    PolicyError,
    load_bundle,
    proof_stamp,
    proved_digest,
    read_bundle_files,
)
from proxy.policy.decision import Relation
from proxy.policy.lint import Severity, parse_policy
from tests.conftest import REPO, proofs_dir, shipped_bundle


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(REPO / "policies", target, ignore=shutil.ignore_patterns("tests"))
    return target


def append(path: Path, text: str) -> int:
    """Append a line; return its line number."""
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, text]) + "\n")
    return len(lines) + 1


def refused(directory: Path) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        load_bundle(directory)
    return info.value


@pytest.mark.parametrize(("row", "words"), [
    ("p, admin, any, clinical_notes, read, allow  # temporary", "comment after a rule"),
    ("p, admin, any, clinical_notes, read", "expected 5"),
    ("p, admin, any, clinical_notes, read, allow, extra", "expected 5"),
    ("g3, admin, counsellor", "unknown row type"),
    ("pp, admin, TREAT", "unknown row type"),
    ("p, admin, any, clinical_note, read, allow", "unknown field class"),
    ("p, admin, everyone, clinical_notes, read, allow", "unknown relation"),
    ("p, admin, any, clinical_notes, view, allow", "unknown action"),
    ("p, admin, any, clinical_notes, read, permit", "unknown effect"),
    ("p, adminn, any, contact, read, allow", "has no purpose of use"),
    ("p2, admin, SHOPPING", "unknown purpose"),
    ("p, keyMatch(admin), any, contact, read, allow", "brackets"),
    ("p, admin, any, , read, allow", "empty value"),
    ("g, counsellor, counsellor", "inherit itself"),
])
def test_policy_pitfalls_are_errors_with_their_line(bundle_dir: Path, row: str, words: str) -> None:
    line = append(bundle_dir / "policy.csv", row)
    exc = refused(bundle_dir)
    hits = [f for f in exc.findings if f.file == "policy.csv" and f.line == line]
    assert hits and words in hits[0].message, [str(f) for f in exc.findings]


def test_role_cycles_and_long_chains(bundle_dir: Path) -> None:
    append(bundle_dir / "policy.csv", "g, admin, researcher")
    append(bundle_dir / "policy.csv", "g, researcher, admin")
    assert any("cycle" in f.message for f in refused(bundle_dir).findings)
    text = "\n".join(f"g, r{i}, r{i + 1}" for i in range(12)) + "\np2, r12, TREAT\n"
    parsed = parse_policy(text, ["contact"])
    assert any("links long" in f.message for f in parsed.findings)


def test_duplicates_are_warnings(bundle_dir: Path) -> None:
    append(bundle_dir / "policy.csv", "p, admin, any, contact, read, allow")
    parsed = parse_policy((bundle_dir / "policy.csv").read_text(), load_fieldmap(bundle_dir / "fields.yaml").classes)
    duplicate = [f for f in parsed.findings if "duplicate" in f.message]
    assert duplicate and all(f.severity is Severity.WARNING for f in duplicate) and not parsed.findings[:-1]


@pytest.mark.parametrize(("old", "new", "words"), [
    ("r = sub, cli, cls, act\n", "r = sub, cli, cls, act  # the request\n", "comment after a definition"),
    ("g2 = _, _\n", "g2 = _, _, (_, _)\n", "conditional role links"),
])
def test_model_pitfalls(bundle_dir: Path, old: str, new: str, words: str) -> None:
    model = bundle_dir / "model.conf"
    model.write_text(model.read_text().replace(old, new))
    assert any(words in f.message for f in refused(bundle_dir).findings)


def test_the_proof_refuses_a_model_whose_meaning_changed(bundle_dir: Path) -> None:
    """Dropping the relation check would give counsellors every client: Casbin and the table disagree."""
    model = bundle_dir / "model.conf"
    model.write_text(model.read_text().replace(
        ' && (p.rel == "any" || g2(r.cli, p.rel + ":" + r.sub))', ""))
    exc = refused(bundle_dir)
    assert any("Casbin says allow but the compiled table says deny" in f.message for f in exc.findings)


def test_deny_overrides_allow_and_inheritance(bundle_dir: Path) -> None:
    append(bundle_dir / "policy.csv", "p, admin, any, clinical_notes, read, allow")
    append(bundle_dir / "policy.csv", "g, senior_counsellor, counsellor")
    duplicate = append(bundle_dir / "policy.csv", "p, admin, any, contact, read, allow")
    bundle = load_bundle(bundle_dir)  # one proof for the three rows: each is checked on its own below
    assert [w.line for w in bundle.warnings if "duplicate" in w.message] == [duplicate]  # kept, as a warning
    table = bundle.table
    view = table.view("admin", Relation.ANY)
    assert view is not None and view.outcome("clinical_notes").value == "remove"
    decided = view.classes["clinical_notes"]
    assert decided.denied_by is not None and decided.denied_by.effect.value == "deny"
    senior = table.view("senior_counsellor", Relation.ANY | Relation.CASELOAD)
    assert senior is not None and senior.outcome("clinical_notes").value == "clear"
    assert table.purpose_allowed("senior_counsellor", "TREAT")


@pytest.mark.parametrize(("old", "new", "words"), [
    ("      email: contact\n", "      email: contactt\n", "unknown class"),
    ("      gp: gp\n", "      gp: gp\n      gp.name: gp\n", "overlaps"),
    ("      email: contact\n", "      email: {class: contact, mask: blur}\n", "unknown mask"),
    ("  appointments:    {label: N", "  appointments:    {label: X", "label must be"),
    ("      - POST /clients\n", "      - POST /clients\n      - GET /clients: {list: true}\n", "overlaps"),
])
def test_field_map_errors(bundle_dir: Path, old: str, new: str, words: str) -> None:
    fields = bundle_dir / "fields.yaml"
    assert old in fields.read_text()
    fields.write_text(fields.read_text().replace(old, new, 1))
    exc = refused(bundle_dir)
    assert any(words in f.message for f in exc.findings), [str(f) for f in exc.findings]
    assert all(f.line for f in exc.findings if f.file == "fields.yaml")


def test_shipped_bundle_is_clean() -> None:
    bundle = shipped_bundle()
    assert bundle.warnings == ()
    assert bundle.proof_checks > 5000


def test_a_cover_grant_or_field_map_edit_reuses_the_proof_and_a_policy_edit_does_not(bundle_dir: Path,
                                                                                     tmp_path: Path) -> None:
    """Cover grants change whenever someone is away, and a field map's paths and encryption never reach Casbin:
    neither costs a new proof (it took 25 s, and more under load, per edit); a rule does."""
    proofs = tmp_path / "proofs"
    proofs.mkdir()
    shipped_bundle()  # proved once for the run: start from its proof, as a keys/ directory that ran it would
    files = read_bundle_files(BundleSource(bundle_dir))
    name = proof_stamp(proofs, proved_digest(files["model.conf"].decode(), files["policy.csv"].decode(),
                                             shipped_bundle().fieldmap.classes), shipped_bundle().table.digest())
    assert name is not None
    shutil.copy(proofs_dir() / name.name, name)

    def stamps() -> int:
        return sum(1 for p in proofs.iterdir() if not p.name.startswith("."))  # not the lock

    first = load_bundle(bundle_dir, proofs)
    assert stamps() == 1
    (bundle_dir / "cover.yaml").write_text(
        "grants:\n  - user: dana\n    covers: bob\n    from: 2026-01-01T00:00:00Z\n"
        "    until: 2026-01-02T00:00:00Z\n    reason: leave\n")
    covered = load_bundle(bundle_dir, proofs)
    assert covered.digest != first.digest and len(covered.cover) == 1
    assert stamps() == 1 and covered.proof_checks == first.proof_checks
    fields = bundle_dir / "fields.yaml"  # a class said to stay in plaintext on purpose: no new proof either
    sealed = "  clinical_notes:  {label: R, encrypt: record,"
    assert sealed in fields.read_text()
    fields.write_text(fields.read_text().replace(sealed, '  clinical_notes:  {label: R, plaintext: "T-7",'))
    reasoned = load_bundle(bundle_dir, proofs)
    assert stamps() == 1 and reasoned.digest != covered.digest
    assert reasoned.fieldmap.classes["clinical_notes"].key_scope is None
    append(bundle_dir / "policy.csv", "p, admin, any, clinical_notes, read, allow")
    changed = load_bundle(bundle_dir, proofs)
    assert stamps() == 2 and changed.digest != reasoned.digest


def test_a_compiler_that_makes_another_table_of_the_same_files_is_proved_again(
        bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The proof used to be remembered by the files and the package version only: a code change to the
    compiler, in a checkout whose version did not move, reused the old proof and served its table
    unproved. Here the compiler loses one grant (as a bug would): the stamp is not reused, and the
    proof catches it."""
    import proxy.policy.bundle as bundle_module

    proofs = tmp_path / "proofs"
    good = load_bundle(bundle_dir, proofs)
    assert sum(1 for p in proofs.iterdir() if not p.name.startswith(".")) == 1
    real = bundle_module.compile_table

    def buggy(*args: Any, **kw: Any) -> Any:
        table = real(*args, **kw)
        allowed = next(k for k, (effect, _) in table.grants.items() if effect.value == "allow")
        del table.grants[allowed]
        return table

    monkeypatch.setattr(bundle_module, "compile_table", buggy)
    with pytest.raises(PolicyError) as exc:
        load_bundle(bundle_dir, proofs)
    assert any("Casbin says allow but the compiled table says deny" in f.message for f in exc.value.findings)
    assert good.proof_checks > 5000


def test_gateways_starting_together_prove_a_bundle_once(bundle_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Several loads of one new bundle on one proofs directory at once: one proves, the others wait for its
    stamp (a lock on the directory), so a fleet restarting on a new policy pays one proof, not one each."""
    import proxy.policy.bundle as bundle_module

    append(bundle_dir / "policy.csv", "p, researcher, any, gp, mask, allow")
    proved: list[int] = []
    real = bundle_module.prove

    def counted(*args: object, **kwargs: object) -> int:
        proved.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(bundle_module, "prove", counted)
    proofs = tmp_path / "proofs"
    with ThreadPoolExecutor(3) as pool:
        bundles = list(pool.map(lambda _: load_bundle(bundle_dir, proofs), range(3)))
    assert len(proved) == 1
    assert len({b.digest for b in bundles}) == 1 and {b.proof_checks for b in bundles} == {bundles[0].proof_checks}


@pytest.mark.parametrize("name", ["policy.csv", "model.conf", "fields.yaml", "cover.yaml"])
def test_a_file_not_in_utf8_is_a_finding_at_its_line(bundle_dir: Path, name: str) -> None:
    path = bundle_dir / name
    if not path.exists():
        path.write_text("grants: []\n")
    lines = path.read_text().splitlines()
    lines.insert(2, "# Zoë's change")  # line 3, saved by an editor set to Latin-1
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    findings = refused(bundle_dir).findings
    assert [(f.file, f.line) for f in findings if "not UTF-8" in f.message] == [(name, 3)], [str(f) for f in findings]


def test_a_file_that_cannot_be_read_is_a_finding(bundle_dir: Path) -> None:
    (bundle_dir / "cover.yaml").unlink(missing_ok=True)
    (bundle_dir / "cover.yaml").mkdir()  # a deploy that left a directory where the file should be
    findings = refused(bundle_dir).findings
    assert [f.file for f in findings] == ["cover.yaml"] and "cannot be read" in findings[0].message


async def test_a_crm_that_ignores_the_page_parameter_is_an_error_not_a_walk_for_ever() -> None:
    source = RelationSource(page_size=2)
    asked: list[str] = []

    async def same_page_always(path: str, params: Mapping[str, str]) -> Any:
        asked.append(params["page"])
        return {"items": [{"id": 1, "counsellor": "alice"}, {"id": 2, "counsellor": "bob"}]}

    with pytest.raises(ValueError, match="page 2 repeats page 1"):
        await RelationIndex().sync(source, "items", same_page_always)
    assert asked == ["1", "2"]


async def test_relations_from_resources_of_links_and_from_either_side() -> None:
    """Caseload links in a resource of their own, supervision on both sides and in links: all add up."""
    data = {
        "/clients": [{"id": 1, "counsellor": "s1"}, {"id": 2, "counsellor": ["s2", "s5"]}, {"id": 3}],
        "/assignments": [{"client_id": 3, "practitioner": "s4"}, {"client_id": 1, "practitioner": "s9"}],
        "/staff": [{"username": "s1", "supervisor": "s3"}, {"username": "s3", "supervises": ["s2"]},
                   {"username": "s6", "supervises": "s4"}],
        "/supervision": [{"supervisor": "s7", "supervisee": "s5"}],
        "/cover": [{"id": 9, "user": "s8", "covers": "s1", "from": "2020-01-01T00:00:00Z",
                    "until": "2099-01-01T00:00:00Z", "reason": "s1 on leave"},
                   {"user": "s8", "covers": "s2", "from": "2020-01-01", "until": "2099-01-01", "reason": "no zone"},
                   {"user": "s8", "covers": "s4", "from": "2020-01-01T00:00:00Z", "until": "2099-01-01T00:00:00Z"}],
    }

    async def fetch(path: str, params: Mapping[str, str]) -> Any:
        return {"items": data[path] if params["page"] == "1" else []}

    source = RelationSource(caseload_path="/assignments", supervises="supervises", supervision_path="/supervision",
                            cover_path="/cover")
    index = RelationIndex()
    await index.sync(source, "items", fetch)
    assert index.counsellor_of == {"1": {"s1", "s9"}, "2": {"s2", "s5"}, "3": {"s4"}}
    assert index.supervisors_of == {"s1": {"s3"}, "s2": {"s3"}, "s4": {"s6"}, "s5": {"s7"}}
    assert (index.staff_rows, index.supervision_links) == (3, 4)
    now = datetime.now(UTC)
    assert index.relations("s3", None, "2", (), now) == Relation.ANY | Relation.SUPERVISION
    assert index.relations("s5", None, "2", (), now) == Relation.ANY | Relation.CASELOAD
    assert index.clients_for("s3", None, Relation.SUPERVISION, (), now) == {"1", "2"}
    assert index.clients_for("s6", None, Relation.SUPERVISION, (), now) == {"3"}
    # cover kept in the CRM: one good grant; one without a time zone and one without a reason are no grant
    assert [(g.user, g.covers, g.source, g.reason) for g in index.cover] == [("s8", "s1", "/cover/9", "s1 on leave")]
    assert index.relations("s8", None, "1", index.cover, now) == Relation.ANY | Relation.COVER
    assert index.relations("s8", None, "2", index.cover, now) == Relation.ANY


@pytest.mark.parametrize(("relations", "words"), [
    ("relations:\n  counsellor: \"\"\n", "say where caseloads are kept"),
    ("relations:\n  staff_path: \"\"\n  supervises: supervises\n", "staff_path is needed"),
    ("relations:\n  client_id: \"\"\n", "relations.client_id must be a non-empty name"),
    ("relations:\n  page_size: \"500\"\n", "relations.page_size must be a positive whole number"),
])
def test_a_relation_source_that_cannot_work_is_refused(bundle_dir: Path, relations: str, words: str) -> None:
    fields = bundle_dir / "fields.yaml"
    text = fields.read_text()
    start = text.index("relations:\n")
    end = text.index("\nresources:")
    fields.write_text(text[:start] + relations + "  resource: client\n" + text[end:])
    findings = refused(bundle_dir).findings
    assert any(words in f.message for f in findings), [str(f) for f in findings]

"""The fast redactor (`proxy.redact.Redactor`, compiled plans) against an obviously correct reference.

The reference below walks each resource's classification tree (`Node`: spec / children / items) and
applies the documented rules leaf by leaf, asking the `View` for each class. Hypothesis generates
records that follow the tree, with wrong shapes, unknown keys, odd flag values and missing client ids
mixed in; every record is redacted for every role of the shipped bundle and every relation set, by
both, and the whole outputs must be equal (types included: True is not 1).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from proxy.masks import MASKS
from proxy.policy import (
    ALL_RELATION_SETS,
    FieldSpec,
    Node,
    Outcome,
    Relation,
    Resource,
    View,
    load_fieldmap,
    values_at,
)
from proxy.redact import Disclosure, Plans, Redactor
from proxy.scrub import names_pattern
from tests.conftest import REPO, shipped_bundle

RESOURCES = load_fieldmap(REPO / "policies" / "fields.yaml").resources  # the trees records are made from


def roles() -> list[str]:
    return sorted(shipped_bundle().table.roles)
PSEUDONYMS = {str(c): f"P-{c:016X}" for c in (0, 1, 2, 4)}  # clients 3, 5 and 6 have no pseudonym
NAMES = {"0": ["Ada", "Lovelace"], "1": ["Mary Ann", "Evans"], "3": ["Jo"]}  # the others' names are not known
EXAMPLES = 300  # records per resource; each is checked for 8 roles x 16 relation sets


# ------------------------------------------------------------------------------------------ reference
DROP = object()  # "this key is not in the output"


def reference_record(resource: Resource, record: dict[str, Any], role: str, rels: Relation) -> dict[str, Any] | None:
    client = reference_client(resource, record)
    # no client: no relation but ANY
    view = shipped_bundle().table.view(role, rels if client is not None else Relation.ANY)
    assert view is not None
    if not view.shows(resource.record_class):
        return None
    assert resource.root.children is not None
    return reference_object(resource.root.children, record, Context(view, record, client, resource))


def reference_client(resource: Resource, record: dict[str, Any]) -> str | None:
    """The client id as a string; none when the field is absent, null, a bool or a container."""
    if resource.client_field is None:
        return None
    value = record.get(resource.client_field)
    if value is None or isinstance(value, (bool, dict, list)):
        return None
    return str(value)


class Context:
    def __init__(self, view: View, record: dict[str, Any], client: str | None, resource: Resource) -> None:
        self.view, self.record, self.client, self.resource = view, record, client, resource
        identifying = {s.field_class for s in RESOURCES["client"].specs if s.pseudonym}
        # a view that pseudonymises the client: no CRM id, no name of theirs, in a record about a client
        self.anonymous = resource.client_field is not None and any(
            view.outcome(c) is Outcome.PSEUDONYM for c in identifying)
        field = next((s for s in resource.specs if s.path == resource.client_field), None)
        linked = field is not None and view.outcome(field.field_class) is not Outcome.REMOVE
        self.stand_in = (PSEUDONYMS.get(client) if client is not None else None) if linked else "[client]"


def reference_object(children: dict[str, Node], value: dict[str, Any], ctx: Context) -> dict[str, Any]:
    out = {}
    for key, item in value.items():
        node = children.get(key)
        if node is None:  # not classified: removed
            continue
        kept = reference_node(node, item, ctx)
        if kept is not DROP:
            out[key] = kept
    return out


def can_show(node: Node, ctx: Context) -> bool:
    """Whether the view can show anything under a node (else an object or list goes, even empty: `[]` would
    tell that the client gave none)."""
    if node.spec is not None:
        spec = node.spec
        for cls in {spec.field_class, spec.flag_class or spec.field_class}:
            outcome = ctx.view.outcome(cls)
            if ctx.anonymous and spec.path == ctx.resource.client_field and outcome is not Outcome.REMOVE:
                return True
            if outcome is Outcome.CLEAR or (outcome is Outcome.PSEUDONYM and spec.pseudonym) or (
                    outcome is Outcome.MASK and spec.mask is not None):
                return True
        return False
    return any(can_show(child, ctx) for child in [*(node.children or {}).values(), *([node.items] if node.items
                                                                                    else [])])


def reference_node(node: Node, value: Any, ctx: Context) -> Any:
    if node.spec is not None:
        return reference_leaf(node.spec, value, ctx)
    if not can_show(node, ctx):
        return DROP
    if node.children is not None:
        if not isinstance(value, dict):  # not the shape the map expects
            return DROP
        out = reference_object(node.children, value, ctx)
        return DROP if value and not out else out  # emptied by redaction: removed; empty as sent: kept
    if node.items is not None:
        if not isinstance(value, list):
            return DROP
        kept = [k for k in (reference_node(node.items, v, ctx) for v in value) if k is not DROP]
        return DROP if value and not kept else kept
    return DROP


def reference_leaf(spec: FieldSpec, value: Any, ctx: Context) -> Any:
    outcome = ctx.view.outcome(spec.class_for(ctx.record))  # `when: {flag, class}` switches unless flag is False
    if ctx.anonymous and spec.path == ctx.resource.client_field and outcome is not Outcome.REMOVE:
        outcome = Outcome.PSEUDONYM  # the CRM id is the pseudonym there, whatever its class
        pseudonym = PSEUDONYMS.get(ctx.client) if ctx.client is not None else None
        return pseudonym if pseudonym is not None else DROP
    if outcome is Outcome.CLEAR:
        if ctx.anonymous and isinstance(value, str):  # the client's names leave the text, or the text goes
            names = NAMES.get(ctx.client) if ctx.client is not None else None
            if names is None or ctx.stand_in is None:
                return DROP
            words = set(names) | {w for n in names for w in re.findall(r"\w{2,}", n)}
            for word in sorted(words, key=len, reverse=True):
                value = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", ctx.stand_in, value, flags=re.IGNORECASE)
        return value
    if outcome is Outcome.PSEUDONYM:
        pseudonym = PSEUDONYMS.get(ctx.client) if spec.pseudonym and ctx.client is not None else None
        return pseudonym if pseudonym is not None else DROP
    if outcome is Outcome.MASK:
        masked = MASKS[spec.mask](value) if spec.mask is not None else None
        return masked if masked is not None else DROP
    return DROP


# --------------------------------------------------------------------------------------- comparison
PATTERNS = {client: names_pattern(names) for client, names in NAMES.items()}

def fast_record(resource: Resource, record: dict[str, Any], role: str, rels: Relation) -> dict[str, Any] | None:
    bundle = shipped_bundle()
    r = Redactor(bundle.table, role, lambda _cid: rels, PSEUDONYMS.get, Disclosure(), Plans.of(bundle), cipher=None,
                 names=PATTERNS.get)
    return r.record(resource, record)


def typed(value: Any) -> Any:
    """The value with every type spelt out, so that equal-but-different (True and 1) compares unequal."""
    if isinstance(value, dict):
        return ("dict", {k: typed(v) for k, v in value.items()})
    if isinstance(value, list):
        return ("list", [typed(v) for v in value])
    return (type(value).__name__, value)


def differences(resource: Resource, record: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """(role, relations, reference's output, fast output) wherever the two disagree."""
    found = []
    for role in roles():
        for rels in ALL_RELATION_SETS:
            want = reference_record(resource, record, role, rels)
            got = fast_record(resource, record, role, rels)
            if typed(got) != typed(want):
                found.append((role, rels.label, want, got))
    return found


# ------------------------------------------------------------------------------------------ records
def _not_sealed(text: str) -> str:
    return "x" + text if text.startswith("fg1.") else text  # values here are never ciphertexts


TEXT = st.text(max_size=12).map(_not_sealed)
SHAPED = st.sampled_from([
    "1987-04-12", "2026-03-14T10:00", "1987-13-45", "87-04-12", "2026-02-30",
    "\uff11\uff19\uff18\uff17-\uff10\uff14-\uff11\uff12",  # full-width digits
    "jane@example.org", "a@b@c", "jane@", "jane@example.org (Jane Smith)",
    "SW1A 1AA", "sw1a1aa", "SW1A", "  M1 1AE ", "12345", "07700 900123", "", " ", "P-0000000000000000",
    "Ada reported a better week", "mary ann said so", "Jo's week", "EVANS-LOVELACE", "Adam and Joanna",
])
SCALAR = st.one_of(TEXT, SHAPED, st.integers(-3, 10**6), st.booleans(), st.none(),
                   st.floats(allow_nan=False, allow_infinity=False))
LEAF = st.one_of(SCALAR, SHAPED, st.lists(SCALAR, max_size=2), st.dictionaries(TEXT, SCALAR, max_size=2))
DATES = st.one_of(st.dates().map(str), st.datetimes().map(lambda d: d.isoformat(timespec="minutes")))
MASKABLE = {  # inputs each mask has a reduced form for, so that masked leaves are shown as well as removed
    "year": DATES, "month": DATES, "age_band": DATES,
    "postcode_district": st.sampled_from(["SW1A 1AA", "sw1a1aa", "  M1 1AE ", "DN55 1PT", "EC1A1BB"]),
    "initials": st.sampled_from(["Jane Smith", "jane", "Émile Zola"]),
    "email_domain": st.sampled_from(["jane@example.org", " j@x.example "]),
    "last4": st.sampled_from(["07700 900123", "+44 7700 900123"]),
    "present": LEAF,
}
EXTRA_KEYS = st.dictionaries(st.one_of(st.sampled_from(["nhs_number", "extra", "_links", ""]), TEXT), LEAF,
                             max_size=2)
NOT_AN_OBJECT = st.one_of(TEXT, st.integers(), st.none(), st.lists(SCALAR, max_size=2))
NOT_AN_ARRAY = st.one_of(TEXT, st.integers(), st.none(), st.dictionaries(TEXT, SCALAR, max_size=2))
MISSING = object()  # drawn for a key that is then left out of the record
CLIENT = st.one_of(st.integers(0, 6), st.integers(0, 6).map(str), st.sampled_from([MISSING, None, True]))
FLAG = st.one_of(st.booleans(), st.sampled_from([MISSING, None, 0, 1, "false", ""]))


def values_for(node: Node) -> st.SearchStrategy[Any]:
    """Values shaped as the map expects at this node, with now and then a wrong shape."""
    if node.spec is not None:
        return st.one_of(MASKABLE[node.spec.mask], LEAF) if node.spec.mask is not None else LEAF
    if node.children is not None:
        good = objects_for(node.children, {})
        return st.one_of(good, good, good, NOT_AN_OBJECT)
    assert node.items is not None
    good_list = st.lists(values_for(node.items), max_size=3)
    return st.one_of(good_list, good_list, good_list, NOT_AN_ARRAY)


def objects_for(children: dict[str, Node], always: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Objects with any subset of the classified keys (those in `always` drawn every time, MISSING
    meaning absent), plus sometimes keys the map does not know."""
    optional = {k: values_for(n) for k, n in children.items() if k not in always}
    known = st.fixed_dictionaries(always, optional=optional)
    return st.builds(lambda extra, fields: {k: v for k, v in {**extra, **fields}.items() if v is not MISSING},
                     EXTRA_KEYS, known)


def records_for(resource: Resource) -> st.SearchStrategy[dict[str, Any]]:
    """Records of this resource: the client id and the flags are there most of the time."""
    always = {s.flag: FLAG for s in resource.specs if s.flag is not None}
    if resource.client_field is not None:
        always[resource.client_field] = CLIENT
    assert resource.root.children is not None
    return objects_for(resource.root.children, always)


STRATEGIES = {name: records_for(resource) for name, resource in RESOURCES.items()}


def check_resource(name: str, max_examples: int = EXAMPLES, phases: tuple[Phase, ...] = tuple(Phase)) -> None:
    """The property for one resource: derandomized (the same records on every run, no example database)."""
    resource = RESOURCES[name]

    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None, phases=phases)
    @given(record=STRATEGIES[name])
    def fast_equals_reference(record: dict[str, Any]) -> None:
        found = differences(resource, record)
        assert not found, f"{len(found)} differ; first (role, relations, reference, fast): {found[0]}"

    fast_equals_reference()


# -------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", sorted(RESOURCES))
def test_fast_redactor_equals_reference_for_every_role_and_relation_set(name: str) -> None:
    check_resource(name)


def rules_met(resource: Resource, record: dict[str, Any]) -> set[str]:
    """Which of the rules one record puts to the test, over every role and relation set."""
    assert resource.root.children is not None
    children = resource.root.children
    client = reference_client(resource, record)
    met = {"client with pseudonym" if client in PSEUDONYMS else "client" if client is not None else "no client"}
    met |= {"unknown key" for key in record if key not in children}
    met |= {"wrong shape" for key, node in children.items() if key in record and node.spec is None
            and not isinstance(record[key], dict if node.children is not None else list)}
    met |= {f"flag is False: {record.get(s.flag) is False}" for s in resource.specs if s.flag is not None}
    for role in roles():
        for rels in ALL_RELATION_SETS:
            out = reference_record(resource, record, role, rels)
            if out is None:
                met.add("record hidden")
                continue
            view = shipped_bundle().table.view(role, rels if client is not None else Relation.ANY)
            assert view is not None
            for spec in resource.specs:
                if values_at(record, spec.path):
                    shown = "shown" if values_at(out, spec.path) else "removed"
                    met.add(f"{view.outcome(spec.class_for(record))} {shown}")
    return met


def test_the_generated_records_put_every_rule_to_the_test() -> None:
    """The property is only as good as its inputs: the records drawn meet every outcome, shown and
    removed, both sides of the flag, wrong shapes, unknown keys, and clients with and without ids."""
    met: set[str] = set()

    def observe(name: str) -> None:
        @settings(max_examples=40, derandomize=True, database=None, deadline=None, phases=(Phase.generate,))
        @given(record=STRATEGIES[name])
        def record_rules(record: dict[str, Any]) -> None:
            met.update(rules_met(RESOURCES[name], record))

        record_rules()

    for name in RESOURCES:
        observe(name)
    assert met >= {"client", "client with pseudonym", "no client", "unknown key", "wrong shape", "record hidden",
                   "flag is False: True", "flag is False: False", "clear shown", "pseudonym shown",
                   "pseudonym removed", "mask shown", "mask removed", "remove removed"}, met
    assert "remove shown" not in met


def test_the_property_fails_when_the_reference_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation check: a reference that shows MASK fields in clear must be caught (researcher sees
    `date_of_birth` masked to its year), so the property above is able to fail."""
    right = reference_leaf

    def mask_as_clear(spec: FieldSpec, value: Any, ctx: Context) -> Any:
        if ctx.view.outcome(spec.class_for(ctx.record)) is Outcome.MASK:
            return value
        return right(spec, value, ctx)

    monkeypatch.setitem(globals(), "reference_leaf", mask_as_clear)  # what reference_node calls
    found = differences(RESOURCES["client"], {"id": 1, "date_of_birth": "1987-04-12"})
    assert {role for role, *_ in found} == {"researcher"}
    with pytest.raises(AssertionError, match="differ"):  # the property itself finds it (no shrinking: quick)
        check_resource("client", phases=(Phase.generate,))

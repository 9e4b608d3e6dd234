"""The policy lifecycle: the officers' bundle (Casbin model and rows, field map, cover grants, break-glass
rules) loaded, linted, compiled to a decision table, proved equal to Casbin, watched and swapped; the need-to-know
relations read from the CRM. The review tools (`proxy.policy.review`) and the expectation tests
(`proxy.policy.expectations`) sit on top of it and are imported by their own names."""

from proxy.policy.breakglass import BreakGlassRules, Reason
from proxy.policy.bundle import (
    SIGNATURE_FILE,
    BundleSource,
    PolicyBundle,
    bundle_digest,
    compile_bundle,
    load_bundle,
    opened_by_breakglass,
    read_bundle_files,
    sign_bundle,
)
from proxy.policy.decision import (
    ALL_RELATION_SETS,
    PURPOSES,
    Action,
    ClassDecision,
    DecisionTable,
    Effect,
    Outcome,
    Relation,
    Rule,
    View,
)
from proxy.policy.fieldmap import (
    ANONYMOUS,
    KEY_SCOPES,
    FieldClass,
    FieldMap,
    FieldSpec,
    ListFormat,
    Node,
    RelationSource,
    Resource,
    load_fieldmap,
    parse_fieldmap,
    values_at,
)
from proxy.policy.lint import Finding, PolicyError, Severity
from proxy.policy.relations import CoverGrant, RelationIndex, assigned_ids
from proxy.policy.reload import PolicyWatcher
from proxy.policy.retention import Event, Period, RetentionRules, Schedule, parse_period
from proxy.policy.yamlfile import MapError

__all__ = [
    "ALL_RELATION_SETS",
    "ANONYMOUS",
    "KEY_SCOPES",
    "PURPOSES",
    "SIGNATURE_FILE",
    "Action",
    "BreakGlassRules",
    "BundleSource",
    "ClassDecision",
    "CoverGrant",
    "DecisionTable",
    "Effect",
    "Event",
    "FieldClass",
    "FieldMap",
    "FieldSpec",
    "Finding",
    "ListFormat",
    "MapError",
    "Node",
    "Outcome",
    "Period",
    "PolicyBundle",
    "PolicyError",
    "PolicyWatcher",
    "Reason",
    "Relation",
    "RelationIndex",
    "RelationSource",
    "Resource",
    "RetentionRules",
    "Rule",
    "Schedule",
    "Severity",
    "View",
    "assigned_ids",
    "bundle_digest",
    "compile_bundle",
    "load_bundle",
    "load_fieldmap",
    "opened_by_breakglass",
    "parse_fieldmap",
    "parse_period",
    "read_bundle_files",
    "sign_bundle",
    "values_at",
]

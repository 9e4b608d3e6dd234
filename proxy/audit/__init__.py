"""The audit lifecycle: the record written for every access, the durable hash-linked trail with group
commit and signed checkpoints, its SIEM copy, and offline verification. The auditors' queries, reports
and exports (`proxy.audit.views`) read the store and are imported by their own name."""

from proxy.audit.checkpoints import Checkpoint, CheckpointSigner, load_public, public_path, public_pem
from proxy.audit.record import AuditRecord
from proxy.audit.siem import JsonLinesTrail, MultiTrail, Siem
from proxy.audit.stores import (
    AuditStore,
    is_shared,
    open_trail,
    record_operation,
    store_exists,
    store_of,
    verify_export,
    verify_store,
)
from proxy.audit.trail import AuditUnavailable, DurableTrail, Trail, UndurableTrail
from proxy.audit.verify import Verdict, VerifyInputError, read_anchors, read_export

__all__ = [
    "AuditRecord",
    "AuditStore",
    "AuditUnavailable",
    "Checkpoint",
    "CheckpointSigner",
    "DurableTrail",
    "JsonLinesTrail",
    "MultiTrail",
    "Siem",
    "Trail",
    "UndurableTrail",
    "Verdict",
    "VerifyInputError",
    "is_shared",
    "load_public",
    "open_trail",
    "public_path",
    "public_pem",
    "read_anchors",
    "read_export",
    "record_operation",
    "store_exists",
    "store_of",
    "verify_export",
    "verify_store",
]

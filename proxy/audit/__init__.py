"""The audit lifecycle: the record written for every access, the durable hash-linked trail with group
commit and signed checkpoints, its SIEM copy, and offline verification. The auditors' queries, reports
and exports (`proxy.audit.views`) read the store and are imported by their own name."""

from proxy.audit.checkpoints import Checkpoint, CheckpointSigner, load_public, public_path, public_pem
from proxy.audit.record import AuditRecord
from proxy.audit.siem import JsonLinesTrail, MultiTrail, Siem
from proxy.audit.trail import AuditUnavailable, DurableTrail, Trail, UndurableTrail, open_trail, record_operation
from proxy.audit.verify import Verdict, VerifyInputError, read_anchors, read_export, verify_export, verify_store

__all__ = [
    "AuditRecord",
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
    "load_public",
    "open_trail",
    "public_path",
    "public_pem",
    "read_anchors",
    "read_export",
    "record_operation",
    "verify_export",
    "verify_store",
]

"""The confidentiality workflows, each a case with a reason, an approver and an audit record: break-glass
(emergency access, alerted and reviewed), disclosure grants, consent, restriction, and the clients' requests
(subject access, portability, rectification, erasure), legal holds and what retention runs from.

They sit beside the request path as the lifecycles do: the app consults them (is a break-glass grant
open for this caller and client), they never import the app or the CLI."""

from proxy.cases.breakglass import (
    DECISIONS,
    REVIEWER_ROLES,
    Alerter,
    AlertTarget,
    GlassBook,
    iso,
    new_alert,
    new_grant_id,
)
from proxy.cases.rights import KINDS, RightsRequest
from proxy.cases.store import Alert, AlreadySigned, CasesStore, Consent, DisclosureGrant, GrantRow, Release, Review

__all__ = [
    "DECISIONS",
    "KINDS",
    "REVIEWER_ROLES",
    "Alert",
    "AlertTarget",
    "Alerter",
    "AlreadySigned",
    "CasesStore",
    "Consent",
    "DisclosureGrant",
    "GlassBook",
    "GrantRow",
    "Release",
    "Review",
    "RightsRequest",
    "iso",
    "new_alert",
    "new_grant_id",
]

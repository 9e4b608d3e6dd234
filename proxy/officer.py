"""The security officers' endpoints on the gateway itself, and shadow mode.

`GET /_fieldguard/explain` answers what `fieldguard policy explain` does, with the caseload facts the
gateway holds now; `POST /_fieldguard/reload` loads the bundle again. Only the configured officer role
may call them, and every call is audited like any other request. Shadow mode evaluates a candidate
bundle beside the one in force and audits where the two would differ, enforcing nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import parse_qsl

from proxy.asgi import Incoming, Reply
from proxy.audit import AuditRecord
from proxy.errors import GatewayError
from proxy.exchange import Exchange
from proxy.identity import Principal
from proxy.policy import Outcome, PolicyBundle, Relation
from proxy.policy.review import explain_class, explain_resource, explain_write
from proxy.routes import normalise_path
from proxy.runtime import Runtime

MAX_ABOUT = 128  # characters of each query value kept in the record

PREFIX = "_fieldguard"  # the gateway's own endpoints: /_fieldguard/...


async def officer(runtime: Runtime, req: Incoming, principal: Principal, bundle: PolicyBundle,
                  record: AuditRecord) -> Reply:
    if principal.role != runtime.settings.policy.officer_role:
        raise GatewayError(403, "only the security officer role may use this endpoint", reason="not an officer")
    if not bundle.table.purpose_allowed(principal.role, principal.purpose):
        raise GatewayError(403, f"purpose of use {principal.purpose} not allowed for role {principal.role}",
                           reason="purpose not allowed")
    if req.segments == (PREFIX, "reload") and req.method == "POST":
        swapped = await runtime.policy.reload()
        error = runtime.policy.status.last_error
        return Reply.json(200 if error is None else 409,
                          {"reloaded": swapped, "policy": runtime.bundle.digest, "error": error})
    if req.segments == (PREFIX, "explain") and req.method == "GET":
        return await explain(runtime, req, bundle, record)
    raise GatewayError(404, "no such FieldGuard endpoint", reason="unknown officer endpoint")


async def explain(runtime: Runtime, req: Incoming, bundle: PolicyBundle, record: AuditRecord) -> Reply:
    """The same as `fieldguard policy explain`, with the caseload facts the gateway holds now. Its record
    says whom it was asked about (role, user, route; the client by pseudonym), since an answer about a
    named user and client is itself a disclosure of how they stand to each other."""
    query = dict(parse_qsl(req.query_string))
    role, purpose = query.get("role", ""), query.get("purpose")
    asked = {"role": role, "user": query.get("user", ""), "method": query.get("method", "GET"),
             "class": query.get("class", "")}
    record.about = {k: v[:MAX_ABOUT] for k, v in asked.items() if v}
    rels = Relation.ANY
    try:
        for name in filter(None, query.get("relation", "").split(",")):
            rels |= Relation.parse(name)
    except ValueError as exc:
        raise GatewayError(400, str(exc)) from None
    if "class" in query:
        return Reply.json(200, explain_class(bundle.table, role, rels, purpose, query["class"]).as_dict())
    target = query.get("path")
    if not target:
        raise GatewayError(400, "give path= (a route) or class=")
    matched = bundle.routes.match(query.get("method", "GET"), normalise_path(target.encode()))
    if matched is None:
        record.about["route"] = "no such route"
        return Reply.json(200, {"route": None, "reason": "no such route: it is refused (403)"})
    route, params = matched
    record.about["route"] = route.template
    if "client_id" in params:  # by pseudonym; made only for a client the CRM has (its caseloads name them)
        ring, client = runtime.ring, params["client_id"]
        on_record = client in runtime.index.counsellor_of
        known = {} if ring is None else await (ring.pseudonyms if on_record else ring.known_pseudonyms)([client])
        record.clients = [known.get(client, "unresolved")]
    user = query.get("user")
    if user and "client_id" in params:
        rels = runtime.index.relations(user, query.get("client_id"), params["client_id"],
                                       (*bundle.cover, *runtime.index.cover),
                                       datetime.now(UTC))
    if route.method in ("POST", "PATCH", "PUT"):
        writes = explain_write(bundle.table, bundle.fieldmap, route.resource, route.method, role, rels, purpose)
        return Reply.json(200, {"route": f"{route.method} {route.template}", "relations": rels.label,
                                "fields": [e.as_dict() for e in writes]})
    items = explain_resource(bundle.table, bundle.fieldmap, route.resource, role, rels, purpose)
    resource = bundle.fieldmap.resources[route.resource]
    visible = explain_class(bundle.table, role, rels, purpose, resource.record_class).outcome != "remove"
    return Reply.json(200, {"route": f"{route.method} {route.template}", "relations": rels.label,
                            "visible": visible, "fields": [e.as_dict() for e in items]})


def compare_shadow(runtime: Runtime, exchange: Exchange, record: AuditRecord) -> None:
    """What the candidate policy would have decided differently, into the record; never enforced."""
    if runtime.shadow is None:
        return
    candidate = runtime.shadow.bundle.table
    who = exchange.who
    differences: set[str] = set()
    if candidate.purpose_allowed(who.role, who.purpose) != exchange.bundle.table.purpose_allowed(who.role,
                                                                                                who.purpose):
        differences.add(f"purpose {who.purpose}")
    for rels, view in exchange.redactor.views.items():
        other = candidate.view(who.role, rels)
        for cls in exchange.resource.classes:
            mine = view.outcome(cls)
            theirs = other.outcome(cls) if other is not None else Outcome.REMOVE
            if mine is not theirs:
                differences.add(f"{cls}: {mine.value} -> {theirs.value} ({rels.label})")
    record.shadow = sorted(differences)
    record.shadow_policy = runtime.shadow.bundle.digest
    if differences:
        runtime.metrics.inc("fieldguard_shadow_differences_total", route=exchange.route.template)

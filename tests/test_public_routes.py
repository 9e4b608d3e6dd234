"""Public routes: served without identity, but classified and redacted like every other route. They used to
return the CRM's raw body to anyone."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.policy import MapError, parse_fieldmap
from tests.conftest import Gateway, Signing, direct, policies_copy, start_gateway
from tests.test_identity import refused

PUBLIC = """
  crm_health:
    record_class: service_health
    fields:
      status: service_health
public:
  - GET /health crm_health
  - GET /staff/alice staff
"""


@pytest.fixture(scope="module")
def gw(crm: str, signing: Signing, shared_keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    d = tmp_path_factory.mktemp("public")
    policies = policies_copy(d)
    fields = policies / "fields.yaml"
    text = fields.read_text().replace("\nclasses:\n", "\nclasses:\n  service_health: {label: N}\n", 1)
    fields.write_text(text + PUBLIC)
    with (policies / "policy.csv").open("a") as f:
        f.write("\np, anonymous, any, service_health, read, allow\n")
    gateway = start_gateway(d / "gw", crm, signing, shared_keys, policies=policies)
    yield gateway
    gateway.service.stop()


def test_a_public_route_shows_only_what_the_policy_grants_anonymous(gw: Gateway, crm: str) -> None:
    assert direct(crm, "/health") == {"status": "ok"}
    r = gw.get("/health")  # no token
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    rec = gw.audit_for(r.headers["x-request-id"])
    assert rec["user"] == "anonymous" and rec["role"] == "anonymous" and rec["route"] == "/health"
    assert rec["shown"] == {"service_health": ["status"]}


def test_a_public_route_whose_classes_anonymous_may_not_read_shows_nothing(gw: Gateway, crm: str) -> None:
    """The staff directory made public by mistake: its body used to go out as the CRM sent it."""
    assert direct(crm, "/staff/alice")["username"] == "alice"
    r = gw.get("/staff/alice")
    assert r.status_code == 403 and "alice" not in r.text
    rec = gw.audit_for(r.headers["x-request-id"])
    assert rec["outcome"] == "denied" and rec["user"] == "anonymous"
    assert rec["reason"] == "no rule gives anonymous staff"


def test_a_token_is_not_needed_and_a_bad_one_changes_nothing(gw: Gateway) -> None:
    r = gw.get("/health", headers={"authorization": "Bearer not-a-token"})
    assert r.status_code == 200 and gw.audit_for(r.headers["x-request-id"])["user"] == "anonymous"
    refused(gw, None, 401, "bearer token required", "no token")  # other routes still need one
    refused(gw, None, 401, "bearer token required", "no token", "/health/x")  # only the literal path is public


def test_client_data_is_never_public() -> None:
    with pytest.raises(MapError, match="client data and are never served without identity"):
        parse_fieldmap(FIELDS_WITH_PUBLIC_CLIENTS)
    with pytest.raises(MapError, match="write 'GET /literal/path resource'"):
        parse_fieldmap(FIELDS_WITH_PUBLIC_CLIENTS.replace("GET /clients/1 client", "GET /health"))


FIELDS_WITH_PUBLIC_CLIENTS = """
version: 1
classes:
  identity: {label: R}
relations:
  clients_path: /clients
  client_id: id
  counsellor: counsellor
  resource: client
resources:
  client:
    client: id
    record_class: identity
    fields:
      id: identity
    routes:
      - GET /clients/{client_id:int}
public:
  - GET /clients/1 client
"""

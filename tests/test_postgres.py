"""Several gateways, one service: the keystore on the machine's PostgreSQL, shared by gateway processes.

Each test has a database of its own (`postgres` fixture; skipped with the reason where PostgreSQL is not
running), its schema made by `fieldguard db upgrade` as an operator would, and real gateway processes in
front of a real CRM. Shreds must reach every replica within a second by announcement, and within the
re-check interval when the announcement is lost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway, Signing, fieldguard, make_keys, pg_sql, policies_copy, start_gateway, wait_until
from tests.test_encryption import crm_process
from tests.test_key_custody import new_client, note


def gateway_on(postgres: str, directory: Path, crm: str, signing: Signing, keys: Path, poll: float = 30.0,
               policies: Path | None = None, shared_audit: bool = True, **kw: Any) -> Gateway:
    """A `fieldguard serve` process whose keystore (and trail, unless not `shared_audit`) is the shared
    database; its own re-check of revocations only every `poll` seconds, so that what arrives sooner came by
    announcement; its trail sealed every second."""
    audit = f'store = "{postgres}"\ncheckpoint_seconds = 1.0' if shared_audit else ""
    return start_gateway(directory, crm, signing, keys, policies=policies or policies_copy(directory),
                         process=True, extra=audit,
                         sections="[relations]\nrefresh_seconds = 0.5\n",
                         keys_extra=f'store = "{postgres}"\nrevocation_poll_seconds = {poll}\n'
                                    f'revocation_max_age_seconds = {max(2 * poll, 5.0)}', **kw)


@pytest.fixture
def service(postgres: str, signing: Signing, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An empty CRM, one keys directory (the KEK file every replica holds), the schema, two gateways."""
    crm, url, _ = crm_process(tmp_path / "crm", seed=False)
    keys = make_keys(tmp_path / "keys")
    policies = policies_copy(tmp_path)  # one service, one policy
    first = gateway_on(postgres, tmp_path / "a", url, signing, keys, policies=policies, start=False)
    upgraded = fieldguard(first.config, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    first.service.start()
    second = gateway_on(postgres, tmp_path / "b", url, signing, keys, policies=policies)
    yield {"a": first, "b": second, "crm": url, "keys": keys, "postgres": postgres, "dir": tmp_path}
    for gw in (first, second):
        gw.service.stop()
    crm.stop()


def known(client: int, *gateways: Gateway) -> None:
    """Wait until each gateway's relation facts (re-read every half second here) include the new client."""
    for gw in gateways:
        token = gw.as_user("alice", "counsellor")
        wait_until(lambda gw=gw, token=token: gw.get(f"/clients/{client}", token).status_code == 200,
                   "the new client to be known", timeout=10)


def body_of(gw: Gateway, note_id: int) -> Any:
    r = gw.get(f"/session-notes/{note_id}", gw.as_user("alice", "counsellor"))
    assert r.status_code == 200, r.text
    return r.json().get("body")


def shown(gw: Gateway, note_id: int) -> Any:
    """The note's body as alice sees it now, or the status when she is refused (the replica not caught up)."""
    r = gw.get(f"/session-notes/{note_id}", gw.as_user("alice", "counsellor"))
    return r.json().get("body") if r.status_code == 200 else r.status_code


def shred(gw: Gateway, client: int) -> None:
    out = fieldguard(gw.config, "keys", "shred", "--client", str(client), "--reason", "erasure request T-9", "--yes")
    assert out.returncode == 0, out.stderr


def test_db_upgrade_makes_the_schema_once_and_says_so(postgres: str, tmp_path: Path) -> None:
    config = tmp_path / "fieldguard.toml"
    config.write_text(f'[keys]\ndir = "{tmp_path / "keys"}"\nstore = "{postgres}"\n')
    dry = fieldguard(config, "db", "upgrade", "--dry-run")
    assert dry.returncode == 0 and "would apply 1: keystore" in dry.stdout and "schema version 0" in dry.stdout
    assert pg_sql(postgres, "SELECT to_regclass('data_keys') IS NULL AS missing")[0]["missing"]
    first = fieldguard(config, "db", "upgrade")
    assert first.returncode == 0 and "applied 1: keystore" in first.stdout and "applied 3: audit" in first.stdout
    again = fieldguard(config, "db", "upgrade")
    assert again.returncode == 0 and "(up to date)" in again.stdout and "applied" not in again.stdout
    versions = [r["version"] for r in pg_sql(postgres, "SELECT version FROM fieldguard_schema ORDER BY version")]
    assert versions == [1, 2, 3]


def test_a_database_without_the_schema_is_refused_with_the_command_that_fixes_it(postgres: str,
                                                                                  tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    config = tmp_path / "fieldguard.toml"
    # trust authentication here: the password is not checked, only kept out of every message
    config.write_text(f'[keys]\ndir = "{keys}"\nstore = "{postgres.replace("127.0.0.1", "root:s3cret@127.0.0.1")}"\n')
    out = fieldguard(config, "keys", "status")
    assert out.returncode != 0
    assert "schema version 0" in out.stderr and "run `fieldguard db upgrade`" in out.stderr
    assert "s3cret" not in out.stderr and "root:***@" in out.stderr
    pg_sql(postgres, "CREATE TABLE fieldguard_schema (version integer PRIMARY KEY, description text NOT NULL, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
    pg_sql(postgres, "INSERT INTO fieldguard_schema (version, description) VALUES (99, 'from the future')")
    newer = fieldguard(config, "db", "upgrade")
    assert newer.returncode != 0 and "newer than this FieldGuard" in newer.stderr


def test_two_gateways_share_the_keystore_and_a_shred_reaches_both_within_a_second(service: dict[str, Any]) -> None:
    a, b = service["a"], service["b"]
    client = new_client(a, "Ada")
    written = note(a, client, "written through the first gateway")
    wait_until(lambda: shown(b, written) == "written through the first gateway",  # the second opens the first's key
               "the second gateway to know the new client", timeout=5)
    assert body_of(a, written) == "written through the first gateway"  # both have it cached now
    keys = pg_sql(service["postgres"], "SELECT status FROM data_keys WHERE client_id = $1", str(client))
    assert keys and all(k["status"] == "active" for k in keys)
    shred(a, client)
    began = time.monotonic()
    for gw in (a, b):
        wait_until(lambda gw=gw: body_of(gw, written) is None, "the shred to reach the replica", timeout=5)
    took = time.monotonic() - began
    assert took < 1.0, f"the shred took {took:.2f} s to reach both replicas (re-check every 30 s)"
    record = b.audit_records()[-1]
    assert "unknown or destroyed key" in json.dumps(record.get("decrypt_failures"))


def test_a_lost_announcement_is_caught_up_by_the_re_check(postgres: str, signing: Signing, tmp_path: Path) -> None:
    crm, url, _ = crm_process(tmp_path / "crm", seed=False)
    keys = make_keys(tmp_path / "keys")
    a = gateway_on(postgres, tmp_path / "a", url, signing, keys, poll=2.0, start=False)
    assert fieldguard(a.config, "db", "upgrade").returncode == 0
    a.service.start()
    try:
        client = new_client(a, "Bea")
        written = note(a, client, "before the listener was cut")
        assert body_of(a, written) == "before the listener was cut"
        cut = pg_sql(postgres, "SELECT pg_terminate_backend(pid) AS cut FROM pg_stat_activity "
                               "WHERE datname = current_database() AND application_name = 'fieldguard-listener'")
        assert cut and all(r["cut"] for r in cut)
        shred(a, client)  # announced while nobody listens
        began = time.monotonic()
        wait_until(lambda: body_of(a, written) is None, "the re-check to catch up", timeout=10)
        assert time.monotonic() - began < 2.0 + 2.5  # the re-check interval, and a request's worth
        wait_until(lambda: a.readyz()["checks"]["tasks"]["listener"]["ok"], "the listener to reconnect", timeout=10)
    finally:
        a.service.stop()
        crm.stop()


def test_a_replica_that_loses_the_database_withholds_and_says_why(postgres: str, signing: Signing,
                                                                 tmp_path: Path) -> None:
    crm, url, _ = crm_process(tmp_path / "crm", seed=False)
    keys = make_keys(tmp_path / "keys")
    b = gateway_on(postgres, tmp_path / "b", url, signing, keys, poll=1.0, start=False, shared_audit=False)
    assert fieldguard(b.config, "db", "upgrade").returncode == 0
    b.service.start()
    name = postgres.rsplit("/", 1)[1]
    admin = postgres.rsplit("/", 1)[0] + "/test"
    try:
        client = new_client(b, "Cy")
        written = note(b, client, "kept from a replica that cannot re-check")
        assert body_of(b, written) == "kept from a replica that cannot re-check"  # its key is cached now
        pg_sql(admin, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        pg_sql(admin, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)

        def refused() -> bool:
            return b.get(f"/session-notes/{written}", b.as_user("alice", "counsellor")).status_code == 503

        wait_until(refused, "the replica to stop using its cached key", timeout=15)
        r = b.get(f"/session-notes/{written}", b.as_user("alice", "counsellor"))
        assert r.json()["error"] == "keystore unavailable; nothing was released"
        assert "kept from" not in r.text
        record = b.audit_for(r.headers["x-request-id"])
        assert record["outcome"] == "error" and record["reason"].startswith("keystore unavailable")
        w = b.request("POST", f"/clients/{client}/session-notes", b.as_user("alice", "counsellor"),
                      json={"session_date": "2026-11-20", "summary": "s", "body": "not to be written in clear"})
        assert w.status_code == 503 and w.json()["error"] == "keystore unavailable; nothing was released"
    finally:
        pg_sql(admin, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
    try:
        wait_until(lambda: shown(b, written) == "kept from a replica that cannot re-check", "recovery", timeout=15)
    finally:
        b.service.stop()
        crm.stop()


def test_status_shows_every_replica_and_whether_they_agree(service: dict[str, Any]) -> None:
    a = service["a"]
    client = new_client(a, "Di")
    note(a, client, "x")
    shred(a, client)

    def agreed() -> dict[str, Any] | None:
        out = fieldguard(a.config, "status")
        assert out.returncode == 0, out.stderr
        found: dict[str, Any] = json.loads(out.stdout)
        return found if found["agree"] and len(found["replicas"]) == 2 and found["key_epoch"] > 0 else None

    found = wait_until(agreed, "both replicas to report the shred", timeout=15)
    b = service["b"]
    b.get("/clients", b.as_user("alice", "counsellor"))  # a record on each replica
    caught_up = wait_until(lambda: all(r["audit"]["records"] > 0 and r["audit"]["unsealed"] == 0
                                       for r in json.loads(fieldguard(a.config, "status").stdout)["replicas"]),
                           "each replica to report its records sealed (audit lag 0)", timeout=20)
    assert caught_up
    assert {r["policy_digest"] for r in found["replicas"]} == {a.readyz()["checks"]["policy"]["hash"]}
    assert all(r["listener"]["connected"] for r in found["replicas"])


def published_gateway(postgres: str, directory: Path, crm: str, signing: Signing, keys: Path,
                      policies: Path, start: bool = False) -> Gateway:
    """A replica enforcing the policy published in the shared database (policy.dir is only the officer's copy)."""
    return gateway_on(postgres, directory, crm, signing, keys, policies=policies,
                      env={"FIELDGUARD_POLICY_STORE": postgres, "FIELDGUARD_POLICY_POLL_SECONDS": "30"}, start=start)


def hash_in_force(gw: Gateway) -> str:
    return str(gw.readyz()["checks"]["policy"]["hash"])


def test_a_published_policy_reaches_both_replicas_and_a_bad_one_is_refused_before_it_is_published(
        postgres: str, signing: Signing, tmp_path: Path) -> None:
    from proxy.policy import load_bundle
    from tests.conftest import proofs_dir

    crm, url, _ = crm_process(tmp_path / "crm", seed=True)
    keys = make_keys(tmp_path / "keys")
    officer = policies_copy(tmp_path / "officer")  # dana covers bob
    env = {"FIELDGUARD_POLICY_STORE": postgres}
    a = published_gateway(postgres, tmp_path / "a", url, signing, keys, officer)
    gateways = [a]
    try:
        assert fieldguard(a.config, "db", "upgrade").returncode == 0
        unpublished = fieldguard(a.config, "status", env=env)
        assert unpublished.returncode == 0 and json.loads(unpublished.stdout)["replicas"] == []
        first = fieldguard(a.config, "policy", "publish", str(officer), "--note", "CR-1", env=env)
        assert first.returncode == 0, first.stderr
        assert "published version 1" in first.stdout
        again = fieldguard(a.config, "policy", "publish", str(officer), env=env)
        assert "already published as version 1" in again.stdout
        a.service.start()
        b = published_gateway(postgres, tmp_path / "b", url, signing, keys, officer)
        gateways.append(b)
        b.service.start()
        v1 = load_bundle(officer, proofs_dir()).digest
        assert hash_in_force(a) == hash_in_force(b) == v1
        dana = a.as_user("dana", "service_manager")
        covered = [gw.get("/clients/2/session-notes", dana).status_code for gw in gateways]
        assert covered == [200, 200], covered  # bob's client, through the cover grant

        (officer / "cover.yaml").write_text("grants: []\n")  # bob is back
        v2 = load_bundle(officer, proofs_dir()).digest
        began = time.monotonic()
        second = fieldguard(a.config, "policy", "publish", str(officer), "--note", "CR-2", env=env)
        assert second.returncode == 0 and "published version 2" in second.stdout, second.stderr
        for gw in gateways:
            wait_until(lambda gw=gw: hash_in_force(gw) == v2, "the new version to be in force", timeout=10)
        took = time.monotonic() - began
        assert took < 2.0, f"version 2 took {took:.2f} s to reach both replicas (their own poll: every 30 s)"
        assert [gw.get("/clients/2/session-notes", dana).status_code for gw in gateways] == [403, 403]

        fields = officer / "fields.yaml"
        text = fields.read_text()
        sealed = "  clinical_notes:  {label: R, encrypt: record,"
        assert sealed in text
        fields.write_text(text.replace(sealed, "  clinical_notes:  {label: R,"))
        downgrade = fieldguard(a.config, "policy", "publish", str(officer), env=env)
        assert downgrade.returncode != 0
        assert "class clinical_notes would stop being encrypted" in downgrade.stderr
        fields.write_text(text)
        (officer / "policy.csv").write_text("p, counsellor, caseload\n")  # truncated mid-line
        broken = fieldguard(a.config, "policy", "publish", str(officer), env=env)
        assert broken.returncode != 0 and "error(s): the bundle cannot be used" in broken.stderr
        versions = pg_sql(postgres, "SELECT version, published_by, note FROM policy_versions ORDER BY version")
        assert [(v["version"], v["note"]) for v in versions] == [(1, "CR-1"), (2, "CR-2")]

        def versions_reported() -> list[int]:
            out = fieldguard(a.config, "status", env=env)
            # None while a replica has the version but not yet in force (its row is beaten every 5 s)
            return sorted(r["policy_version"] or 0 for r in json.loads(out.stdout)["replicas"])

        wait_until(lambda: versions_reported() == [2, 2], "both replicas to report version 2", timeout=15)
        trail = fieldguard(a.config, "audit", "query", "--format", "json", env=env)
        assert trail.returncode == 0, trail.stderr
        publishes = [r for r in json.loads(trail.stdout) if r.get("route") == "policy publish"]
        assert [r["outcome"] for r in publishes] == ["allowed", "allowed", "denied"]
        assert publishes[1]["reason"].startswith(f"version 2: {v2}") and "CR-2" in publishes[1]["reason"]
        assert "would stop being encrypted" in publishes[2]["reason"]
    finally:
        for gw in gateways:
            gw.service.stop()
        crm.stop()


def verify(gw: Gateway, *args: str) -> tuple[int, dict[str, Any]]:
    out = fieldguard(gw.config, "audit", "verify", *args)
    return out.returncode, json.loads(out.stdout)


def all_sealed(postgres: str) -> bool:
    """Every record in the sealed log, and a checkpoint signed over all of it."""
    row = pg_sql(postgres, "SELECT (SELECT COUNT(*) FROM audit_records) AS records, (SELECT COUNT(*) FROM audit_log) "
                           "AS entries, (SELECT COALESCE(MAX(size), 0) FROM audit_seals) AS sealed")[0]
    return bool(row["records"] == row["entries"] == row["sealed"] > 0)


def sealed(gw: Gateway, postgres: str) -> dict[str, Any]:
    """`audit verify` once the sealer has covered every record (it seals every second here)."""
    wait_until(lambda: all_sealed(postgres), "the shared trail to be sealed to its end", timeout=20, every=0.2)
    code, verdict = verify(gw)
    assert code == 0, verdict
    return verdict


def test_one_trail_for_both_replicas_verifies_and_names_a_forged_or_reordered_row(service: dict[str, Any]) -> None:
    a, b, postgres = service["a"], service["b"], service["postgres"]
    client = new_client(a, "Eve")
    known(client, b)
    note(b, client, "through the second")
    ids = [gw.get(f"/clients/{client}", gw.as_user("alice", "counsellor")).headers["x-request-id"]
           for gw in (a, b, a, b)]
    verdict = sealed(a, postgres)
    replicas = {r["replica"] for r in pg_sql(postgres, "SELECT DISTINCT replica FROM audit_records")}
    assert len([r for r in replicas if not r.startswith("cli@")]) == 2, replicas
    total = pg_sql(postgres, "SELECT COUNT(*) AS n FROM audit_records")[0]["n"]
    assert verdict["ok"] and verdict["records"] == total and verdict["verified"] == total and verdict["checkpoints"]
    found = fieldguard(a.config, "audit", "query", "--client", str(client), "--format", "json")
    assert found.returncode == 0, found.stderr
    assert set(ids) <= {r["request_id"] for r in json.loads(found.stdout)}  # both replicas' records, one query

    exported = service["dir"] / "trail.jsonl"
    assert fieldguard(a.config, "audit", "export", "--output", str(exported)).returncode == 0
    code, offline = verify(a, "--export", str(exported))
    assert code == 0 and offline["ok"] and offline["records"] >= total

    # a superuser edits one of the second replica's records after it was sealed
    second = next(r for r in replicas if r.endswith(b.url.rsplit(":", 1)[1]))
    seq = pg_sql(postgres, "SELECT seq FROM audit_records WHERE replica = $1 AND "
                           "position('\"outcome\":\"allowed\"' in convert_from(body, 'UTF8')) > 0 "
                           "ORDER BY seq LIMIT 1", second)[0]["seq"]
    pg_sql(postgres, "ALTER TABLE audit_records DISABLE TRIGGER USER")
    pg_sql(postgres, "UPDATE audit_records SET body = convert_to(replace(convert_from(body, 'UTF8'), "
                     "'\"outcome\":\"allowed\"', '\"outcome\":\"denied\"'), 'UTF8') "
                     "WHERE replica = $1 AND seq = $2", second, seq)
    code, verdict = verify(a)
    assert code == 1 and not verdict["ok"]
    assert any(f"replica {second} record {seq}: its content does not match its hash" in p
               for p in verdict["problems"]), verdict
    code, offline = verify(a, "--export", str(exported))  # the export taken before still verifies
    assert code == 0


def test_a_reordered_sealed_log_is_named(service: dict[str, Any]) -> None:
    a, b, postgres = service["a"], service["b"], service["postgres"]
    client = new_client(a, "Fay")
    known(client, b)
    for gw in (a, b, a, b):
        gw.get(f"/clients/{client}", gw.as_user("alice", "counsellor"))
    sealed(a, postgres)
    pg_sql(postgres, "ALTER TABLE audit_log DISABLE TRIGGER USER")
    pg_sql(postgres, "UPDATE audit_log SET idx = -idx WHERE idx IN (2, 3)")
    pg_sql(postgres, "UPDATE audit_log SET idx = 5 - (-idx) WHERE idx IN (-2, -3)")  # 2 <-> 3
    code, verdict = verify(a)
    assert code == 1
    assert verdict["problems"][0].startswith("sealed log: record 2: its content says it is record 3"), verdict


def test_a_replica_killed_under_load_loses_no_record_of_a_delivered_response(service: dict[str, Any]) -> None:
    import signal
    import threading

    a, b, postgres = service["a"], service["b"], service["postgres"]
    client = new_client(a, "Gus")
    known(client, b)
    token = b.as_user("alice", "counsellor")
    delivered: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                r = b.get(f"/clients/{client}", token)
            except Exception:
                return  # the replica is gone
            if r.status_code == 200:
                delivered.append(r.headers["x-request-id"])

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    wait_until(lambda: len(delivered) >= 40, "load on the second replica", timeout=30)
    assert b.service.proc is not None
    b.service.proc.send_signal(signal.SIGKILL)
    b.service.proc.wait(timeout=10)
    stop.set()
    for w in workers:
        w.join(timeout=30)
    bodies = {r["body"] for r in pg_sql(postgres, "SELECT convert_from(body, 'UTF8') AS body FROM audit_records")}
    recorded = {json.loads(body)["request_id"] for body in bodies}
    missing = [rid for rid in delivered if rid not in recorded]
    assert not missing, f"{len(missing)} of {len(delivered)} delivered responses have no record"
    verdict = sealed(a, postgres)  # the surviving replica seals what the killed one committed
    assert verdict["ok"] and verdict["records"] >= len(delivered)


def test_a_keystore_file_moves_to_the_database_and_what_it_sealed_opens_there(postgres: str, signing: Signing,
                                                                              tmp_path: Path) -> None:
    crm, url, _ = crm_process(tmp_path / "crm", seed=False)
    keys = make_keys(tmp_path / "keys")
    policies = policies_copy(tmp_path)
    alone = start_gateway(tmp_path / "alone", url, signing, keys, policies=policies)  # one gateway, its file
    try:
        client = new_client(alone, "Kit")
        written = note(alone, client, "sealed under the file's key")
    finally:
        alone.service.stop()
    shared = gateway_on(postgres, tmp_path / "shared", url, signing, keys, policies=policies, start=False)
    assert fieldguard(shared.config, "db", "upgrade").returncode == 0
    env = {"FIELDGUARD_KEYS_STORE": ""}  # the file's config, pointed at the database only by --url
    dry = fieldguard(alone.config, "db", "import-keystore", "--url", postgres, "--dry-run", env=env)
    assert dry.returncode == 0 and "would copy 1 data keys, 1 pseudonyms" in dry.stdout, dry.stdout + dry.stderr
    assert pg_sql(postgres, "SELECT COUNT(*) AS n FROM data_keys")[0]["n"] == 0
    moved = fieldguard(alone.config, "db", "import-keystore", "--url", postgres, env=env)
    assert moved.returncode == 0 and "copied 1 data keys" in moved.stdout, moved.stderr
    again = fieldguard(alone.config, "db", "import-keystore", "--url", postgres, env=env)
    assert again.returncode != 0 and "not empty" in again.stderr and "nothing was imported" in again.stderr
    shared.service.start()
    try:
        wait_until(lambda: shown(shared, written) == "sealed under the file's key", "the note to open", timeout=10)
        pseudonym = pg_sql(postgres, "SELECT pseudonym FROM client_pseudonyms WHERE client_id = $1", str(client))
        assert pseudonym and pseudonym[0]["pseudonym"].startswith("P-")
    finally:
        shared.service.stop()
        crm.stop()


def test_a_replica_whose_trail_database_is_lost_withholds_and_recovers(postgres: str, signing: Signing,
                                                                       tmp_path: Path) -> None:
    crm, url, _ = crm_process(tmp_path / "crm", seed=False)
    keys = make_keys(tmp_path / "keys")
    gw = gateway_on(postgres, tmp_path / "gw", url, signing, keys, poll=1.0, start=False)  # keys and trail shared
    assert fieldguard(gw.config, "db", "upgrade").returncode == 0
    gw.service.start()
    name = postgres.rsplit("/", 1)[1]
    admin = postgres.rsplit("/", 1)[0] + "/test"
    try:
        client = new_client(gw, "Lu")
        alice = gw.as_user("alice", "counsellor")
        wait_until(lambda: gw.get(f"/clients/{client}", alice).status_code == 200, "the client to be known")
        pg_sql(admin, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        pg_sql(admin, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        try:
            r = wait_until(lambda: (x if (x := gw.get(f"/clients/{client}", alice)).status_code == 503 else None),
                           "the replica to withhold", timeout=15)
            assert r.json()["error"] in ("audit trail unavailable; nothing was released",
                                         "keystore unavailable; nothing was released"), r.text
            assert "Lu" not in r.text
            siem = gw.audit_for(r.headers["x-request-id"])  # the SIEM copy says what was withheld, and why
            assert siem["status"] == 503 and siem["reason"].startswith(("withheld: audit", "keystore unavailable"))
            ready = gw.readyz()
            assert not ready["ready"] and not ready["checks"]["audit"]["ok"]
        finally:
            pg_sql(admin, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        wait_until(lambda: gw.get(f"/clients/{client}", alice).status_code == 200, "recovery", timeout=20)
        code, verdict = 1, {}
        deadline = time.monotonic() + 20
        while code and time.monotonic() < deadline:
            code, verdict = verify(gw)
        assert code == 0 and verdict["ok"], verdict  # nothing half-written: the chain goes on where it was
    finally:
        gw.service.stop()
        crm.stop()


def test_two_sealers_after_a_split_cannot_fork_the_sealed_log(postgres: str, tmp_path: Path) -> None:
    """A sealer that believes it leads without holding the lock (a split) and the real leader step together:
    it finds the lock is not its own and steps down; had it written, the log's entries are keyed by index
    and a checkpoint only goes on the last, so it could not have forked the log either. The log verifies."""
    import asyncio

    from proxy.audit import AuditRecord, CheckpointSigner, load_public, public_path
    from proxy.audit.pgtrail import PgTrail, Sealer
    from proxy.audit.pgverify import read_shared, verify_shared
    from proxy.audit.siem import JsonLinesTrail
    from proxy.postgres import upgrade

    keys = make_keys(tmp_path / "keys")
    signer = CheckpointSigner(keys / "audit-signing.pem")

    async def scenario() -> tuple[list[int], bool]:
        import asyncpg

        await upgrade(postgres)
        trail = PgTrail(postgres, "r1", signer, siem=JsonLinesTrail(str(tmp_path / "siem.jsonl")))
        await trail.open()
        for i in range(20):
            await trail.append(AuditRecord(request_id=f"r{i}", method="GET", route="/x", outcome="allowed"))
        old, new = Sealer(postgres, signer, "svc", 1, 0.0), Sealer(postgres, signer, "svc", 1, 0.0)
        assert await old.step() == 20  # the leader integrates and seals
        for i in range(20, 30):
            await trail.append(AuditRecord(request_id=f"r{i}", method="GET", route="/x", outcome="allowed"))
        new._conn = await asyncpg.connect(postgres)
        new.leader = True  # as if the old one's lock had gone with its connection, and it had not noticed
        results = await asyncio.gather(old.step(), new.step())
        both = old.leader and new.leader
        await old.close()
        await new.close()
        await trail.close()
        return list(results), both

    results, both_still_lead = asyncio.run(scenario())
    assert sorted(results) == [0, 10], results  # one integrated the ten new records ...
    assert not both_still_lead  # ... and the other, refused by the log's keys, stepped down
    verdict = verify_shared(read_shared(postgres), load_public(public_path(keys / "audit-signing.pem")))
    assert verdict.ok and verdict.records == 30, verdict.problems

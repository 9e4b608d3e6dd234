"""The project's PostgreSQL schema, as numbered migrations applied by `fieldguard db upgrade`.

A migration is never edited once released: a change is a new one. Gateways and commands check the
database's version at start and refuse one older (run the upgrade) or newer (upgrade FieldGuard) than
they were written for, so two versions never write one schema differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from proxy.postgres.database import DatabaseError, connect, redact

_LOCK = 0x46475343  # 'FGSC': one upgrade at a time, whichever host runs it


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "keystore: data keys, pseudonyms, revocations, tombstones, KEK retirement; replica status", """
CREATE TABLE data_keys (
    key_id bytea PRIMARY KEY,
    client_id text,
    scope text NOT NULL,
    version integer NOT NULL,
    status text NOT NULL CHECK (status IN ('active', 'decrypt_only', 'destroyed')),
    wrapped bytea,
    kek_id text,
    created_at double precision NOT NULL,
    linked_at double precision,
    retired_at double precision,
    destroyed_at double precision,
    destroy_reason text
);
CREATE INDEX data_keys_client ON data_keys (client_id, scope, status);
CREATE INDEX data_keys_kek ON data_keys (kek_id);
CREATE UNIQUE INDEX data_keys_version ON data_keys (client_id, scope, version);
CREATE UNIQUE INDEX data_keys_one_active ON data_keys (client_id, scope)
    WHERE status = 'active' AND client_id IS NOT NULL;
CREATE TABLE client_pseudonyms (
    client_id text PRIMARY KEY,
    pseudonym text NOT NULL UNIQUE,
    created_at double precision NOT NULL
);
CREATE TABLE revocations (
    seq bigserial PRIMARY KEY,
    key_id bytea,
    client_id text,
    at double precision NOT NULL
);
CREATE TABLE tombstones (
    client_id text PRIMARY KEY,
    at double precision NOT NULL,
    reason text NOT NULL
);
CREATE TABLE retired_keks (
    kek_id text PRIMARY KEY,
    at double precision NOT NULL
);
CREATE TABLE gateways (
    instance text PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    kek_id text,
    started_at double precision NOT NULL,
    seen_at double precision NOT NULL
);
CREATE TABLE replicas (
    instance text PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    started_at double precision NOT NULL,
    seen_at double precision NOT NULL,
    status jsonb NOT NULL
);
"""),
    Migration(2, "policy: published, versioned bundles", """
CREATE TABLE policy_versions (
    version serial PRIMARY KEY,
    digest text NOT NULL,
    files jsonb NOT NULL,
    published_by text NOT NULL,
    published_at double precision NOT NULL,
    note text NOT NULL DEFAULT ''
);
"""),
    Migration(3, "audit: each replica's hash chain, the sealed log merging them, its signed checkpoints", """
CREATE TABLE audit_records (
    replica text NOT NULL,
    seq bigint NOT NULL,
    recorded_at double precision NOT NULL,
    body bytea NOT NULL,
    leaf bytea NOT NULL,
    link bytea NOT NULL,
    PRIMARY KEY (replica, seq)
);
CREATE TABLE audit_log (
    idx bigint PRIMARY KEY,
    replica text NOT NULL,
    rseq bigint NOT NULL,
    body bytea NOT NULL,
    leaf bytea NOT NULL,
    link bytea NOT NULL,
    UNIQUE (replica, rseq)
);
CREATE TABLE audit_replicas (
    replica text PRIMARY KEY,
    sealed bigint NOT NULL DEFAULT 0,
    first_seen double precision NOT NULL
);
CREATE TABLE audit_seals (
    size bigint PRIMARY KEY,
    head bytea NOT NULL,
    origin text NOT NULL,
    time text NOT NULL,
    key_id text NOT NULL,
    signature bytea NOT NULL
);
CREATE FUNCTION fieldguard_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the audit trail is append-only'; END $$;
CREATE TRIGGER audit_records_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_records
    FOR EACH STATEMENT EXECUTE FUNCTION fieldguard_append_only();
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION fieldguard_append_only();
CREATE TRIGGER audit_seals_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_seals
    FOR EACH STATEMENT EXECUTE FUNCTION fieldguard_append_only();
"""),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


class SchemaMismatch(DatabaseError):
    """The database's schema is not the one this FieldGuard was written for."""


async def _version(conn: Any) -> int:
    exists = await conn.fetchval("SELECT to_regclass('fieldguard_schema') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM fieldguard_schema"))


async def schema_version(url: str) -> int:
    conn = await connect(url)
    try:
        return await _version(conn)
    finally:
        await conn.close()


async def check_schema(conn_or_pool: Any, url: str) -> int:
    """The database's schema version, when it is this FieldGuard's; `SchemaMismatch` otherwise."""
    found = await _version(conn_or_pool)
    if found < SCHEMA_VERSION:
        raise SchemaMismatch(f"the database {redact(url)} is at schema version {found}, this FieldGuard needs "
                             f"{SCHEMA_VERSION}: run `fieldguard db upgrade`")
    if found > SCHEMA_VERSION:
        raise SchemaMismatch(f"the database {redact(url)} is at schema version {found}, newer than this "
                             f"FieldGuard's {SCHEMA_VERSION}: upgrade FieldGuard")
    return found


async def upgrade(url: str, dry_run: bool = False) -> tuple[int, list[Migration]]:
    """Apply the migrations the database lacks, each in its own transaction, under an advisory lock so two
    upgrades never race. Returns the version found and the migrations applied (or, dry run, to apply)."""
    conn = await connect(url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK)
        try:
            await conn.execute("CREATE TABLE IF NOT EXISTS fieldguard_schema (version integer PRIMARY KEY, "
                               "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            found = await _version(conn)
            if found > SCHEMA_VERSION:
                raise SchemaMismatch(f"the database {redact(url)} is at schema version {found}, newer than this "
                                     f"FieldGuard's {SCHEMA_VERSION}: upgrade FieldGuard")
            todo = [m for m in MIGRATIONS if m.version > found]
            if not dry_run:
                for migration in todo:
                    async with conn.transaction():
                        await conn.execute(migration.sql)
                        await conn.execute("INSERT INTO fieldguard_schema (version, description) VALUES ($1, $2)",
                                           migration.version, migration.description)
            return found, todo
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK)
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"{redact(url)}: {type(exc).__name__}: {exc}"[:300]) from None
    finally:
        await conn.close()

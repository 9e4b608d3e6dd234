"""PostgreSQL, the shared backend for deployments beyond one process: connections (a pool without session
state for reads, dedicated connections for the listener and writers), the project's versioned schema
(`fieldguard db upgrade`), change announcements (LISTEN/NOTIFY, sent after commit) and the replicas'
status rows. The stores themselves live with their lifecycles (`proxy.keys.pgstore`, ...)."""

from proxy.postgres.database import Database, DatabaseError, blocking, connect, is_postgres, redact
from proxy.postgres.notify import CHANNEL, Listener, announce
from proxy.postgres.schema import SCHEMA_VERSION, SchemaMismatch, check_schema, schema_version, upgrade

__all__ = [
    "CHANNEL", "SCHEMA_VERSION", "Database", "DatabaseError", "Listener", "SchemaMismatch", "announce", "blocking",
    "check_schema", "connect", "is_postgres", "redact", "schema_version", "upgrade",
]

"""`init-db`: create the database if needed and apply `sql/*.sql` idempotently."""

from pathlib import Path

import psycopg
from psycopg import sql

from orders_pipeline.connections import pg_connect
from orders_pipeline.postgres_patterns.views import rebuild_rollups
from orders_pipeline.settings import PostgresSettings

SQL_DIR = Path(__file__).resolve().parents[1] / "sql"
_SCHEMA_LOCK = "orders_pipeline.schema"
CORE_TABLES = ("products", "currencies", "zip_codes", "orders_staging", "orders",
               "orders_rejected", "ingest_batches", "promotions")


class SchemaMissing(RuntimeError):
    """The pipeline tables do not exist yet; run `orders-pipeline init-db`."""


def ensure_database(settings: PostgresSettings) -> bool:
    """Create the configured database if it does not exist; True if it was created."""
    admin = PostgresSettings(**{**settings.__dict__, "dbname": "postgres"})
    with pg_connect(admin) as conn:
        conn.autocommit = True
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                              (settings.dbname,)).fetchone()
        if exists:
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(settings.dbname)))
        return True


def sql_files() -> list[Path]:
    return sorted(SQL_DIR.glob("*.sql"))


def apply_schema(conn: psycopg.Connection) -> list[str]:
    """Apply every file in `sql/` in order, in one transaction; returns the files applied.

    Then fills the view rollups from existing orders if they are new (and so empty).
    """
    applied = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_SCHEMA_LOCK,))
        for path in sql_files():
            conn.execute(path.read_text())
            applied.append(path.name)
    rebuild_rollups(conn, only_if_empty=True)
    return applied


def missing_tables(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NULL", (list(CORE_TABLES),)
    ).fetchall()
    conn.rollback()
    return [r[0] for r in rows]


def require_schema(conn: psycopg.Connection) -> None:
    missing = missing_tables(conn)
    if missing:
        raise SchemaMissing(
            f"tables missing: {', '.join(missing)} (run `orders-pipeline init-db`)")

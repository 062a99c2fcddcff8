"""`init-db`: create the database if needed and apply the packaged DDL idempotently.

The DDL ships inside the package (`orders_pipeline/sql/*.sql`, package data) and is read with
`importlib.resources`, so an editable install, a wheel and a zipped install all find it
wherever the process runs from.
"""

from importlib.resources import files
from importlib.resources.abc import Traversable

import psycopg
from psycopg import sql

from orders_pipeline.connections import pg_connect
from orders_pipeline.postgres_patterns.views import rebuild_rollups
from orders_pipeline.settings import PostgresSettings

_SCHEMA_LOCK = "orders_pipeline.schema"
CORE_TABLES = ("products", "currencies", "zip_codes", "orders_staging", "orders",
               "orders_rejected", "ingest_batches", "promotions", "quarantined_payloads",
               "redrives", "redrive_batches", "redriven_rows", "lookup_source_versions",
               "lookup_source_changes", "promoted_outbox", "raw_batches", "replays",
               "replay_batches", "reprocessed_orders")


class SchemaFilesMissing(RuntimeError):
    """The install carries no DDL to apply (no `*.sql` in the package's `sql/` resources)."""


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


def ddl_dir() -> Traversable:
    """The package's `sql/` resource directory (a path, or a zip entry for a zipped install)."""
    return files("orders_pipeline") / "sql"


def sql_files(root: Traversable | None = None) -> list[Traversable]:
    """The `*.sql` files directly in `root` (default `ddl_dir()`), in file-name order.

    Raises SchemaFilesMissing (one line: what is wrong and the fix) if there is none, also
    when `root` does not exist.
    """
    where = ddl_dir() if root is None else root
    found = (sorted((entry for entry in where.iterdir()
                     if entry.name.endswith(".sql") and entry.is_file()),
                    key=lambda entry: entry.name)
             if where.is_dir() else [])
    if not found:
        raise SchemaFilesMissing(
            f"no *.sql files to apply in {where}: this install of orders_pipeline lacks its "
            "DDL; reinstall it from a wheel or source tree that ships orders_pipeline/sql")
    return found


def apply_schema(conn: psycopg.Connection) -> list[str]:
    """Apply every packaged `*.sql` file (`sql_files()`) in file-name order.

    All files run in one transaction under an advisory lock, then the view rollups are filled
    from existing orders if they are new (and so empty). Returns the file names applied.
    Raises SchemaFilesMissing, before touching the database, if there is nothing to apply.
    """
    ddl = sql_files()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_SCHEMA_LOCK,))
        for entry in ddl:
            conn.execute(entry.read_text(encoding="utf-8"))
    rebuild_rollups(conn, only_if_empty=True)
    return [entry.name for entry in ddl]


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

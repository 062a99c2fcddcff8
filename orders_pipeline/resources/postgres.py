"""The Postgres resource: direct connections for Dagster-side work, PgBouncer for workers."""

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from orders_pipeline.connections import pg_pool
from orders_pipeline.resources.declared import declared_fields, settings_of
from orders_pipeline.settings import PostgresSettings


class PostgresResource(declared_fields(PostgresSettings)):  # type: ignore[misc]
    """Postgres holding staging, `orders`, rejects and the dashboard views.

    Fields: those of `PostgresSettings` (POSTGRES_*, PGBOUNCER_*, USE_PGBOUNCER). Staging
    workers go through PgBouncer (transaction pooling) when `use_pgbouncer` is on; promotion
    and view refreshes use the same pool, which works in transaction mode because every
    statement runs inside one transaction and locks are transaction-scoped.
    """

    def settings(self) -> PostgresSettings:
        """The plain settings (ConfigError naming the variable if a value is out of range)."""
        return settings_of(self, PostgresSettings)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection (through PgBouncer when enabled)."""
        with pg_pool(self.settings()).connection() as conn:
            yield conn

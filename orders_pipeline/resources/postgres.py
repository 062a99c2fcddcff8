"""The Postgres resource: direct connections for Dagster-side work, PgBouncer for workers."""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg
from pydantic import Field

from orders_pipeline.connections import pg_pool
from orders_pipeline.settings import PostgresSettings


class PostgresResource(dg.ConfigurableResource):
    """Postgres holding staging, `orders`, rejects and the dashboard views.

    Staging workers go through PgBouncer (transaction pooling) when `use_pgbouncer` is on;
    promotion and view refreshes use the same pool, which works in transaction mode because
    every statement runs inside one transaction and locks are transaction-scoped.
    """

    host: str = Field(default="127.0.0.1", description="POSTGRES_HOST")
    port: int = Field(default=5432, description="POSTGRES_PORT")
    user: str = Field(default="postgres", description="POSTGRES_USER")
    # repr=False: a resolved resource (inside a run) must not print its secret.
    password: str | None = Field(default=None, description="POSTGRES_PASSWORD", repr=False)
    dbname: str = Field(default="orders", description="POSTGRES_DB")
    pgbouncer_host: str = Field(default="127.0.0.1", description="PGBOUNCER_HOST")
    pgbouncer_port: int = Field(default=6432, description="PGBOUNCER_PORT")
    use_pgbouncer: bool = Field(default=False, description="USE_PGBOUNCER")
    sslmode: str = Field(default="prefer", description="POSTGRES_SSLMODE (libpq sslmode)")
    sslrootcert: str | None = Field(default=None,
                                    description="POSTGRES_SSLROOTCERT (CA for verify-*)")

    def settings(self) -> PostgresSettings:
        return PostgresSettings(
            host=self.host, port=self.port, user=self.user, password=self.password,
            dbname=self.dbname, pgbouncer_host=self.pgbouncer_host,
            pgbouncer_port=self.pgbouncer_port, use_pgbouncer=self.use_pgbouncer,
            sslmode=self.sslmode, sslrootcert=self.sslrootcert)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection (through PgBouncer when enabled)."""
        with pg_pool(self.settings()).connection() as conn:
            yield conn

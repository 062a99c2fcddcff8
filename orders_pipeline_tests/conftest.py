"""Fixtures: every test gets its own Postgres database and its own Redis key prefix.

Workers reach Postgres through PgBouncer (transaction pooling) when it is running, as in
production; set ORDERS_TEST_REQUIRE_PGBOUNCER=1 (CI does) to fail instead of falling back.
"""

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis
from psycopg import sql

from orders_pipeline.connections import close_all, pg_connect, redis_client
from orders_pipeline.postgres_patterns.schema import apply_schema, ensure_database
from orders_pipeline.redis_patterns.keys import RedisKeys, glob_escape, unlink_matching
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.settings import PipelineSettings, PostgresSettings, RedisSettings, Settings
from orders_pipeline_tests.servers import listening

# `redis_servers` (throwaway redis-servers), and the `dagit` fixture (a real `dagster dev`),
# shared by the webserver and browser tests.
pytest_plugins = ["orders_pipeline_tests.servers", "orders_pipeline_tests.dagit"]


def base_postgres() -> PostgresSettings:
    env = PostgresSettings.from_env()
    bouncer = listening(env.pgbouncer_port, env.pgbouncer_host)
    if not bouncer and os.environ.get("ORDERS_TEST_REQUIRE_PGBOUNCER") == "1":
        raise RuntimeError(f"PgBouncer is not listening on {env.pgbouncer_host}:"
                           f"{env.pgbouncer_port}")
    return PostgresSettings(**{**env.__dict__, "use_pgbouncer": bouncer})


def drop_database(settings: PostgresSettings) -> None:
    admin = PostgresSettings(**{**settings.__dict__, "dbname": "postgres"})
    with pg_connect(admin) as conn:
        conn.autocommit = True
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                     .format(sql.Identifier(settings.dbname)))


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    unlink_matching(client, f"{glob_escape(prefix)}:*")


@pytest.fixture
def test_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings(test_id: str) -> Iterator[Settings]:
    """Settings for a fresh database (schema + seed applied) and a fresh key prefix."""
    postgres = PostgresSettings(**{**base_postgres().__dict__, "dbname": f"op_test_{test_id}"})
    redis_settings = RedisSettings(**{**RedisSettings.from_env().__dict__,
                                      "key_prefix": f"optest:{test_id}"})
    pipeline = PipelineSettings(batch_size=1000, worker_count=2, dedup_window_seconds=3600,
                                max_queue_depth=1_000_000, lookup_ttl_seconds=3600,
                                claim_timeout_seconds=30)
    s = Settings(redis=redis_settings, postgres=postgres, pipeline=pipeline)
    ensure_database(postgres)
    with pg_connect(postgres) as conn:
        apply_schema(conn)
    try:
        yield s
    finally:
        client = redis_client(redis_settings)
        delete_prefix(client, redis_settings.key_prefix)
        close_all()
        drop_database(postgres)


@pytest.fixture
def keys(settings: Settings) -> RedisKeys:
    return RedisKeys.of(settings.redis)


@pytest.fixture
def rconn(settings: Settings) -> redis.Redis:
    return redis_client(settings.redis)


@pytest.fixture
def pg(settings: Settings) -> Iterator[psycopg.Connection]:
    """A direct connection to the test database (autocommit, for assertions)."""
    with pg_connect(settings.postgres) as conn:
        conn.autocommit = True
        yield conn


@pytest.fixture
def loaded_cache(settings: Settings, rconn: redis.Redis, keys: RedisKeys,
                 pg: psycopg.Connection) -> LookupCache:
    cache = LookupCache(rconn, keys, settings.pipeline.lookup_ttl_seconds)
    with pg_connect(settings.postgres) as conn:
        cache.load_snapshot(conn)
    return cache

"""Scratch databases and key prefixes of the benchmark's own, removed again afterwards."""

import uuid
from dataclasses import replace

from psycopg import sql

from orders_pipeline.connections import close_all, pg_connect, redis_client
from orders_pipeline.redis_patterns.keys import glob_escape, unlink_matching
from orders_pipeline.settings import PostgresSettings, RedisSettings, Settings


def bench_settings(settings: Settings) -> Settings:
    """The configured servers with a database and a key prefix of the benchmark's own."""
    token = uuid.uuid4().hex[:10]
    return replace(settings,
                   postgres=replace(settings.postgres, dbname=f"orders_bench_{token}"),
                   redis=replace(settings.redis, key_prefix=f"bench:{token}"))


def drop_database(postgres: PostgresSettings) -> None:
    """Drop `postgres.dbname` (and the connections to it: this process's pools first)."""
    close_all()
    with pg_connect(replace(postgres, dbname="postgres")) as conn:
        conn.autocommit = True
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                     .format(sql.Identifier(postgres.dbname)))


def remove_scratch(bench: Settings) -> None:
    """Remove the scratch key prefix and database of `bench` (`bench_settings`): this
    process's pools closed first (they hold connections to the database), the database
    dropped even if deleting the keys failed."""
    close_all()
    try:
        delete_keys(bench.redis)
    finally:
        drop_database(bench.postgres)


def delete_keys(redis_settings: RedisSettings) -> int:
    """Delete every key under the prefix of `redis_settings`; returns how many went."""
    return unlink_matching(redis_client(redis_settings),
                           f"{glob_escape(redis_settings.key_prefix)}:*")

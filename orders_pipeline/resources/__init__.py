"""Dagster resources for Redis and Postgres, configured from environment variables."""

import os
from typing import Any

import dagster as dg

from orders_pipeline.resources.postgres import PostgresResource
from orders_pipeline.resources.redis import RedisResource
from orders_pipeline.settings import PipelineSettings, PostgresSettings, RedisSettings, Settings

__all__ = ["PostgresResource", "RedisResource", "pipeline_settings", "resources_from_env"]


def _env(name: str, default: Any) -> Any:
    """`EnvVar(name)` when the variable is set (secrets stay out of the UI), else the default."""
    if os.environ.get(name, "") == "":
        return default
    return dg.EnvVar.int(name) if isinstance(default, int) else dg.EnvVar(name)


def resources_from_env() -> dict[str, dg.ConfigurableResource]:
    """Resources whose set variables stay `EnvVar`s: the UI shows names, never secrets."""
    redis_defaults = RedisSettings()
    pipeline_defaults = PipelineSettings()
    postgres_defaults = PostgresSettings()
    # Booleans have no EnvVar form; they are read when the code location loads.
    redis_env = RedisSettings.from_env()
    postgres_env = PostgresSettings.from_env()
    return {
        "redis": RedisResource(
            host=_env("REDIS_HOST", redis_defaults.host),
            port=_env("REDIS_PORT", redis_defaults.port),
            db=_env("REDIS_DB", redis_defaults.db),
            username=_env("REDIS_USERNAME", None),
            password=_env("REDIS_PASSWORD", None),
            ssl=redis_env.ssl,
            ssl_ca_certs=_env("REDIS_SSL_CA_CERTS", None),
            key_prefix=_env("REDIS_KEY_PREFIX", redis_defaults.key_prefix),
            dedup_window_seconds=_env("DEDUP_WINDOW_SECONDS",
                                      pipeline_defaults.dedup_window_seconds),
            max_queue_depth=_env("MAX_QUEUE_DEPTH", pipeline_defaults.max_queue_depth),
            lookup_ttl_seconds=_env("LOOKUP_TTL_SECONDS", pipeline_defaults.lookup_ttl_seconds),
            claim_timeout_seconds=_env("CLAIM_TIMEOUT_SECONDS",
                                       pipeline_defaults.claim_timeout_seconds),
        ),
        "postgres": PostgresResource(
            host=_env("POSTGRES_HOST", postgres_defaults.host),
            port=_env("POSTGRES_PORT", postgres_defaults.port),
            user=_env("POSTGRES_USER", postgres_defaults.user),
            password=_env("POSTGRES_PASSWORD", None),
            dbname=_env("POSTGRES_DB", postgres_defaults.dbname),
            pgbouncer_host=_env("PGBOUNCER_HOST", postgres_defaults.pgbouncer_host),
            pgbouncer_port=_env("PGBOUNCER_PORT", postgres_defaults.pgbouncer_port),
            use_pgbouncer=postgres_env.use_pgbouncer,
            sslmode=_env("POSTGRES_SSLMODE", postgres_defaults.sslmode),
            sslrootcert=_env("POSTGRES_SSLROOTCERT", None),
        ),
    }


def pipeline_settings(redis: RedisResource, postgres: PostgresResource, *,
                      batch_size: int | None = None, worker_count: int | None = None
                      ) -> Settings:
    """The plain `Settings` the pipeline modules (and worker processes) take."""
    env = PipelineSettings.from_env()
    return Settings(
        redis=redis.settings(),
        postgres=postgres.settings(),
        pipeline=PipelineSettings(
            batch_size=batch_size or env.batch_size,
            worker_count=worker_count or env.worker_count,
            dedup_window_seconds=redis.dedup_window_seconds,
            max_queue_depth=redis.max_queue_depth,
            lookup_ttl_seconds=redis.lookup_ttl_seconds,
            claim_timeout_seconds=redis.claim_timeout_seconds,
        ),
    )

"""Configuration from environment variables (and `.env`), with safe local defaults.

Plain frozen dataclasses so they pickle into worker processes; Dagster resources and the CLI
both build these, so there is one place that knows the variable names and defaults.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from dotenv import load_dotenv


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


def load_env_file(path: str = ".env") -> None:
    """Read `.env` if present; variables already set in the environment win."""
    if os.path.exists(path):
        load_dotenv(path, override=False)


def _get(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name)
    return default if value is None or value == "" else value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = _get(env, name, str(default))
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _get(env, name, "true" if default else "false").strip().lower()
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class RedisSettings:
    """Passwords never appear in `repr()`, so settings can be logged and shown safely."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False
    ssl_ca_certs: str | None = None
    key_prefix: str = "orders"

    def __post_init__(self) -> None:
        # A CA without TLS would silently send the password in clear text.
        if self.ssl_ca_certs and not self.ssl:
            raise ConfigError("REDIS_SSL_CA_CERTS is set but REDIS_SSL is false")
        if self.ssl_ca_certs and not os.path.isfile(self.ssl_ca_certs):
            raise ConfigError(f"REDIS_SSL_CA_CERTS: no such file {self.ssl_ca_certs!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "RedisSettings":
        return cls(
            host=_get(env, "REDIS_HOST", "127.0.0.1"),
            port=_int(env, "REDIS_PORT", 6379, 1),
            db=_int(env, "REDIS_DB", 0),
            username=env.get("REDIS_USERNAME") or None,
            password=env.get("REDIS_PASSWORD") or None,
            ssl=_bool(env, "REDIS_SSL", False),
            ssl_ca_certs=env.get("REDIS_SSL_CA_CERTS") or None,
            key_prefix=_get(env, "REDIS_KEY_PREFIX", "orders"),
        )


@dataclass(frozen=True)
class PostgresSettings:
    """`sslmode`/`sslrootcert` apply to Postgres and PgBouncer alike; no password in `repr()`."""

    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    password: str | None = field(default=None, repr=False)
    dbname: str = "orders"
    pgbouncer_host: str = "127.0.0.1"
    pgbouncer_port: int = 6432
    use_pgbouncer: bool = False
    sslmode: str = "prefer"
    sslrootcert: str | None = None

    def __post_init__(self) -> None:
        if self.sslmode not in SSL_MODES:
            raise ConfigError(f"POSTGRES_SSLMODE must be one of {', '.join(SSL_MODES)}, "
                              f"got {self.sslmode!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "PostgresSettings":
        return cls(
            host=_get(env, "POSTGRES_HOST", "127.0.0.1"),
            port=_int(env, "POSTGRES_PORT", 5432, 1),
            user=_get(env, "POSTGRES_USER", "postgres"),
            password=env.get("POSTGRES_PASSWORD") or None,
            dbname=_get(env, "POSTGRES_DB", "orders"),
            pgbouncer_host=_get(env, "PGBOUNCER_HOST", "127.0.0.1"),
            pgbouncer_port=_int(env, "PGBOUNCER_PORT", 6432, 1),
            use_pgbouncer=_bool(env, "USE_PGBOUNCER", False),
            sslmode=_get(env, "POSTGRES_SSLMODE", "prefer"),
            sslrootcert=env.get("POSTGRES_SSLROOTCERT") or None,
        )

    def conninfo(self, *, via_pgbouncer: bool | None = None) -> dict[str, object]:
        """Keyword arguments for psycopg; workers go through PgBouncer when it is enabled."""
        bouncer = self.use_pgbouncer if via_pgbouncer is None else via_pgbouncer
        params: dict[str, object] = {
            "host": self.pgbouncer_host if bouncer else self.host,
            "port": self.pgbouncer_port if bouncer else self.port,
            "user": self.user,
            "dbname": self.dbname,
            "application_name": "orders_pipeline",
            "connect_timeout": 10,
            "sslmode": self.sslmode,
        }
        if self.sslrootcert:
            params["sslrootcert"] = self.sslrootcert
        if self.password:
            params["password"] = self.password
        return params


@dataclass(frozen=True)
class PipelineSettings:
    batch_size: int = 5000
    worker_count: int = 2
    dedup_window_seconds: int = 3600
    max_queue_depth: int = 1_000_000
    lookup_ttl_seconds: int = 90_000
    claim_timeout_seconds: int = 60

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "PipelineSettings":
        return cls(
            batch_size=_int(env, "BATCH_SIZE", 5000, 1),
            worker_count=_int(env, "WORKER_COUNT", 2, 1),
            dedup_window_seconds=_int(env, "DEDUP_WINDOW_SECONDS", 3600, 1),
            max_queue_depth=_int(env, "MAX_QUEUE_DEPTH", 1_000_000, 1),
            lookup_ttl_seconds=_int(env, "LOOKUP_TTL_SECONDS", 90_000, 1),
            claim_timeout_seconds=_int(env, "CLAIM_TIMEOUT_SECONDS", 60, 1),
        )


@dataclass(frozen=True)
class Settings:
    redis: RedisSettings = field(default_factory=RedisSettings)
    postgres: PostgresSettings = field(default_factory=PostgresSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        return cls(
            redis=RedisSettings.from_env(env),
            postgres=PostgresSettings.from_env(env),
            pipeline=PipelineSettings.from_env(env),
        )

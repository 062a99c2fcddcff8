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


@dataclass(frozen=True)
class Bound:
    """The inclusive range of one integer setting.

    The constants below are the one place that fixes these ranges: environment variables
    (`*Settings.from_env` and `__post_init__`), the CLI flags and the Dagster config fields of
    `staged_orders` all check against them and word a refusal the same way.
    """

    minimum: int
    maximum: int

    def span(self) -> str:
        """The range in words, e.g. "1 to 64"."""
        return f"{self.minimum} to {self.maximum}"

    def refusal(self, name: str, value: object) -> str:
        """One line naming the setting, the value refused and the allowed range."""
        return f"{name} must be an integer from {self.span()}, got {value!r}"

    def check(self, name: str, value: int) -> int:
        """`value` if it is an int (not a bool) in range; else ConfigError(`refusal`)."""
        if isinstance(value, bool) or not isinstance(value, int) or not (
                self.minimum <= value <= self.maximum):
            raise ConfigError(self.refusal(name, value))
        return value


DAY_SECONDS = 86_400
# TCP ports of Postgres, PgBouncer and Redis.
PORT = Bound(1, 65_535)
# Redis logical database number: the server's `databases` setting is a C int.
REDIS_DB = Bound(0, 2**31 - 1)
# Staging worker processes per run or `process` call: each holds a Postgres (or PgBouncer)
# connection and a Redis connection, so more than 64 only crowds the servers.
WORKERS = Bound(1, 64)
# Orders per claimed (and per pushed) batch: a worker holds a whole batch in memory several
# times over (raw payloads, Polars frames, COPY buffer), so memory stays bounded by this.
BATCH_SIZE = Bound(1, 100_000)
# Batches a worker processes before it stops (`--iterations`, `max_batches_per_worker`).
BATCHES_PER_WORKER = Bound(1, 1_000_000)
DEDUP_WINDOW_SECONDS = Bound(1, 30 * DAY_SECONDS)
# Orders queued before producers wait; a Redis list holds at most 2**32 - 1 elements.
MAX_QUEUE_DEPTH = Bound(1, 1_000_000_000)
# A snapshot must outlive the time it takes to load and use it; the daily schedule reloads it.
LOOKUP_TTL_SECONDS = Bound(60, 30 * DAY_SECONDS)
CLAIM_TIMEOUT_SECONDS = Bound(1, DAY_SECONDS)
# Environment variable -> its bound; `PipelineSettings` has one field per variable, in lower case.
PIPELINE_BOUNDS = {
    "BATCH_SIZE": BATCH_SIZE,
    "WORKER_COUNT": WORKERS,
    "DEDUP_WINDOW_SECONDS": DEDUP_WINDOW_SECONDS,
    "MAX_QUEUE_DEPTH": MAX_QUEUE_DEPTH,
    "LOOKUP_TTL_SECONDS": LOOKUP_TTL_SECONDS,
    "CLAIM_TIMEOUT_SECONDS": CLAIM_TIMEOUT_SECONDS,
}


def _get(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name)
    return default if value is None or value == "" else value


def _int(env: Mapping[str, str], name: str, default: int, bound: Bound) -> int:
    """The integer in variable `name` (`default` when unset or empty), within `bound`.

    Raises ConfigError naming the variable, its value and the allowed range.
    """
    raw = _get(env, name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(bound.refusal(name, raw)) from None
    return bound.check(name, value)


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
        PORT.check("REDIS_PORT", self.port)
        REDIS_DB.check("REDIS_DB", self.db)
        # A CA without TLS would silently send the password in clear text.
        if self.ssl_ca_certs and not self.ssl:
            raise ConfigError("REDIS_SSL_CA_CERTS is set but REDIS_SSL is false")
        if self.ssl_ca_certs and not os.path.isfile(self.ssl_ca_certs):
            raise ConfigError(f"REDIS_SSL_CA_CERTS: no such file {self.ssl_ca_certs!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "RedisSettings":
        return cls(
            host=_get(env, "REDIS_HOST", "127.0.0.1"),
            port=_int(env, "REDIS_PORT", 6379, PORT),
            db=_int(env, "REDIS_DB", 0, REDIS_DB),
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
        PORT.check("POSTGRES_PORT", self.port)
        PORT.check("PGBOUNCER_PORT", self.pgbouncer_port)
        if self.sslmode not in SSL_MODES:
            raise ConfigError(f"POSTGRES_SSLMODE must be one of {', '.join(SSL_MODES)}, "
                              f"got {self.sslmode!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "PostgresSettings":
        return cls(
            host=_get(env, "POSTGRES_HOST", "127.0.0.1"),
            port=_int(env, "POSTGRES_PORT", 5432, PORT),
            user=_get(env, "POSTGRES_USER", "postgres"),
            password=env.get("POSTGRES_PASSWORD") or None,
            dbname=_get(env, "POSTGRES_DB", "orders"),
            pgbouncer_host=_get(env, "PGBOUNCER_HOST", "127.0.0.1"),
            pgbouncer_port=_int(env, "PGBOUNCER_PORT", 6432, PORT),
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
    """Tunables of the pipeline; each must lie in its `Bound` (ConfigError otherwise).

    Fields are named after their environment variables, which is how a refusal names them.
    """

    batch_size: int = 5000
    worker_count: int = 2
    dedup_window_seconds: int = 3600
    max_queue_depth: int = 1_000_000
    lookup_ttl_seconds: int = 90_000
    claim_timeout_seconds: int = 60

    def __post_init__(self) -> None:
        for name, bound in PIPELINE_BOUNDS.items():
            bound.check(name, getattr(self, name.lower()))

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "PipelineSettings":
        defaults = cls()
        return cls(**{name.lower(): _int(env, name, getattr(defaults, name.lower()), bound)
                      for name, bound in PIPELINE_BOUNDS.items()})


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

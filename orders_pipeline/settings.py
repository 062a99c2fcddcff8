"""Every setting of the pipeline, declared once, with its environment variable and range.

Each field of `RedisSettings`, `PostgresSettings` and `PipelineSettings` names its environment
variable, default, description and (for numbers) its inclusive range, and nothing else does:
`from_env` reads the environment from these declarations, the Dagster resources derive their
fields from them (`orders_pipeline.resources`), the CLI derives its flag ranges from them,
`to_env` renders them back for subprocesses, and a test checks that `.env.example` lists
exactly these variables with these defaults.

The classes are frozen pydantic dataclasses: validated on construction (also by
`dataclasses.replace`), hashable, and picklable into worker processes. A value that does not
fit raises `ConfigError`, one line naming the variable, the value and what is allowed.
Secrets are `SecretStr`: they never appear in `repr()`, logs or the Dagster UI.
"""

import contextlib
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types
from dotenv import load_dotenv
from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    StrictBool,
    StrictInt,
    ValidationError,
    model_validator,
)
from pydantic import dataclasses as pydantic_dataclasses
from pydantic.fields import FieldInfo


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


def load_env_file(path: str = ".env") -> None:
    """Read `.env` if present; variables already set in the environment win."""
    if os.path.exists(path):
        load_dotenv(path, override=False)


@dataclass(frozen=True)
class Bound:
    """The inclusive range of one integer setting or flag, and how a refusal is worded."""

    minimum: int
    maximum: int

    def span(self) -> str:
        """The range in words, e.g. "1 to 64"."""
        return f"{self.minimum} to {self.maximum}"

    def refusal(self, name: str, value: object) -> str:
        """One line naming the setting, the value refused and the allowed range."""
        return f"{name} must be an integer from {self.span()}, got {value!r}"


def _integer(value: object) -> object:
    """Text as an integer (`int()` rules: "5", " 5 ", "-5"; not "5.0", "1e3", "0x10")."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError("not an integer") from None
    return value


_FLAG_WORDS = {"1": True, "true": True, "yes": True, "on": True,
               "0": False, "false": False, "no": False, "off": False}


def _flag(value: object) -> object:
    """Text as a boolean: 1/true/yes/on or 0/false/no/off, any case."""
    if isinstance(value, str):
        try:
            return _FLAG_WORDS[value.strip().lower()]
        except KeyError:
            raise ValueError("not true or false") from None
    return value


# Integers and booleans are strict (a bool is not an integer, 5.0 is not an integer); text is
# converted first, because environment variables are text.
Integer = Annotated[StrictInt, BeforeValidator(_integer)]
Flag = Annotated[StrictBool, BeforeValidator(_flag)]

DAY_SECONDS = 86_400
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
SSL_MODES: tuple[str, ...] = get_args(SslMode)


def setting(default: Any, env: str, description: str, *, ge: int | None = None,
            le: int | None = None) -> Any:
    """Declare one setting: its default, environment variable, description and range."""
    return Field(default=default, description=description, ge=ge, le=le,
                 json_schema_extra={"env": env})


def _bound(info: FieldInfo) -> Bound | None:
    minimum = next((m.ge for m in info.metadata if isinstance(m, annotated_types.Ge)), None)
    maximum = next((m.le for m in info.metadata if isinstance(m, annotated_types.Le)), None)
    return None if minimum is None or maximum is None else Bound(minimum, maximum)


class Declared:
    """What the three settings classes share: their declarations, read from the environment."""

    __pydantic_fields__: dict[str, FieldInfo]

    @classmethod
    def declarations(cls) -> dict[str, FieldInfo]:
        """Field name -> its declaration (default, description, range, `env` name)."""
        return cls.__pydantic_fields__

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable of `field`, e.g. "REDIS_PORT" for `RedisSettings.port`."""
        extra = cls.__pydantic_fields__[field].json_schema_extra
        assert isinstance(extra, dict)
        return str(extra["env"])

    @classmethod
    def bound(cls, field: str) -> Bound:
        """The inclusive range of an integer setting (ValueError if it has none)."""
        bound = _bound(cls.__pydantic_fields__[field])
        if bound is None:
            raise ValueError(f"{cls.__name__}.{field} has no range")
        return bound

    @classmethod
    def build(cls, values: Mapping[str, object]) -> Any:
        """An instance from field values (missing ones take their default).

        Raises ConfigError naming the first offending variable, its value and what is allowed.
        """
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(cls._refusal(exc.errors()[0], values)) from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Any:
        """Read every declared variable from `env`; unset or empty means the default."""
        values = {name: env[cls.env_name(name)] for name in cls.__pydantic_fields__
                  if env.get(cls.env_name(name), "") != ""}
        return cls.build(values)

    def to_env(self) -> dict[str, str]:
        """The environment that `from_env` reads back as these settings (secrets included)."""
        env: dict[str, str] = {}
        for name in self.__pydantic_fields__:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[self.env_name(name)] = (
                "" if value is None else str(value).lower() if isinstance(value, bool)
                else str(value))
        return env

    @classmethod
    def _refusal(cls, error: Any, values: Mapping[str, object]) -> str:
        if not error["loc"]:  # a rule across fields (`_check`): its own words
            return str(error["ctx"]["error"])
        field = str(error["loc"][0])
        info = cls.__pydantic_fields__[field]
        name, value = cls.env_name(field), values.get(field, error["input"])
        if isinstance(value, str):
            with contextlib.suppress(ValueError):  # an out-of-range number shown as one
                value = int(value)
        bound = _bound(info)
        if bound is not None:
            return bound.refusal(name, value)
        choices = _choices(info.annotation)
        if choices:
            return f"{name} must be one of {', '.join(choices)}, got {value!r}"
        if "bool" in error["type"] or "true or false" in error["msg"]:
            return f"{name} must be true or false, got {value!r}"
        return f"{name}: {error['msg']}, got {value!r}"


def _choices(annotation: Any) -> tuple[str, ...]:
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return ()


_frozen = pydantic_dataclasses.dataclass(frozen=True)


def has_hash_tag(key: str) -> bool:
    """True if Redis Cluster hashes `key` by a tag: a `{` followed later by a `}` with at least
    one character between them (the cluster specification's rule for the first `{`)."""
    start = key.find("{")
    return start >= 0 and key.find("}", start + 1) > start + 1


def sentinel_addresses(text: str) -> list[tuple[str, int]]:
    """`host:port,host:port` as address pairs; ValueError naming the entry that is not one."""
    addresses = []
    for entry in (part.strip() for part in text.split(",")):
        host, _, port = entry.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65_535:
            raise ValueError(f"REDIS_SENTINEL_HOSTS entry {entry!r} is not host:port")
        addresses.append((host.strip("[]"), int(port)))
    return addresses


@_frozen
class RedisSettings(Declared):
    """Where Redis is and how to reach it; every key and channel starts with `key_prefix`."""

    host: str = setting("127.0.0.1", "REDIS_HOST", "Redis host")
    port: Integer = setting(6379, "REDIS_PORT", "Redis port", ge=1, le=65_535)
    # The server's `databases` setting is a C int.
    db: Integer = setting(0, "REDIS_DB", "Redis logical database number", ge=0, le=2**31 - 1)
    username: str | None = setting(
        None, "REDIS_USERNAME", "Redis ACL user (Redis 6+); empty: the default user. "
        "docker-compose creates this user and disables the default one when it is set")
    password: SecretStr | None = setting(
        None, "REDIS_PASSWORD",
        "Redis password: empty for a local Redis without auth; REQUIRED for docker-compose")
    ssl: Flag = setting(False, "REDIS_SSL", "true to connect to Redis over TLS (rediss://); "
                        "the server certificate and host name are always verified")
    ssl_ca_certs: str | None = setting(
        None, "REDIS_SSL_CA_CERTS", "CA bundle (PEM) that signed the Redis server certificate "
        "(needs REDIS_SSL=true); empty: the system CAs")
    key_prefix: str = setting(
        "orders", "REDIS_KEY_PREFIX", "Prefix of every Redis key and channel, e.g. "
        "orders:ingestion (lets deployments share a Redis)")

    cluster: Flag = setting(
        False, "REDIS_CLUSTER", "true: REDIS_HOST:REDIS_PORT is any node of a Redis Cluster "
        "(the client learns the others, follows MOVED/ASK and failovers); the key prefix "
        "must then hold a hash tag, e.g. {orders}")
    sentinel_hosts: str | None = setting(
        None, "REDIS_SENTINEL_HOSTS", "Comma-separated host:port of Redis Sentinels; when set, "
        "the master is asked of them by name (REDIS_SENTINEL_MASTER) and REDIS_HOST/REDIS_PORT "
        "are not used")
    sentinel_master: str = setting("mymaster", "REDIS_SENTINEL_MASTER",
                                   "Name of the master the Sentinels monitor")
    # One hash tag per shard: a cluster of M masters serves K shards, K a multiple of M
    # spreading them evenly. The queue list and the dedup window of one shard stay in one slot.
    shards: Integer = setting(
        1, "REDIS_SHARDS", "Shards of the queue and the dedup window (each under its own "
        "hash tag, so a Redis Cluster spreads them over its masters); 1: one queue", ge=1,
        le=256)

    @model_validator(mode="after")
    def _check(self) -> "RedisSettings":
        if self.cluster and self.sentinel_hosts:
            raise ValueError("REDIS_CLUSTER=true and REDIS_SENTINEL_HOSTS are both set: a "
                             "deployment uses one of them")
        if self.cluster and self.db != 0:
            raise ValueError(f"REDIS_DB is {self.db}, but a Redis Cluster has only database "
                             "0: unset REDIS_DB")
        if self.cluster and not has_hash_tag(self.key_prefix):
            raise ValueError(
                f"REDIS_KEY_PREFIX {self.key_prefix!r} has no hash tag, so its keys would "
                "fall in different cluster slots: use e.g. {"
                f"{self.key_prefix.strip('{}') or 'orders'}" "}")
        if self.sentinel_hosts:
            sentinel_addresses(self.sentinel_hosts)
        # A CA without TLS would silently send the password in clear text.
        if self.ssl_ca_certs and not self.ssl:
            raise ValueError("REDIS_SSL_CA_CERTS is set but REDIS_SSL is false")
        if self.ssl_ca_certs and not os.path.isfile(self.ssl_ca_certs):
            raise ValueError(f"REDIS_SSL_CA_CERTS: no such file {self.ssl_ca_certs!r}")
        return self


@_frozen
class PostgresSettings(Declared):
    """Postgres and PgBouncer; `sslmode`/`sslrootcert` apply to both."""

    host: str = setting("127.0.0.1", "POSTGRES_HOST", "Postgres host (docker-compose "
                        "overrides it with the service name inside the network)")
    port: Integer = setting(5432, "POSTGRES_PORT", "Postgres port", ge=1, le=65_535)
    user: str = setting("postgres", "POSTGRES_USER", "Postgres user")
    password: SecretStr | None = setting(
        None, "POSTGRES_PASSWORD", "Postgres password: empty works with local trust auth; "
        "REQUIRED for docker-compose (set a strong one)")
    dbname: str = setting("orders", "POSTGRES_DB",
                          "Postgres database holding products, orders, views")
    pgbouncer_host: str = setting("127.0.0.1", "PGBOUNCER_HOST",
                                  "PgBouncer host (transaction pool used by the workers)")
    pgbouncer_port: Integer = setting(6432, "PGBOUNCER_PORT", "PgBouncer port (docker-compose "
                                      "publishes it on 127.0.0.1:6432)", ge=1, le=65_535)
    use_pgbouncer: Flag = setting(False, "USE_PGBOUNCER", "true: workers connect through "
                                  "PgBouncer; false: straight to Postgres")
    sslmode: SslMode = setting(
        "prefer", "POSTGRES_SSLMODE", "libpq sslmode for Postgres AND PgBouncer: disable, "
        "allow, prefer (default), require, verify-ca, verify-full (TLS, CA chain and host "
        "name checked). Dagster's own storage reads PGSSLMODE instead")
    sslrootcert: str | None = setting(
        None, "POSTGRES_SSLROOTCERT", "CA certificate (PEM) that signed the server "
        "certificate, for verify-ca/verify-full; empty: libpq's default "
        "~/.postgresql/root.crt. Dagster's own storage reads PGSSLROOTCERT instead")

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
        if self.password is not None:
            params["password"] = self.password.get_secret_value()
        return params


@_frozen
class PipelineSettings(Declared):
    """Tunables of the pipeline (the Dagster `pipeline` resource shows the same fields)."""

    # A worker holds a whole batch in memory several times over (raw payloads, Polars frames,
    # COPY buffer), so memory stays bounded by this.
    batch_size: Integer = setting(5000, "BATCH_SIZE", "Orders claimed from the queue and "
                                  "written per batch", ge=1, le=100_000)
    # Each worker holds a Postgres (or PgBouncer) connection and a Redis connection, so more
    # than 64 only crowds the servers.
    worker_count: Integer = setting(2, "WORKER_COUNT", "Number of parallel worker processes "
                                    "draining the queue", ge=1, le=64)
    dedup_window_seconds: Integer = setting(
        3600, "DEDUP_WINDOW_SECONDS", "How long (seconds) an order_id is remembered for "
        "deduplication", ge=1, le=30 * DAY_SECONDS)
    # A Redis list holds at most 2**32 - 1 elements.
    max_queue_depth: Integer = setting(
        1_000_000, "MAX_QUEUE_DEPTH", "Queue depth at which producers slow down or wait "
        "(backpressure)", ge=1, le=1_000_000_000)
    # A snapshot must outlive the time it takes to load and use it.
    lookup_ttl_seconds: Integer = setting(
        90_000, "LOOKUP_TTL_SECONDS", "TTL (seconds) of the lookup snapshot cached in Redis "
        "(products, currencies, zip codes)", ge=60, le=30 * DAY_SECONDS)
    claim_timeout_seconds: Integer = setting(
        60, "CLAIM_TIMEOUT_SECONDS", "Seconds a silent worker keeps its in-flight batch before "
        "other workers may reclaim it", ge=1, le=DAY_SECONDS)
    # Kept in whole UTC days (one partition each), ten years at most.
    raw_retention_days: Integer = setting(
        30, "RAW_RETENTION_DAYS", "Days the raw payloads of every claimed batch are kept in "
        "Postgres (raw_batches) for replay; older days are dropped whole", ge=1, le=3650)


ExecutorName = Literal["in_process", "multiprocess", "celery"]
EXECUTORS: tuple[str, ...] = get_args(ExecutorName)


@_frozen
class DagsterSettings(Declared):
    """How the Dagster code location places its steps; read when `definitions` loads."""

    executor: ExecutorName = setting(
        "in_process", "DAGSTER_EXECUTOR", "Dagster executor of every job: in_process (one "
        "process per run, a laptop's default), multiprocess (one process per step), celery "
        "(steps go to Celery workers: `dagster-celery worker start -A "
        "dagster_celery.app`)")
    celery_broker: SecretStr | None = setting(
        None, "DAGSTER_CELERY_BROKER", "Celery broker URL for DAGSTER_EXECUTOR=celery, e.g. "
        "redis://:password@host:6379/1; empty: the pipeline's Redis, database 1")


SETTINGS_CLASSES: tuple[type[Declared], ...] = (PostgresSettings, RedisSettings,
                                                 PipelineSettings, DagsterSettings)


def env_bounds() -> dict[str, Bound]:
    """Environment variable -> inclusive range, for every integer setting."""
    return {cls.env_name(name): bound for cls in SETTINGS_CLASSES
            for name, info in cls.declarations().items() if (bound := _bound(info))}


# Flag and Dagster config ranges that are settings too, and one that is not.
WORKERS = PipelineSettings.bound("worker_count")
BATCH_SIZE = PipelineSettings.bound("batch_size")
# Batches a worker processes before it stops (`--iterations`, `max_batches_per_worker`).
BATCHES_PER_WORKER = Bound(1, 1_000_000)


@dataclass(frozen=True)
class Settings:
    """All settings of one deployment (plain frozen dataclass of the three groups)."""

    redis: RedisSettings = dataclasses.field(default_factory=RedisSettings)
    postgres: PostgresSettings = dataclasses.field(default_factory=PostgresSettings)
    pipeline: PipelineSettings = dataclasses.field(default_factory=PipelineSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        """Every group from `env`; ConfigError on the first bad variable."""
        return cls(redis=RedisSettings.from_env(env), postgres=PostgresSettings.from_env(env),
                   pipeline=PipelineSettings.from_env(env))

    def to_env(self) -> dict[str, str]:
        """Every variable of every group, as `from_env` reads them back."""
        return {**self.postgres.to_env(), **self.redis.to_env(), **self.pipeline.to_env()}


"""The Dagster executor of every job, chosen by DAGSTER_EXECUTOR; the Celery workers' app.

- `in_process` (default, a laptop's): every step of a run in the run's own process;
  `staged_orders` then has one drain step that starts its N staging worker processes.
- `multiprocess`: one process per step; `staged_orders` has one drain step per worker, run in
  parallel (each step pays Dagster's process start-up, ~2-3 s on 2 cores).
- `celery`: `dagster_celery.celery_executor` (install `dagster-celery`, same release as
  dagster); each step is a Celery task run by any worker listening on the broker. Broker and
  result backend: DAGSTER_CELERY_BROKER, or else the pipeline's Redis (REDIS_HOST, REDIS_PORT,
  REDIS_USERNAME, REDIS_PASSWORD, REDIS_SSL, REDIS_SSL_CA_CERTS, or the Sentinels of
  REDIS_SENTINEL_HOSTS) database 1. Celery's keys start with `<REDIS_KEY_PREFIX>:celery:`, so
  deployments sharing a Redis never run each other's steps.

Start Celery workers with the same environment (they read it exactly as the executor does;
no URL, password or yaml on the command line):

    celery -A orders_pipeline.executors:celery_app worker --concurrency 1 --loglevel INFO

Each worker process runs one step at a time and takes the next task only when it is free
(`worker_disable_prefetch`), so a long drain step never holds back a step another worker
could start.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import dagster as dg

from orders_pipeline.settings import (
    ConfigError,
    DagsterSettings,
    RedisSettings,
    load_env_file,
    sentinel_addresses,
)

# The database of the default broker on the pipeline's Redis (the pipeline uses REDIS_DB).
CELERY_DB = 1
# Schemes Celery can use as its result backend too (the broker URL serves as both).
_REDIS_SCHEMES = ("redis://", "rediss://", "sentinel://")
CELERY_INSTALL = "pip install dagster-celery==0.29.27 (the release of dagster 1.13.27)"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _default_broker(redis: RedisSettings) -> str:
    """The pipeline's Redis, database CELERY_DB, as a Celery (kombu) URL; secret."""
    if redis.cluster:
        raise ConfigError("DAGSTER_EXECUTOR=celery: Celery cannot use a Redis Cluster as its "
                          "broker; set DAGSTER_CELERY_BROKER to a plain Redis (or Sentinel) URL")
    auth = ""
    if redis.username or redis.password:
        password = redis.password.get_secret_value() if redis.password else ""
        auth = f"{quote(redis.username or '', safe='')}:{quote(password, safe='')}@"
    if redis.sentinel_hosts:
        if redis.ssl:
            raise ConfigError("DAGSTER_EXECUTOR=celery: the default broker does not reach "
                              "Sentinels over TLS; set DAGSTER_CELERY_BROKER")
        return ";".join(f"sentinel://{auth}{_host(host)}:{port}/{CELERY_DB}"
                        for host, port in sentinel_addresses(redis.sentinel_hosts))
    url = f"{'rediss' if redis.ssl else 'redis'}://{auth}{_host(redis.host)}:{redis.port}/" \
          f"{CELERY_DB}"
    if redis.ssl:  # the certificate (and host name) verified, as the pipeline's client does
        query = {"ssl_cert_reqs": "required"}
        if redis.ssl_ca_certs:
            query["ssl_ca_certs"] = redis.ssl_ca_certs
        url += "?" + urlencode(query)
    return url


@dataclass(frozen=True)
class CeleryConnection:
    """Where Celery's messages and results go, and the Celery settings both the executor
    and the workers use. `broker` and `backend` hold credentials: never shown (repr)."""

    broker: str = field(repr=False)
    backend: str = field(repr=False)
    key_prefix: str
    sentinel_master: str | None = None

    @classmethod
    def of(cls, dagster: DagsterSettings, redis: RedisSettings) -> "CeleryConnection":
        """From the settings; ConfigError if the default broker cannot be built."""
        broker = (dagster.celery_broker.get_secret_value() if dagster.celery_broker
                  else _default_broker(redis))
        backend = broker if broker.startswith(_REDIS_SCHEMES) else "rpc://"
        master = redis.sentinel_master if broker.startswith("sentinel://") else None
        return cls(broker, backend, f"{redis.key_prefix}:celery:", master)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "CeleryConnection":
        return cls.of(DagsterSettings.from_env(env), RedisSettings.from_env(env))

    def config_source(self) -> dict[str, Any]:
        """Celery settings (lowercase names) beyond broker and backend."""
        from dagster_celery.defaults import broker_transport_options

        transport: dict[str, Any] = {**broker_transport_options,
                                     "global_keyprefix": self.key_prefix}
        backend: dict[str, Any] = {"global_keyprefix": self.key_prefix}
        if self.sentinel_master:
            transport["master_name"] = backend["master_name"] = self.sentinel_master
        return {
            "broker_transport_options": transport,
            "result_backend_transport_options": backend,
            # A worker process takes a task only when it is free (Redis brokers only).
            "worker_prefetch_multiplier": 1,
            "worker_disable_prefetch": True,
        }

    def executor_config(self) -> dict[str, Any]:
        """The `celery_executor` config (broker, backend, config_source, step retries on)."""
        return {"broker": self.broker, "backend": self.backend,
                "config_source": self.config_source(), "retries": {"enabled": {}}}


def _dagster_celery() -> Any:
    try:
        import dagster_celery
    except ImportError as exc:
        raise ConfigError(f"DAGSTER_EXECUTOR=celery needs dagster-celery: {CELERY_INSTALL}"
                          ) from exc
    return dagster_celery


def executor_for(dagster: DagsterSettings, redis: RedisSettings) -> dg.ExecutorDefinition:
    """The executor DAGSTER_EXECUTOR names. For celery the broker is built now (a ConfigError
    fails the code location's load) and handed to the executor when a run starts, through a
    config function: the credentials never show in the UI or in any run's config."""
    if dagster.executor == "in_process":
        return dg.in_process_executor
    if dagster.executor == "multiprocess":
        return dg.multiprocess_executor
    celery = _dagster_celery()
    connection = CeleryConnection.of(dagster, redis)

    def configure(_: Any) -> dict[str, Any]:
        return connection.executor_config()

    return celery.celery_executor.configured(
        configure, config_schema={}, name="celery",
        description="Steps run as Celery tasks; broker and backend from DAGSTER_CELERY_BROKER "
                    "or the pipeline's Redis (orders_pipeline.executors).")


def executor_from_env(env: Mapping[str, str] = os.environ) -> dg.ExecutorDefinition:
    """`executor_for` the settings in `env` (DAGSTER_EXECUTOR, DAGSTER_CELERY_BROKER, REDIS_*)."""
    return executor_for(DagsterSettings.from_env(env), RedisSettings.from_env(env))


def make_celery_app(env: Mapping[str, str] = os.environ) -> Any:
    """The Celery app of the workers: dagster-celery's step task on the broker, backend and
    settings the executor uses (`CeleryConnection.from_env`)."""
    _dagster_celery()
    from dagster_celery.executor import CeleryExecutor
    from dagster_celery.make_app import make_app
    from dagster_celery.tasks import create_task

    connection = CeleryConnection.from_env(env)
    app = make_app(CeleryExecutor.for_cli(
        broker=connection.broker, backend=connection.backend,
        config_source=connection.config_source()).app_args())
    create_task(app)
    return app


def __getattr__(name: str) -> Any:
    # `celery -A orders_pipeline.executors:celery_app worker` builds the app on first use, so
    # that importing this module never needs Celery or a valid broker setting.
    if name == "celery_app":
        load_env_file()
        app = make_celery_app()
        globals()["celery_app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Dagster resources for Redis, Postgres and the pipeline's tunables.

Their fields are derived from the settings declarations (`orders_pipeline.settings`), so a
setting is declared once and appears in the environment, the resources and the CLI alike.
"""

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import dagster as dg

from orders_pipeline.resources.pipeline import PipelineResource
from orders_pipeline.resources.postgres import PostgresResource
from orders_pipeline.resources.redis import RedisResource
from orders_pipeline.settings import (
    Declared,
    PipelineSettings,
    PostgresSettings,
    RedisSettings,
    Settings,
)

__all__ = ["RESOURCES", "PipelineResource", "PostgresResource", "RedisResource",
           "pipeline_settings", "resources_for", "resources_from_env"]

# Resource key -> (resource class, the settings it holds).
RESOURCES: dict[str, tuple[type[dg.ConfigurableResource], type[Declared]]] = {
    "redis": (RedisResource, RedisSettings),
    "postgres": (PostgresResource, PostgresSettings),
    "pipeline": (PipelineResource, PipelineSettings),
}


def _from_env(declared: type[Declared], name: str, env: Mapping[str, str]) -> Any:
    """`EnvVar` for a set text or integer variable (the UI shows its name, never its value);
    a boolean has no `EnvVar` form, so it is read when the code location loads."""
    variable = declared.env_name(name)
    default = declared.declarations()[name].default
    if isinstance(default, bool):
        return getattr(declared.from_env({variable: env[variable]}), name)
    return dg.EnvVar.int(variable) if isinstance(default, int) else dg.EnvVar(variable)


def resources_from_env(env: Mapping[str, str] = os.environ) -> dict[str, dg.ConfigurableResource]:
    """One resource per key of `RESOURCES`; variables that are set become `EnvVar`s, the rest
    keep their declared default."""
    return {
        key: resource(**{name: _from_env(declared, name, env)
                         for name in declared.declarations()
                         if env.get(declared.env_name(name), "") != ""})
        for key, (resource, declared) in RESOURCES.items()}


def resources_for(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """Resources holding exactly `settings` (tests, the benchmark, embedding applications)."""
    groups = {"redis": settings.redis, "postgres": settings.postgres,
              "pipeline": settings.pipeline}
    return {key: resource(**{field.name: _plain(getattr(groups[key], field.name))
                             for field in dataclasses.fields(groups[key])})
            for key, (resource, _) in RESOURCES.items()}


def _plain(value: Any) -> Any:
    secret = getattr(value, "get_secret_value", None)
    return secret() if secret else value


def pipeline_settings(redis: RedisResource, postgres: PostgresResource,
                      pipeline: PipelineResource, *, batch_size: int | None = None,
                      worker_count: int | None = None) -> Settings:
    """The plain `Settings` the pipeline modules (and worker processes) take; `batch_size` and
    `worker_count` override the pipeline resource's (a run's `staged_orders` config)."""
    tuning = pipeline.settings()
    return Settings(redis=redis.settings(), postgres=postgres.settings(),
                    pipeline=dataclasses.replace(
                        tuning, batch_size=batch_size or tuning.batch_size,
                        worker_count=worker_count or tuning.worker_count))

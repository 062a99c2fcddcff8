"""What every asset of the pipeline shares: the retry rules, and how numbers are shown."""

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import dagster as dg
import psycopg
import pydantic
from redis.exceptions import AuthenticationError, NoPermissionError

from orders_pipeline.postgres_patterns.schema import SchemaMissing
from orders_pipeline.redis_patterns.lookup_cache import LookupCacheMissing
from orders_pipeline.settings import ConfigError

# Transient errors (a server restarting, a dropped connection, a pool timeout) are retried in
# the same run, 2, 4, 8 and 16 s apart. Run retries (dagster.yaml `run_retries`) re-run only
# runs whose worker crashed, never a step that failed: this policy is the one retry of those.
RETRY = dg.RetryPolicy(max_retries=4, delay=2, backoff=dg.Backoff.EXPONENTIAL)

# Errors that come out the same on every attempt: configuration, schema or seed data missing,
# credentials or grants refused, a value Postgres cannot store.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, pydantic.ValidationError, SchemaMissing, LookupCacheMissing,
    psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn,
    psycopg.errors.UndefinedFunction, psycopg.errors.InsufficientPrivilege, psycopg.DataError,
    AuthenticationError, NoPermissionError,
)

P = ParamSpec("P")
R = TypeVar("R")
SECONDS_PLACES = 3  # durations in metadata: milliseconds are plenty


def permanent_failure(asset: str, reason: str, **metadata: int | str | bool) -> dg.Failure:
    """A `dg.Failure` that neither the asset's RetryPolicy nor run retries will retry.

    `reason` is folded onto one line; the description says it is not retried and why.
    """
    return dg.Failure(
        description=(f"{asset}: {' '.join(reason.split())}. Not retried: retrying cannot fix "
                     f"this; correct the configuration or setup, then materialize again."),
        metadata={"retryable": False, **metadata},
        allow_retries=False)


def seconds(value: float) -> dg.FloatMetadataValue:
    """A duration for metadata, in seconds rounded to milliseconds."""
    return dg.MetadataValue.float(round(value, SECONDS_PLACES))


def retried_only_if_transient(body: Callable[P, R]) -> Callable[P, R]:
    """Decorate an asset body (under `@dg.asset`): PERMANENT_ERRORS become `permanent_failure`.

    Anything else propagates unchanged, so RETRY still retries transient errors.
    """
    return retried_only_if_transient_as(body.__name__)(body)


def retried_only_if_transient_as(asset: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """`retried_only_if_transient` for an op of a graph-backed asset: the failure names
    `asset` (what the catalog shows), not the op. `body` must not be a generator (its errors
    would escape the wrapper): return the outputs instead of yielding them."""
    def decorate(body: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(body)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return body(*args, **kwargs)
            except PERMANENT_ERRORS as exc:
                raise permanent_failure(asset, f"{type(exc).__name__}: {exc}",
                                        error_type=type(exc).__name__) from exc
        return run
    return decorate


RATE_PLACES = 4


def rate(value: float) -> dg.FloatMetadataValue:
    """A fraction for metadata (0.0123), rounded to four places."""
    return dg.MetadataValue.float(round(value, RATE_PLACES))


def per_second(rows: int, elapsed: float) -> dg.FloatMetadataValue:
    """Rows per second for metadata, to one decimal (0.0 for no time)."""
    return dg.MetadataValue.float(round(rows / elapsed, 1) if elapsed else 0.0)

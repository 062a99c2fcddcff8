"""The lookup snapshot asset, and the retry rules every asset of the pipeline shares."""

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import dagster as dg
import psycopg
import pydantic
from redis.exceptions import AuthenticationError, NoPermissionError

from orders_pipeline.assets import GROUP, OWNERS
from orders_pipeline.postgres_patterns.schema import SchemaMissing, require_schema
from orders_pipeline.redis_patterns.lookup_cache import LookupCache, LookupCacheMissing
from orders_pipeline.resources import PostgresResource, RedisResource, pipeline_settings
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


def permanent_failure(asset: str, reason: str, **metadata: int | str | bool) -> dg.Failure:
    """A `dg.Failure` that neither the asset's RetryPolicy nor run retries will retry.

    `reason` is folded onto one line; the description says it is not retried and why.
    """
    return dg.Failure(
        description=(f"{asset}: {' '.join(reason.split())}. Not retried: retrying cannot fix "
                     f"this; correct the configuration or setup, then materialize again."),
        metadata={"retryable": False, **metadata},
        allow_retries=False)


def retried_only_if_transient(body: Callable[P, R]) -> Callable[P, R]:
    """Decorate an asset body (under `@dg.asset`): PERMANENT_ERRORS become `permanent_failure`.

    Anything else propagates unchanged, so RETRY still retries transient errors.
    """
    @functools.wraps(body)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return body(*args, **kwargs)
        except PERMANENT_ERRORS as exc:
            raise permanent_failure(body.__name__, f"{type(exc).__name__}: {exc}",
                                    error_type=type(exc).__name__) from exc
    return run


@dg.asset(
    group_name=GROUP,
    owners=OWNERS,
    kinds={"redis", "postgres"},
    retry_policy=RETRY,
    description="""
**Lookup snapshot in Redis**: `products`, `currencies` and `zip_codes` copied from Postgres
into the hashes `{P}:lookup:products`, `{P}:lookup:currencies`, `{P}:lookup:zip_codes`
(plus `{P}:lookup:meta`), each with a TTL of `LOOKUP_TTL_SECONDS`.

Workers enrich every batch from this snapshot in one round trip, never joining Postgres.
A new snapshot is written aside and swapped in atomically. Kept fresh by the daily
`lookup_cache_daily` schedule; workers reload it themselves if it ever expires. A lookup
table that is empty in Postgres fails it without retries (every order would be rejected).
""",
    metadata={"dagster/table_name": "redis: {P}:lookup:*"},
)
@retried_only_if_transient
def lookup_cache(context: dg.AssetExecutionContext, redis: RedisResource,
                 postgres: PostgresResource) -> dg.MaterializeResult:
    ttl_seconds = pipeline_settings(redis, postgres).pipeline.lookup_ttl_seconds
    cache = LookupCache(redis.client(), redis.key_space(), ttl_seconds)
    with postgres.connection() as conn:
        require_schema(conn)
        info = cache.load_snapshot(conn)
    empty = [table for table, rows in info.rows.items() if rows == 0]
    if empty:
        raise LookupCacheMissing(f"lookup table(s) {', '.join(empty)} empty in Postgres: every "
                                 f"order would be rejected as unknown; seed them")
    context.log.info(f"lookup snapshot loaded: {info.rows} in {info.seconds:.2f}s")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": sum(info.rows.values()),
        "products": info.rows["products"],
        "currencies": info.rows["currencies"],
        "zip_codes": info.rows["zip_codes"],
        "ttl_seconds": ttl_seconds,
        "seconds": info.seconds,
        "redis_keys": dg.MetadataValue.text(", ".join(
            redis.key_space().lookup(t) for t in info.rows)),
    })

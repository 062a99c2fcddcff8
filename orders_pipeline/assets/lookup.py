import dagster as dg

from orders_pipeline.assets import GROUP, OWNERS
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.resources import PostgresResource, RedisResource

RETRY = dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL)


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
`lookup_cache_daily` schedule; workers reload it themselves if it ever expires.
""",
    metadata={"dagster/table_name": "redis: {P}:lookup:*"},
)
def lookup_cache(context: dg.AssetExecutionContext, redis: RedisResource,
                 postgres: PostgresResource) -> dg.MaterializeResult:
    cache = LookupCache(redis.client(), redis.key_space(), redis.lookup_ttl_seconds)
    with postgres.connection() as conn:
        info = cache.load_snapshot(conn)
    context.log.info(f"lookup snapshot loaded: {info.rows} in {info.seconds:.2f}s")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": sum(info.rows.values()),
        "products": info.rows["products"],
        "currencies": info.rows["currencies"],
        "zip_codes": info.rows["zip_codes"],
        "ttl_seconds": redis.lookup_ttl_seconds,
        "seconds": info.seconds,
        "redis_keys": dg.MetadataValue.text(", ".join(
            redis.key_space().lookup(t) for t in info.rows)),
    })

"""The lookup area: the Postgres lookup tables (external) and their snapshot in Redis."""

from datetime import timedelta

import dagster as dg

from orders_pipeline.assets import GROUP, OWNERS
from orders_pipeline.assets.catalog import REDIS_KEY
from orders_pipeline.assets.common import RETRY, retried_only_if_transient, seconds
from orders_pipeline.assets.tables import CURRENCIES_SCHEMA, PRODUCTS_SCHEMA, ZIP_CODES_SCHEMA
from orders_pipeline.postgres_patterns.schema import require_schema
from orders_pipeline.redis_patterns.lookup_cache import LookupCache, LookupCacheMissing
from orders_pipeline.resources import PipelineResource, PostgresResource, RedisResource


def _lookup_table(name: str, schema: dg.TableSchema, what: str) -> dg.AssetSpec:
    return dg.AssetSpec(
        name, group_name=GROUP, owners=OWNERS, kinds={"postgres"},
        description=f"""
**Lookup table `{name}`** in Postgres ({what}), kept by the systems upstream of this
pipeline (`orders-pipeline init-db` seeds it). External: Dagster reads it, never writes it;
`lookup_cache` snapshots it into Redis.
""",
        metadata={"dagster/table_name": name, "dagster/column_schema": schema})


LOOKUP_TABLE_SPECS = [
    _lookup_table("products", PRODUCTS_SCHEMA, "id, name, category, base price"),
    _lookup_table("currencies", CURRENCIES_SCHEMA, "ISO 4217 code, USD value of one unit"),
    _lookup_table("zip_codes", ZIP_CODES_SCHEMA, "city, state, region, shipping zone"),
]
DAILY_AT_3 = "0 3 * * *"


@dg.asset(
    group_name=GROUP,
    owners=OWNERS,
    kinds={"redis", "postgres"},
    deps=LOOKUP_TABLE_SPECS,
    retry_policy=RETRY,
    # Reloaded every day at 03:00 UTC whether or not the tables changed (their observations
    # are ignored here: `lookup_sources_sensor` requests the reload after a change itself);
    # the snapshot's TTL outlives one missed reload.
    automation_condition=dg.AutomationCondition.on_cron(DAILY_AT_3).ignore(
        dg.AssetSelection.assets(*(table.key for table in LOOKUP_TABLE_SPECS))),
    freshness_policy=dg.FreshnessPolicy.time_window(warn_window=timedelta(hours=25),
                                                    fail_window=timedelta(hours=49)),
    description="""
**Lookup snapshot in Redis**: `products`, `currencies` and `zip_codes` copied from Postgres
into the hashes `{P}:lookup:products`, `{P}:lookup:currencies`, `{P}:lookup:zip_codes`
(plus `{P}:lookup:meta`), each with a TTL of `LOOKUP_TTL_SECONDS`.

Workers enrich every batch from this snapshot in one round trip, never joining Postgres.
A new snapshot is written aside and swapped in atomically, with the versions of the tables it
was copied from (in `{P}:lookup:meta`). Reloaded within a minute of a change to a lookup table
by `lookup_sources_sensor` (change counters kept by triggers), every day at 03:00 UTC by its
automation condition (`default_automation_condition_sensor` runs it); workers reload it
themselves if it ever expires. Freshness warns after 25 hours (a missed reload) and fails
after 49. A lookup table that is empty in Postgres fails it without retries (every order
would be rejected).
""",
    metadata={"dagster/table_name": "redis: {P}:lookup:*", REDIS_KEY: "{P}:lookup:*"},
)
@retried_only_if_transient
def lookup_cache(context: dg.AssetExecutionContext, redis: RedisResource,
                 postgres: PostgresResource, pipeline: PipelineResource) -> dg.MaterializeResult:
    ttl_seconds = pipeline.settings().lookup_ttl_seconds
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
        "seconds": seconds(info.seconds),
        "redis_keys": dg.MetadataValue.text(", ".join(
            redis.key_space().lookup(t) for t in info.rows)),
    })

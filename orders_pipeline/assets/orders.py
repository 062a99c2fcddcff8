"""The orders area: staging (with its rejects) and promotion (with the view rollups)."""

import dataclasses
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import dagster as dg
import pydantic
import redis as redis_py
from psycopg import sql
from pydantic_core import ErrorDetails

from orders_pipeline.assets import GROUP, OWNERS
from orders_pipeline.assets.common import (
    RETRY,
    per_second,
    permanent_failure,
    rate,
    retried_only_if_transient_as,
    seconds,
)
from orders_pipeline.assets.lookup import lookup_cache
from orders_pipeline.assets.queue import INGESTION_QUEUE
from orders_pipeline.assets.tables import (
    ORDERS_SCHEMA,
    PRODUCT_DAILY_SCHEMA,
    REJECTED_SCHEMA,
    SALES_HOURLY_SCHEMA,
    STAGING_SCHEMA,
)
from orders_pipeline.pipeline import promote_staged, stage_queue
from orders_pipeline.postgres_patterns.schema import require_schema
from orders_pipeline.postgres_patterns.views import refresh_stale
from orders_pipeline.redis_patterns.lookup_cache import LookupCache, LookupCacheMissing
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.resources import (
    PipelineResource,
    PostgresResource,
    RedisResource,
    pipeline_settings,
)
from orders_pipeline.settings import BATCH_SIZE, BATCHES_PER_WORKER, WORKERS, Bound
from orders_pipeline.worker import BatchReport, StagingWorker, WorkerStats


def _bounded(bound: Bound, description: str) -> Any:
    """An optional config field within `bound`; unset (None) means the default `description`
    names, resolved when the run starts, never when this module is imported."""
    return pydantic.Field(default=None, ge=bound.minimum, le=bound.maximum,
                          description=f"{description}. Allowed: {bound.span()}.")


class StagingConfig(dg.Config):
    """How the queue is drained (launchpad: `ops: staged_orders: config:`).

    A value out of range fails the step at once with a `dg.Failure` that names the field, the
    value and the range, and that no retry repeats.
    """

    workers: int | None = _bounded(
        WORKERS, "Staging worker processes; unset: WORKER_COUNT; 1 drains in the step's process")
    batch_size: int | None = _bounded(BATCH_SIZE, "Orders claimed per batch; unset: BATCH_SIZE")
    max_batches_per_worker: int | None = _bounded(
        BATCHES_PER_WORKER, "Batches each worker processes before it stops; unset: until the "
                            "queue is empty")

    @pydantic.model_validator(mode="wrap")
    @classmethod
    def _refused_for_good(cls, data: Any,
                          handler: pydantic.ModelWrapValidatorHandler["StagingConfig"]
                          ) -> "StagingConfig":
        # Dagster builds the config inside the step, where a ValidationError would be retried
        # like any error of the asset's body: refuse it as a permanent failure instead.
        try:
            return handler(data)
        except pydantic.ValidationError as exc:
            raise permanent_failure(
                "staged_orders", "bad config: " + "; ".join(cls._refusal(e) for e in exc.errors()),
                error_type="config") from exc

    @classmethod
    def _refusal(cls, error: ErrorDetails) -> str:
        """One field's refusal, worded like the env vars' and CLI flags' (range included)."""
        name = ".".join(str(part) for part in error["loc"]) or "config"
        field = cls.model_fields.get(name)
        limits = {type(m).__name__: m for m in field.metadata} if field else {}
        if "Ge" in limits and "Le" in limits:
            return Bound(limits["Ge"].ge, limits["Le"].le).refusal(name, error["input"])
        return f"{name}: {error['msg']}, got {error['input']!r}"


def table_rows(postgres: PostgresResource, table: str) -> int:
    """Exact row count of one of the pipeline's own tables (for `dagster/row_count`)."""
    with postgres.connection() as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        return int(row.fetchone()[0])


# Promotion runs for every burst of completion signals; an hour without one is worth a look
# (little traffic, or the queue stalled: `orders_wait_within_limit` tells which), a day is not
# fresh. The views are refreshed with every promotion, so they share the policy.
INGEST_FRESHNESS = dg.FreshnessPolicy.time_window(warn_window=timedelta(hours=1),
                                                  fail_window=timedelta(hours=24))

STAGED_ORDERS = dg.AssetSpec(
    "staged_orders",
    group_name=GROUP,
    owners=OWNERS,
    kinds={"redis", "polars", "postgres"},
    deps=[INGESTION_QUEUE, lookup_cache],
    description="""
**Orders staged in Postgres**: the Redis list `{P}:ingestion` drained into the UNLOGGED
table `orders_staging` by N staging workers.

Each worker claims whole batches under a lease, parses and validates them with Polars,
enriches them from the `lookup_cache` snapshot, drops duplicates seen within
`DEDUP_WINDOW_SECONDS`, and COPYs the rest into staging; bad payloads go to
`orders_rejected` with a reason. A batch stays in Redis until promotion. Materialized by the
`completion_signal_sensor` for every completion signal, or by hand. Its row count is the
number of rows this run staged: promotion empties the table again.

Steps: `staging_plan` checks the schema and the lookup snapshot and reads the queue depth;
then one `staging_drain` step per worker (pool `orders_staging`), each a single process
that the executor places (DAGSTER_EXECUTOR=multiprocess: a process each; celery: any Celery
worker); `staging_collect` adds them up. On the in-process executor (the default, a
laptop's) one `staging_drain` step starts all N worker processes itself instead.
""",
    metadata={"dagster/table_name": "orders_staging", "dagster/column_schema": STAGING_SCHEMA},
)
ORDERS_REJECTED = dg.AssetSpec(
    "orders_rejected",
    group_name=GROUP,
    owners=OWNERS,
    kinds={"postgres"},
    deps=[INGESTION_QUEUE, lookup_cache],
    description="""
**Rejected orders**: every payload the order contract refused (bad JSON, a missing or
mistyped field, an unknown product, currency or zip code, a value out of range), one row each
in the table `orders_rejected` with the raw payload exactly as received and the reason.
Written by the same step as `staged_orders`, in the same transaction as the batch's staged
rows. Rejects are never retried by the pipeline: fix the producer and send them again.
""",
    metadata={"dagster/table_name": "orders_rejected",
              "dagster/column_schema": REJECTED_SCHEMA},
)

# ---------------------------------------------------------------- staging as steps
#
# `staged_orders` is a graph of three ops, so that a distributed executor can place each
# worker: staging_plan -> one staging_drain per worker (dynamic outputs) -> staging_collect.
# Their small values (a StagingPlan, a DrainReport per drain) go from step to step through
# Redis (`staging_handoff`), which every host running a step reaches: no shared filesystem.

STAGING_POOL = "orders_staging"
HANDOFF = "staging_handoff"
# A run re-executed from a failure reads the values its parent run handed over: kept a week.
HANDOFF_SECONDS = 7 * 86_400
# Executors that run every step in the run's own process (`execute_in_process_executor` is
# what `dg.materialize` and `execute_in_process` use); there a drain step may start worker
# processes. Everywhere else (multiprocess, Celery, K8s) each drain is one process.
IN_PROCESS_EXECUTORS = frozenset({"in_process", "execute_in_process_executor"})


@dataclass(frozen=True)
class StagingPlan:
    """What `staging_plan` decided, handed to every drain step and to `staging_collect`.

    `workers`: staging worker processes in all; `processes_per_step`: how many of them one
    drain step runs (`workers` on the in-process executor, where there is one drain step,
    else 1); `queue_depth_before`: orders queued when the plan was made.
    """

    workers: int
    processes_per_step: int
    batch_size: int
    max_batches_per_worker: int | None
    queue_depth_before: int

    @property
    def steps(self) -> int:
        """Drain steps: one, or one per worker."""
        return self.workers // self.processes_per_step


@dataclass(frozen=True)
class DrainReport:
    """One drain step's totals, and where (host name, process id) and when (Unix time, s)
    it ran."""

    hostname: str
    pid: int
    started_at: float
    finished_at: float
    stats: WorkerStats

    def metadata(self, processes: int) -> dict[str, Any]:
        """The drain step's output metadata (the UI shows it on the step)."""
        stats = self.stats
        elapsed = self.finished_at - self.started_at
        return {"hostname": self.hostname, "pid": self.pid, "worker_processes": processes,
                "rows_claimed": stats.claimed, "rows_staged": stats.staged,
                "duplicates_dropped": stats.duplicates, "rows_rejected": stats.rejected,
                "batches": stats.batches, "batches_reclaimed": stats.reclaimed_batches,
                "seconds": seconds(elapsed), "rows_per_second": per_second(stats.claimed,
                                                                          elapsed)}


def _encode(value: StagingPlan | DrainReport) -> str:
    return json.dumps({"type": type(value).__name__, "fields": dataclasses.asdict(value)})


def _decode(raw: bytes | str) -> StagingPlan | DrainReport:
    """The value `_encode` wrote (ValueError for anything else)."""
    data = json.loads(raw)
    fields = data["fields"]
    if data["type"] == "StagingPlan":
        return StagingPlan(**fields)
    if data["type"] == "DrainReport":
        return DrainReport(**{**fields, "stats": WorkerStats(**fields["stats"])})
    raise ValueError(f"not a staging hand-over value: {data['type']!r}")


class StagingHandoff(dg.IOManager):
    """The staging ops' values, as JSON in Redis under
    `<prefix>:dagster:handoff:<run id>:<step key>:<output>[:<mapping key>]`, listed in the
    set `<prefix>:dagster:handoff:<run id>` (the default IO manager would write files on the
    host that ran the step, which a Celery worker on another host cannot read).

    `staging_collect` releases a run's values once it has added them up; those of a run that
    failed before are kept HANDOFF_SECONDS, for a re-execution from the failure.
    """

    def __init__(self, client: redis_py.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    @classmethod
    def of(cls, redis: RedisResource) -> "StagingHandoff":
        return cls(redis.client(), redis.key_space().prefix)

    def _key(self, identifier: list[str]) -> str:
        return ":".join([self.prefix, "dagster", "handoff", *identifier])

    def handle_output(self, context: dg.OutputContext, obj: StagingPlan | DrainReport) -> None:
        key, index = self._key(context.get_identifier()), self._key([context.run_id])
        pipe = self.client.pipeline(transaction=False)
        pipe.set(key, _encode(obj), ex=HANDOFF_SECONDS)
        pipe.sadd(index, key)
        pipe.expire(index, HANDOFF_SECONDS)
        pipe.execute()

    def load_input(self, context: dg.InputContext) -> StagingPlan | DrainReport:
        """The upstream step's value; a permanent failure if it expired or was released."""
        upstream = context.upstream_output
        assert upstream is not None, "staging ops only take their upstream ops' outputs"
        key = self._key(upstream.get_identifier())
        raw = self.client.get(key)
        if raw is None:
            raise permanent_failure("staged_orders", f"the staging hand-over {key} is gone "
                                    f"(kept {HANDOFF_SECONDS} s); materialize staged_orders "
                                    "again")
        return _decode(raw)

    def release(self, run_id: str) -> int:
        """Delete the values run `run_id` handed over (and their list); how many there were."""
        index = self._key([run_id])
        keys = [k.decode() if isinstance(k, bytes) else k for k in self.client.smembers(index)]
        for key in keys:  # one at a time: no multi-key command across cluster slots
            self.client.unlink(key)
        self.client.unlink(index)
        return len(keys)


@dg.io_manager(required_resource_keys={"redis"},
               description="Hands the staging steps' small values over through Redis.")
def staging_handoff(init_context: dg.InitResourceContext) -> StagingHandoff:
    return StagingHandoff.of(init_context.resources.redis)


def steps_share_one_process(context: dg.OpExecutionContext) -> bool:
    """True if the run executes every step in its own process (see IN_PROCESS_EXECUTORS);
    `multi_or_in_process_executor` asks its run config (`execution: config: in_process:`)."""
    executor = context.job_def.executor_def
    if executor.name == "multi_or_in_process_executor":
        return "in_process" in ((context.run_config.get("execution") or {}).get("config") or {})
    return executor.name in IN_PROCESS_EXECUTORS


def plan_staging(context: dg.OpExecutionContext, config: StagingConfig, redis: RedisResource,
                 postgres: PostgresResource, pipeline: PipelineResource, *,
                 one_step: bool) -> StagingPlan:
    """Check what no worker could get past (schema, lookup snapshot), once, before any
    worker starts; read the queue depth. `one_step`: one drain step runs every worker."""
    settings = pipeline_settings(redis, postgres, pipeline, batch_size=config.batch_size,
                                 worker_count=config.workers)
    workers, batch_size = settings.pipeline.worker_count, settings.pipeline.batch_size
    cache = LookupCache(redis.client(), redis.key_space(), settings.pipeline.lookup_ttl_seconds)
    with postgres.connection() as conn:
        require_schema(conn)
        cache.ensure_loaded(conn)
    if not cache.is_loaded():
        raise LookupCacheMissing("a lookup table is empty in Postgres, so the snapshot cannot be "
                                 "loaded; seed products, currencies and zip_codes")
    plan = StagingPlan(workers=workers, processes_per_step=workers if one_step else 1,
                       batch_size=batch_size,
                       max_batches_per_worker=config.max_batches_per_worker,
                       queue_depth_before=OrderQueue(redis.client(), redis.key_space()).depth())
    context.log.info(f"draining {plan.queue_depth_before} queued orders with {workers} "
                     f"worker(s) in {plan.steps} drain step(s), batches of {batch_size}")
    return plan


def drain_staging(context: dg.OpExecutionContext, plan: StagingPlan, redis: RedisResource,
                  postgres: PostgresResource, pipeline: PipelineResource) -> DrainReport:
    """Drain the queue until nothing is queued or claimed (`StagingWorker.drain`) in this
    process, or with `plan.processes_per_step` processes (`stage_queue`) if more than one."""
    settings = pipeline_settings(redis, postgres, pipeline, batch_size=plan.batch_size,
                                 worker_count=plan.workers)

    def log_batch(report: BatchReport) -> None:
        context.log.info(report.line())

    started = time.time()
    if plan.processes_per_step > 1:
        stats = stage_queue(settings, workers=plan.processes_per_step,
                            batch_size=plan.batch_size,
                            max_batches=plan.max_batches_per_worker, on_batch=log_batch)
    else:
        stats = StagingWorker(settings).drain(plan.batch_size, plan.max_batches_per_worker,
                                              log_batch)
    return DrainReport(hostname=socket.gethostname(), pid=os.getpid(), started_at=started,
                       finished_at=time.time(), stats=stats)


def collect_staging(context: dg.OpExecutionContext, plan: StagingPlan,
                    drains: list[DrainReport], redis: RedisResource,
                    postgres: PostgresResource) -> tuple[dg.Output[None], dg.Output[None]]:
    """Add the drains up into the two assets' materializations.

    Raises a permanent `dg.Failure` if orders waited and none was claimed (a config that
    slipped past validation, e.g. max_batches_per_worker=0).
    """
    stats = WorkerStats(workers=plan.workers)
    for drain in drains:
        stats.merge(drain.stats)
    # Wall time from the first drain's start to the last one's end (hosts' clocks).
    stats.seconds = (max(d.finished_at for d in drains) - min(d.started_at for d in drains)
                     if drains else 0.0)
    depth_before = plan.queue_depth_before
    depth_after = OrderQueue(redis.client(), redis.key_space()).depth()
    if depth_before and not stats.claimed and depth_after >= depth_before:
        raise permanent_failure(
            "staged_orders", f"claimed nothing while {depth_after} orders wait (workers="
            f"{plan.workers}, batch_size={plan.batch_size}, max_batches_per_worker="
            f"{plan.max_batches_per_worker})", queue_depth=depth_after)
    hosts = sorted({f"{d.hostname}:{d.pid}" for d in drains})
    context.log.info(f"{len(drains)} drain step(s) ({', '.join(hosts)}) claimed "
                     f"{stats.claimed} orders in {stats.batches} batches: staged "
                     f"{stats.staged}, {stats.duplicates} duplicates, {stats.rejected} rejected")
    rejected_rate = rate(stats.rejected / stats.claimed if stats.claimed else 0.0)
    return (
        dg.Output(None, output_name="staged_orders", metadata={
            "dagster/row_count": stats.staged,
            "rows_claimed": stats.claimed,
            "rows_staged": stats.staged,
            "duplicates_dropped": stats.duplicates,
            "rows_rejected": stats.rejected,
            "rejected_rate": rejected_rate,
            "batches": stats.batches,
            "batches_reclaimed": stats.reclaimed_batches,
            "workers": plan.workers,
            "seconds": seconds(stats.seconds),
            "rows_per_second": per_second(stats.claimed, stats.seconds),
            "queue_depth_before": depth_before,
            "queue_depth_after": depth_after,
        }),
        dg.Output(None, output_name="orders_rejected", metadata={
            "dagster/row_count": table_rows(postgres, "orders_rejected"),
            "rows_rejected": stats.rejected,
            "rejected_rate": rejected_rate,
        }),
    )


@dg.op(
    ins={"ingestion_queue": dg.In(dg.Nothing), "lookup_cache": dg.In(dg.Nothing)},
    out={"plan": dg.Out(StagingPlan, io_manager_key=HANDOFF,
                        description="The plan, for staging_collect."),
         "drains": dg.DynamicOut(StagingPlan, io_manager_key=HANDOFF,
                                 description="The plan again, once per drain step.")},
    retry_policy=RETRY,
    description="Checks the schema and the lookup snapshot, reads the queue depth and fans "
                "out one drain step per worker (one in all on the in-process executor).",
)
@retried_only_if_transient_as("staged_orders")
def staging_plan(context: dg.OpExecutionContext, config: StagingConfig, redis: RedisResource,
                 postgres: PostgresResource, pipeline: PipelineResource
                 ) -> tuple[StagingPlan, list[dg.DynamicOutput[StagingPlan]]]:
    plan = plan_staging(context, config, redis, postgres, pipeline,
                        one_step=steps_share_one_process(context))
    return plan, [dg.DynamicOutput(plan, mapping_key=f"worker_{n}", output_name="drains")
                  for n in range(plan.steps)]


@dg.op(
    out=dg.Out(DrainReport, io_manager_key=HANDOFF),
    retry_policy=RETRY,
    pool=STAGING_POOL,
    description="Drains the queue into orders_staging until nothing is queued or claimed: "
                "one worker process (or, on the in-process executor, all of them). Output "
                "metadata: where it ran (hostname, pid) and what it did.",
)
@retried_only_if_transient_as("staged_orders")
def staging_drain(context: dg.OpExecutionContext, plan: StagingPlan, redis: RedisResource,
                  postgres: PostgresResource, pipeline: PipelineResource
                  ) -> dg.Output[DrainReport]:
    report = drain_staging(context, plan, redis, postgres, pipeline)
    return dg.Output(report, metadata=report.metadata(plan.processes_per_step))


@dg.op(
    out={"staged_orders": dg.Out(dg.Nothing), "orders_rejected": dg.Out(dg.Nothing)},
    retry_policy=RETRY,
    description="Adds the drain steps up into the staged_orders and orders_rejected "
                "materializations; fails for good if orders waited and none was claimed.",
)
@retried_only_if_transient_as("staged_orders")
def staging_collect(context: dg.OpExecutionContext, plan: StagingPlan,
                    drains: list[DrainReport], redis: RedisResource, postgres: PostgresResource
                    ) -> tuple[dg.Output[None], dg.Output[None]]:
    outputs = collect_staging(context, plan, drains, redis, postgres)
    # Added up: released now (had this step failed before, its retry would read them again).
    StagingHandoff.of(redis).release(context.run_id)
    return outputs


def _planning_config(values: dict[str, Any]) -> dict[str, Any]:
    """`ops: staged_orders: config:` is the planning step's config, passed on unchecked: the
    step validates it (StagingConfig), so a bad value fails that step for good."""
    return {"staging_plan": {"config": values}}


def _out(spec: dg.AssetSpec) -> dg.AssetOut:
    """The spec as a graph output (its deps become the graph's inputs)."""
    return dg.AssetOut.from_spec(spec.replace_attributes(deps=[]), dagster_type=dg.Nothing)


with warnings.catch_warnings():
    # Asset-level `resource_defs` is beta; it carries the hand-over IO manager with the asset,
    # so that every Definitions, job and `dg.materialize` gets it without wiring.
    warnings.simplefilter("ignore", dg.BetaWarning)

    @dg.graph_multi_asset(
        name="staged_orders",
        outs={"staged_orders": _out(STAGED_ORDERS), "orders_rejected": _out(ORDERS_REJECTED)},
        ins={"ingestion_queue": dg.AssetIn(INGESTION_QUEUE.key, dagster_type=dg.Nothing),
             "lookup_cache": dg.AssetIn(lookup_cache.key, dagster_type=dg.Nothing)},
        group_name=GROUP,
        config=dg.ConfigMapping(config_fn=_planning_config,
                                config_schema=StagingConfig.to_config_schema()),
        resource_defs={HANDOFF: staging_handoff},
    )
    def staged_orders(ingestion_queue: Any, lookup_cache: Any) -> dict[str, Any]:
        # Composition, not execution: the arguments and results are Dagster's handles
        # (the two inputs are deps only: Nothing, never loaded).
        plan, drains = staging_plan(ingestion_queue=ingestion_queue, lookup_cache=lookup_cache)
        staged, rejected = staging_collect(plan, drains.map(staging_drain).collect())
        return {"staged_orders": staged, "orders_rejected": rejected}


def _rollup(name: str, view: str, schema: dg.TableSchema, grain: str) -> dg.AssetSpec:
    return dg.AssetSpec(
        name, group_name=GROUP, owners=OWNERS, kinds={"postgres"},
        deps=[STAGED_ORDERS],
        description=f"""
**Rollup of `orders` by {grain}**: the table `{name}` that promotion adds every inserted
order to, in the same transaction as the insert, so it is never behind `orders`. The view
`{view}` reads it through one materialized view per UTC month; triggers on the rollup mark the
months each statement changed, so a refresh costs time in proportion to those months, not to
`orders` or the rest of the rollup.
""",
        metadata={"dagster/table_name": name, "dagster/column_schema": schema})


PROMOTED_ORDERS = dg.AssetSpec(
    "promoted_orders",
    group_name=GROUP,
    owners=OWNERS,
    kinds={"postgres", "redis"},
    deps=[STAGED_ORDERS],
    freshness_policy=INGEST_FRESHNESS,
    description="""
**Orders**: `orders_staging` validated and promoted into the table `orders`, partitioned by
UTC month of `order_timestamp` (partitions created ahead); the guard `order_ids` keeps every
`order_id` stored once across the months.

Whole batches move in one transaction under an advisory lock, inserting with
`ON CONFLICT DO NOTHING` into `orders` and the guard (a copy of a stored order, however dated,
does not land), deleting exactly the staging rows they took and adding the orders that landed
to the rollups; then the batches are released from Redis. Batches whose
staged rows a Postgres crash erased are sent back to the queue. A poison batch (its promotion
fails for a reason retrying cannot fix) is quarantined with its error and raw payloads, and
the others are promoted: see the check `no_quarantined_batches` and `orders-pipeline
readmit`. Re-running it changes nothing already done. Freshness warns after an hour without a
promotion and fails after a day. Last, the relay publishes the promoted orders (listed in the
outbox `promoted_outbox` by the same transaction) to the stream `promoted_stream` for the
consumer groups (metadata `entries_published`). Then the step refreshes the month views of
`sales_hourly` and `product_performance_daily` whose months changed (concurrently, readers
never blocked) and records each as a materialization of that view's month partition
(metadata `view_months_refreshed`, `view_refresh_seconds`).
""",
    metadata={"dagster/table_name": "orders", "dagster/column_schema": ORDERS_SCHEMA},
)
SALES_HOURLY_ROLLUP = _rollup("sales_hourly_rollup", "sales_hourly", SALES_HOURLY_SCHEMA,
                              "hour and category")
PRODUCT_DAILY_ROLLUP = _rollup("product_daily_rollup", "product_performance_daily",
                               PRODUCT_DAILY_SCHEMA, "day and product")


@dg.multi_asset(
    name="promoted_orders",
    specs=[PROMOTED_ORDERS, SALES_HOURLY_ROLLUP, PRODUCT_DAILY_ROLLUP],
    retry_policy=RETRY,
)
def promoted_orders(context: dg.AssetExecutionContext, redis: RedisResource,
                    postgres: PostgresResource, pipeline: PipelineResource
                    ) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization]:
    # A generator, so that the views' month materializations come after the step's own (run
    # log and catalog show the promotion first). `_promote` does all the work, and turns
    # permanent errors into failures, before anything is yielded.
    yield from _promote(context, redis, postgres, pipeline)


@retried_only_if_transient_as("promoted_orders")
def _promote(context: dg.AssetExecutionContext, redis: RedisResource,
             postgres: PostgresResource, pipeline: PipelineResource
             ) -> list[dg.MaterializeResult | dg.AssetMaterialization]:
    """Promote, refresh the views' changed months; the step's materializations, then one per
    refreshed view month (`assets.views.view_month_materializations`)."""
    # Imported here: the views area imports this module for the specs it depends on.
    from orders_pipeline.assets.views import view_month_materializations

    settings = pipeline_settings(redis, postgres, pipeline)
    started = time.perf_counter()
    result = promote_staged(settings)
    elapsed = time.perf_counter() - started
    # The views follow at once: the months this promotion (or any writer since the last
    # refresh: replay, re-drive, a hand edit) changed, each recorded as its view's partition.
    with postgres.connection() as conn:
        refreshed = refresh_stale(conn)
    months, outside = view_month_materializations(context, refreshed)
    context.log.info(
        f"promoted {len(result.promoted_batches)} batches: {result.inserted_rows} rows inserted, "
        f"{result.conflicts} already present, {len(result.lost_batches)} lost batches requeued, "
        f"{len(result.quarantined)} batches quarantined")
    for batch in result.quarantined:
        context.log.warning(
            f"batch {batch.batch_id} quarantined with {batch.orders} orders "
            f"({batch.payloads} raw payloads kept): {batch.error}; fix the cause, then run "
            f"`orders-pipeline readmit {batch.batch_id}`")
    return [
        dg.MaterializeResult(asset_key=PROMOTED_ORDERS.key, metadata={
            "dagster/row_count": table_rows(postgres, "orders"),
            "rows_promoted": result.inserted_rows,
            "rows_staged_in": result.staged_rows,
            "conflicts": result.conflicts,
            "batches_promoted": len(result.promoted_batches),
            "batches_requeued": len(result.lost_batches),
            "batches_quarantined": len(result.quarantined),
            "rows_quarantined": sum(batch.orders for batch in result.quarantined),
            "seconds": seconds(elapsed),
            "rows_per_second": per_second(result.inserted_rows, elapsed),
            "queue_depth_after": OrderQueue(redis.client(), redis.key_space()).depth(),
            "entries_published": result.entries_published,
            "view_months_refreshed": len(refreshed),
            "view_refresh_seconds": seconds(sum((made.seconds for made in refreshed), 0.0)),
            "view_months_outside_partitions": dg.MetadataValue.text(
                ", ".join(made.relation for made in outside) or "-"),
        }),
        _rollup_rows(postgres, SALES_HOURLY_ROLLUP),
        _rollup_rows(postgres, PRODUCT_DAILY_ROLLUP),
        *months,
    ]


def _rollup_rows(postgres: PostgresResource, rollup: dg.AssetSpec) -> dg.MaterializeResult:
    return dg.MaterializeResult(asset_key=rollup.key, metadata={
        "dagster/row_count": table_rows(postgres, rollup.key.to_user_string())})

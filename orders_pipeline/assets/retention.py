"""The `retention` job: drop whole months of orders from the launchpad.

It runs `pipeline.apply_retention` (the same as `orders-pipeline retention`) with the horizon
of its config (launchpad `ops: drop_months: config: {keep_months: 36}` or
`{before: "2024-01"}`; `dry_run: true` only reports): the months' partitions of `orders`,
their rollup rows and month views, then their ids in `order_ids` (promotion waits only for two
short transactions); the step's metadata lists them, with how long promotion was locked out
and how long the ids took. A refusal (a horizon after this month, staged orders before it)
fails the run without retries: retrying cannot change it.
"""

from datetime import date

import dagster as dg
from pydantic import Field

from orders_pipeline.assets.common import (
    RETRY,
    permanent_failure,
    retried_only_if_transient,
    seconds,
)
from orders_pipeline.jobs import RUN_KIND_TAG
from orders_pipeline.pipeline import apply_retention
from orders_pipeline.postgres_patterns.partitions import (
    MAX_KEEP_MONTHS,
    RetentionRefused,
    horizon_keeping,
    parse_month,
)
from orders_pipeline.resources import (
    PipelineResource,
    PostgresResource,
    RedisResource,
    pipeline_settings,
)


class RetentionConfig(dg.Config):
    """The horizon: exactly one of `keep_months` and `before`."""

    keep_months: int | None = Field(
        default=None, ge=1, le=MAX_KEEP_MONTHS,
        description="keep the current UTC month and the N-1 before it")
    before: str | None = Field(
        default=None, pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])$",
        description="drop every month before this one, YYYY-MM")
    dry_run: bool = Field(default=False, description="report what would be dropped only")

    def horizon(self) -> date:
        """The first day of the horizon month; ValueError unless exactly one field is set."""
        if (self.keep_months is None) == (self.before is None):
            raise ValueError("give exactly one of keep_months and before")
        if self.keep_months is not None:
            return horizon_keeping(self.keep_months)
        return parse_month(str(self.before))


@dg.op(
    name="drop_months",
    out=dg.Out(dg.Nothing),
    retry_policy=RETRY,
    description="Drops every month before the horizon from `orders`, the rollups and the "
                "dashboard views, then their ids from `order_ids`.",
)
@retried_only_if_transient
def retention_op(context: dg.OpExecutionContext, config: RetentionConfig,
                 redis: RedisResource, postgres: PostgresResource,
                 pipeline: PipelineResource) -> None:
    try:
        horizon = config.horizon()
        result = apply_retention(pipeline_settings(redis, postgres, pipeline), horizon,
                                 dry_run=config.dry_run)
    except (ValueError, RetentionRefused) as exc:
        raise permanent_failure("retention", str(exc)) from exc
    verb = "would drop" if result.dry_run else "dropped"
    context.log.info(f"retention before {result.horizon.isoformat()[:7]}: {verb} "
                     f"{len(result.partitions)} month partitions ({result.orders} orders)")
    context.add_output_metadata({
        "horizon": result.horizon.isoformat(), "dry_run": result.dry_run,
        "orders": result.orders, "ids": result.ids,
        "partitions": dg.MetadataValue.json(result.partitions),
        "view_slices": dg.MetadataValue.json(result.view_slices),
        "promotion_locked_seconds": seconds(result.locked_seconds),
        "ids_seconds": seconds(result.ids_seconds)})


@dg.job(
    name="retention",
    tags={RUN_KIND_TAG: "retention"},
    description="Drop whole months of orders before a horizon (config: keep_months or before; "
                "dry_run); the same as `orders-pipeline retention`.",
)
def retention_job() -> None:
    retention_op()

"""The re-drive job: rejected orders sent through the pipeline again, from the launchpad.

`redrive_rejected` runs `pipeline.redrive_rejected` with the filters of its config (the same as
`orders-pipeline requeue-rejected`): launchpad `ops: redrive: config: {reason:
"^unknown product_id", dry_run: true}`. Its batches carry completion signals, so
`completion_signal_sensor` starts the ingest run that stages and promotes them. The step's
output metadata and an observation of `orders_rejected` say what it selected and pushed.
"""

import time
from datetime import datetime

import dagster as dg
from pydantic import Field

from orders_pipeline.assets.common import (
    RETRY,
    permanent_failure,
    retried_only_if_transient,
    seconds,
)
from orders_pipeline.assets.orders import ORDERS_REJECTED
from orders_pipeline.jobs import RUN_KIND_TAG
from orders_pipeline.pipeline import Redrive, redrive_rejected
from orders_pipeline.postgres_patterns.redrive import RedriveRefused, RejectFilter
from orders_pipeline.resources import (
    PipelineResource,
    PostgresResource,
    RedisResource,
    pipeline_settings,
)


class RedriveConfig(dg.Config):
    """Which rejected orders to send through again; every given filter must hold."""

    reason: str | None = Field(
        default=None, description="Postgres regular expression found in the reason "
                                  "(case-sensitive), e.g. `^unknown product_id`")
    since: str | None = Field(
        default=None, description="Rejected at or after this instant (ISO 8601 with offset)")
    until: str | None = Field(
        default=None, description="Rejected before this instant (ISO 8601 with offset)")
    order_ids: list[str] = Field(default=[], description="Only these order ids")
    batch_ids: list[str] = Field(default=[], description="Only rows of these batches")
    unknown_references: bool = Field(
        default=False, description="Preset: rejected for an unknown product, currency or zip "
                                   "code since the last lookup change the snapshot picked up")
    everything: bool = Field(default=False,
                             description="Every rejected row not re-driven yet (no filter)")
    dry_run: bool = Field(default=False, description="Only count what would be re-driven")

    def selection(self) -> RejectFilter:
        """The filter (RedriveRefused for a time that is not ISO 8601)."""
        return RejectFilter(
            reason=self.reason, since=_instant("since", self.since),
            until=_instant("until", self.until), order_ids=tuple(self.order_ids),
            batch_ids=tuple(self.batch_ids), unknown_references=self.unknown_references,
            everything=self.everything)


def _instant(name: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise RedriveRefused(f"{name} {text!r} is not an ISO 8601 instant") from exc


def redrive_metadata(result: Redrive, elapsed: float) -> dict[str, dg.MetadataValue | int | str]:
    """What a re-drive did, for the step's output and the `orders_rejected` observation."""
    return {
        "redrive_id": result.redrive_id or "-",
        "dry_run": dg.MetadataValue.bool(result.dry_run),
        "selected": result.selected,
        "pushed_batches": len(result.batch_ids),
        "resumed_batches": len(result.resumed),
        "by_reason": dg.MetadataValue.json(result.by_reason),
        "filters": dg.MetadataValue.json(result.selection.as_json()),
        "seconds": seconds(elapsed),
    }


@dg.op(
    name="redrive",
    out=dg.Out(dg.Nothing),
    retry_policy=RETRY,
    description="""
Sends rejected orders (rows of `orders_rejected` picked by the config's filters) through the
pipeline again, byte for byte, each row at most once; finishes first any re-drive a crash
interrupted. An order still bad is rejected again with its new reason. `dry_run` only counts.
""",
)
@retried_only_if_transient
def redrive_rejected_op(context: dg.OpExecutionContext, config: RedriveConfig,
                        redis: RedisResource, postgres: PostgresResource,
                        pipeline: PipelineResource) -> None:
    started = time.perf_counter()
    try:
        result = redrive_rejected(pipeline_settings(redis, postgres, pipeline),
                                  config.selection(), dry_run=config.dry_run)
    except RedriveRefused as exc:
        raise permanent_failure("redrive", str(exc),
                                error_type=type(exc).__name__) from exc
    metadata = redrive_metadata(result, time.perf_counter() - started)
    verb = "would re-drive" if result.dry_run else "re-drove"
    context.log.info(f"{verb} {result.selected} rejected orders {result.by_reason}"
                     + (f" as {result.redrive_id} in {len(result.batch_ids)} batches"
                        if result.redrive_id else "")
                     + (f"; finished {len(result.resumed)} pending batches of earlier "
                        "re-drives" if result.resumed else ""))
    context.log_event(dg.AssetObservation(asset_key=ORDERS_REJECTED.key, metadata=metadata))
    context.add_output_metadata(metadata)


@dg.job(
    name="redrive_rejected",
    tags={RUN_KIND_TAG: "redrive"},
    description="Send rejected orders through the pipeline again (config: the filters, "
                "dry_run); the completion signals of its batches start the ingest run.",
)
def redrive_rejected_job() -> None:
    redrive_rejected_op()

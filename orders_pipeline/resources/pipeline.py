"""The pipeline resource: batch size, workers, dedup window, backpressure, TTLs, leases."""

from orders_pipeline.resources.declared import declared_fields, settings_of
from orders_pipeline.settings import PipelineSettings


class PipelineResource(declared_fields(PipelineSettings)):  # type: ignore[misc]
    """The tunables of the pipeline: the fields of `PipelineSettings` (BATCH_SIZE,
    WORKER_COUNT, DEDUP_WINDOW_SECONDS, MAX_QUEUE_DEPTH, LOOKUP_TTL_SECONDS,
    CLAIM_TIMEOUT_SECONDS, RAW_RETENTION_DAYS). `staged_orders` config may override workers
    and batch size."""

    def settings(self) -> PipelineSettings:
        """The plain settings (ConfigError naming the variable if a value is out of range)."""
        return settings_of(self, PipelineSettings)

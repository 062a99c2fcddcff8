"""A staging worker: claim a batch, validate, enrich, dedup, COPY, hand it to promotion.

The order of steps is what makes redelivery safe: validation and enrichment come before the
dedup marks (a rejected order never marks its id), the marks carry this batch's token (a
redelivered batch is never a duplicate of itself), and the batch leaves the lease only after
its staging transaction commits. It leaves Redis altogether only at promotion.
"""

import contextlib
import logging
import os
import resource
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import polars as pl
import psycopg
import psycopg_pool
import redis

from orders_pipeline import transform
from orders_pipeline.connections import pg_pool, redis_client
from orders_pipeline.faults import crash_point
from orders_pipeline.postgres_patterns.staging import StageOutcome, StagingBatch, stage_batch
from orders_pipeline.redis_patterns.dedup import DedupWindow
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache, LookupCacheMissing
from orders_pipeline.redis_patterns.order_window import OrderRateWindow
from orders_pipeline.redis_patterns.queue import ClaimedBatch, OrderQueue
from orders_pipeline.settings import Settings

log = logging.getLogger(__name__)
TRANSIENT_RETRIES = 6
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError, redis.TimeoutError, psycopg.OperationalError,
    psycopg_pool.PoolTimeout)
IDLE_POLL_SECONDS = 0.02
# How often a drain with nothing left to claim looks again at batches others hold: a
# live worker's batch leaves `{P}:inflight` as soon as it is staged, long before its lease ends.
LEASE_POLL_SECONDS = 0.1


class StepClock:
    """Seconds per step of one batch, so a benchmark can rate each stage of the worker."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = self.seconds.get(step, 0.0) + now - self._last
        self._last = now


@dataclass
class BatchReport:
    batch_id: str
    claimed: int
    duplicates: int
    rejected: int
    staged: int
    seconds: float
    outcome: str
    reclaimed: bool
    steps: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        rate = self.claimed / self.seconds if self.seconds else 0.0
        again = " (reclaimed)" if self.reclaimed else ""
        return (f"batch {self.batch_id[:12]}{again}: claimed {self.claimed}, "
                f"duplicates {self.duplicates}, rejected {self.rejected}, staged {self.staged}"
                f" [{self.outcome}] in {self.seconds * 1000:.0f} ms ({rate:,.0f} rows/s)")


@dataclass
class WorkerStats:
    batches: int = 0
    claimed: int = 0
    duplicates: int = 0
    rejected: int = 0
    staged: int = 0
    reclaimed_batches: int = 0
    seconds: float = 0.0
    workers: int = 1
    per_worker_seconds: list[float] = field(default_factory=list)
    peak_rss_kib: list[int] = field(default_factory=list)
    # Time spent on batches (claim to hand-over), summed over workers: not idle polling.
    busy_seconds: float = 0.0
    step_seconds: dict[str, float] = field(default_factory=dict)

    def add_batch(self, report: BatchReport) -> None:
        self.batches += 1
        self.claimed += report.claimed
        self.duplicates += report.duplicates
        self.rejected += report.rejected
        self.staged += report.staged
        self.reclaimed_batches += int(report.reclaimed)
        self._add_steps(report.steps)

    def merge(self, other: "WorkerStats") -> None:
        for name in ("batches", "claimed", "duplicates", "rejected", "staged",
                     "reclaimed_batches"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.per_worker_seconds.append(other.seconds)
        self.peak_rss_kib += other.peak_rss_kib
        self._add_steps(other.step_seconds)

    def _add_steps(self, steps: dict[str, float]) -> None:
        for step, seconds in steps.items():
            self.step_seconds[step] = self.step_seconds.get(step, 0.0) + seconds
            self.busy_seconds += seconds

    @property
    def rows_per_second(self) -> float:
        return self.claimed / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "rows_per_second": self.rows_per_second}


class StagingWorker:
    """Drains the ingestion queue into `orders_staging`, one claimed batch at a time."""

    def __init__(self, settings: Settings, *, name: str | None = None,
                 client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.client = client or redis_client(settings.redis)
        self.keys = RedisKeys(settings.redis.key_prefix)
        tuning = settings.pipeline
        self.queue = OrderQueue(self.client, self.keys, tuning.claim_timeout_seconds)
        self.dedup = DedupWindow(self.client, self.keys, tuning.dedup_window_seconds)
        self.lookups = LookupCache(self.client, self.keys, tuning.lookup_ttl_seconds)
        self.window = OrderRateWindow(self.client, self.keys)
        self.owner = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def next_batch(self, batch_size: int) -> ClaimedBatch | None:
        """A batch whose worker died comes first; then fresh orders from the queue."""
        return (self.queue.reclaim_expired(self.owner)
                or self.queue.claim_batch(batch_size, self.owner))

    def process(self, batch: ClaimedBatch) -> BatchReport:
        crash_point("after_claim")
        started = time.perf_counter()
        clock = StepClock()
        payloads = batch.payloads
        parsed = transform.parse_payloads(payloads)
        clock.lap("parse")
        valid, invalid = transform.validate_values(parsed.rows)
        lookups = self._fetch_lookups(transform.lookup_ids(valid))
        enriched, unknown = transform.enrich(valid, lookups)
        clock.lap("transform")
        tokens = [f"{batch.batch_id}:{p}" for p in enriched["batch_position"].to_list()]
        keep = self.dedup.check_and_mark(enriched["order_id"].to_list(), tokens)
        clock.lap("dedup")
        crash_point("after_dedup")
        staged = enriched.filter(pl.Series(keep, dtype=pl.Boolean)) if keep else enriched
        rejects = pl.concat([
            parsed.rejects,
            transform.rejects_from(pl.concat([invalid, unknown]), payloads),
        ])
        duplicates = enriched.height - staged.height
        clock.lap("transform")
        with pg_pool(self.settings.postgres).connection() as conn:
            outcome = stage_batch(conn, StagingBatch(
                batch.batch_id, len(payloads), staged, rejects, duplicates))
        clock.lap("copy")
        crash_point("after_copy")
        self._hand_over(batch, outcome, staged)
        clock.lap("hand_over")
        return BatchReport(batch.batch_id, len(payloads), duplicates, rejects.height,
                           staged.height, time.perf_counter() - started, outcome.value,
                           batch.reclaimed, clock.seconds)

    def _fetch_lookups(self, ids: dict[str, list[str]]) -> dict[str, pl.DataFrame]:
        try:
            return self.lookups.fetch(ids)
        except LookupCacheMissing:
            with pg_pool(self.settings.postgres).connection() as conn:
                self.lookups.ensure_loaded(conn)
            return self.lookups.fetch(ids)

    def _hand_over(self, batch: ClaimedBatch, outcome: StageOutcome,
                   staged: pl.DataFrame) -> None:
        if outcome is StageOutcome.ALREADY_PROMOTED:
            self.queue.release([batch.batch_id])
            return
        self.queue.mark_staged(batch)
        if outcome is StageOutcome.STAGED:
            self.window.add_counts(batch.batch_id, transform.orders_per_minute(staged))

    def _process_with_retries(self, batch: ClaimedBatch) -> BatchReport:
        """Retry a batch through transient server errors (restarts, dropped connections).

        Processing is idempotent, so retrying is safe; after the last attempt the error
        propagates and the batch stays in flight, to be reclaimed once its lease expires.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                return self.process(batch)
            except TRANSIENT_ERRORS as exc:
                if attempt >= TRANSIENT_RETRIES:
                    raise
                delay = min(0.2 * 2**attempt, 5.0)
                log.warning("batch %s: %s; retry %d in %.1fs", batch.batch_id[:12],
                            exc, attempt, delay)
                time.sleep(delay)
                with contextlib.suppress(*TRANSIENT_ERRORS):
                    self.queue.extend_lease(batch)

    def drain(self, batch_size: int, max_batches: int | None = None,
              on_batch: Callable[[BatchReport], None] | None = None,
              wait_while: Callable[[], bool] | None = None) -> WorkerStats:
        """Process batches until nothing is queued or claimed (or `max_batches` were processed).

        A drain is done only when the ingestion list is empty *and* `{P}:inflight` is: while
        other workers hold batches, it polls every LEASE_POLL_SECONDS (never past the
        earliest lease deadline, read with the Redis clock), and takes over each batch whose
        lease runs out, i.e. a dead worker's batch at most its CLAIM_TIMEOUT_SECONDS after the
        claim. A live worker's batch leaves `{P}:inflight` once staged; a batch requeued with
        deadline 0 is reclaimed at once. So "done" never leaves orders claimed but unstaged.

        With `wait_while`, an empty queue ends the drain only once it returns False: a
        worker running beside a producer waits for more instead of quitting at a lull. It
        is read before each claim, so an empty claim after False means nothing is left.
        """
        stats = WorkerStats()
        started = time.perf_counter()
        waiting_for_leases = False
        while max_batches is None or stats.batches < max_batches:
            more_coming = wait_while is not None and wait_while()
            claim_started = time.perf_counter()
            batch = self.next_batch(batch_size)
            if batch is None:
                if more_coming:
                    time.sleep(IDLE_POLL_SECONDS)
                    continue
                until_expiry = self.queue.seconds_until_lease_expiry()
                if until_expiry is None:
                    break
                if not waiting_for_leases:
                    log.info("queue empty; waiting for %d batch(es) other workers hold "
                             "(next lease ends in %.1f s)", self.queue.in_flight_batches(),
                             until_expiry)
                waiting_for_leases = True
                time.sleep(min(until_expiry, LEASE_POLL_SECONDS))
                continue
            waiting_for_leases = False
            claim_seconds = time.perf_counter() - claim_started
            report = self._process_with_retries(batch)
            report.steps["claim"] = claim_seconds
            stats.add_batch(report)
            if on_batch is not None:
                on_batch(report)
        stats.seconds = time.perf_counter() - started
        stats.peak_rss_kib = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]
        return stats

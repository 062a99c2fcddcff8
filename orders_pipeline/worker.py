"""A staging worker: claim a batch, validate, enrich, dedup, COPY, hand it to promotion.

The order of steps is what makes redelivery safe: validation and enrichment come before the
dedup marks (a rejected order never marks its id), the marks carry this batch's token (a
redelivered batch is never a duplicate of itself), and the batch leaves the lease only after
its staging transaction commits. It leaves Redis altogether only at promotion.

A worker either drains the queue (`drain`: until nothing is queued or claimed) or follows it
(`follow`: a long-running worker that waits for work until a `StopRequest`).
"""

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from types import FrameType
from typing import TypeVar

import polars as pl
import psycopg
import psycopg_pool
import redis

from orders_pipeline import transform
from orders_pipeline.connections import (
    TRANSIENT_REDIS_ERRORS,
    pg_pool,
    redis_client,
    retry_transient,
)
from orders_pipeline.faults import crash_point
from orders_pipeline.postgres_patterns.archive import RawBatch
from orders_pipeline.postgres_patterns.partitions import retention_horizon
from orders_pipeline.postgres_patterns.replay import is_replay_batch
from orders_pipeline.postgres_patterns.staging import (
    StageOutcome,
    StagingBatch,
    before_horizon,
    stage_batch,
)
from orders_pipeline.redis_patterns.dedup import DedupWindow
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache, LookupCacheMissing
from orders_pipeline.redis_patterns.order_window import OrderRateWindow
from orders_pipeline.redis_patterns.queue import ClaimedBatch, OrderQueue
from orders_pipeline.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    *TRANSIENT_REDIS_ERRORS, psycopg.OperationalError, psycopg_pool.PoolTimeout)
# How often a drain with nothing left to claim looks again at batches others hold: a
# live worker's batch leaves `{P}:inflight` as soon as it is staged, long before its lease ends.
LEASE_POLL_SECONDS = 0.1
# Longest a following worker waits for a completion signal before it looks at the queue
# again (orders pushed without a signal, leases running out, a stop request).
FOLLOW_WAIT_SECONDS = 1.0
STOP_CHECK_SECONDS = 0.1
# How long a worker trusts the retention horizon it read (staging checks it again, locked).
HORIZON_TTL_SECONDS = 30.0


@dataclass
class BatchReport:
    """What one batch came to: orders claimed, dropped as duplicates, rejected and staged,
    seconds from claim to hand-over, the staging outcome, and whether it was reclaimed."""
    batch_id: str
    claimed: int
    duplicates: int
    rejected: int
    staged: int
    seconds: float
    outcome: str
    reclaimed: bool

    def line(self) -> str:
        rate = self.claimed / self.seconds if self.seconds else 0.0
        again = " (reclaimed)" if self.reclaimed else ""
        return (f"batch {self.batch_id[:12]}{again}: claimed {self.claimed}, "
                f"duplicates {self.duplicates}, rejected {self.rejected}, staged {self.staged}"
                f" [{self.outcome}] in {self.seconds * 1000:.0f} ms ({rate:,.0f} rows/s)")


@dataclass
class WorkerStats:
    """Totals of one or more workers; `seconds` is wall time, `left_in_flight` the batches a
    stop interrupted (still leased: reclaimed once their lease runs out)."""
    batches: int = 0
    claimed: int = 0
    duplicates: int = 0
    rejected: int = 0
    staged: int = 0
    reclaimed_batches: int = 0
    seconds: float = 0.0
    workers: int = 1
    left_in_flight: list[str] = field(default_factory=list)

    def add_batch(self, report: BatchReport) -> None:
        self.batches += 1
        self.claimed += report.claimed
        self.duplicates += report.duplicates
        self.rejected += report.rejected
        self.staged += report.staged
        self.reclaimed_batches += int(report.reclaimed)

    def merge(self, other: "WorkerStats") -> None:
        """Add another worker's counts (not its seconds: the caller knows the wall time)."""
        for name in ("batches", "claimed", "duplicates", "rejected", "staged",
                     "reclaimed_batches"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.left_in_flight += other.left_in_flight

    @property
    def rows_per_second(self) -> float:
        return self.claimed / self.seconds if self.seconds else 0.0


class GraceExpired(KeyboardInterrupt):
    """The batch in hand was not done within the grace period of a stop.

    A KeyboardInterrupt, so that libraries treat it as an interruption: psycopg cancels the
    query in flight instead of leaving the connection busy.
    """


class StopRequest:
    """Asks a following worker (`StagingWorker.follow`) to stop, e.g. from a signal handler.

    After `request()` the worker claims nothing more. The batch in hand is finished; if that
    takes longer than `grace_seconds`, SIGALRM interrupts it (GraceExpired) and the batch
    stays leased in `{P}:inflight`, to be reclaimed when its lease runs out, exactly as after
    a crash (staging is idempotent): it is never lost. The grace timer needs the worker to
    run in the main thread (where Python runs signal handlers); elsewhere the batch in hand
    is always finished. `request()` only sets flags, arms that timer and calls the listeners
    (`on_request`), so it is safe in a signal handler; a second request changes nothing.
    """

    def __init__(self, grace_seconds: float) -> None:
        if grace_seconds <= 0:
            raise ValueError(f"the grace period must be positive, got {grace_seconds} s")
        self.grace_seconds = grace_seconds
        self.requested = False
        self._holding = False
        self._timer_installed = False
        self._armed = False
        self._listeners: list[Callable[[], None]] = []

    def on_request(self, listener: Callable[[], None]) -> None:
        """Call `listener` (no arguments) when the stop is requested; now if it already was."""
        self._listeners.append(listener)
        if self.requested:
            listener()

    def request(self) -> None:
        """Stop: finish the batch in hand within the grace period, claim nothing more."""
        first = not self.requested
        self.requested = True
        if self._holding:
            self._arm()
        if first:
            for listener in self._listeners:
                listener()

    def sleep(self, seconds: float) -> None:
        """Sleep `seconds`, or less: until the stop is requested."""
        deadline = time.monotonic() + seconds
        while not self.requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, STOP_CHECK_SECONDS))

    @contextlib.contextmanager
    def holding_batch(self) -> Iterator[None]:
        """The block that claims and processes one batch: a stop inside it starts the timer."""
        self._holding = True
        try:
            if self.requested:
                self._arm()
            yield
        finally:
            self._holding = False
            self._disarm()

    @contextlib.contextmanager
    def grace_timer(self) -> Iterator[None]:
        """Install the SIGALRM handler that ends the grace period (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGALRM, self._expire)
        self._timer_installed = True
        try:
            yield
        finally:
            self._disarm()
            self._timer_installed = False
            signal.signal(signal.SIGALRM, previous)

    def _expire(self, signum: int, frame: FrameType | None) -> None:
        if self._holding:
            raise GraceExpired(f"the batch in hand was not done within {self.grace_seconds} s")

    def _arm(self) -> None:
        if self._timer_installed and not self._armed:
            self._armed = True
            signal.setitimer(signal.ITIMER_REAL, self.grace_seconds)

    def _disarm(self) -> None:
        if self._armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._armed = False


class StagingWorker:
    """Drains the ingestion queue into `orders_staging`, one claimed batch at a time."""

    def __init__(self, settings: Settings, *, name: str | None = None,
                 client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.client = client or redis_client(settings.redis)
        self.keys = RedisKeys.of(settings.redis)
        tuning = settings.pipeline
        self.queue = OrderQueue(self.client, self.keys, tuning.claim_timeout_seconds)
        self.dedup = DedupWindow(self.client, self.keys, tuning.dedup_window_seconds)
        self.lookups = LookupCache(self.client, self.keys, tuning.lookup_ttl_seconds)
        self.window = OrderRateWindow(self.client, self.keys)
        self.owner = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._horizon: tuple[float, date | None] | None = None  # (read at, horizon)

    def _retention_horizon(self) -> date | None:
        """The retention horizon, read from Postgres at most every HORIZON_TTL_SECONDS.
        Orders before it are rejected before the dedup window marks their ids; `stage_batch`
        checks again under the retention lock, which covers a horizon moved meanwhile."""
        now = time.monotonic()
        if self._horizon is None or now - self._horizon[0] > HORIZON_TTL_SECONDS:
            with pg_pool(self.settings.postgres).connection() as conn, conn.transaction():
                self._horizon = (now, retention_horizon(conn))
        return self._horizon[1]

    def next_batch(self, batch_size: int) -> ClaimedBatch | None:
        """A batch whose worker died comes first; then fresh orders from the queue."""
        return (self.queue.reclaim_expired(self.owner)
                or self.queue.claim_batch(batch_size, self.owner))

    def process(self, batch: ClaimedBatch) -> BatchReport:
        crash_point("after_claim")
        started = time.perf_counter()
        payloads = batch.payloads
        parsed = transform.parse_payloads(payloads)
        valid, invalid = transform.validate_values(parsed.rows)
        lookups = self._fetch_lookups(transform.lookup_ids(valid))
        enriched, unknown = transform.enrich(valid, lookups)
        horizon = self._retention_horizon()
        expired = pl.DataFrame(schema=transform.REJECT_SCHEMA)
        if horizon is not None:
            enriched, expired = before_horizon(enriched, payloads, horizon)
        replay = is_replay_batch(batch.batch_id)
        if replay:  # promotion tells which copy landed, not the dedup window
            staged = enriched.unique(subset="order_id", keep="first", maintain_order=True)
        else:
            tokens = [f"{batch.batch_id}:{p}" for p in enriched["batch_position"].to_list()]
            keep = self.dedup.check_and_mark(enriched["order_id"].to_list(), tokens,
                                             shard=batch.shard)
            staged = enriched.filter(pl.Series(keep, dtype=pl.Boolean)) if keep else enriched
        crash_point("after_dedup")
        rejects = pl.concat([
            parsed.rejects,
            transform.rejects_from(pl.concat([invalid, unknown]), payloads),
            expired,
        ])
        duplicates = enriched.height - staged.height
        # A replay batch's bytes are archived already, under the batch it replays.
        raw = None if replay else RawBatch.of(payloads, self.settings.pipeline.raw_retention_days)
        with pg_pool(self.settings.postgres).connection() as conn:
            outcome = stage_batch(conn, StagingBatch(
                batch.batch_id, len(payloads), staged, rejects, duplicates, raw, batch.shard,
                payloads))
        crash_point("after_copy")
        self._hand_over(batch, outcome, staged)
        return BatchReport(batch.batch_id, len(payloads), duplicates, rejects.height,
                           staged.height, time.perf_counter() - started, outcome.value,
                           batch.reclaimed)

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
        if outcome is StageOutcome.STAGED and not is_replay_batch(batch.batch_id):  # new orders
            self.window.add_counts(batch.batch_id, transform.orders_per_minute(staged))

    def _process_with_retries(self, batch: ClaimedBatch) -> BatchReport:
        """Retry a batch through transient server errors (restarts, dropped connections).

        Processing is idempotent, so retrying is safe; after the last attempt the error
        propagates and the batch stays in flight, to be reclaimed once its lease expires.
        """
        def keep_lease() -> None:
            with contextlib.suppress(*TRANSIENT_ERRORS):
                self.queue.extend_lease(batch)

        return self._retried(lambda: self.process(batch), f"batch {batch.batch_id[:12]}",
                             keep_lease)

    @staticmethod
    def _retried(call: Callable[[], T], what: str = "claim",
                 after_wait: Callable[[], None] | None = None) -> T:
        """`call()` through `retry_transient` with TRANSIENT_ERRORS (Redis's and Postgres's)."""
        return retry_transient(call, what=what, errors=TRANSIENT_ERRORS, after_wait=after_wait)

    def drain(self, batch_size: int, max_batches: int | None = None,
              on_batch: Callable[[BatchReport], None] | None = None) -> WorkerStats:
        """Process batches until nothing is queued or claimed (or `max_batches` were processed).

        A drain is done only when the ingestion list is empty *and* `{P}:inflight` is: while
        other workers hold batches, it polls every LEASE_POLL_SECONDS (never past the
        earliest lease deadline, read with the Redis clock), and takes over each batch whose
        lease runs out, i.e. a dead worker's batch at most its CLAIM_TIMEOUT_SECONDS after the
        claim. A live worker's batch leaves `{P}:inflight` once staged; a batch requeued with
        deadline 0 is reclaimed at once. So "done" never leaves orders claimed but unstaged.
        """
        stats = WorkerStats()
        started = time.perf_counter()
        waiting_for_leases = False
        while max_batches is None or stats.batches < max_batches:
            batch = self._retried(lambda: self.next_batch(batch_size))
            if batch is None:
                until_expiry = self._retried(self.queue.seconds_until_lease_expiry,
                                             "lease reading")
                if until_expiry is None:
                    break
                if not waiting_for_leases:
                    log.info("queue empty; waiting for %d batch(es) other workers hold "
                             "(next lease ends in %.1f s)", self.queue.claimed_batches(),
                             until_expiry)
                waiting_for_leases = True
                time.sleep(min(until_expiry, LEASE_POLL_SECONDS))
                continue
            waiting_for_leases = False
            report = self._process_with_retries(batch)
            stats.add_batch(report)
            if on_batch is not None:
                on_batch(report)
        stats.seconds = time.perf_counter() - started
        return stats

    def follow(self, batch_size: int, stop: StopRequest,
               on_batch: Callable[[BatchReport], None] | None = None) -> WorkerStats:
        """Process batches as they arrive until `stop` is requested (a long-running worker).

        Between batches it holds nothing: with the queue empty it blocks on the completion
        signal stream (`CompletionSignals.wait_after`, at most FOLLOW_WAIT_SECONDS, never past
        the earliest lease deadline), so a push wakes it at once and a dead worker's batch is
        reclaimed when its lease runs out; orders pushed without a signal wait at most
        FOLLOW_WAIT_SECONDS. After a stop request it claims nothing more; the
        batch in hand is finished, or, past the grace period, left leased (its id in
        `left_in_flight`). Returns the totals; `seconds` is the time it ran.
        """
        stats = WorkerStats()
        started = time.perf_counter()
        failures = 0
        with stop.grace_timer():
            while not stop.requested:
                batch: ClaimedBatch | None = None
                report: BatchReport | None = None
                try:
                    with stop.holding_batch():
                        batch = self.next_batch(batch_size)
                        if batch is not None:
                            report = self._process_with_retries(batch)
                    if batch is None and not stop.requested:
                        self._wait_for_work(stop)
                    failures = 0
                except GraceExpired:
                    if batch is None:
                        log.warning("stopping: a claim was not done within %g s; a batch it "
                                    "took is reclaimed when its lease ends", stop.grace_seconds)
                    elif report is None:
                        log.warning("stopping: batch %s not done within %g s, left leased "
                                    "(reclaimed when its lease ends)", batch.batch_id,
                                    stop.grace_seconds)
                        stats.left_in_flight.append(batch.batch_id)
                except TRANSIENT_ERRORS as exc:
                    # A server restarting under a long-running worker: wait, then go on; a
                    # batch it held is reclaimed when its lease ends (by this worker, too).
                    failures += 1
                    delay = min(0.2 * 2**failures, 5.0)
                    log.warning("%s: %s; trying again in %.1f s", type(exc).__name__, exc,
                                delay)
                    stop.sleep(delay)
                if report is not None:
                    stats.add_batch(report)
                    if on_batch is not None:
                        on_batch(report)
        stats.seconds = time.perf_counter() - started
        return stats

    def _wait_for_work(self, stop: StopRequest) -> None:
        """Block until a signal arrives, a lease runs out, `stop`, or FOLLOW_WAIT_SECONDS.

        The wait is cut into STOP_CHECK_SECONDS slices so that a stop is seen within one.
        """
        signals = self.queue.signals
        mark = signals.latest_id()  # before looking: a push after this wakes the wait
        if self.queue.depth():
            return
        until_expiry = self.queue.seconds_until_lease_expiry()
        wait = FOLLOW_WAIT_SECONDS if until_expiry is None else min(until_expiry,
                                                                   FOLLOW_WAIT_SECONDS)
        deadline = time.monotonic() + wait
        while not stop.requested:
            left = deadline - time.monotonic()
            if left <= 0 or signals.wait_after(mark, min(left, STOP_CHECK_SECONDS)):
                return

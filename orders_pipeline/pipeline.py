"""Pipeline operations shared by the Dagster assets and the CLI: one implementation each.

`stage_queue` drains the queue with N staging worker processes, `follow_queue` runs N
long-running workers until they are asked to stop, `promote_staged` moves staged batches into
`orders` and releases them from Redis (quarantining poison batches), `readmit_quarantined`
hands quarantined batches back, `refresh_all_views` refreshes the dashboards.
"""

import contextlib
import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import connection as mp_connection
from multiprocessing.queues import SimpleQueue
from types import FrameType
from typing import Any

from orders_pipeline.connections import pg_pool, redis_client
from orders_pipeline.postgres_patterns.promotion import (
    PromotionResult,
    QuarantinedBatch,
    batch_statuses,
    kept_payloads,
    mark_readmitted,
    promote_round,
    quarantined_batches,
)
from orders_pipeline.postgres_patterns.views import ROLLUPS, refresh_views
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.settings import Settings
from orders_pipeline.worker import BatchReport, StagingWorker, StopRequest, WorkerStats


class WorkerFailed(RuntimeError):
    """A staging worker process raised or died (raised once the other workers are done).

    Its batch stays in flight until its lease runs out; the other workers of the same
    `stage_queue` wait for that and take it over, or, if none was left, the next drain does.
    """


def _report_outcome(reports: "SimpleQueue[Any]", run: Callable[[], WorkerStats]) -> None:
    """Run a worker in a child process and report its totals, or its error, to the parent."""
    name = mp.current_process().name
    try:
        stats = run()
    except BaseException as exc:  # reported to the parent, which fails the run
        reports.put(("error", name, f"{name}: {type(exc).__name__}: {exc}"))
        raise
    reports.put(("done", name, stats))


def _drain_main(settings: Settings, batch_size: int, max_batches: int | None,
                reports: "SimpleQueue[Any]") -> None:
    _report_outcome(reports, lambda: StagingWorker(settings).drain(
        batch_size, max_batches, on_batch=reports.put))


def _follow_main(settings: Settings, batch_size: int, grace_seconds: float,
                 reports: "SimpleQueue[Any]") -> None:
    """A following worker process: SIGTERM (how its supervisor forwards a stop) stops it
    gracefully; SIGINT is ignored, as a Ctrl-C reaches it through the supervisor."""
    stop = StopRequest(grace_seconds)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        stop.request()

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_sigterm)
    _report_outcome(reports, lambda: StagingWorker(settings).follow(
        batch_size, stop, on_batch=reports.put))


def _supervise(settings: Settings, workers: int, target: Callable[..., None],
               args: tuple[Any, ...], on_batch: Callable[[BatchReport], None] | None,
               stop: StopRequest | None = None) -> tuple[WorkerStats, list[str]]:
    """Run `target(settings, *args, reports)` in `workers` spawned processes until all exit.

    Each child reports every BatchReport (passed to `on_batch` here) and then its totals or
    its error. A thread waits for the processes' exits (their sentinels) and then closes the
    report stream; a child's reports are written synchronously before it exits, so none is
    missed. With `stop` (following workers) a stop request is forwarded to every process
    as SIGTERM, and one process ending, for whatever reason, stops the others. Returns the
    merged totals (`seconds`: the longest worker's) and one line per failed process.
    """
    ctx = mp.get_context("spawn")
    reports = ctx.SimpleQueue()
    processes = [ctx.Process(target=target, name=f"staging-worker-{i}",
                             args=(settings, *args, reports), daemon=True)
                 for i in range(workers)]
    for process in processes:
        process.start()
    running = {process.sentinel: process for process in processes}

    def forward_stop() -> None:
        for process in list(running.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)

    def await_exits() -> None:
        while running:
            for sentinel in mp_connection.wait(list(running)):
                running.pop(sentinel).join()
                if stop is not None:
                    stop.request()
        reports.put(None)

    if stop is not None:
        stop.on_request(forward_stop)
    waiter = threading.Thread(target=await_exits, name="staging-supervisor", daemon=True)
    waiter.start()
    total = WorkerStats(workers=workers)
    errors: list[str] = []
    reported: set[str] = set()
    for message in iter(reports.get, None):
        if isinstance(message, BatchReport):
            if on_batch is not None:
                on_batch(message)
            continue
        kind, name, body = message
        reported.add(name)
        if kind == "done":
            total.merge(body)
            total.seconds = max(total.seconds, body.seconds)
        else:
            errors.append(body)
    waiter.join()
    # A child reports before it exits: one that did not was killed (SIGKILL, OOM killer), or
    # got its stop before it could handle one (then it held no batch).
    stopped_early = -signal.SIGTERM if stop is not None and stop.requested else None
    errors += [f"{p.name} exited with code {p.exitcode}" for p in processes
               if p.name not in reported and p.exitcode != stopped_early]
    return total, errors


def stage_queue(settings: Settings, *, workers: int, batch_size: int,
                max_batches: int | None = None,
                on_batch: Callable[[BatchReport], None] | None = None) -> WorkerStats:
    """Drain the queue into staging with `workers` processes (1 = in this process).

    Returns once every worker has finished (see `StagingWorker.drain`: nothing queued and
    nothing claimed); a worker that raised or died does not end the others early, they take
    over its batch when its lease runs out. Raises WorkerFailed after that if any worker
    failed.
    """
    if workers <= 1:
        return StagingWorker(settings).drain(batch_size, max_batches, on_batch)
    total, errors = _supervise(settings, workers, _drain_main, (batch_size, max_batches),
                               on_batch)
    if errors:
        raise WorkerFailed("; ".join(errors) + " (a failed worker's batch is taken over once "
                           "its lease of CLAIM_TIMEOUT_SECONDS="
                           f"{settings.pipeline.claim_timeout_seconds} s runs out)")
    return total


def follow_queue(settings: Settings, *, workers: int, batch_size: int, stop: StopRequest,
                 on_batch: Callable[[BatchReport], None] | None = None) -> WorkerStats:
    """Stage batches as they arrive with `workers` long-running workers until `stop`.

    1 worker runs in this process (`StagingWorker.follow`; in the main thread for the grace
    timer); more run as processes, each stopped by a forwarded SIGTERM with the same grace
    period, and one ending (stopped or failed) stops the others. Returns the totals once all
    have stopped: every batch they took is staged, or listed in `left_in_flight` (still
    leased, reclaimed when its lease runs out). Raises WorkerFailed if a worker process
    raised or died (its batch is reclaimed the same way).
    """
    if workers <= 1:
        return StagingWorker(settings).follow(batch_size, stop, on_batch)
    total, errors = _supervise(settings, workers, _follow_main,
                               (batch_size, stop.grace_seconds), on_batch, stop)
    if errors:
        raise WorkerFailed("; ".join(errors) + "; the other workers were stopped (a failed "
                           "worker's batch is reclaimed once its lease of "
                           f"CLAIM_TIMEOUT_SECONDS={settings.pipeline.claim_timeout_seconds}"
                           " s runs out)")
    return total


@dataclass
class Reconciled:
    released: int
    requeued: int


def reconcile_batches(settings: Settings) -> Reconciled:
    """Bring Redis in line with the ledger after a crash between a commit and its Redis step.

    Batches the ledger calls promoted are released. Staged batches (in `{P}:staged`) that it
    calls lost (staging emptied by a Postgres crash) or has no row for (their asynchronous
    commit died in a crash) are requeued, and so are claimed batches it calls lost whose
    lease has run out (handed back before, then left by a drain that stopped early or died);
    a lost batch a live worker holds is left to it. `OrderQueue.requeue` records a
    completion signal with them, so the sensor starts the run that stages and promotes them
    again: whoever calls this (every promotion does) never leaves recovered work waiting for
    a producer's next signal. Returns how many batches were released and requeued.
    """
    client = redis_client(settings.redis)
    queue = OrderQueue(client, RedisKeys(settings.redis.key_prefix))
    staged = queue.staged_batch_ids()
    claimed = queue.claimed_batch_ids()
    with pg_pool(settings.postgres).connection() as conn:
        statuses = batch_statuses(conn, staged + claimed)
    expired = set(queue.expired_batch_ids())
    promoted = [b for b, s in statuses.items() if s == "promoted"]
    lost = [b for b in staged if statuses.get(b, "lost") == "lost"] + [
        b for b in claimed if b in expired and statuses.get(b) == "lost"]
    queue.release(promoted)
    queue.requeue(lost)
    return Reconciled(len(promoted), len(lost))


# Promotion deletes every row it takes from staging and rewrites rollup rows: reclaim that
# space after each promotion, or every later round scans the dead rows again (autovacuum, if
# it runs at all, wakes once a minute: minutes of staged rows at full speed).
_AFTER_PROMOTION = f"VACUUM (SKIP_LOCKED) orders_staging, {', '.join(ROLLUPS)}"


def promote_staged(settings: Settings, max_batches_per_round: int = 400) -> PromotionResult:
    """Promote every staged batch, releasing each round's batches from Redis after commit.

    A poison batch is quarantined by its round (`promote_round`, which copies its raw payloads
    from the Redis batch list into Postgres in the same transaction) and the others are
    promoted; after the commit it moves from `{P}:staged` to `{P}:quarantined`, its list kept.
    A move that a crash interrupted is finished by the next call. Errors that are not poison
    (`promotion.is_poison`) propagate; the round they hit committed nothing.
    """
    client = redis_client(settings.redis)
    queue = OrderQueue(client, RedisKeys(settings.redis.key_prefix))
    reconcile_batches(settings)
    total = PromotionResult()
    with pg_pool(settings.postgres).connection() as conn:
        while True:
            result = promote_round(conn, max_batches_per_round, queue.batch_payloads)
            queue.release(result.promoted_batches)
            queue.requeue(result.lost_batches)
            queue.quarantine(result.quarantined_batches)
            total.add(result)
            done = (len(result.promoted_batches) + len(result.lost_batches)
                    + len(result.quarantined))
            if done < max_batches_per_round:
                break
        statuses = batch_statuses(conn, queue.staged_batch_ids())
        queue.quarantine([b for b, status in statuses.items() if status == "quarantined"])
        if total.promoted_batches:
            conn.autocommit = True  # VACUUM cannot run inside a transaction
            try:
                conn.execute(_AFTER_PROMOTION)
            finally:
                conn.autocommit = False
    return total


def list_quarantined(settings: Settings,
                     batch_ids: Sequence[str] | None = None) -> list[QuarantinedBatch]:
    """The quarantined batches (all, or those named; NotQuarantined if one of those is not)."""
    with pg_pool(settings.postgres).connection() as conn, conn.transaction():
        return quarantined_batches(conn, batch_ids)


@dataclass
class Readmission:
    """What `readmit_quarantined` did: batches handed back, and batches it could not hand back
    because no copy of their raw payloads is left (neither in Redis nor in Postgres)."""
    readmitted: list[QuarantinedBatch]
    unrecoverable: list[QuarantinedBatch]


def readmit_quarantined(settings: Settings,
                        batch_ids: Sequence[str] | None = None) -> Readmission:
    """Re-admit quarantined batches (all, or those named) after the cause was fixed.

    Under the batches' locked ledger rows: each batch list Redis lost is restored from
    `quarantined_payloads`, the batches are requeued under their own ids with a completion
    signal (`OrderQueue.readmit`), and the ledger marks them `lost`, so the next staging of
    each restages it and the next promotion promotes it, or quarantines it again if it is
    still poison. Raises NotQuarantined if a named batch is not quarantined; re-running after
    a failure finishes the job (a batch is quarantined in the ledger until it commits).
    """
    queue = OrderQueue(redis_client(settings.redis), RedisKeys(settings.redis.key_prefix))
    with pg_pool(settings.postgres).connection() as conn, conn.transaction():
        batches = quarantined_batches(conn, batch_ids, lock=True)
        missing = set(queue.missing_batch_lists([b.batch_id for b in batches]))
        unrecoverable = [b for b in batches if b.batch_id in missing and not b.payloads]
        readmitted = [b for b in batches if b not in unrecoverable]
        ids = [b.batch_id for b in readmitted]
        queue.readmit(ids, {b: kept_payloads(conn, b) for b in ids if b in missing})
        mark_readmitted(conn, ids)
    return Readmission(readmitted, unrecoverable)


def refresh_all_views(settings: Settings) -> dict[str, float]:
    with pg_pool(settings.postgres, via_pgbouncer=False).connection() as conn:
        return refresh_views(conn)

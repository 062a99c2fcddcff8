"""Pipeline operations shared by the Dagster assets and the CLI: one implementation each.

`stage_queue` runs N staging worker processes, `promote_staged` moves staged batches into
`orders` and releases them from Redis (quarantining poison batches), `readmit_quarantined`
hands quarantined batches back, `refresh_all_views` refreshes the dashboards.
"""

import multiprocessing as mp
import queue as queue_module
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.synchronize import Event

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
from orders_pipeline.worker import BatchReport, StagingWorker, WorkerStats


class WorkerFailed(RuntimeError):
    """A staging worker process raised or died (raised once the other workers are done).

    Its batch stays in flight until its lease runs out; the other workers of the same
    `stage_queue` wait for that and take it over, or, if none was left, the next drain does.
    """


def _waiting_for(producer_done: Event | None) -> Callable[[], bool] | None:
    """While the producer is not done, an empty queue is a lull, not the end."""
    return None if producer_done is None else lambda: not producer_done.is_set()


def _worker_main(settings: Settings, batch_size: int, max_batches: int | None,
                 reports: "mp.Queue[object]", producer_done: Event | None) -> None:
    name = mp.current_process().name
    try:
        stats = StagingWorker(settings).drain(batch_size, max_batches, on_batch=reports.put,
                                              wait_while=_waiting_for(producer_done))
        reports.put(("done", name, stats))
    except BaseException as exc:  # reported to the parent, which fails the run
        reports.put(("error", name, f"{name}: {type(exc).__name__}: {exc}"))
        raise


def stage_queue(settings: Settings, *, workers: int, batch_size: int,
                max_batches: int | None = None,
                on_batch: Callable[[BatchReport], None] | None = None,
                producer_done: Event | None = None) -> WorkerStats:
    """Drain the queue into staging with `workers` processes (1 = in this process).

    With `producer_done` (an Event of the "spawn" context) workers keep waiting at an
    empty queue until it is set, so they can run beside a producer that is still pushing.
    Returns once every worker has finished (see `StagingWorker.drain`: nothing queued and
    nothing claimed); a worker that raised or died does not end the others early, they take
    over its batch when its lease runs out. Raises WorkerFailed after that if any worker
    failed.
    """
    if workers <= 1:
        stats = StagingWorker(settings).drain(batch_size, max_batches, on_batch,
                                              wait_while=_waiting_for(producer_done))
        stats.per_worker_seconds = [stats.seconds]
        return stats
    ctx = mp.get_context("spawn")
    reports: mp.Queue[object] = ctx.Queue()
    processes = [ctx.Process(target=_worker_main, name=f"staging-worker-{i}",
                             args=(settings, batch_size, max_batches, reports, producer_done),
                             daemon=True)
                 for i in range(workers)]
    total = WorkerStats(workers=workers)
    errors: list[str] = []
    for process in processes:
        process.start()
    running = {process.name: process for process in processes}
    while running:
        try:
            message = reports.get(timeout=0.5)
        except queue_module.Empty:
            # A worker flushes its last report before it exits: one that exited before the
            # queue was seen empty never reported (SIGKILL, OOM killer).
            exited = [p for p in running.values() if p.exitcode is not None]
            if exited and reports.empty():
                for process in exited:
                    errors.append(f"{process.name} exited with code {process.exitcode}")
                    del running[process.name]
            continue
        if isinstance(message, BatchReport):
            if on_batch is not None:
                on_batch(message)
            continue
        kind, name, body = message
        running.pop(name, None)
        if kind == "done":
            total.merge(body)
        else:
            errors.append(body)
    for process in processes:
        process.join(timeout=30)
    total.seconds = max(total.per_worker_seconds, default=0.0)
    if errors:
        raise WorkerFailed("; ".join(errors) + " (a failed worker's batch is taken over once "
                           "its lease of CLAIM_TIMEOUT_SECONDS="
                           f"{settings.pipeline.claim_timeout_seconds} s runs out)")
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

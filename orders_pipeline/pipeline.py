"""Pipeline operations shared by the Dagster assets and the CLI: one implementation each.

`stage_queue` runs N staging worker processes, `promote_staged` moves staged batches into
`orders` and releases them from Redis, `refresh_all_views` refreshes the dashboards.
"""

import multiprocessing as mp
import queue as queue_module
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Event

from orders_pipeline.connections import pg_pool, redis_client
from orders_pipeline.postgres_patterns.promotion import (
    PromotionResult,
    batch_statuses,
    promote_round,
)
from orders_pipeline.postgres_patterns.views import ROLLUPS, refresh_views
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.settings import Settings
from orders_pipeline.worker import BatchReport, StagingWorker, WorkerStats


class WorkerFailed(RuntimeError):
    """A staging worker process raised or died; its batch stays in flight for reclaim."""


def _waiting_for(producer_done: Event | None) -> Callable[[], bool] | None:
    """While the producer is not done, an empty queue is a lull, not the end."""
    return None if producer_done is None else lambda: not producer_done.is_set()


def _worker_main(settings: Settings, batch_size: int, max_batches: int | None,
                 reports: "mp.Queue[object]", producer_done: Event | None) -> None:
    try:
        stats = StagingWorker(settings).drain(batch_size, max_batches, on_batch=reports.put,
                                              wait_while=_waiting_for(producer_done))
        reports.put(("done", stats))
    except BaseException as exc:  # reported to the parent, which fails the run
        reports.put(("error", f"{type(exc).__name__}: {exc}"))
        raise


def stage_queue(settings: Settings, *, workers: int, batch_size: int,
                max_batches: int | None = None,
                on_batch: Callable[[BatchReport], None] | None = None,
                producer_done: Event | None = None) -> WorkerStats:
    """Drain the queue into staging with `workers` processes (1 = in this process).

    With `producer_done` (an Event of the "spawn" context) workers keep waiting at an
    empty queue until it is set, so they can run beside a producer that is still pushing.
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
    finished = 0
    while finished < workers:
        try:
            message = reports.get(timeout=0.5)
        except queue_module.Empty:
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead and reports.empty():
                errors += [f"{p.name} exited with code {p.exitcode}" for p in dead]
                break
            continue
        if isinstance(message, BatchReport):
            if on_batch is not None:
                on_batch(message)
        elif message[0] == "done":
            total.merge(message[1])
            finished += 1
        else:
            errors.append(message[1])
            finished += 1
    for process in processes:
        process.join(timeout=30)
    total.seconds = max(total.per_worker_seconds, default=0.0)
    if errors:
        raise WorkerFailed("; ".join(errors) + " (unfinished batches are reclaimed after "
                           f"CLAIM_TIMEOUT_SECONDS={settings.pipeline.claim_timeout_seconds})")
    return total


@dataclass
class Reconciled:
    released: int
    requeued: int


def reconcile_batches(settings: Settings) -> Reconciled:
    """Bring Redis in line with the ledger after a crash between a commit and its Redis step.

    Batches the ledger calls promoted are released; batches it calls lost (staging emptied
    by a Postgres crash) go back to the queue to be staged again, and so do batches Redis
    holds as staged whose ledger row is missing (their asynchronous commit died in a crash).
    """
    client = redis_client(settings.redis)
    queue = OrderQueue(client, RedisKeys(settings.redis.key_prefix))
    staged = queue.staged_batch_ids()
    candidates = staged + queue.claimed_batch_ids()
    with pg_pool(settings.postgres).connection() as conn:
        statuses = batch_statuses(conn, candidates)
    promoted = [b for b, s in statuses.items() if s == "promoted"]
    lost = [b for b, s in statuses.items() if s == "lost"] + [
        b for b in staged if b not in statuses]
    queue.release(promoted)
    queue.requeue(lost)
    return Reconciled(len(promoted), len(lost))


# Promotion deletes every row it takes from staging and rewrites rollup rows: reclaim that
# space after each promotion, or every later round scans the dead rows again (autovacuum, if
# it runs at all, wakes once a minute: minutes of staged rows at full speed).
_AFTER_PROMOTION = f"VACUUM (SKIP_LOCKED) orders_staging, {', '.join(ROLLUPS)}"


def promote_staged(settings: Settings, max_batches_per_round: int = 400) -> PromotionResult:
    """Promote every staged batch, releasing each round's batches from Redis after commit."""
    client = redis_client(settings.redis)
    queue = OrderQueue(client, RedisKeys(settings.redis.key_prefix))
    reconcile_batches(settings)
    total = PromotionResult()
    with pg_pool(settings.postgres).connection() as conn:
        while True:
            result = promote_round(conn, max_batches_per_round)
            queue.release(result.promoted_batches)
            queue.requeue(result.lost_batches)
            total.add(result)
            if len(result.promoted_batches) + len(result.lost_batches) < max_batches_per_round:
                break
        if total.promoted_batches:
            conn.autocommit = True  # VACUUM cannot run inside a transaction
            try:
                conn.execute(_AFTER_PROMOTION)
            finally:
                conn.autocommit = False
    return total


def refresh_all_views(settings: Settings) -> dict[str, float]:
    with pg_pool(settings.postgres, via_pgbouncer=False).connection() as conn:
        return refresh_views(conn)

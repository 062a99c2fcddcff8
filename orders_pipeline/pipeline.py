"""Pipeline operations shared by the Dagster assets and the CLI: one implementation each.

`stage_queue` drains the queue with N staging worker processes, `follow_queue` runs N
long-running workers until they are asked to stop, `promote_staged` moves staged batches into
`orders` and releases them from Redis (quarantining poison batches), `readmit_quarantined`
hands quarantined batches back, `redrive_rejected` sends rejected orders through again,
`replay_window` runs the archived batches of a time window through again (`prune_archive`
drops expired days of the archive), `refresh_all_views` refreshes the dashboards.
"""

import contextlib
import multiprocessing as mp
import os
import signal
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from multiprocessing import connection as mp_connection
from multiprocessing.queues import SimpleQueue
from types import FrameType
from typing import Any

import psycopg

from orders_pipeline.connections import pg_pool, redis_client
from orders_pipeline.fanout import relay
from orders_pipeline.faults import crash_point
from orders_pipeline.postgres_patterns import archive, partitions, redrive, replay
from orders_pipeline.postgres_patterns.batch_outbox import Outbox
from orders_pipeline.postgres_patterns.promotion import (
    PromotionResult,
    QuarantinedBatch,
    batch_statuses,
    kept_payloads,
    mark_readmitted,
    promote_round,
    quarantined_batches,
)
from orders_pipeline.postgres_patterns.redrive import (
    RedriveRefused,
    RedriveReport,
    RejectFilter,
    plan,
    preview,
    report,
)
from orders_pipeline.postgres_patterns.replay import ReplayOutcome, Window, WindowContents
from orders_pipeline.postgres_patterns.views import (
    ROLLUPS,
    VIEWS,
    refresh_all_slices,
    refresh_views,
)
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
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
    queue = OrderQueue(client, RedisKeys.of(settings.redis))
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


def promote_staged(settings: Settings, max_batches_per_round: int = 400, *,
                   shards: Sequence[int] | None = None) -> PromotionResult:
    """Promote every staged batch, releasing each round's batches from Redis after commit.

    `shards`: promote only the batches of these queue shards, each under its own lock
    (`promote_round(shard=...)`), so promoters of disjoint shards (processes or hosts) run at
    the same time; None: every shard, under the lock that excludes all shard promoters.

    A poison batch is quarantined by its round (`promote_round`, which copies its raw payloads
    from the Redis batch list into Postgres in the same transaction) and the others are
    promoted; after the commit it moves from `{P}:staged` to `{P}:quarantined`, its list kept.
    A move that a crash interrupted is finished by the next call. First, the month partitions
    of `orders` for this month and PARTITIONS_AHEAD after it are created if missing
    (`partitions.ensure_ahead`). Errors that are not poison
    (`promotion.is_poison`) propagate; the round they hit committed nothing. Last, the
    fan-out outbox is relayed into `{P}:promoted` (`fanout.relay`: what these rounds wrote
    and whatever an earlier relay left; `entries_published`).
    """
    client = redis_client(settings.redis)
    queue = OrderQueue(client, RedisKeys.of(settings.redis))
    reconcile_batches(settings)
    finish_redrives(settings)
    total = PromotionResult()
    with pg_pool(settings.postgres).connection() as conn:
        partitions.ensure_ahead(conn)
        for shard in [None] if shards is None else sorted(set(shards)):
            while True:
                result = promote_round(conn, max_batches_per_round, queue.batch_payloads,
                                       shard=shard)
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
    total.entries_published = relay(settings).entries
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
    queue = OrderQueue(redis_client(settings.redis), RedisKeys.of(settings.redis))
    with pg_pool(settings.postgres).connection() as conn, conn.transaction():
        batches = quarantined_batches(conn, batch_ids, lock=True)
        missing = set(queue.missing_batch_lists([b.batch_id for b in batches]))
        unrecoverable = [b for b in batches if b.batch_id in missing and not b.payloads]
        readmitted = [b for b in batches if b not in unrecoverable]
        ids = [b.batch_id for b in readmitted]
        queue.readmit(ids, {b: kept_payloads(conn, b) for b in ids if b in missing})
        mark_readmitted(conn, ids)
    return Readmission(readmitted, unrecoverable)


@dataclass(frozen=True)
class Redrive:
    """What `redrive_rejected` did, or with `dry_run` would do.

    `selection`: the filter as applied (the unknown-references preset resolved into reason
    kinds and a time range). `redrive_id`: the request's id (None for a dry run or when
    nothing was selected). `selected`: rows selected, `by_reason` by reason kind, largest
    first. `batch_ids`: this request's batches, all pushed. `resumed`: pending batches of
    earlier requests (interrupted by a crash) that this call pushed first.
    """
    selection: RejectFilter
    dry_run: bool
    redrive_id: str | None
    selected: int
    by_reason: dict[str, int]
    batch_ids: list[str]
    resumed: list[str]


def redrive_rejected(settings: Settings, selection: RejectFilter, *,
                     dry_run: bool = False) -> Redrive:
    """Send the rejected orders `selection` picks through the pipeline again, byte for byte.

    First finishes earlier requests a crash interrupted (`finish_redrives`). Then, in one
    Postgres transaction (`redrive.plan`), the request is recorded and its rows are marked
    with the batch (of BATCH_SIZE) and position each goes back under, the batches written to
    the outbox as pending; a row already re-driven is never selected again. Then each batch,
    holding its outbox row: pushed to Redis in flight under its own id with a completion
    signal (`OrderQueue.push_redriven`), and marked pushed. The next drain stages it like any
    batch: an order still bad is rejected again under (batch id, position) with its new
    reason, a good one lands in `orders` once (`redrive_outcomes` tells which).

    Exactly once, whatever dies when: the Redis push and its marker are one MULTI that does
    nothing if the marker is there; the outbox row stays locked, so no one else pushes the
    batch, until the transaction that marks it pushed commits, and only then is the marker
    dropped. A crash before the push leaves the batch pending (pushed by the next call); a
    crash after it leaves the marker, so the next call only records the push.

    With `dry_run` nothing changes (and nothing pending is finished): only the counts.
    Raises RedriveRefused (no filter without `everything`, naive times, the preset before
    the live lookup snapshot picked up any change), psycopg's InvalidRegularExpression for a
    bad reason pattern.
    """
    queue = OrderQueue(redis_client(settings.redis), RedisKeys.of(settings.redis))
    if selection.unknown_references:
        selection = _since_lookup_change(settings, queue, selection)
    selection.check()
    if dry_run:
        with pg_pool(settings.postgres).connection() as conn:
            by_reason = preview(conn, selection)
        return Redrive(selection, True, None, sum(by_reason.values()), by_reason, [], [])
    resumed = finish_redrives(settings)
    with pg_pool(settings.postgres).connection() as conn:
        planned = plan(conn, selection, f"redrive-{uuid.uuid4().hex[:16]}",
                       settings.pipeline.batch_size)
        crash_point("after_redrive_plan")
        _push_outboxed(conn, queue, REDRIVES, planned.batch_ids)
    return Redrive(selection, False, planned.redrive_id if planned.selected else None,
                   planned.selected, planned.by_reason, planned.batch_ids, resumed)


def _since_lookup_change(settings: Settings, queue: OrderQueue,
                         selection: RejectFilter) -> RejectFilter:
    """The unknown-references preset resolved against the live snapshot's sources."""
    sources = LookupCache(queue.client, queue.keys,
                          settings.pipeline.lookup_ttl_seconds).sources()
    if sources is None or sources.changes is None:
        raise RedriveRefused(
            "the lookup snapshot has picked up no change of products, currencies or zip_codes "
            "since it was first loaded, so no order was rejected for an unknown reference "
            "since a change; select rejects by reason pattern and time range instead")
    return selection.for_reload(datetime.fromtimestamp(sources.changes.since, UTC),
                                datetime.fromtimestamp(sources.changes.loaded_at, UTC))


REDRIVES, REPLAYS = redrive.OUTBOX, replay.OUTBOX


def _push_outboxed(conn: psycopg.Connection, queue: OrderQueue, outbox: Outbox,
                   batch_ids: Sequence[str]) -> list[str]:
    """Push each batch of `outbox` that is still pending, once (see `redrive_rejected`);
    returns those this call pushed or found pushed by a call a crash interrupted."""
    done = []
    for batch_id in batch_ids:
        with conn.transaction():
            payloads = outbox.lock_pending(conn, batch_id)
            if payloads is None:
                continue
            queue.push_redriven(batch_id, payloads, counter=outbox.counter)
            crash_point(f"after_{outbox.name}_push")
            outbox.mark_pushed(conn, batch_id)
        queue.forget_redriven([batch_id])
        done.append(batch_id)
    return done


def _forget_recorded(conn: psycopg.Connection, queue: OrderQueue, outbox: Outbox) -> None:
    """Drop the Redis markers of the batches `outbox` records as pushed."""
    markers = queue.redriven_markers()
    if markers:
        queue.forget_redriven(outbox.pushed_among(conn, markers))


def finish_redrives(settings: Settings) -> list[str]:
    """Finish the re-drive requests a crash interrupted; returns the batches it pushed.

    Markers of batches whose push the outbox already recorded are dropped; every batch still
    pending in the outbox is pushed (or, if its marker shows an earlier push, recorded as
    pushed). Cheap when there is nothing to do (one HKEYS, one indexed query): every
    promotion calls it.
    """
    queue = OrderQueue(redis_client(settings.redis), RedisKeys.of(settings.redis))
    with pg_pool(settings.postgres).connection() as conn:
        _forget_recorded(conn, queue, REDRIVES)
        return _push_outboxed(conn, queue, REDRIVES, REDRIVES.pending_batches(conn))


def redrive_report(settings: Settings, redrive_id: str) -> RedriveReport | None:
    """What became of the rows of one re-drive request (None for an unknown id)."""
    with pg_pool(settings.postgres).connection() as conn:
        return report(conn, redrive_id)


# Replay batches pushed before they are staged and promoted: a replay holds at most this many
# batches (of at most BATCH_SIZE orders) of its window in Redis at once.
REPLAY_CHUNK_BATCHES = 20


@dataclass(frozen=True)
class Replay:
    """What `replay_window` did, or with `dry_run` would do.

    `contents`: what the archive held in the window when asked. `replay_id`: the request
    (None for a dry run or when no batch of the window was promoted); `resumed_request`: it
    is one a crash interrupted, resumed. `resumed`: pending batches of other interrupted
    requests this call replayed first. `outcome`: what became of the request's batches.
    """
    window: Window
    reprocess: bool
    dry_run: bool
    contents: WindowContents
    replay_id: str | None = None
    resumed_request: bool = False
    resumed: list[str] = field(default_factory=list)
    outcome: ReplayOutcome | None = None


def replay_window(settings: Settings, window: Window, *, reprocess: bool = False,
                  dry_run: bool = False,
                  chunk_batches: int = REPLAY_CHUNK_BATCHES) -> Replay:
    """Run the archived batches of `window` through the pipeline again, from their raw bytes.

    In one Postgres transaction (`replay.plan`) the request is recorded and a replay batch
    for each archived batch of the window that is promoted (the others are still on their
    way) is written to the outbox as pending; a request for the same window and mode that a
    crash interrupted is resumed instead. Then, `chunk_batches` at a time, the batches
    (pending ones of other interrupted requests first) are pushed to Redis exactly once,
    as re-drive batches are (`Outbox`), drained into staging in this process
    (`stage_queue`, which also stages whatever else is queued) and promoted; last, the views
    are refreshed. A replayed order is one more delivery (`replayed` in conservation).

    Default mode changes nothing already in `orders` (the copy that landed is staged again
    and meets ON CONFLICT DO NOTHING) and brings in what is missing. With `reprocess`,
    promotion replaces the stored values of the window's orders by those recomputed from the
    raw bytes with the current transform and lookup snapshot, and moves the rollups by the
    difference (`replay.reprocess_staged`). With `dry_run` nothing changes: only `contents`.
    Raises ReplayRefused for a naive instant or an empty window.
    """
    window.check()
    with pg_pool(settings.postgres).connection() as conn:
        contents = replay.preview(conn, window)
    if dry_run:
        return Replay(window, reprocess, True, contents)
    queue = OrderQueue(redis_client(settings.redis), RedisKeys.of(settings.redis))
    with pg_pool(settings.postgres).connection() as conn:
        _forget_recorded(conn, queue, REPLAYS)
        planned = replay.plan(conn, window, reprocess)
        mine = set(planned.batch_ids)
        others = [b for b in replay.pending_batches(conn) if b not in mine]
    crash_point("after_replay_plan")
    batch_ids = [*others, *planned.batch_ids]
    for start in range(0, len(batch_ids), chunk_batches):
        with pg_pool(settings.postgres).connection() as conn:
            _push_outboxed(conn, queue, REPLAYS, batch_ids[start:start + chunk_batches])
        stage_queue(settings, workers=1, batch_size=settings.pipeline.batch_size)
        promote_staged(settings)
        crash_point("after_replay_chunk")
    if batch_ids:
        refresh_all_views(settings)
    if planned.replay_id is None:
        return Replay(window, reprocess, False, contents, resumed=others)
    with pg_pool(settings.postgres).connection() as conn:
        result = replay.outcome(conn, planned.replay_id)
    return Replay(window, reprocess, False, contents, planned.replay_id, planned.resumed,
                  others, result)


def prune_archive(settings: Settings) -> list[str]:
    """Drop the archive's day partitions older than RAW_RETENTION_DAYS now (staging does it
    once a day anyway); returns the partitions dropped."""
    with pg_pool(settings.postgres).connection() as conn:
        return archive.prune(conn, settings.pipeline.raw_retention_days)


def apply_retention(settings: Settings, horizon: date, *,
                    dry_run: bool = False) -> partitions.RetentionResult:
    """Drop every month before `horizon` (first of a month) from `orders`, the rollups and
    the dashboard views, then their ids from the guard (`partitions.apply_retention`, which
    raises RetentionRefused saying why it cannot); with `dry_run`, only report it."""
    with pg_pool(settings.postgres, via_pgbouncer=False).connection() as conn:
        return partitions.apply_retention(conn, horizon, dry_run=dry_run)


def refresh_all_views(settings: Settings, *, every_month: bool = False) -> dict[str, float]:
    """Refresh the views' month views whose months changed (`views.refresh_views`), or with
    `every_month` all of them (`views.refresh_all_slices`); seconds spent per view."""
    with pg_pool(settings.postgres, via_pgbouncer=False).connection() as conn:
        if not every_month:
            return refresh_views(conn)
        spent = dict.fromkeys(VIEWS, 0.0)
        for made in refresh_all_slices(conn):
            spent[made.view] += made.seconds
        return spent

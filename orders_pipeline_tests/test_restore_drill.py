"""The restore drill: back up in the middle of a run, restore onto empty servers, resume.

The source is the test's own database and key prefix on the shared servers; the restore
target is a throwaway Postgres cluster and redis-server (`servers.py`), empty, under another
key prefix. `orders-pipeline backup` and `restore` run as real processes, as in the README's
checklist; a backup is killed at its crash points, and paused while it holds the ledger still;
hypothesis backs up and restores random mixes of batch states.
"""

import dataclasses
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import redis
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orders_pipeline import backup, contract, generator, pipeline
from orders_pipeline.assets.backup import backup_job
from orders_pipeline.backup import MANIFEST_FILE, REDIS_FILE, read_manifest
from orders_pipeline.connections import close_all, pg_connect, redis_client
from orders_pipeline.conservation import Conservation, check_conservation
from orders_pipeline.faults import BACKUP_CRASH_POINTS, CRASH_ENV, PAUSE_ENV, PAUSE_FILE_ENV
from orders_pipeline.postgres_patterns.promotion import promote_round
from orders_pipeline.redis_patterns.backpressure import Backpressure
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LOOKUP_TABLES, LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.settings import Settings
from orders_pipeline.worker import StagingWorker
from orders_pipeline_tests.conftest import drop_database
from orders_pipeline_tests.helpers import (
    assert_exactly_once,
    expire_leases,
    fresh_example,
    is_generated_valid,
    pipeline_env,
    push_orders,
    resources_for,
    valid_order_ids,
    wait_for,
)
from orders_pipeline_tests.servers import PostgresServer, RedisFactory
from orders_pipeline_tests.test_cli import one_error_line, run

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("orders-pipeline"))
TARGET_PREFIX = "drill"
BATCH = 300
ORDER_ROWS = f"SELECT {', '.join(contract.ORDER_COLUMNS)} FROM orders"


def cli(settings: Settings, cwd: Path, *argv: str, **env: str
        ) -> subprocess.CompletedProcess[str]:
    """`orders-pipeline ARGV` as a user runs it, configured for `settings`."""
    return subprocess.run([CONSOLE_SCRIPT, *argv], env=pipeline_env(settings, **env), cwd=cwd,
                          capture_output=True, text=True, timeout=180)


def with_batch_size(settings: Settings, batch_size: int) -> Settings:
    return dataclasses.replace(settings, pipeline=dataclasses.replace(
        settings.pipeline, batch_size=batch_size))


def with_shards(settings: Settings, shards: int) -> Settings:
    return dataclasses.replace(settings, redis=dataclasses.replace(settings.redis,
                                                                   shards=shards))


def with_tag(settings: Settings, lookups_from: redis.Redis | None) -> Settings:
    """`settings` under a prefix with a hash tag: `<prefix>:{t}` (shard n: `<prefix>:{t.n}`,
    outside `<prefix>:{t}:`); the lookup snapshot copied there from the old prefix."""
    old = RedisKeys(settings.redis.key_prefix)
    new = RedisKeys(f"{old.prefix}:{{t}}")
    if lookups_from is not None:
        for key in (*(old.lookup(table.name) for table in LOOKUP_TABLES), old.lookup_meta):
            assert lookups_from.copy(key, new.prefix + key[len(old.prefix):])
    return dataclasses.replace(settings, redis=dataclasses.replace(settings.redis,
                                                                   key_prefix=new.prefix))


def moved(settings: Settings, *, redis_port: int, pg_port: int | None = None,
          dbname: str = "restored") -> Settings:
    """`settings` pointed at a restore target: another Redis (prefix TARGET_PREFIX) and
    another database (on another Postgres server if `pg_port`), Postgres reached directly."""
    pg = settings.postgres
    return dataclasses.replace(
        settings,
        postgres=dataclasses.replace(pg, port=pg_port or pg.port, dbname=dbname,
                                     use_pgbouncer=False),
        redis=dataclasses.replace(settings.redis, port=redis_port, key_prefix=TARGET_PREFIX))


@pytest.fixture
def target(settings: Settings, redis_servers: RedisFactory) -> Iterator[Settings]:
    """Settings on empty throwaway servers: a Postgres cluster without the database yet, and
    a redis-server; both stopped and deleted at the end."""
    with PostgresServer() as server:
        server.start()
        try:
            yield moved(settings, redis_port=redis_servers().port, pg_port=server.port)
        finally:
            close_all()


def resume(settings: Settings) -> None:
    """What the README's checklist runs after a restore: process, then promote, until
    nothing waits (a batch a promotion hands back needs one more round)."""
    for _ in range(3):
        pipeline.stage_queue(settings, workers=1, batch_size=BATCH)
        pipeline.promote_staged(settings)


def books_of(settings: Settings) -> Conservation:
    with pg_connect(settings.postgres) as conn:
        return check_conservation(redis_client(settings.redis), RedisKeys.of(settings.redis),
                                  conn)


def order_rows(conn: psycopg.Connection) -> dict[str, tuple[object, ...]]:
    rows = {row[0]: row[1:] for row in conn.execute(ORDER_ROWS)}
    assert len(rows) == conn.execute("SELECT count(*) FROM orders").fetchone()[0]
    return rows


def rejected_payloads(conn: psycopg.Connection) -> Counter[bytes]:
    return Counter(bytes(row[0]) for row in conn.execute("SELECT raw_payload FROM orders_rejected"))


def invalid_payloads(payloads: list[bytes]) -> Counter[bytes]:
    return Counter(p for p in payloads if not is_generated_valid(p))


# --- the drill ----------------------------------------------------------------------------


def test_backup_mid_run_restored_and_resumed_lands_every_accepted_order_exactly_once(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        loaded_cache: LookupCache, target: Settings, tmp_path: Path) -> None:
    source = with_batch_size(settings, BATCH)
    first, _ = push_orders(source, rconn, pg, 6_000, batch_size=500, duplicates=0.05,
                           invalid=0.05)
    # Every state a batch can be in when the backup starts:
    worker = StagingWorker(source)
    worker.drain(BATCH, max_batches=4)
    pipeline.promote_staged(source)  # promoted and released
    worker.drain(BATCH, max_batches=2)
    with pg_connect(source.postgres) as conn:  # promoted, its release never done (a crash)
        assert len(promote_round(conn).promoted_batches) == 2
    worker.drain(BATCH, max_batches=3)  # staged, awaiting promotion
    assert OrderQueue(rconn, keys, lease_seconds=3600).claim_batch(BATCH, "dead-worker")
    # A real worker stages one more batch and stops right after its COPY commits (staged in
    # the ledger, still claimed in Redis); the rest stays queued.
    paused = tmp_path / "worker-paused"
    follower = subprocess.Popen(
        [CONSOLE_SCRIPT, "process", "--follow", "--workers", "1", "--batch-size", "100"],
        env=pipeline_env(source, **{PAUSE_ENV: "after_copy", PAUSE_FILE_ENV: str(paused)}),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(paused.exists, "the worker to stage its first batch")
        # While the backup runs: a producer pushes, the worker stages, promotions promote.
        refs = generator.References.load(pg)
        pushes: list[tuple[float, list[bytes]]] = []  # (when the push returned, payloads)
        stop = threading.Event()

        def produce() -> None:
            queue = OrderQueue(rconn, keys)
            while not stop.is_set():
                batch, _ = generator.build_payloads(refs, 100, seed=len(pushes),
                                                    duplicates=0.05, invalid=0.05)
                queue.push_batch(batch)
                pushes.append((time.monotonic(), batch))
                time.sleep(0.02)

        def promote() -> None:
            while not stop.is_set():
                pipeline.promote_staged(source)
                time.sleep(0.05)

        threads = [threading.Thread(target=produce), threading.Thread(target=promote)]
        for thread in threads:
            thread.start()
        began = time.monotonic()
        backing_up = subprocess.Popen([CONSOLE_SCRIPT, "backup", str(tmp_path / "backup")],
                                      env=pipeline_env(source), cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        paused.unlink()
        out, err = backing_up.communicate(timeout=180)
        assert backing_up.returncode == 0, err
        assert "manifest.json written last" in out
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        paused.unlink(missing_ok=True)
        follower.send_signal(signal.SIGTERM)
        follower.communicate(timeout=60)
    assert follower.returncode == 0

    manifest = read_manifest(tmp_path / "backup")
    assert manifest.redis.claimed_batches >= 1  # the dead worker's, at least
    assert manifest.postgres.ledger["promoted"] >= 6
    # The source was not disturbed: it finishes with every order exactly once.
    expire_leases(rconn, keys)
    resume(source)
    everything = first + [p for _, batch in pushes for p in batch]
    assert_exactly_once(source, rconn, pg, everything)

    restored = cli(target, tmp_path, "restore", str(tmp_path / "backup"))
    assert restored.returncode == 0, restored.stderr
    handed_back = re.search(r"handed back (\d+) claimed batches", restored.stdout)
    assert handed_back and int(handed_back[1]) >= 1, restored.stdout
    assert "books balanced" in restored.stdout
    resume(target)

    before_backup = first + [p for returned, batch in pushes if returned < began for p in batch]
    books = books_of(target)
    assert books.balanced, books
    assert books.queued == books.in_flight == books.awaiting_promotion == 0, books
    assert len(before_backup) <= books.accepted <= len(everything)
    with pg_connect(target.postgres) as conn:
        rows = order_rows(conn)
        rejected = rejected_payloads(conn)
        assert conn.execute("SELECT count(*) FROM orders_staging").fetchone()[0] == 0
    # Every order accepted before the backup began is in `orders` once (the primary key),
    # with the values the source computed; nothing else is there.
    assert valid_order_ids(before_backup) <= rows.keys() <= valid_order_ids(everything)
    source_rows = order_rows(pg)
    assert {i: source_rows[i] for i in rows} == rows
    # Every invalid one is rejected once: none twice, none of those accepted before missed.
    assert invalid_payloads(before_backup) <= rejected <= invalid_payloads(everything)
    target_keys = RedisKeys(TARGET_PREFIX)
    target_redis = redis_client(target.redis)
    assert target_redis.zcard(target_keys.inflight) == target_redis.zcard(target_keys.staged) == 0
    assert not list(target_redis.scan_iter(match=f"{TARGET_PREFIX}:batch:*"))


def test_staging_waits_while_the_backup_holds_the_ledger_and_nothing_is_counted_twice(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, target: Settings, tmp_path: Path) -> None:
    payloads, _ = push_orders(settings, rconn, pg, 900, batch_size=BATCH, duplicates=0.05,
                              invalid=0.05)
    paused = tmp_path / "backup-paused"
    backing_up = subprocess.Popen(
        [CONSOLE_SCRIPT, "backup", str(tmp_path / "backup")],
        env=pipeline_env(settings, **{PAUSE_ENV: "backup_ledger_paused",
                                      PAUSE_FILE_ENV: str(paused)}),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(paused.exists, "the backup to hold the ledger still")
    # The queue state is copied; a worker claims a batch now and its staging commit waits.
    stager = threading.Thread(target=StagingWorker(settings).drain, args=(BATCH, 1))
    stager.start()
    waiting = ("SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
               " AND wait_event_type = 'Lock' AND query LIKE '%%ingest_batches%%'")
    wait_for(lambda: pg.execute(waiting, (settings.postgres.dbname,)).fetchone()[0] == 1,
             "the staging commit to wait for the ledger")
    paused.unlink()
    _, err = backing_up.communicate(timeout=120)
    assert backing_up.returncode == 0, err
    stager.join(timeout=120)
    assert not stager.is_alive()

    manifest = read_manifest(tmp_path / "backup")
    assert (manifest.redis.queued_orders, manifest.redis.claimed_batches,
            manifest.postgres.ledger) == (900, 0, {})
    assert pg.execute("SELECT count(*) FROM ingest_batches").fetchone()[0] == 1
    resume(settings)
    assert_exactly_once(settings, rconn, pg, payloads)

    restored = cli(target, tmp_path, "restore", str(tmp_path / "backup"))
    assert restored.returncode == 0, restored.stderr
    resume(target)
    with pg_connect(target.postgres) as conn:
        conn.autocommit = True
        assert_exactly_once(target, redis_client(target.redis), conn, payloads)
    books = books_of(target)
    assert books.balanced and books.promotion_conflicts == 0, books


# Each step leaves batches in one more state: queued, staged, promoted and released, promoted
# but never released (the promoter died), claimed by a worker that died, staging emptied by a
# Postgres crash (the ledger still says staged).
STEPS = st.lists(st.sampled_from(["push", "stage", "promote", "promote_unreleased",
                                  "claim_dead", "crash_staging"]), min_size=1, max_size=10)


@hypothesis_settings(max_examples=8, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@example(steps=["push", "stage", "promote_unreleased", "claim_dead", "push"], shards=3,
         tagged=True)
@given(steps=STEPS, shards=st.sampled_from([1, 3]), tagged=st.booleans())
def test_any_mix_of_batch_states_restores_and_resumes_exactly_once(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, target: Settings, tmp_path: Path, steps: list[str],
        shards: int, tagged: bool) -> None:
    """With REDIS_SHARDS 1 or 3 (each shard's queue state copied in a call of its own, and
    restored into the same shard under the target's prefix), and prefixes with a hash tag or
    without (a tagged prefix's shards, `{t.n}`, are not under `{t}:`)."""
    source = with_shards(fresh_example(with_batch_size(settings, 100), rconn, pg), shards)
    target = with_shards(target, shards)
    if tagged:
        source, target = with_tag(source, rconn), with_tag(target, None)
    keys = RedisKeys.of(source.redis)
    queue = OrderQueue(rconn, keys, lease_seconds=3600)
    refs = generator.References.load(pg)
    payloads: list[bytes] = []

    def push() -> None:
        batch, _ = generator.build_payloads(refs, 250, duplicates=0.05, invalid=0.05)
        generator.push_payloads(queue, Backpressure(rconn, keys, 10**9), batch, batch_size=100)
        payloads.extend(batch)

    push()
    for step in steps:
        if step == "push":
            push()
        elif step == "stage" and queue.depth():  # (a drain would wait for the dead lease)
            StagingWorker(source).drain(100, max_batches=1)
        elif step == "promote":
            pipeline.promote_staged(source)
        elif step == "promote_unreleased":
            with pg_connect(source.postgres) as conn:
                promote_round(conn)
        elif step == "claim_dead":
            queue.claim_batch(100, "dead-worker")
        elif step == "crash_staging":
            pg.execute("DELETE FROM orders_staging")
    directory = tmp_path / uuid.uuid4().hex

    backup.backup(source, directory)
    assert read_manifest(directory).redis.shards == shards
    other = shards % 3 + 1
    with pytest.raises(backup.BackupError, match=f"holds {shards} shard.*REDIS_SHARDS is "
                                                 f"{other}: restore with REDIS_SHARDS={shards}"):
        backup.restore(with_shards(target, other), directory, force=True)
    report = backup.restore(target, directory, force=True)

    assert report.books.balanced, report.books
    assert report.books.accepted == len(payloads)
    resume(target)
    with pg_connect(target.postgres) as conn:
        conn.autocommit = True
        assert_exactly_once(target, redis_client(target.redis), conn, payloads)
    expire_leases(rconn, keys)
    resume(source)
    assert_exactly_once(source, rconn, pg, payloads)


# --- refusals ------------------------------------------------------------------------------


def test_restore_refuses_incomplete_backups_and_non_empty_targets_unless_forced(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, redis_servers: RedisFactory, tmp_path: Path) -> None:
    payloads, _ = push_orders(settings, rconn, pg, 1_500, batch_size=500, invalid=0.1)
    StagingWorker(settings).drain(500, max_batches=2)
    pipeline.promote_staged(settings)
    backup_dir = tmp_path / "backup"
    assert cli(settings, tmp_path, "backup", str(backup_dir)).returncode == 0
    again = cli(settings, tmp_path, "backup", str(backup_dir))
    assert again.returncode == 1
    assert "is not an empty directory" in one_error_line(again.stderr)
    manifest = read_manifest(backup_dir)

    red = redis_servers()
    target = moved(settings, redis_port=red.port, dbname=f"{settings.postgres.dbname}_restored")
    target_redis = red.client()

    def database_exists() -> bool:
        return bool(pg.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                               (target.postgres.dbname,)).fetchone())

    incomplete = tmp_path / "incomplete"
    shutil.copytree(backup_dir, incomplete)
    (incomplete / MANIFEST_FILE).unlink()
    tampered = tmp_path / "tampered"
    shutil.copytree(backup_dir, tampered)
    record = tampered / REDIS_FILE
    record.write_bytes(record.read_bytes().replace(b'"expire_at_ms": null',
                                                   b'"expire_at_ms": 1', 1))
    newer = tmp_path / "newer"
    shutil.copytree(backup_dir, newer)
    (newer / MANIFEST_FILE).write_text((backup_dir / MANIFEST_FILE).read_text().replace(
        '"format": 1', '"format": 3'))
    target_redis.set(f"{TARGET_PREFIX}:someone-else", "x")
    try:
        for directory, refusal in [
                (tmp_path / "nowhere", "no backup directory"),
                (incomplete, "holds no manifest.json: not a complete backup"),
                (newer, "is not a manifest of format 1 or 2 (format: "),
                (tampered, f"backup file {REDIS_FILE} in"),
                (backup_dir, f"the restore target is not empty: Redis at 127.0.0.1:{red.port} db "
                             f"0 holds keys under {TARGET_PREFIX}:")]:
            refused = cli(target, tmp_path, "restore", str(directory))
            assert refused.returncode == 1
            assert refusal in one_error_line(refused.stderr)
        assert not database_exists()
        assert target_redis.keys("*") == [f"{TARGET_PREFIX}:someone-else".encode()]
        target_redis.delete(f"{TARGET_PREFIX}:someone-else")

        first = cli(target, tmp_path, "restore", str(backup_dir))
        assert first.returncode == 0, first.stderr
        second = cli(target, tmp_path, "restore", str(backup_dir))
        assert second.returncode == 1
        line = one_error_line(second.stderr)
        assert f"database '{target.postgres.dbname}'" in line and "--force" in line
        forced = cli(target, tmp_path, "restore", "--force", str(backup_dir))
        assert forced.returncode == 0, forced.stderr
        assert forced.stdout.count("replaced (--force): ") == 2
        with pg_connect(target.postgres) as conn:
            assert len(order_rows(conn)) == manifest.postgres.orders > 0
        books = books_of(target)
        assert books.balanced and books.accepted == len(payloads), books  # nothing doubled
    finally:
        close_all()
        drop_database(target.postgres)


@pytest.mark.parametrize("point", BACKUP_CRASH_POINTS)
def test_killed_backup_leaves_no_manifest_and_the_pipeline_goes_on(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, tmp_path: Path, point: str) -> None:
    payloads, _ = push_orders(settings, rconn, pg, 1_200, batch_size=BATCH, duplicates=0.05,
                              invalid=0.05)
    StagingWorker(settings).drain(BATCH, max_batches=2)
    backup_dir = tmp_path / "backup"

    killed = cli(settings, tmp_path, "backup", str(backup_dir), **{CRASH_ENV: point})

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (backup_dir / REDIS_FILE).exists()
    assert not (backup_dir / MANIFEST_FILE).exists()
    refused = cli(settings, tmp_path, "restore", str(backup_dir))
    assert refused.returncode == 1
    assert "not a complete backup" in one_error_line(refused.stderr)
    # The ledger lock died with the process: staging and promotion go on (a lock left behind
    # would make these wait until their timeout fails the test).
    for command in ("process", "promote"):
        done = cli(settings, tmp_path, command)
        assert done.returncode == 0, done.stderr
    assert_exactly_once(settings, rconn, pg, payloads)


def test_backup_that_cannot_hold_the_ledger_still_fails_and_leaves_nothing(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    push_orders(settings, rconn, pg, 300, batch_size=BATCH)
    monkeypatch.setattr(backup, "LEDGER_LOCK_TIMEOUT_SECONDS", 1)
    with pg_connect(settings.postgres) as writer:  # a long transaction writing the ledger
        writer.execute("LOCK TABLE ingest_batches IN ROW EXCLUSIVE MODE")
        with pytest.raises(backup.LedgerBusy, match="could not hold ingest_batches, "):
            backup.backup(settings, tmp_path / "backup")
    assert not (tmp_path / "backup").exists()
    assert rconn.llen(RedisKeys(settings.redis.key_prefix).ingestion) == 300
    assert backup.backup(settings, tmp_path / "backup").redis.queued_orders == 300


def test_missing_pg_dump_is_one_line_and_writes_nothing(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(backup, "PG_INSTALL_ROOT", tmp_path)

    code, _, err = run(capsys, "backup", str(tmp_path / "backup"))

    assert code == 1
    assert one_error_line(err) == (
        f"orders-pipeline: error: pg_dump not found on PATH or in {tmp_path}/*/bin: install the "
        "PostgreSQL client programs (Debian: postgresql-client) of the server's major version "
        "or newer")
    assert not (tmp_path / "backup").exists()


# --- the Dagster job -------------------------------------------------------------------------


def test_backup_job_reports_what_the_backup_holds(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, tmp_path: Path) -> None:
    push_orders(settings, rconn, pg, 600, batch_size=BATCH)
    StagingWorker(settings).drain(BATCH, max_batches=1)

    def run() -> dg.ExecuteInProcessResult:
        return backup_job.execute_in_process(
            run_config={"ops": {"write_backup": {"config": {
                "directory": str(tmp_path / "backup")}}}},
            resources=resources_for(settings), instance=dg.DagsterInstance.ephemeral(),
            raise_on_error=False)

    done = run()
    assert done.success
    [output] = [e for e in done.events_for_node("write_backup") if e.is_successful_output]
    metadata = {k: v.value for k, v in output.step_output_data.metadata.items()}
    manifest = read_manifest(tmp_path / "backup")
    assert metadata["postgres_dump_bytes"] == manifest.files["postgres.dump"].bytes > 0
    assert metadata["redis_keys"] == manifest.redis.keys > 0
    assert (metadata["queued_orders"], metadata["staged_batches"], metadata["batch_orders"],
            metadata["orders"], metadata["ledger_batches"]) == (300, 1, 300, 0, {"staged": 1})
    assert metadata["redis_snapshot_at"] == manifest.redis.snapshot_at.isoformat()
    assert json.loads((tmp_path / "backup" / MANIFEST_FILE).read_text())["format"] == 1

    refused = run()
    assert not refused.success
    [failure] = [e for e in refused.all_events if e.is_step_failure]
    assert "is not an empty directory" in failure.step_failure_data.error.message
    assert not [e for e in refused.all_events if e.is_step_up_for_retry]

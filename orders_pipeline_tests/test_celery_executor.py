"""Issue 12 item 3: the ingest job under dagster-celery, staging placed on two Celery workers.

`DAGSTER_EXECUTOR=celery` makes every job use `dagster_celery.celery_executor` with the
pipeline's Redis (database 1, keys under `<REDIS_KEY_PREFIX>:celery:`) as broker and result
backend. The test starts two real Celery worker processes (`celery -A
orders_pipeline.executors:celery_app worker`, default prefork pool, concurrency 1: the pool
whose daemonic processes could not fork the old staging workers), runs the `ingest_orders`
job with `workers: 2` through `dagster job execute` (a reconstructable job the workers load
from `orders_pipeline.definitions`) against a real instance (its own DAGSTER_HOME, the
repository's dagster.yaml: Postgres storage in the test's database, the shipped pools), and
checks that the run succeeded, that the two drain steps ran in the two workers' processes,
and that every accepted order is in `orders` exactly once.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import dagster as dg
import psycopg
import pytest
import redis
from pydantic import SecretStr

from orders_pipeline.connections import redis_client
from orders_pipeline.executors import CELERY_DB, CeleryConnection, executor_for
from orders_pipeline.settings import ConfigError, DagsterSettings, RedisSettings, Settings
from orders_pipeline_tests.conftest import delete_prefix
from orders_pipeline_tests.helpers import (
    REPO,
    assert_exactly_once,
    dagster_env,
    push_orders,
    valid_order_ids,
)

CELERY = Path(sys.executable).with_name("celery")
WORKERS = 2
RUN_TIMEOUT_SECONDS = 240
DRAIN_STEP = "staged_orders.staging_drain["


@dataclasses.dataclass
class CeleryWorker:
    """One `celery worker` process (its own session: stopped with its pool children)."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def ready(self) -> bool:
        return f"{self.name}@" in self.text() and " ready." in self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # warm shutdown
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def parent_pid(pid: int) -> int:
    """The parent of a running process (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("PPid:")))


@contextmanager
def celery_workers(env: dict[str, str], count: int, logs: Path) -> Iterator[list[CeleryWorker]]:
    """`count` Celery workers, each one prefork process slot, started and ready; stopped
    after (the warm shutdown waits for a task in hand)."""
    workers = []
    try:
        for n in range(1, count + 1):
            name = f"orders-w{n}"
            log = logs / f"{name}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [str(CELERY), "-A", "orders_pipeline.executors:celery_app", "worker",
                     "--concurrency", "1", "--loglevel", "INFO", "--hostname", f"{name}@%h",
                     "--without-gossip", "--without-mingle", "--without-heartbeat"],
                    cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)
            workers.append(CeleryWorker(name, process, log))
        deadline = time.monotonic() + 90
        while not all(w.ready() for w in workers):
            for worker in workers:
                assert worker.process.poll() is None, worker.text()[-3000:]
            assert time.monotonic() < deadline, [w.text()[-2000:] for w in workers]
            time.sleep(0.2)
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def open_instance(home: Path, env: dict[str, str]) -> dg.DagsterInstance:
    """The run's instance as the CLI saw it (dagster.yaml reads POSTGRES_* when it loads)."""
    with mock.patch.dict(os.environ, env):
        return dg.DagsterInstance.from_config(str(home))


def run_ingest(env: dict[str, str], config: dict[str, object], tmp_path: Path
               ) -> subprocess.CompletedProcess[str]:
    """`dagster job execute` of `ingest_orders`: the run's orchestrator, in its own process."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    return subprocess.run(
        [sys.executable, "-m", "dagster", "job", "execute", "-m", "orders_pipeline.definitions",
         "-j", "ingest_orders", "-c", str(config_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS,
        check=False)


def step_metadata(instance: dg.DagsterInstance, run_id: str, prefix: str
                  ) -> dict[str, dict[str, object]]:
    """Step key -> metadata of its output, for the steps whose key starts with `prefix`."""
    found = {}
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_OUTPUT):
        event = record.dagster_event
        if event is not None and event.step_key.startswith(prefix):
            found[event.step_key] = {k: v.value for k, v in
                                     event.step_output_data.metadata.items()}
    return found


def celery_hosts(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """Step key -> the Celery worker (node name) that executed it, from dagster-celery's
    engine event "Executing steps ... in celery worker"."""
    hosts = {}
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        event = record.dagster_event
        data = event.engine_event_data if event is not None else None
        worker = data.metadata.get("Celery worker") if data is not None else None
        if worker is not None and event.step_key:
            hosts[event.step_key] = worker.value
    return hosts


@pytest.fixture
def celery_env(settings: Settings, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The test's pipeline environment with DAGSTER_EXECUTOR=celery and its own DAGSTER_HOME;
    afterwards the broker's keys (database CELERY_DB, under the test's prefix) are deleted."""
    env = {**dagster_env(settings, tmp_path / "home"), "DAGSTER_EXECUTOR": "celery"}
    env.pop("DAGSTER_CELERY_BROKER", None)  # the default: the pipeline's Redis, database 1
    try:
        yield env
    finally:
        broker = redis_client(dataclasses.replace(settings.redis, db=CELERY_DB))
        delete_prefix(broker, f"{settings.redis.key_prefix}:celery")


def test_ingest_job_stages_on_two_celery_workers(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        celery_env: dict[str, str], tmp_path: Path) -> None:
    payloads, summary = push_orders(settings, rconn, pg, 6_000, batch_size=1_000,
                                    duplicates=0.05, invalid=0.01)
    assert summary["unique_valid"] == len(valid_order_ids(payloads)) > 5_000
    started = time.monotonic()
    with celery_workers(celery_env, WORKERS, tmp_path) as workers:
        done = run_ingest(celery_env, {"ops": {"staged_orders": {"config": {
            "workers": WORKERS, "batch_size": 250}}}}, tmp_path)
        logs = "\n".join(w.text()[-3000:] for w in workers)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:] + logs

        instance = open_instance(Path(celery_env["DAGSTER_HOME"]), celery_env)
        [run] = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS
        drains = step_metadata(instance, run.run_id, DRAIN_STEP)
        # The drain steps' processes are the workers' pool processes (alive until stopped).
        parents = {parent_pid(int(m["pid"])) for m in drains.values()}
    elapsed = time.monotonic() - started

    assert sorted(drains) == [f"{DRAIN_STEP}worker_{n}]" for n in range(WORKERS)]
    assert parents == {w.process.pid for w in workers}, (parents, drains)
    assert len({m["pid"] for m in drains.values()}) == WORKERS
    hosts = celery_hosts(instance, run.run_id)
    assert {hosts[step].split("@")[0] for step in drains} == {w.name for w in workers}
    assert all(m["worker_processes"] == 1 for m in drains.values())
    # Every step of the run went to Celery, none ran in the orchestrator.
    assert {step.split("[")[0] for step in hosts} >= {
        "staged_orders.staging_plan", "staged_orders.staging_drain",
        "staged_orders.staging_collect", "promoted_orders"}

    staged = instance.get_latest_materialization_event(dg.AssetKey("staged_orders"))
    assert staged is not None
    meta = staged.asset_materialization.metadata
    assert meta["workers"].value == WORKERS
    assert meta["rows_claimed"].value == 6_000 == sum(m["rows_claimed"] for m in drains.values())
    assert meta["rows_staged"].value == summary["unique_valid"]

    count, distinct = pg.execute("SELECT count(*), count(DISTINCT order_id) FROM orders"
                                 ).fetchone()
    assert count == distinct == summary["unique_valid"]
    assert_exactly_once(settings, rconn, pg, payloads)
    # The staging steps' hand-over values were released by staging_collect.
    assert not list(rconn.scan_iter(match=f"{settings.redis.key_prefix}:dagster:*"))
    print(f"celery ingest of 6,000 orders on {WORKERS} workers: {elapsed:.1f} s")


def test_multiprocess_executor_runs_one_drain_step_per_worker(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection, tmp_path: Path) -> None:
    """DAGSTER_EXECUTOR=multiprocess: `staged_orders` alone, two drain steps, each its own
    single-process step (no worker processes of its own)."""
    payloads, summary = push_orders(settings, rconn, pg, 3_000, batch_size=1_000)
    env = {**dagster_env(settings, tmp_path / "home"), "DAGSTER_EXECUTOR": "multiprocess"}
    done = subprocess.run(
        [sys.executable, "-m", "dagster", "asset", "materialize", "-m",
         "orders_pipeline.definitions", "--select", "staged_orders,orders_rejected",
         "--config-json",
         json.dumps({"ops": {"staged_orders": {"config": {"workers": WORKERS,
                                                          "batch_size": 500}}}})],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS,
        check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    instance = open_instance(Path(env["DAGSTER_HOME"]), env)
    [run] = instance.get_runs()
    assert run.status == dg.DagsterRunStatus.SUCCESS
    drains = step_metadata(instance, run.run_id, DRAIN_STEP)
    assert sorted(drains) == [f"{DRAIN_STEP}worker_{n}]" for n in range(WORKERS)]
    assert all(m["worker_processes"] == 1 for m in drains.values())
    assert len({m["pid"] for m in drains.values()} | {os.getpid()}) == WORKERS + 1
    assert sum(m["rows_claimed"] for m in drains.values()) == 3_000
    staged = pg.execute("SELECT count(*), count(DISTINCT order_id) FROM orders_staging"
                        ).fetchone()
    assert staged == (summary["unique_valid"],) * 2 == (len(valid_order_ids(payloads)),) * 2
    assert not list(rconn.scan_iter(match=f"{settings.redis.key_prefix}:dagster:*"))


# ---------------------------------------------------------------- the broker settings


def test_the_default_broker_is_the_pipelines_redis_database_1() -> None:
    redis_settings = RedisSettings(host="redis.internal", port=6380, username="app",
                                   password=SecretStr("p@ss/word:1"), key_prefix="{shop7}")
    connection = CeleryConnection.of(DagsterSettings(executor="celery"), redis_settings)
    assert connection.broker == connection.backend == \
        "redis://app:p%40ss%2Fword%3A1@redis.internal:6380/1"
    assert "p@ss" not in repr(connection) and "%40" not in repr(connection)
    source = connection.config_source()
    assert source["broker_transport_options"]["global_keyprefix"] == "{shop7}:celery:"
    assert source["result_backend_transport_options"] == {"global_keyprefix": "{shop7}:celery:"}
    assert source["worker_disable_prefetch"] is True

    tls = CeleryConnection.of(DagsterSettings(executor="celery"), dataclasses.replace(
        redis_settings, ssl=True, username=None, password=None))
    assert tls.broker == "rediss://redis.internal:6380/1?ssl_cert_reqs=required"

    sentinels = CeleryConnection.of(DagsterSettings(executor="celery"), RedisSettings(
        sentinel_hosts="s1:26379,s2:26380", sentinel_master="orders-master"))
    assert sentinels.broker == "sentinel://s1:26379/1;sentinel://s2:26380/1"
    assert sentinels.config_source()["broker_transport_options"]["master_name"] == \
        "orders-master"

    explicit = CeleryConnection.of(DagsterSettings(
        executor="celery", celery_broker=SecretStr("amqp://guest@rabbit//")), redis_settings)
    assert (explicit.broker, explicit.backend) == ("amqp://guest@rabbit//", "rpc://")

    with pytest.raises(ConfigError, match="cannot use a Redis Cluster"):
        CeleryConnection.of(DagsterSettings(executor="celery"),
                            RedisSettings(cluster=True, key_prefix="{orders}"))


def test_the_executor_is_chosen_by_dagster_executor() -> None:
    redis_settings = RedisSettings(password=SecretStr("secret-pw"))
    names = {name: executor_for(DagsterSettings(executor=name), redis_settings).name
             for name in ("in_process", "multiprocess", "celery")}
    assert names == {"in_process": "in_process", "multiprocess": "multiprocess",
                     "celery": "celery"}
    celery = executor_for(DagsterSettings(executor="celery"), redis_settings)
    # The broker's password is handed over when a run starts, never part of the definition.
    assert "secret-pw" not in repr(vars(celery))
    assert dg.Definitions(executor=celery).get_repository_def()  # loads

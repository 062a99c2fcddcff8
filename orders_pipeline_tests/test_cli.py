"""The `orders-pipeline` CLI against the real servers, configured only through env vars.

Most commands run in-process through `main()` with the test's database and key prefix in the
environment; a few run as real subprocesses to check exit codes and the one-line errors.
"""

import contextlib
import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql

from orders_pipeline.cli import main
from orders_pipeline.connections import pg_connect
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.settings import Settings
from orders_pipeline.stats import throughput_line

CONSOLE_SCRIPT = Path(sys.executable).with_name("orders-pipeline")
TERMINAL_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment variables that make the CLI use exactly these settings."""
    pg, rd, tuning = settings.postgres, settings.redis, settings.pipeline
    return {
        "POSTGRES_HOST": pg.host, "POSTGRES_PORT": str(pg.port), "POSTGRES_USER": pg.user,
        "POSTGRES_PASSWORD": pg.password or "", "POSTGRES_DB": pg.dbname,
        "PGBOUNCER_HOST": pg.pgbouncer_host, "PGBOUNCER_PORT": str(pg.pgbouncer_port),
        "USE_PGBOUNCER": str(pg.use_pgbouncer).lower(),
        "REDIS_HOST": rd.host, "REDIS_PORT": str(rd.port), "REDIS_DB": str(rd.db),
        "REDIS_PASSWORD": rd.password or "", "REDIS_SSL": str(rd.ssl).lower(),
        "REDIS_KEY_PREFIX": rd.key_prefix,
        "BATCH_SIZE": str(tuning.batch_size), "WORKER_COUNT": str(tuning.worker_count),
        "DEDUP_WINDOW_SECONDS": str(tuning.dedup_window_seconds),
        "MAX_QUEUE_DEPTH": str(tuning.max_queue_depth),
        "LOOKUP_TTL_SECONDS": str(tuning.lookup_ttl_seconds),
        "CLAIM_TIMEOUT_SECONDS": str(tuning.claim_timeout_seconds),
    }


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point the CLI at the test's database and prefix; run from a directory with no `.env`."""
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def extra_db(settings: Settings) -> Iterator[str]:
    """The name of a second database of this test, dropped afterwards whatever happened."""
    name = f"{settings.postgres.dbname}_x"
    yield name
    with pg_connect(replace(settings.postgres, dbname="postgres")) as conn:
        conn.autocommit = True
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                     .format(sql.Identifier(name)))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("orders-pipeline: error: "), err
    return lines[0]


def one_usage_line(err: str, command: str) -> str:
    """The single stderr line of a usage error of `command`, which points at its --help."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"orders-pipeline {command}: error: "), err
    assert lines[0].endswith(f" (see `orders-pipeline {command} --help`)"), err
    return lines[0]


def scalar(conn: psycopg.Connection, query: str) -> int:
    return int(conn.execute(query).fetchone()[0])


def schema_fingerprint(conn: psycopg.Connection) -> tuple[int, ...]:
    return tuple(scalar(conn, q) for q in (
        "SELECT count(*) FROM products", "SELECT count(*) FROM currencies",
        "SELECT count(*) FROM zip_codes",
        "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace",
        "SELECT count(*) FROM pg_constraint WHERE connamespace = 'public'::regnamespace",
    ))


def test_init_db_creates_then_changes_nothing(
        settings: Settings, cli_env: Path, extra_db: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("POSTGRES_DB", extra_db)
    code, out, _ = run(capsys, "init-db")
    assert code == 0 and "created" in out and "010_schema.sql" in out
    with pg_connect(replace(settings.postgres, dbname=extra_db)) as conn:
        before = schema_fingerprint(conn)
    code, out, _ = run(capsys, "init-db")
    assert code == 0 and "already existed" in out
    with pg_connect(replace(settings.postgres, dbname=extra_db)) as conn:
        assert schema_fingerprint(conn) == before
    assert before[0] >= 1000 and before[3] > 10


def test_generate_process_promote_refresh_then_stats_balance(
        settings: Settings, cli_env: Path, pg: psycopg.Connection, rconn: redis.Redis,
        keys: RedisKeys, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "init-cache")
    lookup_rows = sum(schema_fingerprint(pg)[:3])
    assert code == 0 and f"{scalar(pg, 'SELECT count(*) FROM products'):,} rows" in out

    code, out, _ = run(capsys, "generate", "--count", "3000", "--duplicates", "0.05",
                       "--invalid", "0.01", "--seed", "7")
    assert code == 0 and "unique valid 2,820, duplicates 150, invalid 30" in out
    code, out, _ = run(capsys, "process", "--workers", "2")
    assert code == 0 and "claimed 3,000, duplicates 150, rejected 30, staged 2,820" in out
    assert scalar(pg, "SELECT count(*) FROM orders") == 0  # process never promotes
    code, out, _ = run(capsys, "promote")
    assert code == 0 and "inserted 2,820 rows" in out
    code, out, _ = run(capsys, "refresh")
    assert code == 0 and "sales_hourly" in out and "product_performance_daily" in out

    code, out, _ = run(capsys, "stats", "--json")
    assert code == 0
    stats = json.loads(out)
    assert stats["queue_depth"] == rconn.llen(keys.ingestion) == 0
    assert stats["in_flight"] == stats["staging_rows"] == 0
    assert stats["orders_rows"] == scalar(pg, "SELECT count(*) FROM orders") == 2820
    assert stats["rejected_rows"] == scalar(pg, "SELECT count(*) FROM orders_rejected") == 30
    assert stats["duplicates_dropped"] == 150 and stats["promotion_conflicts"] == 0
    assert stats["sales_hourly_rows"] == scalar(pg, "SELECT count(*) FROM sales_hourly") > 0
    assert (stats["product_performance_daily_rows"]
            == scalar(pg, "SELECT count(*) FROM product_performance_daily") > 0)
    assert stats["accepted"] == int(rconn.hget(keys.counters, "accepted")) == 3000
    assert stats["dedup_window_size"] == 2820
    assert stats["lookup_cache_size"] == lookup_rows
    assert 0 < stats["orders_per_minute_last_hour"] <= 2820
    assert stats["conservation"]["balanced"] and stats["conservation"]["difference"] == 0

    code, out, _ = run(capsys, "stats")
    assert code == 0 and "Conservation" in out and "balanced" in out

    assert run(capsys, "clear")[0] == 2
    code, out, _ = run(capsys, "clear", "--queue")
    assert code == 0 and keys.counters in out
    assert rconn.exists(keys.ingestion, keys.counters, keys.order_window,
                        keys.signals_stream) == 0
    assert LookupCache(rconn, keys, 60).is_loaded()  # --queue leaves the cache alone


def test_subprocess_json_and_unreachable_redis(cli_env: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "orders_pipeline", "stats", "--json"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["queue_depth"] == 0

    env = {**os.environ, "REDIS_PORT": "1"}
    done = subprocess.run([str(CONSOLE_SCRIPT), "stats"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode != 0 and done.stdout == ""
    assert "cannot reach Redis at" in one_error_line(done.stderr)


def test_unreachable_postgres_fails_fast(cli_env: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("POSTGRES_PORT", "1")
    for command in ("stats", "process", "init-db"):
        started = time.monotonic()
        code, _, err = run(capsys, command)
        assert code != 0
        assert "cannot reach Postgres at" in one_error_line(err)
        assert time.monotonic() - started < 8


def test_stats_without_schema_says_init_db(
        settings: Settings, cli_env: Path, extra_db: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    with pg_connect(replace(settings.postgres, dbname="postgres")) as conn:
        conn.autocommit = True
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(extra_db)))
    monkeypatch.setenv("POSTGRES_DB", extra_db)
    code, _, err = run(capsys, "stats")
    assert code != 0 and "run `orders-pipeline init-db`" in one_error_line(err)


def test_bad_arguments_and_config(cli_env: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "generate", "--count", "10", "--duplicates", "0.6",
                       "--invalid", "0.5")
    assert code != 0 and "fractions" in one_error_line(err)
    code, out, err = run(capsys, "generate", "--count", "0")
    assert code == 2 and out == "" and one_usage_line(err, "generate") == (
        "orders-pipeline generate: error: Invalid value for '--count': 0 is not in the range "
        "x>=1. (see `orders-pipeline generate --help`)")
    monkeypatch.setenv("BATCH_SIZE", "lots")
    code, _, err = run(capsys, "stats")
    assert code != 0 and "BATCH_SIZE" in one_error_line(err)


def test_stats_watch_redraws_until_ctrl_c(cli_env: Path) -> None:
    """At a terminal, `stats --watch` redraws the stats in place every --interval seconds,
    each time with a throughput line (a rate from the second one on); Ctrl-C ends it, exit 0,
    nothing on stderr, the last picture left on screen."""
    controller, terminal = pty.openpty()
    watch = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "stats", "--watch", "--interval", "0.2"], stdout=terminal,
        stderr=subprocess.PIPE, env={**os.environ, "TERM": "xterm", "COLUMNS": "120",
                                     "LINES": "100"})
    os.close(terminal)
    chunks: list[bytes] = []

    def read_terminal() -> None:  # until the program exits (EIO), so it never blocks writing
        with contextlib.suppress(OSError):
            while chunk := os.read(controller, 1 << 16):
                chunks.append(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while b"".join(chunks).count(b"/min") < 3:  # the last line of a picture: 3 complete
            assert time.monotonic() < deadline, b"".join(chunks)
            time.sleep(0.05)
    finally:
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=30)
        reader.join(timeout=30)
        os.close(controller)
    assert watch.returncode == 0 and err == b"", err
    text = TERMINAL_CONTROL.sub("", b"".join(chunks).decode())
    # Three pictures drawn while watching, maybe one cut short by Ctrl-C, then the last one.
    frames = text.split("orders_pipeline stats  ")[1:]
    assert len(frames) >= 4, text
    assert "throughput: measuring…  (every 0.2 s, Ctrl-C to stop)" in frames[0]
    for frame in [*frames[1:3], frames[-1]]:
        assert re.search(r"^throughput: [0-9,]+ orders/s into orders \| lag: none \(all caught "
                         r"up\) \| backpressure off  \(every 0\.2 s", frame, re.MULTILINE), frame
    for frame in [*frames[:3], frames[-1]]:
        for row in ("queue depth", "orders rows", "sales_hourly rows", "balanced", "peak "):
            assert row in frame, frame


def test_watch_line_shows_throughput_lag_and_backpressure() -> None:
    base = {"orders_rows": 1_000, "queue_depth": 4_000, "in_flight": 1_000,
            "backpressure_active": True}
    assert throughput_line(base, None, 10.0) == "throughput: measuring…"
    line = throughput_line(base, (8.0, 0), 10.0)
    assert line == ("throughput: 500 orders/s into orders | lag: ~10 s for 5,000 orders"
                    " | backpressure ON")
    idle = {**base, "queue_depth": 0, "in_flight": 0, "backpressure_active": False}
    assert "lag: none" in throughput_line(idle, (8.0, 1_000), 10.0)
    stalled = throughput_line(base, (8.0, 1_000), 10.0)
    assert "none promoted since the last look" in stalled

"""The `benchmarks` package: outside the product, run through the product's own commands.

The benchmark runs on a small size against the real servers (through `orders-pipeline
benchmark`, the thin delegation users already know, and as `python -m benchmarks`); the
product never imports it (checked at import time in a fresh interpreter and in the source),
and without it `orders-pipeline benchmark` fails with one line.
"""

import ast
import json
import subprocess
import sys
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import psycopg
import pytest
import redis
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from benchmarks.cli import main as benchmark_main
from benchmarks.preload import uuid4_ids, uuid7_ids
from benchmarks.scale_curve import parse_sizes, uuid4_payloads
from orders_pipeline import generator, transform
from orders_pipeline.cli import main
from orders_pipeline.connections import pg_connect
from orders_pipeline.faults import CRASH_ENV
from orders_pipeline.postgres_patterns.partitions import horizon_keeping
from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import REPO, pipeline_env

BENCH_DATABASES = "SELECT datname FROM pg_database WHERE datname LIKE 'orders\\_bench\\_%'"


@pytest.fixture
def bench_env(settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The test's servers in the environment; run from a directory with no `.env`."""
    for name, value in pipeline_env(settings).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_error_line(err: str, prog: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def test_benchmark_writes_results_and_leaves_nothing_behind(
        bench_env: Path, pg: psycopg.Connection, rconn: redis.Redis,
        capsys: pytest.CaptureFixture[str]) -> None:
    before = {r[0] for r in pg.execute(BENCH_DATABASES)}
    output = bench_env / "bench.json"
    code = main(["benchmark", "--total", "5000", "--workers", "2", "--batch-size", "500",
                 "--duplicates", "0.02", "--raw-repeats", "1", "--output", str(output)])
    out, _ = capsys.readouterr()
    assert code == 0 and "end-to-end" in out and f"results written to {output}" in out
    result = json.loads(output.read_text())
    assert [s["stage"] for s in result["stages"]] == ["build", "push", "stage", "promote",
                                                      "refresh"]
    assert all(s["rows_per_second"] > 0 for s in result["stages"])
    staged = result["stages"][2]
    assert staged["rows"] == 5000 and staged["processes"] == 2
    assert 0 < staged["seconds"] <= 2 * staged["wall_seconds"]  # busy <= wall x workers
    assert result["end_to_end"]["orders_per_second"] > 0
    orders = result["orders"]
    assert orders["verified"] and orders["orders_rows"] == orders["unique_valid"] == 4900
    assert orders["duplicates_dropped"] == 100 and orders["staged"] == 4900
    rss = result["peak_rss_kib"]
    assert rss["self"] > 0 and result["machine"]["postgres_server"]
    assert len(rss["workers"]) == 2 and all(kib > 0 for kib in rss["workers"])
    assert {"producer", "promoter", "dashboard", "raw_limits"} <= set(rss)
    assert [c["stage"] for c in result["comparisons"]] == [
        "push", "claim", "dedup", "parse", "transform", "copy", "promote"]
    assert all(c["alone_rows_per_second"] > 0 for c in result["comparisons"])
    assert {c["stage"] for c in result["comparisons"]
            if c["overlapped_rows_per_second"] is not None} == {"push", "promote"}
    alone = result["raw_limits"]["pipeline_alone"]
    assert {"claim", "parse", "transform", "dedup", "copy", "hand_over", "stage", "promote",
            "refresh"} <= set(alone)
    assert result["raw_limits"]["limits"]["views_match_full_recompute"]["value"]
    assert result["dashboard"]["all"]["count"] > 0
    after = {r[0] for r in pg.execute(BENCH_DATABASES)}
    assert result["database"] not in after and after <= before
    assert not any(name.startswith(result["database"]) for name in after)
    assert not list(rconn.scan_iter(match=f"{result['key_prefix']}:*"))


def test_benchmark_module_and_console_script_refuse_bad_usage(settings: Settings) -> None:
    env = pipeline_env(settings)
    script = Path(sys.executable).with_name("orders-pipeline-benchmark")
    for argv, prog in (([sys.executable, "-m", "benchmarks"], "orders-pipeline-benchmark"),
                       ([str(script)], "orders-pipeline-benchmark"),
                       ([sys.executable, "-m", "orders_pipeline", "benchmark"],
                        "orders-pipeline benchmark")):
        done = subprocess.run([*argv, "--total", "10", "--invalid", "1.5"], env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2 and done.stdout == ""
        assert "'--invalid': 1.5 is not in the range 0<=x<1" in one_error_line(done.stderr,
                                                                             prog)
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    assert "--total N" in done.stdout and "--raw-sample R" in done.stdout


def test_benchmark_without_the_package_is_one_line(settings: Settings) -> None:
    """An install without `benchmarks`: the command says so, the rest of the CLI works."""
    hidden = ("import sys; sys.modules['benchmarks'] = None; "
              "from orders_pipeline.cli import main; sys.exit(main(sys.argv[1:]))")
    env = pipeline_env(settings)
    done = subprocess.run([sys.executable, "-c", hidden, "benchmark", "--total", "10"],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert one_error_line(done.stderr, "orders-pipeline") == (
        "orders-pipeline: error: the benchmarks package is not installed; install the "
        "project from its source tree (`pip install -e .`) to run `benchmark`")
    done = subprocess.run([sys.executable, "-c", hidden, "stats", "--json"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and json.loads(done.stdout)["queue_depth"] == 0


def test_the_product_imports_nothing_from_benchmarks() -> None:
    """Importing every module of `orders_pipeline` loads no `benchmarks` module, and the
    package's only import of it is the CLI's lazy one, inside a function."""
    check = ("import importlib, pkgutil, sys, orders_pipeline\n"
             "names = [m.name for m in pkgutil.walk_packages(orders_pipeline.__path__, "
             "'orders_pipeline.')]\n"
             "for name in names: importlib.import_module(name)\n"
             "print(len(names), sorted(m for m in sys.modules if m.split('.')[0] == "
             "'benchmarks'))\n")
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=True)
    count, loaded = done.stdout.split(" ", 1)
    assert int(count) > 20 and loaded.strip() == "[]"

    lazy = []
    for path in sorted((REPO / "orders_pipeline").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        inside_functions = {id(node) for function in ast.walk(tree)
                            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
                            for node in ast.walk(function)}
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name.split(".")[0] == "benchmarks" for name in names):
                assert id(node) in inside_functions, f"{path}:{node.lineno} imports benchmarks"
                lazy.append(path.relative_to(REPO).as_posix())
    assert lazy == ["orders_pipeline/cli.py"]


# --------------------------------------------------------------------------- scale-curve

GIB_KIB = 2**20
CURVE_PROG = "orders-pipeline-benchmark scale-curve"


def last_error_line(err: str) -> str:
    """The one error line, after the progress lines the curve prints on stderr."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith(f"{CURVE_PROG}: error: ")]
    assert errors == lines[-1:], err
    return errors[0]


def scale_curve(output: Path, *args: str) -> tuple[int, dict]:
    code = benchmark_main(["scale-curve", "--run-orders", "1000", "--batch-size", "250",
                           "--workers", "1", "--history-days", "400", "--output", str(output),
                           *args])
    return code, json.loads(output.read_text()) if code == 0 else {}


def test_scale_curve_grows_one_database_and_measures_each_size(
        bench_env: Path, pg: psycopg.Connection, rconn: redis.Redis,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Two sizes on one scratch database: preloaded up to each size, then both id styles'
    promotion, the fresh batch, the dashboard, sizes and memory; everything removed after."""
    plot = bench_env / "curve.png"  # matplotlib: the `bench` extra, which .ci/run installs
    code, result = scale_curve(bench_env / "curve.json", "--sizes", "0,3000",
                               "--fresh-batch", "300", "--plot", str(plot))
    out = capsys.readouterr().out
    assert code == 0 and "| orders present |" in out and "\n| 3,000 | " in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["complete"] and result["options"]["sizes"] == [0, 3000]
    first, second = result["points"]
    # Orders present before the runs equal the sizes: 2 runs + the batch came after size 0.
    assert [first["orders_present"], second["orders_present"]] == [0, 3000]
    assert "preload" not in first and second["preload"]["orders"] == 3000 - 2300
    preload = second["preload"]
    assert preload["copy_seconds"] > 0 and preload["load_orders_per_second"] > 0
    assert preload["days"] == 400 and preload["partitions_created"] >= 13
    assert 0 < preload["peak_rss_kib"] < GIB_KIB and preload["wal_bytes"] > 0
    for point, present in ((first, 0), (second, 3000)):
        runs = point["runs"]
        assert [runs[s]["orders_present_before"] for s in ("uuid7", "uuid4")] == [
            present, present + 1000]
        for run in runs.values():
            assert run["orders"] == 1000 and run["promoted_batches"] == 4
            assert run["promote_orders_per_second"] == pytest.approx(
                1000 / run["promote_seconds"], rel=0.02)
            assert run["stage_seconds"] > 0 and run["refresh_seconds"] > 0
            assert run["promotion_wal_bytes"] > 0
        fresh = point["fresh_batch"]
        assert fresh["views_answer_with_batch"] and fresh["orders"] == 300
        assert fresh["views_fresh_seconds"] > 0 and fresh["promote_seconds"] > 0
        assert fresh["orders_present_before"] == present + 2000
        assert point["orders_present_after"] == present + 2300
        dashboard = point["dashboard"]["all"]
        assert dashboard["count"] > 0 and 0 < dashboard["p50_ms"] <= dashboard["p99_ms"]
        assert dashboard["p99_ms"] <= dashboard["max_ms"]
        assert {"run_uuid7", "run_uuid4", "fresh_batch"} <= set(point["dashboard"]["by_phase"])
        sizes = point["sizes"]
        orders = sizes["orders"]
        assert 0 < orders["heap_bytes"] + orders["index_bytes"] <= orders["total_bytes"]
        assert sizes["guard"]["total_bytes"] > 0 and sizes["view_slices"]["count"] > 0
        assert sizes["database_bytes"] > orders["total_bytes"] + sizes["guard"]["total_bytes"]
        assert point["wal_bytes"] > 0
        memory = point["memory"]
        assert memory["postgres"]["available"] and memory["postgres"]["pss_kib"] > 0
        assert memory["postgres"]["rss_kib"] >= memory["postgres"]["pss_kib"]
        assert memory["redis"]["used_memory"] > 0
        assert all(0 < kib < GIB_KIB for kib in memory["peak_rss_kib"].values())
    # 14 months of history (400 days) and the current month with the three after it.
    assert second["sizes"]["partitions"]["count"] >= 14
    assert second["sizes"]["partitions"]["largest"]["total_bytes"] > 0
    assert result["verified"] == {"expected": 5300, "verified": True,
                                  "counted": {"orders": 5300, "order_ids": 5300}}
    assert result["database"] not in {r[0] for r in pg.execute(BENCH_DATABASES)}
    assert not list(rconn.scan_iter(match=f"{result['key_prefix']}:*"))


def test_scale_curve_unpartitioned_is_a_raw_insert_comparison(
        bench_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, result = scale_curve(bench_env / "flat.json", "--sizes", "0,2500",
                               "--design", "unpartitioned")
    assert code == 0 and "raw-insert comparison" in capsys.readouterr().out
    first, second = result["points"]
    assert [first["orders_present"], second["orders_present"]] == [0, 2500]
    assert second["preload"]["table"] == "orders_flat" and second["preload"]["orders"] == 500
    for point in result["points"]:
        assert not {"fresh_batch", "dashboard"} & set(point)
        assert all(run["promote_orders_per_second"] > 0 for run in point["runs"].values())
        assert point["sizes"]["orders"]["table"] == "orders_flat"
        assert point["sizes"]["orders"]["total_bytes"] > 0
    assert result["verified"]["counted"] == {"orders_flat": 4500}


def test_scale_curve_refuses_when_the_disk_is_short(
        bench_env: Path, pg: psycopg.Connection, capsys: pytest.CaptureFixture[str]) -> None:
    data = pg.execute("SHOW data_directory").fetchone()[0]
    if not Path(data).exists():
        pytest.skip("the Postgres data directory is not on this host: free disk is unknown")
    before = {r[0] for r in pg.execute(BENCH_DATABASES)}
    code = benchmark_main(["scale-curve", "--sizes", f"0,{10**12}"])
    line = last_error_line(capsys.readouterr().err)
    assert code == 1 and "not enough free disk for the curve" in line and "GiB free at" in line
    assert {r[0] for r in pg.execute(BENCH_DATABASES)} <= before


def test_scale_curve_failing_step_is_one_line_and_leaves_nothing_behind(
        bench_env: Path, pg: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Both staging workers die at their first claim: the curve stops with the workers'
    failure in one line, its dashboard process stopped and its scratch database dropped."""
    monkeypatch.setenv(CRASH_ENV, "after_claim")
    before = {r[0] for r in pg.execute(BENCH_DATABASES)}
    code = benchmark_main(["scale-curve", "--sizes", "0", "--run-orders", "500",
                           "--batch-size", "100", "--workers", "2"])
    line = last_error_line(capsys.readouterr().err)
    assert code == 1 and "WorkerFailed: staging-worker-" in line and "code -9" in line
    assert {r[0] for r in pg.execute(BENCH_DATABASES)} <= before


def test_scale_curve_refuses_bad_sizes_in_one_line(
        bench_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for sizes in ("5,3", "0,0", "-1,4", "a", ""):
        assert benchmark_main(["scale-curve", "--sizes", sizes]) == 2
        line = one_error_line(capsys.readouterr().err, CURVE_PROG)
        assert "--sizes" in line


@hypothesis_settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 10**12), min_size=1, max_size=6))
def test_sizes_are_distinct_and_ascending(sizes: list[int]) -> None:
    text = ",".join(map(str, sizes))
    if sizes == sorted(set(sizes)):
        assert parse_sizes(text) == tuple(sizes)
    else:
        with pytest.raises(ValueError, match="ascending"):
            parse_sizes(text)


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**48 - 1), st.integers(0, 2**40 - 1)),
                min_size=1, max_size=50, unique_by=lambda pair: pair[1]),
       st.integers(0, 2**63))
def test_preload_ids_are_uuid7_with_the_order_time(pairs: list[tuple[int, int]],
                                                    seed: int) -> None:
    """Each preload id is a UUIDv7 carrying its order's millisecond and its number (so
    distinct numbers never collide), whatever the seed."""
    frame = pl.DataFrame({"ms": [ms for ms, _ in pairs], "n": [n for _, n in pairs]},
                         schema={"ms": pl.Int64, "n": pl.Int64})
    ids = frame.select(uuid7_ids(pl.col("ms"), pl.col("n"), seed).alias("id"))["id"].to_list()
    for text, (ms, number) in zip(ids, pairs, strict=True):
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert parsed.int >> 80 == ms and parsed.int % 2**40 == number
    assert len(set(ids)) == len(ids)


@hypothesis_settings(max_examples=50, deadline=None)
@given(st.integers(1, 2000), st.integers(0, 2**64 - 1))
def test_uuid4_ids_are_random_version_4(count: int, seed: int) -> None:
    ids = uuid4_ids(count, seed).to_list()
    parsed = [uuid.UUID(text) for text in ids]
    assert [str(p) for p in parsed] == ids and len(set(ids)) == count
    assert all(p.version == 4 and p.variant == uuid.RFC_4122 for p in parsed)


def test_uuid4_payloads_are_valid_orders(settings: Settings) -> None:
    """The benchmark's random-id payloads pass the product's parse and rules, ids v4."""
    with pg_connect(settings.postgres) as conn:
        refs = generator.References.load(conn)
    payloads = uuid4_payloads(refs, 500, seed=3)
    parsed = transform.parse_payloads(payloads)
    valid, invalid = transform.validate_values(parsed.rows)
    assert parsed.rejects.height == 0 and invalid.height == 0 and valid.height == 500
    ids = valid["order_id"].to_list()
    assert len(set(ids)) == 500 and {uuid.UUID(i).version for i in ids} == {4}
    stamps = [datetime.fromisoformat(json.loads(p)["order_timestamp"]) for p in payloads]
    assert all((datetime.now(UTC) - stamp).total_seconds() < 3700 for stamp in stamps)


# --------------------------------------------------------------------------- retention


def test_retention_benchmark_times_the_drop_and_promotions_wait(
        bench_env: Path, pg: psycopg.Connection, rconn: redis.Redis,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A small run: 4,000 orders over 300 days, four months kept; the drop is what the
    product's retention reports, the guard shrinks by exactly its ids, the probe took the
    promotion lock, and the scratch database and keys are gone."""
    output = bench_env / "retention.json"
    code = benchmark_main(["retention", "--orders", "4000", "--history-days", "300",
                           "--keep-months", "4", "--output", str(output)])
    out = capsys.readouterr().out
    assert code == 0 and "| dropped | seconds |" in out
    result = json.loads(output.read_text())
    dropped = result["retention"]
    horizon = date.fromisoformat(dropped["horizon"])
    assert horizon in {horizon_keeping(4, datetime.now(UTC) - timedelta(minutes=m))
                       for m in (0, 30)}  # (a run across a month's start)
    before, after = result["guard_before"], result["guard_after"]
    assert before["rows"] == 4000 and after["bytes"] > 0
    assert dropped["ids"] == dropped["orders"] == before["rows"] - after["rows"] > 2000
    assert len(dropped["partitions"]) >= 6 and dropped["seconds"] > 0
    assert all(name < f"orders_p{horizon:%Y%m}" for name in dropped["partitions"])
    assert len(dropped["view_slices"]) >= len(dropped["partitions"])
    wait = result["promotion_wait"]
    assert wait["count"] >= 2 and 0 < wait["p50_ms"] <= wait["max_ms"]
    assert result["database"] not in {r[0] for r in pg.execute(BENCH_DATABASES)}
    assert not list(rconn.scan_iter(match=f"{result['key_prefix']}:*"))

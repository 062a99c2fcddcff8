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
from pathlib import Path

import psycopg
import pytest
import redis

from orders_pipeline.cli import main
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

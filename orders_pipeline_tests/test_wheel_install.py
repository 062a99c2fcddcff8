"""The DDL ships inside the package: a wheel install creates the schema and runs a pipeline.

Issue 8, item 8: with `sql/` outside the package, a plain (non-editable) install applied
nothing and `init-db` exited 0. Here the wheel is built from a copy of the sources, installed
into a fresh virtualenv (dependencies borrowed from the project's venv through a `.pth` file,
nothing downloaded) and driven from a directory that is not the repo. An install without the
DDL must make `init-db` fail with one line and leave the server untouched.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orders_pipeline.connections import pg_connect
from orders_pipeline.postgres_patterns.schema import (
    CORE_TABLES,
    SchemaFilesMissing,
    sql_files,
)
from orders_pipeline.settings import PostgresSettings, Settings
from orders_pipeline_tests.conftest import drop_database
from orders_pipeline_tests.helpers import REPO, pipeline_env

REPO_DDL = sorted(path.name for path in (REPO / "orders_pipeline" / "sql").glob("*.sql"))
VIEWS = ("sales_hourly", "product_performance_daily")
ERROR_PREFIX = "orders-pipeline: error: "


def isolated_env(settings: Settings) -> dict[str, str]:
    """The test's database and prefix, with nothing that could put the repo on sys.path."""
    env = pipeline_env(settings)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


def run_ok(argv: list[str | Path], cwd: Path, env: dict[str, str] | None = None,
           timeout: float = 60) -> str:
    """Run a command, fail the test with its output unless it exits 0; returns stdout."""
    done = subprocess.run([str(arg) for arg in argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done.stdout


def copy_sources(dest: Path, *, with_ddl: bool = True) -> Path:
    """What a wheel is built from (pyproject, README, the package), without caches."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", *(() if with_ddl else ("sql",)))
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    shutil.copytree(REPO / "orders_pipeline", dest / "orders_pipeline", ignore=ignore)
    return dest


def database_exists(settings: PostgresSettings) -> bool:
    admin = PostgresSettings(**{**settings.__dict__, "dbname": "postgres"})
    with pg_connect(admin) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (settings.dbname,)).fetchone() is not None


def wheel_venv(tmp: Path) -> Path:
    """Build the wheel, install it into a new venv with the project's deps; returns its bin/."""
    source = copy_sources(tmp / "src")
    dist = tmp / "dist"
    run_ok([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
            "--no-index", "-w", dist, source], cwd=tmp)
    (wheel,) = dist.glob("orders_pipeline-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = sorted(name.removeprefix("orders_pipeline/sql/") for name in archive.namelist()
                         if name.startswith("orders_pipeline/sql/"))
    assert shipped == REPO_DDL
    assert REPO_DDL[:4] == ["010_schema.sql", "015_partitioned_orders.sql", "020_seed.sql",
                            "030_views.sql"]

    venv = tmp / "venv"
    run_ok([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    run_ok([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
            "--no-index", wheel], cwd=tmp)
    site = Path(run_ok([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=tmp).strip())
    # A path line in a .pth is appended to sys.path without processing the .pth files found
    # there, so the project's editable-install hook never runs in the new venv.
    (site / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def test_wheel_install_creates_schema_and_runs_pipeline(settings: Settings,
                                                        tmp_path: Path) -> None:
    bin_dir = wheel_venv(tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = isolated_env(settings)
    where = run_ok([bin_dir / "python", "-c",
                    "import orders_pipeline.postgres_patterns.schema as s; "
                    "print(s.__file__); print(s.ddl_dir())"], cwd=work, env=env).split()
    venv = str(bin_dir.parent) + os.sep
    assert all(path.startswith(venv) for path in where), where

    cli = bin_dir / "orders-pipeline"
    drop_database(settings.postgres)  # init-db from the wheel creates it from nothing
    out = run_ok([cli, "init-db"], cwd=work, env=env)
    assert out.splitlines() == [f"database {settings.postgres.dbname!r} created",
                                f"applied (idempotent): {', '.join(REPO_DDL)}"]
    with pg_connect(settings.postgres) as conn:
        missing = conn.execute("SELECT t FROM unnest(%s::text[]) AS t"
                               " WHERE to_regclass(t) IS NULL",
                               (list(CORE_TABLES + VIEWS),)).fetchall()
        assert missing == []

    run_ok([cli, "init-cache"], cwd=work, env=env)
    run_ok([cli, "generate", "--count", "200", "--duplicates", "0.1", "--invalid", "0.05",
            "--seed", "8"], cwd=work, env=env)
    run_ok([cli, "process"], cwd=work, env=env)
    run_ok([cli, "promote"], cwd=work, env=env)
    with pg_connect(settings.postgres) as conn:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM orders), (SELECT count(DISTINCT order_id) FROM orders),"
            " (SELECT count(*) FROM orders_rejected), (SELECT count(*) FROM orders_staging)"
        ).fetchone()
    # 200 payloads: round(200 × 0.1) = 20 duplicates, round(200 × 0.05) = 10 invalid.
    assert counts == (170, 170, 10, 0)


def test_init_db_without_ddl_fails_with_one_line(settings: Settings, tmp_path: Path) -> None:
    """A real install of the package that lacks `sql/`: one line, exit 1, server untouched."""
    site = tmp_path / "site"
    copy_sources(site, with_ddl=False)
    work = tmp_path / "elsewhere"
    work.mkdir()
    drop_database(settings.postgres)
    env = {**isolated_env(settings), "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-m", "orders_pipeline", "init-db"], cwd=work,
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr == (
        f"{ERROR_PREFIX}no *.sql files to apply in {site / 'orders_pipeline' / 'sql'}: this "
        "install of orders_pipeline lacks its DDL; reinstall it from a wheel or source tree "
        "that ships orders_pipeline/sql\n")
    assert not database_exists(settings.postgres)


def test_sql_files_of_empty_or_missing_dir_raise(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not DDL")
    (tmp_path / "dir.sql").mkdir()
    for root in (tmp_path, tmp_path / "absent"):
        with pytest.raises(SchemaFilesMissing, match=r"^no \*\.sql files to apply in "):
            sql_files(root)


def test_packaged_ddl_is_read_in_file_name_order() -> None:
    assert [entry.name for entry in sql_files()] == REPO_DDL


NAMES = st.from_regex(r"[A-Za-z0-9_-]{1,6}(\.sql|\.SQL|\.sql\.bak|\.txt|\.sq|)", fullmatch=True)


@hypothesis_settings(max_examples=150, deadline=None)
@given(entries=st.dictionaries(NAMES, st.booleans(), max_size=8))
def test_sql_files_selects_sql_files_sorted_by_name(entries: dict[str, bool]) -> None:
    """Any directory: exactly its `*.sql` regular files, by name; none at all raises."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, is_dir in entries.items():
            if is_dir:
                (root / name).mkdir()
            else:
                (root / name).write_text(f"-- {name}\n")
        expected = sorted(name for name, is_dir in entries.items()
                          if name.endswith(".sql") and not is_dir)
        if expected:
            found = sql_files(root)
            assert [entry.name for entry in found] == expected
            assert [entry.read_text() for entry in found] == [f"-- {n}\n" for n in expected]
        else:
            with pytest.raises(SchemaFilesMissing):
                sql_files(root)

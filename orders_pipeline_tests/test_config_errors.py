"""Issue 8 item 7: configuration mistakes are refused once, never retried as if transient.

Every config field (the `staged_orders` config, the CLI flags, the environment variables) is
bounded; a value out of range or of the wrong type is refused with one line naming the field,
its value and the range. In Dagster such an error is a `dg.Failure(allow_retries=False)`: one
step attempt, and the run is not re-run by run retries either (`dagster.yaml`). Transient
server errors are still retried with backoff.
"""

import contextlib
import io
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import dagster as dg
import psycopg
import pytest
import redis
import yaml
from hypothesis import example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orders_pipeline import cli
from orders_pipeline.assets import orders
from orders_pipeline.assets.lookup import lookup_cache
from orders_pipeline.assets.orders import StagingConfig, staged_orders
from orders_pipeline.connections import close_all
from orders_pipeline.definitions import defs
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.resources import PipelineResource
from orders_pipeline.settings import (
    BATCH_SIZE,
    BATCHES_PER_WORKER,
    WORKERS,
    Bound,
    ConfigError,
    PipelineSettings,
    Settings,
    env_bounds,
)
from orders_pipeline_tests.helpers import REPO, pipeline_env, push_orders, resources_for
from orders_pipeline_tests.servers import RedisServer
from orders_pipeline_tests.test_cli import CONSOLE_SCRIPT

RETRIED = {"STEP_UP_FOR_RETRY", "STEP_RESTARTED"}
CONFIG_BOUNDS = {"workers": WORKERS, "batch_size": BATCH_SIZE,
                 "max_batches_per_worker": BATCHES_PER_WORKER}
ENV_BOUNDS = env_bounds()
FLAG_BOUNDS = {"--workers": WORKERS, "--batch-size": BATCH_SIZE,
               "--iterations": BATCHES_PER_WORKER}


@contextlib.contextmanager
def instance_with_run_retries() -> Iterator[dg.DagsterInstance]:
    """A throwaway instance whose `run_retries` are exactly those of the repo's dagster.yaml."""
    run_retries = yaml.safe_load((REPO / "dagster.yaml").read_text())["run_retries"]
    assert run_retries["enabled"] and run_retries["max_retries"] >= 1
    with dg.instance_for_test(overrides={"run_retries": run_retries}) as instance:
        yield instance


def step_events(result: dg.ExecuteInProcessResult) -> list[str]:
    return [e.event_type_value for e in result.all_events if e.is_step_event]


def failure_description(result: dg.ExecuteInProcessResult) -> str:
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    data = failure.step_failure_data
    assert data.user_failure_data is not None, data.error
    return data.user_failure_data.description


def assert_refused_once(instance: dg.DagsterInstance, result: dg.ExecuteInProcessResult) -> str:
    """One attempt, no step retry, and run retries will not re-run it; the failure's text."""
    assert not result.success
    events = step_events(result)
    assert events.count("STEP_START") == 1 and not RETRIED & set(events), events
    run = instance.get_run_by_id(result.run_id)
    assert run is not None and run.tags["dagster/failure_reason"] == "STEP_FAILURE"
    assert run.tags["dagster/will_retry"] == "false"
    assert len(instance.get_runs()) == 1
    description = failure_description(result)
    assert "\n" not in description and "Not retried" in description
    return description


def materialize_staging(settings: Settings, instance: dg.DagsterInstance,
                        config: dict[str, object]) -> dg.ExecuteInProcessResult:
    return dg.materialize([staged_orders], resources=resources_for(settings), instance=instance,
                          run_config={"ops": {"staged_orders": {"config": config}}},
                          raise_on_error=False)


# ---------------------------------------------------------------- the examples


def test_batch_size_minus_5_is_refused_once_and_not_rerun(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection, keys: RedisKeys) -> None:
    push_orders(settings, rconn, pg, 3_000, batch_size=1_000)
    started = time.monotonic()
    with instance_with_run_retries() as instance:
        result = materialize_staging(settings, instance, {"batch_size": -5})
        description = assert_refused_once(instance, result)
    assert time.monotonic() - started < 15  # was 8 attempts in ~45 s
    assert description == (
        "staged_orders: bad config: batch_size must be an integer from 1 to 100000, got -5. "
        "Not retried: retrying cannot fix this; correct the configuration or setup, then "
        "materialize again.")
    assert OrderQueue(rconn, keys).depth() == 3_000
    assert pg.execute("SELECT count(*) FROM orders_staging").fetchone()[0] == 0


def test_zero_workers_and_batch_size_are_refused_and_orders_stay_queued(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection, keys: RedisKeys) -> None:
    push_orders(settings, rconn, pg, 10_000, batch_size=1_000)
    with instance_with_run_retries() as instance:
        result = materialize_staging(settings, instance, {"workers": 0, "batch_size": 0})
        description = assert_refused_once(instance, result)
    assert ("bad config: workers must be an integer from 1 to 64, got 0; "
            "batch_size must be an integer from 1 to 100000, got 0.") in description
    queue = OrderQueue(rconn, keys)
    assert queue.depth() == 10_000 and queue.claimed_batches() == 0
    assert pg.execute("SELECT count(*) FROM orders_staging").fetchone()[0] == 0


def test_a_run_that_claims_nothing_while_orders_wait_fails(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection, keys: RedisKeys) -> None:
    """The post-condition behind validation, with a config that slipped past it."""
    push_orders(settings, rconn, pg, 2_000, batch_size=1_000)
    unchecked = StagingConfig.model_construct(workers=1, batch_size=500,
                                              max_batches_per_worker=0)
    resources = resources_for(settings)
    context = dg.build_op_context()  # the steps' bodies: a run would validate the config
    plan = orders.plan_staging(context, unchecked, **resources, one_step=True)
    drained = orders.drain_staging(context, plan, **resources)
    with pytest.raises(dg.Failure) as refused:
        orders.collect_staging(context, plan, [drained], resources["redis"],
                               resources["postgres"])
    assert not refused.value.allow_retries
    assert refused.value.description.startswith(
        "staged_orders: claimed nothing while 2000 orders wait (workers=1, batch_size=500, "
        "max_batches_per_worker=0). Not retried")
    assert OrderQueue(rconn, keys).depth() == 2_000


def test_env_var_out_of_range_is_one_cli_line(settings: Settings) -> None:
    done = subprocess.run([str(CONSOLE_SCRIPT), "process"],
                          env=pipeline_env(settings, BATCH_SIZE="-5"), capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == ("orders-pipeline: error: bad configuration: BATCH_SIZE must be an "
                           "integer from 1 to 100000, got -5\n")


def test_env_var_out_of_range_fails_the_asset_once(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection, keys: RedisKeys) -> None:
    """The `pipeline` resource reads BATCH_SIZE when the run starts (`EnvVar`, as
    `resources_from_env` configures it): out of range there, the step is refused once."""
    push_orders(settings, rconn, pg, 1_000, batch_size=1_000)
    resources = {**resources_for(settings),
                 "pipeline": PipelineResource(batch_size=dg.EnvVar.int("BATCH_SIZE"))}
    with mock.patch.dict(os.environ, {"BATCH_SIZE": "-5"}), \
            instance_with_run_retries() as instance:
        result = dg.materialize([staged_orders], resources=resources, instance=instance,
                                raise_on_error=False)
        description = assert_refused_once(instance, result)
    assert description.startswith("staged_orders: ConfigError: BATCH_SIZE must be an integer "
                                  "from 1 to 100000, got -5. Not retried")
    assert OrderQueue(rconn, keys).depth() == 1_000


def test_missing_schema_and_empty_lookup_table_are_not_retried(
        settings: Settings, pg: psycopg.Connection) -> None:
    pg.execute("TRUNCATE products CASCADE")
    with instance_with_run_retries() as instance:
        result = dg.materialize([lookup_cache], resources=resources_for(settings),
                                instance=instance, raise_on_error=False)
        description = assert_refused_once(instance, result)
    assert description.startswith("lookup_cache: LookupCacheMissing: lookup table(s) products "
                                  "empty in Postgres")

    pg.execute("DROP TABLE orders_staging CASCADE")
    with instance_with_run_retries() as instance:
        result = materialize_staging(settings, instance, {})
        description = assert_refused_once(instance, result)
    assert description.startswith("staged_orders: SchemaMissing: tables missing: orders_staging "
                                  "(run `orders-pipeline init-db`)")


def test_transient_redis_outage_is_still_retried_with_backoff(
        settings: Settings, tmp_path: Path) -> None:
    server = RedisServer(directory=tmp_path)  # not started: the first attempt finds Redis down
    down = replace(settings, redis=replace(settings.redis, port=server.port))
    try:
        with dg.instance_for_test() as instance:
            def retry_requested() -> bool:
                return any(instance.all_logs(run.run_id,
                                             of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY)
                           for run in instance.get_runs())

            def start_redis_after_first_failure() -> None:
                deadline = time.monotonic() + 60
                while not retry_requested():
                    if time.monotonic() > deadline:
                        return
                    time.sleep(0.05)
                server.start()

            starter = threading.Thread(target=start_redis_after_first_failure)
            starter.start()
            result = dg.materialize([lookup_cache], resources=resources_for(down),
                                    instance=instance, raise_on_error=False)
            starter.join(timeout=70)
            events = [e for e in result.all_events if e.is_step_event]
        assert result.success
        assert [e.event_type_value for e in events if e.event_type_value in
                {"STEP_START", "STEP_UP_FOR_RETRY", "STEP_RESTARTED", "STEP_SUCCESS"}] == [
            "STEP_START", "STEP_UP_FOR_RETRY", "STEP_RESTARTED", "STEP_SUCCESS"]
        [retry] = [e for e in events if e.event_type_value == "STEP_UP_FOR_RETRY"]
        assert retry.event_specific_data.seconds_to_wait == 2  # RETRY's first backoff step
        assert LookupCache(server.client(), RedisKeys(settings.redis.key_prefix),
                           3600).is_loaded()
    finally:
        close_all()
        server.kill()


# ---------------------------------------------------------------- generated mistakes


def out_of_range(bound: Bound) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(max_value=bound.minimum - 1),
                     st.integers(min_value=bound.maximum + 1))


def not_an_integer() -> st.SearchStrategy[str]:
    def unparsable(text: str) -> bool:
        try:
            int(text)
        except ValueError:
            return True
        return False
    text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
    return st.one_of(text, st.floats(allow_nan=True).map(str),
                     st.sampled_from(["", "5.0", "1e3", "0x10", "ten", "5 000", "--1"])
                     ).filter(unparsable)


@hypothesis_settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(CONFIG_BOUNDS)).flatmap(
    lambda name: st.tuples(st.just(name), out_of_range(CONFIG_BOUNDS[name]))))
def test_generated_out_of_range_config_is_refused_for_good(case: tuple[str, int]) -> None:
    """Dagster's Int check passes any integer; the step then builds the config: a permanent
    failure naming the field, the value and the range."""
    name, value = case
    with pytest.raises(dg.Failure) as refused:
        StagingConfig(**{name: value})
    assert not refused.value.allow_retries
    assert refused.value.description == (
        f"staged_orders: bad config: {CONFIG_BOUNDS[name].refusal(name, value)}. Not retried: "
        f"retrying cannot fix this; correct the configuration or setup, then materialize again.")


@hypothesis_settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(CONFIG_BOUNDS)),
       value=st.one_of(not_an_integer(), st.booleans(), st.floats(),
                       st.lists(st.integers(), max_size=2)))
def test_generated_ill_typed_config_is_refused_at_launch(name: str, value: object) -> None:
    """The launchpad's own check on the sensor's job: never launched, the field is named."""
    with pytest.raises(dg.DagsterInvalidConfigError) as refused:
        dg.validate_run_config(defs.resolve_job_def("ingest_orders"),
                               {"ops": {"staged_orders": {"config": {name: value}}}})
    assert f"staged_orders:config:{name}" in str(refused.value)


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(ENV_BOUNDS)).flatmap(
    lambda name: st.tuples(st.just(name), st.one_of(out_of_range(ENV_BOUNDS[name]).map(str),
                                                    not_an_integer().filter(bool)))))
@example(("BATCH_SIZE", "  "))  # blanks kept as given in the one line, not squeezed
def test_generated_bad_env_vars_are_one_cli_line(case: tuple[str, str]) -> None:
    """An empty variable means unset (its default); anything else out of range is refused."""
    name, raw = case
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({name: raw})
    try:
        shown: object = int(raw)
    except ValueError:
        shown = raw
    assert str(refused.value) == ENV_BOUNDS[name].refusal(name, shown)

    if "\x00" in raw:
        return  # an environment cannot hold NUL; the refusal above is what it would say
    stderr = io.StringIO()
    with mock.patch.dict(os.environ, {name: raw}), contextlib.redirect_stderr(stderr):
        code = cli.main(["stats"])
    assert code == 1
    assert stderr.getvalue() == f"orders-pipeline: error: bad configuration: {refused.value}\n"


def not_a_finite_number() -> st.SearchStrategy[str]:
    def unreadable(text: str) -> bool:
        try:
            return not math.isfinite(float(text))
        except ValueError:
            return True
    text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
    return st.one_of(text, st.sampled_from(["nan", "-NaN", "inf", "+Infinity", "1e999", "ten",
                                            "0,5", "1/2", ""])).filter(unreadable)


class BoundedOption(NamedTuple):
    """A bounded CLI option: its command, click's words for its range, values outside the
    range and values that are no (finite) number at all."""

    command: str
    range: str
    outside: st.SearchStrategy[str]
    garbage: st.SearchStrategy[str]


_FRACTION_OUTSIDE = st.one_of(st.floats(max_value=0, exclude_max=True), st.floats(min_value=1))
BOUNDED_OPTIONS = {
    **{flag: BoundedOption("process", f"{bound.minimum}<=x<={bound.maximum}",
                           out_of_range(bound).map(str), not_an_integer())
       for flag, bound in FLAG_BOUNDS.items()},
    "--count": BoundedOption("generate", "x>=1", st.integers(max_value=0).map(str),
                             not_an_integer()),
    "--grace": BoundedOption("process", "x>0", st.floats(max_value=0).map(str),
                             not_a_finite_number()),
    "--interval": BoundedOption("stats", "x>0", st.floats(max_value=0).map(str),
                                not_a_finite_number()),
    "--duplicates": BoundedOption("generate", "0<=x<1", _FRACTION_OUTSIDE.map(str),
                                  not_a_finite_number()),
    "--invalid": BoundedOption("generate", "0<=x<1", _FRACTION_OUTSIDE.map(str),
                               not_a_finite_number()),
}
# Were a bad value let through, the command would fail to reach these (exit 1), not run.
NO_SERVERS = {"POSTGRES_PORT": "1", "PGBOUNCER_PORT": "1", "REDIS_PORT": "1"}


@hypothesis_settings(max_examples=300, deadline=None)
@given(flag=st.sampled_from(sorted(BOUNDED_OPTIONS)), outside=st.booleans(), data=st.data())
def test_generated_bad_option_values_are_one_usage_line(flag: str, outside: bool,
                                                        data: st.DataObject) -> None:
    """Out of range or not a number: exit 2 and one stderr line that names the option (and,
    for a number out of range, the range) and points at the command's --help."""
    option = BOUNDED_OPTIONS[flag]
    raw = data.draw(option.outside if outside else option.garbage, label="value")
    stdout, stderr = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, NO_SERVERS), contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        code = cli.main([option.command, f"{flag}={raw}"])
    assert code == 2 and stdout.getvalue() == ""
    (line,) = stderr.getvalue().splitlines()
    assert line.startswith(f"orders-pipeline {option.command}: error: Invalid value for "
                           f"'{flag}': "), line
    assert line.endswith(f" (see `orders-pipeline {option.command} --help`)"), line
    if outside:
        assert f" is not in the range {option.range}. (see " in line, line


def test_flags_env_vars_and_config_share_one_set_of_bounds() -> None:
    process = cli.main.commands["process"]
    for flag, bound in FLAG_BOUNDS.items():
        for good in (bound.minimum, bound.maximum):
            params = process.make_context("process", [f"{flag}={good}"]).params
            assert params[flag[2:].replace("-", "_")] == good
    for name, bound in CONFIG_BOUNDS.items():
        for good in (bound.minimum, bound.maximum):
            assert getattr(StagingConfig(**{name: good}), name) == good
        assert bound.span() in StagingConfig.model_fields[name].description
    for field in PipelineSettings.declarations():
        name, bound = PipelineSettings.env_name(field), PipelineSettings.bound(field)
        for good in (bound.minimum, bound.maximum):
            assert getattr(Settings.from_env({name: str(good)}).pipeline, field) == good


def test_importing_the_assets_with_a_bad_env_var_does_not_crash() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import orders_pipeline.assets.orders as o; "
                               "print(o.StagingConfig().batch_size)"],
        env={**os.environ, "BATCH_SIZE": "lots", "WORKER_COUNT": "0"}, capture_output=True,
        text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "None\n"

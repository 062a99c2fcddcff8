"""`orders-pipeline listen` bridges publish-only upstream signals into the durable stream."""

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import dagster as dg
import psycopg
import redis

from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.sensors import completion_signal_sensor
from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import REPO, pipeline_env, push_orders, resources_for


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_listen_bridges_published_signals_once(settings: Settings, rconn: redis.Redis,
                                               keys: RedisKeys, pg: psycopg.Connection) -> None:
    bridge = subprocess.Popen([sys.executable, "-m", "orders_pipeline", "listen"], cwd=REPO,
                              env=pipeline_env(settings), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: rconn.pubsub_numsub(keys.signals_channel)[0][1] >= 1, "subscription")
        push_orders(settings, rconn, pg, 500)  # our producer: already in the stream
        upstream = {"batch_id": "upstream-42", "count": 7,
                    "published_at": "2026-11-22T12:00:00+00:00"}
        rconn.publish(keys.signals_channel, json.dumps(upstream))
        rconn.publish(keys.signals_channel, json.dumps(upstream))  # a repeat: recorded once
        rconn.publish(keys.signals_channel, b"\xffnot json")  # garbage: ignored
        _wait(lambda: rconn.xlen(keys.signals_stream) >= 2, "the bridged signal")
        time.sleep(1)  # give a wrongly recorded repeat the chance to show up
    finally:
        bridge.send_signal(signal.SIGINT)
        out, err = bridge.communicate(timeout=30)
    assert bridge.returncode == 0, err
    assert "bridged 1 signals" in out

    entries = rconn.xrange(keys.signals_stream)
    bodies = [json.loads(fields[b"data"]) for _, fields in entries]
    assert [b["batch_id"] for b in bodies].count("upstream-42") == 1
    assert len(entries) == 2

    context = dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(),
                                      resources=resources_for(settings))
    result = completion_signal_sensor(context)
    assert len(result.run_requests) == 1
    tags = result.run_requests[0].tags
    assert tags["orders_pipeline/signals"] == "2"
    assert tags["orders_pipeline/signal_orders"] == "507"

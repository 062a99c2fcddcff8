"""Issue 8, item 2: a malformed completion signal never stops automation.

Bad signals are refused where they enter (`listen` / `CompletionSignals.append`: one warning
line, counter `signals_refused`, nothing recorded); stream entries that are not valid signals
(an older version's, or hand-XADDed) are skipped and reported by the sensor, which still
launches a run for the good ones and moves its cursor past the bad; a cursor that is not a
usable stream id is reset. Hypothesis generates malformed messages of every kind mixed with
good ones.
"""

import json
import logging
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from datetime import date

import dagster as dg
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.redis_patterns.signals import (
    MAX_BATCH_ID_LENGTH,
    MAX_SIGNAL_BYTES,
    RESET_CURSOR,
    CompletionSignals,
    SignalError,
    parse_signal,
)
from orders_pipeline.sensors import completion_signal_sensor
from orders_pipeline.settings import Settings
from orders_pipeline.stats import collect_stats
from orders_pipeline_tests.helpers import REPO, pipeline_env, resources_for
from orders_pipeline_tests.test_signals import _wait

ISSUE_EXAMPLE = b'{"batch_id":"up-1","count":"many","published_at":"x"}'
SIGNALS_LOGGER = "orders_pipeline.redis_patterns.signals"
EXAMPLES = int(os.environ.get("ORDERS_PROPERTY_EXAMPLES", "25"))
U64 = 2**64 - 1
PROPERTY = hypothesis_settings(max_examples=EXAMPLES, deadline=None,
                               suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow])


def _good(batch_id: str, count: int, published_at: str = "2026-11-22T12:00:00+00:00") -> bytes:
    return json.dumps({"batch_id": batch_id, "count": count,
                       "published_at": published_at}).encode()


def _tick(settings: Settings, instance: dg.DagsterInstance,
          cursor: str | None) -> dg.SensorResult | dg.SkipReason:
    context = dg.build_sensor_context(cursor=cursor, instance=instance,
                                      resources=resources_for(settings))
    return completion_signal_sensor(context)


def _refused(rconn: redis.Redis, keys: RedisKeys) -> int:
    return int(rconn.hget(keys.counters, "signals_refused") or 0)


# --- the issue's example ----------------------------------------------------------------------


def test_issue_example_is_refused_by_listen_and_later_signals_run(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys) -> None:
    bridge = subprocess.Popen([sys.executable, "-m", "orders_pipeline", "listen"], cwd=REPO,
                              env=pipeline_env(settings), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    good = _good("up-2", 5)
    try:
        _wait(lambda: rconn.pubsub_numsub(keys.signals_channel)[0][1] >= 1, "subscription")
        rconn.publish(keys.signals_channel, ISSUE_EXAMPLE)
        _wait(lambda: _refused(rconn, keys) == 1, "the refusal")
        rconn.publish(keys.signals_channel, good)
        _wait(lambda: rconn.xlen(keys.signals_stream) == 1, "the good signal")
    finally:
        bridge.send_signal(signal.SIGINT)
        out, err = bridge.communicate(timeout=30)
    assert bridge.returncode == 0, err
    warnings = [line for line in err.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, err
    assert "refused a completion signal" in warnings[0]
    assert "count is a JSON string, not an integer" in warnings[0]
    assert "Traceback" not in err
    assert "bridged 1 signals" in out
    assert "1 malformed signals refused" in out

    entries = rconn.xrange(keys.signals_stream)
    assert [fields[b"data"] for _, fields in entries] == [good]
    assert _refused(rconn, keys) == 1
    assert collect_stats(settings)["signals_refused"] == 1

    result = _tick(settings, dg.DagsterInstance.ephemeral(), None)
    assert isinstance(result, dg.SensorResult)
    [request] = result.run_requests
    assert request.tags["orders_pipeline/signals"] == "1"
    assert request.tags["orders_pipeline/signal_orders"] == "5"
    assert request.tags["orders_pipeline/signals_skipped"] == "0"
    assert result.cursor == entries[0][0].decode()


def test_issue_example_reason() -> None:
    with pytest.raises(SignalError, match="^count is a JSON string, not an integer$"):
        parse_signal(ISSUE_EXAMPLE)


def test_a_hand_written_bad_entry_between_good_ones_is_skipped(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys,
        capsys: pytest.CaptureFixture[str]) -> None:
    signals = CompletionSignals(rconn, keys)
    first = signals.append(_good("up-a", 3))
    # As the old `listen` recorded the issue's example: the bug this guards against.
    bad = rconn.xadd(keys.signals_stream, {"data": ISSUE_EXAMPLE, "bridged": "1"}).decode()
    last = signals.append(_good("up-b", 4))
    instance = dg.DagsterInstance.ephemeral()

    result = _tick(settings, instance, None)
    assert isinstance(result, dg.SensorResult)
    [request] = result.run_requests
    assert request.run_key == f"signals:{first}..{last}"
    assert request.tags["orders_pipeline/signals"] == "2"
    assert request.tags["orders_pipeline/signal_orders"] == "7"
    assert request.tags["orders_pipeline/signals_skipped"] == "1"
    assert result.cursor == last
    assert (f"skipped signal stream entry {bad}: count is a JSON string, not an integer"
            in capsys.readouterr().err)

    # A tick that meets only bad entries still moves past them.
    no_data = rconn.xadd(keys.signals_stream, {"payload": "x"}).decode()
    not_utf8 = rconn.xadd(keys.signals_stream, {"data": b"\xff\xfe"}).decode()
    only_bad = _tick(settings, instance, last)
    assert isinstance(only_bad, dg.SensorResult)
    assert only_bad.run_requests == []
    assert only_bad.skip_reason is not None
    assert (f"skipped 2 malformed signal stream entries ({no_data}..{not_utf8})"
            in only_bad.skip_reason.skip_message)
    assert only_bad.cursor == not_utf8
    err = capsys.readouterr().err
    assert f"skipped signal stream entry {no_data}: entry has no 'data' field" in err
    assert f"skipped signal stream entry {not_utf8}: signal is not UTF-8 (byte 0)" in err
    assert isinstance(_tick(settings, instance, not_utf8), dg.SkipReason)


def test_record_refuses_to_build_a_bad_signal(rconn: redis.Redis, keys: RedisKeys) -> None:
    queue = OrderQueue(rconn, keys)
    for batch_id in ("a\nb", "\x85", "x" * (MAX_BATCH_ID_LENGTH + 1), "\ud800"):
        with pytest.raises(SignalError):
            queue.push_batch([b"{}"], batch_id=batch_id)
    assert rconn.llen(keys.ingestion) == 0
    assert rconn.xlen(keys.signals_stream) == 0
    assert rconn.hget(keys.counters, "accepted") is None


# --- bad cursors ------------------------------------------------------------------------------


BAD_CURSORS = ["garbage", "", "1", "1-", "-1-0", "1-2-3", " 1-0", "1-0\n", "(1-0", "+", "-",
               "$", "0x1-0", "1.5-0", "١-٠", f"{U64 + 1}-0", f"0-{U64 + 1}", f"{U64}-{U64}"]


@pytest.mark.parametrize("cursor", BAD_CURSORS)
def test_a_bad_cursor_is_reset_to_the_start(settings: Settings, rconn: redis.Redis,
                                            keys: RedisKeys, cursor: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    instance = dg.DagsterInstance.ephemeral()
    empty = _tick(settings, instance, cursor)
    assert isinstance(empty, dg.SensorResult) and empty.run_requests == []
    assert empty.cursor == RESET_CURSOR
    assert f"sensor cursor reset to {RESET_CURSOR}: cursor" in capsys.readouterr().err
    assert isinstance(_tick(settings, instance, RESET_CURSOR), dg.SkipReason)

    signals = CompletionSignals(rconn, keys)
    ids = [signals.append(_good(f"b{n}", n)) for n in (1, 2)]
    result = _tick(settings, instance, cursor)
    assert isinstance(result, dg.SensorResult)
    [request] = result.run_requests
    assert request.tags["orders_pipeline/signals"] == "2"
    assert request.tags["orders_pipeline/signal_orders"] == "3"
    assert result.cursor == ids[-1]
    assert "sensor cursor reset" in capsys.readouterr().err


def test_a_cursor_past_the_newest_entry_is_reset(settings: Settings, rconn: redis.Redis,
                                                 keys: RedisKeys) -> None:
    """E.g. the stream was recreated after the cursor was stored: new ids are smaller."""
    signals = CompletionSignals(rconn, keys)
    ids = [signals.append(_good(f"b{n}", n)) for n in (1, 2)]
    assert ids[-1] is not None
    ms = int(ids[-1].split("-")[0])
    result = _tick(settings, dg.DagsterInstance.ephemeral(), f"{ms + 3_600_000}-0")
    assert isinstance(result, dg.SensorResult)
    [request] = result.run_requests
    assert request.tags["orders_pipeline/signals"] == "2"
    assert result.cursor == ids[-1]


def _stream_id_or_none(text: str) -> tuple[int, int] | None:
    """Independent oracle: a complete, in-range stream id after which an entry can follow."""
    match = re.fullmatch(r"([0-9]+)-([0-9]+)", text, re.ASCII)
    if match is None:
        return None
    ms, seq = int(match[1]), int(match[2])
    return (ms, seq) if ms <= U64 and seq <= U64 and (ms, seq) != (U64, U64) else None


@PROPERTY
@given(data=st.data())
def test_property_any_cursor(settings: Settings, rconn: redis.Redis, keys: RedisKeys,
                             data: st.DataObject) -> None:
    """Whatever the cursor, a tick never raises; it reads after a usable cursor, else from the
    start, and its new cursor is the last entry's id."""
    signals = CompletionSignals(rconn, keys)
    if rconn.xlen(keys.signals_stream) == 0:
        for n in (1, 2, 3):
            signals.append(_good(f"b{n}", n))
    entries = [(tuple(map(int, raw.decode().split("-"))), raw.decode())
               for raw, _ in rconn.xrange(keys.signals_stream)]
    near = st.sampled_from(entries).flatmap(lambda e: st.tuples(
        st.integers(e[0][0] - 2, e[0][0] + 2), st.integers(0, 3)))
    cursor = data.draw(st.one_of(
        st.text(max_size=30),
        near.map(lambda p: f"{p[0]}-{p[1]}"),
        st.tuples(st.integers(0, U64 + 5), st.integers(0, U64 + 5)).map(
            lambda p: f"{p[0]}-{p[1]}"),
    ), label="cursor")
    position = _stream_id_or_none(cursor)
    if position is not None and position <= entries[-1][0]:
        expected = [e for e in entries if e[0] > position]
    else:
        expected = entries  # reset to the start
    result = _tick(settings, dg.DagsterInstance.ephemeral(), cursor)
    if not expected:
        assert isinstance(result, dg.SkipReason)
        return
    assert isinstance(result, dg.SensorResult)
    [request] = result.run_requests
    assert request.run_key == f"signals:{expected[0][1]}..{expected[-1][1]}"
    assert request.tags["orders_pipeline/signals"] == str(len(expected))
    assert result.cursor == entries[-1][1]


# --- generated malformed signals --------------------------------------------------------------


JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)
NON_OBJECT = JSON_SCALARS | st.lists(JSON_VALUES, max_size=3)
NON_STRING = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
              | st.lists(JSON_VALUES, max_size=3)
              | st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3))
GOOD_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40)
BAD_TIMESTAMPS = (
    "x", "", "2031-1-1T1:2:3Z", "2031-03-01T10:00:00 +01:00", "2031-03-01T10:00:60Z",
    "2031-03-01T24:00:00Z", "2031-02-29T10:00:00Z", "2031-03-01T10:00:00", "2031-03-01",
    "2031-03-01 10:00:00Z", "2031-03-01t10:00:00z", "20310301T100000Z", "1969-12-31T23:59Z",
    "2101-01-01T00:00Z", "2031-03-01T10:00+24:00", "2031-03-01T10:00+01:60",
    "2031-03-01T10:00:00.Z", "2031-03-01T10:00:00.1234567890Z", "2031-03-01T10Z",
    "２０３１-03-01T10:00:00Z", "2031-03-01T10:00:00Z\n", " 2031-03-01T10:00Z",
    "2031-13-01T10:00Z", "2031-00-10T10:00Z", "2031-03-01T10:00+1", "2031-03-01T10:00+01:0")


@st.composite
def published_at(draw: st.DrawFn) -> str:
    """A timestamp of the DESIGN.md grammar, in any of its accepted forms."""
    day = draw(st.dates(date(1970, 1, 1), date(2100, 12, 31)))
    text = f"{day.isoformat()}T{draw(st.integers(0, 23)):02d}:{draw(st.integers(0, 59)):02d}"
    if draw(st.booleans()):
        text += f":{draw(st.integers(0, 59)):02d}"
        if draw(st.booleans()):
            text += draw(st.sampled_from(".,")) + draw(st.text("0123456789", min_size=1,
                                                               max_size=9))
    hours, minutes = draw(st.integers(0, 23)), draw(st.integers(0, 59))
    sign = draw(st.sampled_from("+-"))
    return text + draw(st.sampled_from(["Z", f"{sign}{hours:02d}:{minutes:02d}",
                                        f"{sign}{hours:02d}{minutes:02d}", f"{sign}{hours:02d}"]))


@st.composite
def good_body(draw: st.DrawFn) -> dict[str, object]:
    body: dict[str, object] = draw(st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in ("batch_id", "count", "published_at")),
        JSON_SCALARS, max_size=2))
    body.update(batch_id=draw(GOOD_TEXT), count=draw(st.integers(0, 2**63 - 1)),
                published_at=draw(published_at()))
    return body


def _dumps(body: object, draw: st.DrawFn) -> bytes:
    """JSON text of `body`, escaped or not; a lone surrogate unescaped is not UTF-8."""
    return json.dumps(body, ensure_ascii=draw(st.booleans()),
                      separators=draw(st.sampled_from([(",", ":"), (", ", ": ")]))
                      ).encode(errors="surrogatepass")


@st.composite
def bad_message(draw: st.DrawFn) -> bytes:
    """A message that is not a valid signal, by construction, of one of many kinds."""
    kind = draw(st.sampled_from(["not_utf8", "not_object", "missing", "batch_id", "count",
                                 "published_at", "truncated", "repeated_key", "constant",
                                 "too_big", "huge_int", "deep"]))
    body = draw(good_body())
    if kind == "not_utf8":
        raw = draw(st.binary(max_size=40))
        cut = draw(st.integers(0, len(raw)))
        return raw[:cut] + b"\xff" + raw[cut:]
    if kind == "not_object":
        return _dumps(draw(NON_OBJECT), draw)
    if kind == "missing":
        gone = draw(st.sets(st.sampled_from(["batch_id", "count", "published_at"]),
                            min_size=1))
        return _dumps({k: v for k, v in body.items() if k not in gone}, draw)
    if kind == "batch_id":
        body["batch_id"] = draw(
            NON_STRING
            | st.sampled_from(["", "x" * (MAX_BATCH_ID_LENGTH + 1), "\ud800", "a\udfffb"])
            | st.tuples(st.text(max_size=5), st.characters(categories=("Cc",)),
                        st.text(max_size=5)).map("".join))
        return _dumps(body, draw)
    if kind == "count":
        body["count"] = draw(
            st.booleans() | st.none() | st.text(max_size=10) | st.just("many")
            | st.floats(allow_nan=False, allow_infinity=False) | st.integers(max_value=-1)
            | st.integers(min_value=2**63) | st.lists(st.integers(), max_size=2)
            | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
        return _dumps(body, draw)
    if kind == "published_at":
        body["published_at"] = draw(
            NON_STRING
            | st.sampled_from(BAD_TIMESTAMPS)
            | st.text(st.characters(blacklist_characters="0123456789"), max_size=30))
        return _dumps(body, draw)
    if kind == "truncated":
        whole = _dumps(body, draw)
        return whole[:draw(st.integers(0, len(whole) - 1))]
    if kind == "repeated_key":
        key = draw(st.sampled_from(sorted(body)))
        text = _dumps(body, draw).decode()
        return (text[:-1] + f", {json.dumps(key)}: {json.dumps(body[key])}}}").encode()
    if kind in ("constant", "huge_int"):
        literal = (draw(st.sampled_from(["NaN", "Infinity", "-Infinity"])) if kind == "constant"
                   else "1" + "0" * 5000)  # more digits than Python's int() accepts
        return (f'{{"batch_id": {json.dumps(body["batch_id"])}, "count": {literal}, '
                f'"published_at": {json.dumps(body["published_at"])}}}').encode()
    if kind == "too_big":
        body["padding"] = "p" * MAX_SIGNAL_BYTES
        return _dumps(body, draw)
    return b"[" * 3000 + b"]" * 3000  # deep: nesting past the recursion limit


@st.composite
def mixed_messages(draw: st.DrawFn) -> list[tuple[bytes, dict[str, object] | None]]:
    """Good (with their body) and bad (body None) messages in a random order."""
    items: list[tuple[bytes, dict[str, object] | None]] = []
    for n in range(draw(st.integers(1, 12))):
        if draw(st.booleans()):
            body = draw(good_body())
            body["batch_id"] = f"{body['batch_id']}#{n}"  # unique: repeats are not refusals
            items.append((_dumps(body, draw), body))
        else:
            items.append((draw(bad_message()), None))
    return items


@PROPERTY
@given(messages=mixed_messages(), limit=st.integers(1, 5))
def test_property_malformed_signals_never_stop_the_sensor(
        settings: Settings, rconn: redis.Redis, caplog: pytest.LogCaptureFixture,
        messages: list[tuple[bytes, dict[str, object] | None]], limit: int) -> None:
    """append refuses exactly the bad messages (one log line and one count each); when the
    same bad messages also sit in the stream (hand-written), the sensor skips exactly them and
    requests a run covering exactly the good ones, and paged reads never raise."""
    caplog.clear()
    prefix = f"{settings.redis.key_prefix}:{os.urandom(4).hex()}"  # own keys per example
    own = replace(settings, redis=replace(settings.redis, key_prefix=prefix))
    keys = RedisKeys(own.redis.key_prefix)
    signals = CompletionSignals(rconn, keys)
    good_ids, bad_ids = [], []
    with caplog.at_level(logging.WARNING, logger=SIGNALS_LOGGER):
        for message, body in messages:
            stream_id = signals.append(message)
            if body is None:
                assert stream_id is None, message
                bad_ids.append(rconn.xadd(keys.signals_stream, {"data": message}).decode())
            else:
                assert stream_id is not None, message
                good_ids.append(stream_id)
    bad = [m for m, b in messages if b is None]
    good = [b for _, b in messages if b is not None]
    refusals = [r.getMessage() for r in caplog.records if r.name == SIGNALS_LOGGER]
    assert len(refusals) == len(bad) == _refused(rconn, keys)
    assert all("\n" not in line and "refused a completion signal" in line for line in refusals)

    everything = rconn.xrange(keys.signals_stream)
    result = _tick(own, dg.DagsterInstance.ephemeral(), None)
    assert isinstance(result, dg.SensorResult)
    assert result.cursor == everything[-1][0].decode()
    if good:
        [request] = result.run_requests
        assert request.tags["orders_pipeline/signals"] == str(len(good))
        assert request.tags["orders_pipeline/signal_orders"] == str(sum(b["count"] for b in good))
        assert request.tags["orders_pipeline/signals_skipped"] == str(len(bad))
    else:
        assert result.run_requests == []
        assert f"skipped {len(bad)} malformed" in result.skip_reason.skip_message

    cursor, read, skipped = None, [], []
    while (page := signals.read_after(cursor, limit=limit)).last_id is not None:
        assert page.cursor == page.last_id != cursor  # moves past bad entries too
        read += page.signals
        skipped += [entry.stream_id for entry in page.skipped]
        cursor = page.cursor
    assert [s.stream_id for s in read] == good_ids
    assert [(s.batch_id, s.count, s.published_at) for s in read] == [
        (b["batch_id"], b["count"], b["published_at"]) for b in good]
    assert skipped == bad_ids

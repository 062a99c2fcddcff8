"""Fan-out without a second pipeline: every promoted order reaches every consumer group.

Promotion lists the ids it inserted in the outbox `promoted_outbox` in its own transaction;
the relay publishes them to the Redis stream `{P}:promoted`, one entry per order; consumer
groups read it (`PromotedStream.consume`, `orders-pipeline consume`). Real `relay` and
`consume` processes are SIGKILLed at random moments and at the two crash points between a
write and its bookkeeping (`FANOUT_CRASH_POINTS`): every promoted order still reaches every
group, and a consumer whose effect is keyed by the idempotency key (a Postgres table with a
primary key, or one file per key) has each effect exactly once. The trimming script is
checked against a model of the groups over random interleavings of publish, read, ack,
take-over, group creation and trim: it drops exactly what every group acknowledged, never an
entry some group has not.
"""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orders_pipeline import fanout
from orders_pipeline.assets import fanout as fanout_assets
from orders_pipeline.connections import pg_pool
from orders_pipeline.definitions import defs
from orders_pipeline.faults import CRASH_ENV
from orders_pipeline.pipeline import promote_staged, stage_queue
from orders_pipeline.postgres_patterns.promotion import promote_round
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.promoted_stream import (
    BadName,
    PromotedEntry,
    PromotedOrder,
    PromotedStream,
)
from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import (
    REPO,
    pipeline_env,
    push_orders,
    resources_for,
    valid_order_ids,
    wait_for,
)
from orders_pipeline_tests.test_cli import cli_env, one_error_line  # noqa: F401  (fixture)
from orders_pipeline_tests.test_cli import run as cli

CLI = [sys.executable, "-m", "orders_pipeline"]
GROUPS = ("billing", "emails", "search-index")
LEASE_SECONDS = 1.0

# The effect of a CLI consumer, keyed by the idempotency key: one line per delivery, one file
# per order written once (atomically); with HANG set, the first call to get there hangs
# between the two (the consumer is killed mid-handler).
EFFECT_SCRIPT = """#!/bin/sh
set -e
dir="$EFFECTS/$ORDERS_PIPELINE_GROUP"
mkdir -p "$dir"
echo "$ORDERS_PIPELINE_IDEMPOTENCY_KEY" >> "$dir.deliveries"
if [ -n "$HANG" ] && mkdir "$HANG" 2>/dev/null; then sleep 60; fi
[ -e "$dir/$ORDERS_PIPELINE_IDEMPOTENCY_KEY" ] && exit 0
cat > "$dir/.$ORDERS_PIPELINE_IDEMPOTENCY_KEY.$$"
mv "$dir/.$ORDERS_PIPELINE_IDEMPOTENCY_KEY.$$" "$dir/$ORDERS_PIPELINE_IDEMPOTENCY_KEY"
"""


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def cached(settings: Settings, loaded_cache: LookupCache) -> Settings:
    return settings


@pytest.fixture
def effects(pg: psycopg.Connection) -> psycopg.Connection:
    """Tables of a consumer that keys its effect by the idempotency key."""
    pg.execute("CREATE TABLE fanout_deliveries (consumer_group text NOT NULL,"
               " order_id text NOT NULL)")
    pg.execute("CREATE TABLE fanout_effects (consumer_group text NOT NULL, order_id text NOT"
               " NULL, entry jsonb NOT NULL, PRIMARY KEY (consumer_group, order_id))")
    return pg


def record_effect(pg: psycopg.Connection, group: str) -> Callable[[PromotedEntry], None]:
    """A handler that records each delivery, and its effect once per idempotency key."""
    def handle(entry: PromotedEntry) -> None:
        pg.execute("INSERT INTO fanout_deliveries VALUES (%s, %s)", (group, entry.key))
        pg.execute("INSERT INTO fanout_effects VALUES (%s, %s, %s)"
                   " ON CONFLICT (consumer_group, order_id) DO NOTHING",
                   (group, entry.key, entry.document().decode()))
    return handle


def promoted_ids(pg: psycopg.Connection) -> set[str]:
    return {row[0] for row in pg.execute("SELECT order_id FROM orders")}


def stage_and_promote_without_relay(settings: Settings, rconn: redis.Redis,
                                    pg: psycopg.Connection, count: int, batch_size: int,
                                    seed: int) -> set[str]:
    """Push, stage and promote `count` orders in batches of `batch_size`, leaving their
    outbox rows unrelayed (promotion alone, as if the relay after it had died); returns the
    ids promoted."""
    before = promoted_ids(pg)
    push_orders(settings, rconn, pg, count, batch_size=batch_size, seed=seed, duplicates=0.05,
                invalid=0.02)
    stage_queue(settings, workers=1, batch_size=batch_size)
    with pg_pool(settings.postgres).connection() as conn:
        while promote_round(conn, 400).promoted_batches:
            pass
    return promoted_ids(pg) - before


def outbox_rows(pg: psycopg.Connection) -> int:
    return int(pg.execute("SELECT count(*) FROM promoted_outbox").fetchone()[0])


def drain(settings: Settings, group: str, pg: psycopg.Connection) -> None:
    fanout.promoted_stream(settings).consume(group, f"{group}-drainer",
                                             record_effect(pg, group), drain=True,
                                             lease_seconds=LEASE_SECONDS)


def assert_each_effect_once(pg: psycopg.Connection, groups: tuple[str, ...],
                            expected: set[str]) -> int:
    """Every group delivered every expected order at least once and has its effect exactly
    once, with the order's row as in `orders`; returns the deliveries beyond the first."""
    for group in groups:
        delivered = {r[0] for r in pg.execute(
            "SELECT DISTINCT order_id FROM fanout_deliveries WHERE consumer_group = %s",
            (group,))}
        assert delivered == expected, (group, len(delivered), len(expected))
        effects = [r[0] for r in pg.execute(
            "SELECT order_id FROM fanout_effects WHERE consumer_group = %s", (group,))]
        assert sorted(effects) == sorted(expected), group
    differing = pg.execute(
        "SELECT count(*) FROM fanout_effects e JOIN orders o USING (order_id)"
        " WHERE e.entry->>'idempotency_key' <> o.order_id"
        " OR (e.entry->'order'->>'total_amount_usd')::numeric <> o.total_amount_usd"
        " OR (e.entry->'order'->>'unit_price')::numeric <> o.unit_price"
        " OR (e.entry->'order'->>'order_timestamp')::timestamptz <> o.order_timestamp"
        " OR e.entry->'order'->>'batch_id' <> o.batch_id").fetchone()[0]
    assert differing == 0
    deliveries = pg.execute("SELECT count(*) FROM fanout_deliveries").fetchone()[0]
    return int(deliveries) - len(groups) * len(expected)


def start(settings: Settings, *args: str, crash_at: str | None = None,
          **env: str) -> subprocess.Popen[bytes]:
    """An `orders-pipeline` process in its own process group (killed with its children)."""
    full = pipeline_env(settings, **env)
    full.pop(CRASH_ENV, None)
    if crash_at:
        full[CRASH_ENV] = crash_at
    return subprocess.Popen([*CLI, *args], cwd=REPO, env=full, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def kill(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def finish(process: subprocess.Popen[bytes], timeout: float = 300) -> None:
    _, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err.decode()


@pytest.fixture
def effect_script(tmp_path: Path) -> Path:
    script = tmp_path / "effect.sh"
    script.write_text(EFFECT_SCRIPT)
    script.chmod(0o755)
    (tmp_path / "effects").mkdir()
    return script


def consumer(settings: Settings, script: Path, group: str, name: str, *extra: str,
             crash_at: str | None = None, **env: str) -> subprocess.Popen[bytes]:
    return start(settings, "consume", "--group", group, "--consumer", name, "--lease",
                 str(LEASE_SECONDS), "--count", "5", *extra, "--", str(script),
                 crash_at=crash_at, EFFECTS=str(script.parent / "effects"), **env)


def file_effects(script: Path, group: str) -> tuple[set[str], list[str]]:
    """(orders with an effect file, one line per delivery) of a CLI consumer group."""
    directory = script.parent / "effects" / group
    files = {p.name for p in directory.iterdir() if not p.name.startswith(".")}
    deliveries = (script.parent / "effects" / f"{group}.deliveries").read_text().split()
    return files, deliveries


def drain_with_cli(settings: Settings, script: Path, groups: tuple[str, ...]) -> None:
    """Consumers that take over whatever dead ones left (their lease run out), until each
    group has nothing pending and nothing new."""
    stream = fanout.promoted_stream(settings)
    for attempt in range(10):
        time.sleep(LEASE_SECONDS * 1.2)  # dead consumers' leases run out
        for group in groups:
            finish(consumer(settings, script, group, f"{group}-final-{attempt}", "--drain"))
        if all(g.pending == 0 and g.lag == 0 for g in stream.groups() if g.name in groups):
            return
    raise AssertionError(f"groups still hold entries: {stream.groups()}")


# --- every promoted order reaches every group --------------------------------------------


def test_every_promoted_order_reaches_every_group(cached: Settings, rconn: redis.Redis,
                                                  effects: psycopg.Connection) -> None:
    stream = fanout.promoted_stream(cached)
    for group in GROUPS:
        assert stream.ensure_group(group)
    assert not stream.ensure_group(GROUPS[0])  # exists already
    payloads, _ = push_orders(cached, rconn, effects, 1500, batch_size=300, duplicates=0.05,
                              invalid=0.01)
    stage_queue(cached, workers=2, batch_size=300)
    result = promote_staged(cached)
    expected = valid_order_ids(payloads)
    assert result.inserted_rows == result.entries_published == len(expected)
    assert outbox_rows(effects) == 0
    assert stream.length() == len(expected)
    for group in GROUPS:
        drain(cached, group, effects)
    assert assert_each_effect_once(effects, GROUPS, expected) == 0
    # Every group acknowledged everything: trimmed to nothing; a promotion adds nothing again.
    assert stream.length() == 0
    assert promote_staged(cached).entries_published == 0
    assert [(g.pending, g.lag) for g in stream.groups()] == [(0, 0)] * len(GROUPS)


def test_a_group_receives_what_is_promoted_after_it_was_created(
        cached: Settings, rconn: redis.Redis, effects: psycopg.Connection) -> None:
    stream = fanout.promoted_stream(cached)
    first = stage_and_promote_without_relay(cached, rconn, effects, 300, 100, seed=1)
    unheard = fanout.relay(cached)
    assert (unheard.rows, unheard.entries, unheard.unheard) == (3, 0, len(first))
    assert outbox_rows(effects) == 0 and stream.length() == 0

    stream.ensure_group("late")
    second = stage_and_promote_without_relay(cached, rconn, effects, 300, 100, seed=2)
    effects.execute("DELETE FROM orders WHERE order_id = %s", (min(second),))  # by hand
    relayed = fanout.relay(cached)
    assert (relayed.rows, relayed.entries, relayed.missing) == (3, len(second) - 1, 1)
    drain(cached, "late", effects)
    assert assert_each_effect_once(effects, ("late",), second - {min(second)}) == 0


# --- the relay killed ------------------------------------------------------------------------


def test_relay_killed_after_publishing_publishes_that_row_again(
        cached: Settings, rconn: redis.Redis, effects: psycopg.Connection) -> None:
    stream = fanout.promoted_stream(cached)
    stream.ensure_group("billing")
    promoted = stage_and_promote_without_relay(cached, rconn, effects, 1000, 250, seed=3)
    first_row = effects.execute("SELECT cardinality(order_ids) FROM promoted_outbox"
                                " ORDER BY outbox_id LIMIT 1").fetchone()[0]
    killed = start(cached, "relay", crash_at="after_relay_publish")
    killed.wait(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert stream.length() == first_row and outbox_rows(effects) == 4  # none deleted

    finish(start(cached, "relay"))
    assert outbox_rows(effects) == 0
    assert stream.length() == len(promoted) + first_row  # that row's entries twice
    drain(cached, "billing", effects)
    assert assert_each_effect_once(effects, ("billing",), promoted) == first_row


def test_relay_killed_at_random_moments(cached: Settings, rconn: redis.Redis,
                                        effects: psycopg.Connection) -> None:
    """Many small outbox rows; each relay is killed at a random moment once it publishes."""
    stream = fanout.promoted_stream(cached)
    for group in GROUPS[:2]:
        stream.ensure_group(group)
    promoted = stage_and_promote_without_relay(cached, rconn, effects, 800, 4, seed=4)
    rng = random.Random(2027)
    landed = 0
    for _ in range(6):
        before = outbox_rows(effects)
        # Strike once a random share of what is left is published (the relay runs on).
        waiting = effects.execute("SELECT sum(cardinality(order_ids)) FROM promoted_outbox"
                                  ).fetchone()[0]
        target = stream.length() + rng.randint(1, max(1, waiting * 3 // 5))
        relay = start(cached, "relay")
        wait_for(lambda target=target, relay=relay: (stream.length() >= target
                                                    or relay.poll() is not None),
                 "the relay to publish", interval=0.002)
        if relay.poll() is None:
            kill(relay)
            landed += 0 < outbox_rows(effects) < before
        if not outbox_rows(effects):
            break
    assert landed >= 2, f"only {landed} kills landed while the relay was relaying"
    finish(start(cached, "relay"))
    for group in GROUPS[:2]:
        drain(cached, group, effects)
    assert assert_each_effect_once(effects, GROUPS[:2], promoted) >= 0
    assert stream.length() == 0


# --- consumers killed --------------------------------------------------------------------


def test_consumer_killed_after_its_handler_gets_the_entry_again(
        cached: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        effect_script: Path) -> None:
    stream = fanout.promoted_stream(cached)
    stream.ensure_group("billing")
    promoted = stage_and_promote_without_relay(cached, rconn, pg, 200, 100, seed=5)
    fanout.relay(cached)
    killed = consumer(cached, effect_script, "billing", "first", "--drain",
                      crash_at="after_consume_handler")
    killed.wait(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    # Restarted under its name, it first gets what it was handed and did not acknowledge.
    finish(consumer(cached, effect_script, "billing", "first", "--drain"))
    files, deliveries = file_effects(effect_script, "billing")
    assert files == promoted
    assert len(deliveries) == len(promoted) + 1 and set(deliveries) == promoted
    assert stream.groups()[0].pending == 0 and stream.length() == 0


def test_consumer_killed_mid_handler_is_taken_over(cached: Settings, rconn: redis.Redis,
                                                   pg: psycopg.Connection,
                                                   effect_script: Path) -> None:
    stream = fanout.promoted_stream(cached)
    stream.ensure_group("billing")
    promoted = stage_and_promote_without_relay(cached, rconn, pg, 100, 100, seed=6)
    fanout.relay(cached)
    hang = effect_script.parent / "hang"
    victim = consumer(cached, effect_script, "billing", "victim", HANG=str(hang))
    wait_for(hang.exists, "the handler to hang", timeout=120)
    time.sleep(LEASE_SECONDS)  # renewed meanwhile: nobody may take it over
    key = RedisKeys(cached.redis.key_prefix).promoted
    assert rconn.xautoclaim(key, "billing", "thief", int(LEASE_SECONDS * 1000))[1] == []
    kill(victim)
    time.sleep(LEASE_SECONDS * 1.2)  # its lease runs out
    survivor = consumer(cached, effect_script, "billing", "survivor", "--drain")
    _, err = survivor.communicate(timeout=120)
    assert survivor.returncode == 0, err.decode()
    files, deliveries = file_effects(effect_script, "billing")
    assert files == promoted and set(deliveries) == promoted
    assert len(deliveries) > len(promoted)  # the hung order was delivered twice
    consumers = {c["name"].decode(): c["pending"] for c in
                 rconn.xinfo_consumers(RedisKeys(cached.redis.key_prefix).promoted, "billing")}
    assert consumers["victim"] == 0 and stream.length() == 0


def test_relay_and_consumers_killed_at_random_moments(cached: Settings, rconn: redis.Redis,
                                                      pg: psycopg.Connection,
                                                      effect_script: Path) -> None:
    """The issue's soak: relays and CLI consumers of two groups die at random moments while
    promotions go on; in the end every order has its effect once in every group."""
    groups = GROUPS[:2]
    stream = fanout.promoted_stream(cached)
    for group in groups:
        stream.ensure_group(group)
    rng = random.Random(2028)
    promoted: set[str] = set()
    kills = 0
    for round_ in range(4):
        promoted |= stage_and_promote_without_relay(cached, rconn, pg, 150, 5, seed=10 + round_)
        relay = start(cached, "relay")
        consumers = [consumer(cached, effect_script, group, f"{group}-{round_}")
                     for group in groups]
        for process in rng.sample([relay, *consumers], 2):
            time.sleep(rng.uniform(1.0, 3.0))  # the CLI takes about 1.5 s to start
            if process.poll() is None:
                kill(process)
                kills += 1
        for process in consumers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # a clean stop: finishes the entry in hand
                finish(process)
        relay.wait(timeout=120)
    assert kills >= 4, f"only {kills} kills landed on a running process"
    finish(start(cached, "relay"))
    drain_with_cli(cached, effect_script, groups)
    for group in groups:
        files, deliveries = file_effects(effect_script, group)
        assert files == promoted, group
        assert set(deliveries) == promoted, group
    assert stream.length() == 0 and outbox_rows(pg) == 0


# --- taking over and leases (Python API) -----------------------------------------------------


def test_xautoclaim_takes_over_a_dead_consumers_entries(settings: Settings,
                                                        rconn: redis.Redis,
                                                        keys: RedisKeys) -> None:
    stream = PromotedStream(rconn, keys)
    stream.ensure_group("g")
    stream.publish(1, "b", [PromotedOrder(f"o{i}", "{}") for i in range(25)])
    # A consumer reads ten entries and dies before it handles them.
    rconn.xreadgroup("g", "dead", {keys.promoted: ">"}, count=10)
    seen: list[str] = []
    live = stream.consume("g", "live", lambda e: seen.append(e.key), drain=True,
                          lease_seconds=30)
    assert (live.acked, live.taken_over) == (15, 0)  # the dead one's lease has not run out
    time.sleep(0.3)
    late = stream.consume("g", "late", lambda e: seen.append(e.key), drain=True,
                          lease_seconds=0.2)
    assert (late.acked, late.taken_over) == (10, 10)
    assert sorted(seen) == sorted(f"o{i}" for i in range(25))
    assert stream.groups()[0].pending == 0 and stream.length() == 0


def test_a_failing_handler_leaves_the_entry_for_later(settings: Settings, rconn: redis.Redis,
                                                      keys: RedisKeys) -> None:
    stream = PromotedStream(rconn, keys)
    stream.publish(1, "b", [PromotedOrder("x", '{"price": 1.10}')])  # before the group: unseen
    stream.ensure_group("g")
    stream.publish(2, "b", [PromotedOrder("o", '{"price": 2.50}')])
    failed = stream.consume("g", "c", lambda e: False, drain=True, lease_seconds=0.2)
    assert (failed.acked, failed.failed) == (0, 1) and stream.length() == 1  # kept, pending
    time.sleep(0.3)
    got: list[PromotedEntry] = []
    ok = stream.consume("g", "c", got.append, drain=True, lease_seconds=0.2)
    assert (ok.acked, ok.resumed) == (1, 1)
    assert got[0].order == {"price": Decimal("2.50")} and got[0].outbox_id == 2
    assert stream.length() == 0
    with pytest.raises(BadName):
        stream.ensure_group("")
    with pytest.raises(BadName):
        stream.consume("g", "bad\nname", got.append, drain=True)


def test_a_stop_request_leaves_the_rest_pending_for_this_consumer(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys) -> None:
    stream = PromotedStream(rconn, keys)
    stream.ensure_group("g")
    stream.publish(1, "b", [PromotedOrder(f"o{i}", "{}") for i in range(6)])
    stop = threading.Event()

    def handle(entry: PromotedEntry) -> None:
        if entry.key == "o2":
            stop.set()

    first = stream.consume("g", "c", handle, count=6, should_stop=stop.is_set)
    assert first.acked == 3 and stream.groups()[0].pending == 3
    again = stream.consume("g", "c", lambda e: None, drain=True)
    assert (again.resumed, again.acked) == (3, 3) and stream.length() == 0


# --- trimming never drops what a group has not acknowledged -----------------------------------


@dataclass
class GroupModel:
    """What Redis should hold for one group: the index of the last entry delivered, and the
    entries delivered and not acknowledged, by consumer."""
    delivered_up_to: int
    pending: dict[str, str] = field(default_factory=dict)  # entry id -> consumer


OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 4)),
    st.tuples(st.just("read"), st.integers(0, 2), st.integers(0, 1), st.integers(1, 4)),
    st.tuples(st.just("ack"), st.integers(0, 2), st.integers(1, 4)),
    st.tuples(st.just("take_over"), st.integers(0, 2), st.integers(0, 1)),
    st.tuples(st.just("create"), st.integers(0, 2)),
), min_size=1, max_size=30)
GROUP_NAMES = ("a", "b", "c")


def _retained(published: list[str], groups: dict[str, GroupModel]) -> list[str]:
    """The entries the model keeps: from the oldest one some group has pending or has not
    read; none without groups."""
    if not groups:
        return []
    keep = min(min((published.index(i) for i in g.pending), default=g.delivered_up_to + 1)
               for g in groups.values())
    return published[keep:]


def _apply(rconn: redis.Redis, stream: PromotedStream, operation: tuple[object, ...],
           published: list[str], groups: dict[str, GroupModel]) -> None:
    """Do one operation on the stream and on the model, checking what Redis hands out."""
    kind, *args = operation
    key = stream.key
    name = GROUP_NAMES[int(args[0])] if kind != "publish" else ""
    if kind == "publish":
        pipe = rconn.pipeline(transaction=True)
        for _ in range(int(args[0])):
            pipe.xadd(key, {"key": "k"})
        published += [i.decode() for i in pipe.execute()]
    elif kind == "create" and name not in groups:
        stream.ensure_group(name)
        groups[name] = GroupModel(len(published) - 1)
    elif kind == "read" and name in groups:
        who, count, model = f"c{args[1]}", int(args[2]), groups[name]
        found = rconn.xreadgroup(name, who, {key: ">"}, count=count)
        got = [i.decode() for i, _ in found[0][1]] if found else []
        assert got == published[model.delivered_up_to + 1:][:count]  # none was trimmed
        model.delivered_up_to += len(got)
        model.pending.update(dict.fromkeys(got, who))
    elif kind == "ack" and name in groups:
        acked = sorted(groups[name].pending, key=published.index)[:int(args[1])]
        if acked:
            assert rconn.xack(key, name, *acked) == len(acked)
        for entry in acked:
            del groups[name].pending[entry]
    elif kind == "take_over" and name in groups:
        who = f"c{args[1]}"
        reply = rconn.xautoclaim(key, name, who, 0, count=100)
        assert sorted(i.decode() for i, _ in reply[1]) == sorted(groups[name].pending)
        assert reply[2] == []  # no pending entry was ever trimmed
        groups[name].pending = dict.fromkeys(groups[name].pending, who)


@hypothesis_settings(max_examples=150, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(initial_groups=st.integers(0, 3), operations=OPERATIONS)
def test_trimming_never_drops_what_a_group_has_not_acknowledged(
        rconn: redis.Redis, keys: RedisKeys, initial_groups: int,
        operations: list[tuple[object, ...]]) -> None:
    """After every operation, `trim`: no entry some group has pending or not yet read is
    gone, and every entry before the oldest of those is (exact MINID)."""
    stream = PromotedStream(rconn, RedisKeys(f"{keys.prefix}:{random.getrandbits(48):x}"))
    published: list[str] = []
    groups: dict[str, GroupModel] = {}
    for operation in [("create", i) for i in range(initial_groups)] + operations:
        _apply(rconn, stream, operation, published, groups)
        stream.trim()
        held = [i.decode() for i, _ in rconn.xrange(stream.key)]
        for model in groups.values():
            unread = published[model.delivered_up_to + 1:]
            assert set(model.pending) | set(unread) <= set(held)
        assert held == _retained(published, groups)
    rconn.delete(stream.key)


# --- the CLI and Dagster -----------------------------------------------------------------------


def test_cli_relay_and_consume(cached: Settings, rconn: redis.Redis, pg: psycopg.Connection,
                               cli_env: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
                               effect_script: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    promoted = stage_and_promote_without_relay(cached, rconn, pg, 100, 50, seed=7)
    code, out, _ = cli(capsys, "relay")
    assert code == 0
    assert out.startswith(f"relayed 2 outbox rows: published 0 entries to "
                          f"{cached.redis.key_prefix}:promoted, {len(promoted)} orders promoted "
                          f"while no consumer group existed")

    code, _, err = cli(capsys, "consume", "--group", "shop", "--drain", "--", "true")
    assert code == 0  # created the group: it receives what is relayed from now on
    push_orders(cached, rconn, pg, 100, batch_size=50, seed=8)
    stage_queue(cached, workers=1, batch_size=50)
    before = promoted_ids(pg)
    code, out, _ = cli(capsys, "promote")  # relays after promoting
    promoted = promoted_ids(pg) - before
    assert code == 0 and (f"published {len(promoted)} entries to {cached.redis.key_prefix}"
                          ":promoted for its consumer groups") in out
    code, out, err = cli(capsys, "consume", "--group", "shop", "--consumer", "c1", "--lease",
                         "0.2", "--drain", "--", "sh", "-c", "exit 3")
    assert code == 0
    assert err.count("command exited with code 3; left pending") == len(promoted)
    assert f"left pending {len(promoted)} (command failed)" in out
    time.sleep(0.3)
    monkeypatch.setenv("EFFECTS", str(effect_script.parent / "effects"))
    code, out, _ = cli(capsys, "consume", "--group", "shop", "--consumer", "c2", "--lease",
                       "0.2", "--drain", "--", str(effect_script))
    assert code == 0 and f"took over {len(promoted)} from dead consumers" in out
    assert file_effects(effect_script, "shop")[0] == promoted

    code, _, err = cli(capsys, "consume", "--group", "shop", "--drain", "--",
                       "no-such-command-xyz")
    assert code == 1 and "command not found: 'no-such-command-xyz'" in one_error_line(err)
    code, _, err = cli(capsys, "consume", "--group", "", "--drain", "--", "true")
    assert code == 1 and "group name must have 1 to 200 characters" in one_error_line(err)


def test_relay_follow_stops_on_sigterm(cached: Settings, rconn: redis.Redis,
                                       pg: psycopg.Connection) -> None:
    fanout.promoted_stream(cached).ensure_group("g")
    follower = start(cached, "relay", "--follow", "--interval", "0.1")
    promoted = stage_and_promote_without_relay(cached, rconn, pg, 100, 50, seed=9)
    wait_for(lambda: outbox_rows(pg) == 0, "the following relay to publish")
    follower.send_signal(signal.SIGTERM)
    _, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err.decode()
    assert fanout.promoted_stream(cached).length() == len(promoted)


def _observe(settings: Settings, instance: dg.DagsterInstance
             ) -> tuple[dict[str, object], dg.AssetCheckEvaluation]:
    """One tick of the stream's observation sensor: the observation's values, the check."""
    context = dg.build_sensor_context(instance=instance, resources=resources_for(settings))
    result = fanout_assets.promoted_stream_observation_sensor(context)
    assert not result.run_requests
    observation, evaluation = result.asset_events
    assert isinstance(observation, dg.AssetObservation)
    assert isinstance(evaluation, dg.AssetCheckEvaluation)
    return {k: v.value for k, v in observation.metadata.items()}, evaluation


def test_dagster_promotion_publishes_and_the_sensor_shows_each_groups_lag(
        cached: Settings, rconn: redis.Redis, effects: psycopg.Connection) -> None:
    stream = fanout.promoted_stream(cached)
    for group in GROUPS[:2]:
        stream.ensure_group(group)
    payloads, _ = push_orders(cached, rconn, effects, 1000, batch_size=250)
    instance = dg.DagsterInstance.ephemeral()
    job = defs.resolve_job_def("ingest_orders")
    assert job.execute_in_process(resources=resources_for(cached), instance=instance).success
    expected = valid_order_ids(payloads)
    materialization = instance.get_latest_materialization_event(
        dg.AssetKey("promoted_orders")).asset_materialization
    assert materialization.metadata["entries_published"].value == len(expected)

    drain(cached, GROUPS[0], effects)
    seen, evaluation = _observe(cached, instance)
    assert seen["stream_length"] == len(expected) and seen["consumer_groups"] == 2
    assert (seen[f"lag:{GROUPS[0]}"], seen[f"lag:{GROUPS[1]}"]) == (0, len(expected))
    assert seen[f"pending:{GROUPS[0]}"] == 0 and seen["outbox_rows"] == 0
    assert evaluation.passed

    # A promotion whose relay died an hour ago: the check fails, naming the backlog.
    more = stage_and_promote_without_relay(cached, rconn, effects, 200, 200, seed=12)
    effects.execute("UPDATE promoted_outbox SET created_at = now() - interval '1 hour'")
    seen, evaluation = _observe(cached, instance)
    assert not evaluation.passed and seen["outbox_orders"] == len(more)
    assert evaluation.metadata["outbox_rows"].value == 1
    drain(cached, GROUPS[1], effects)
    assert stream.length() == 0  # billing read all; emails' entries were kept until it did


"""The dedup window on its own: duplicates dropped, redeliveries kept, ids expire with a TTL."""

import time

import pytest
import redis

from orders_pipeline.redis_patterns.dedup import DedupWindow
from orders_pipeline.redis_patterns.keys import RedisKeys


def tokens(batch_id: str, n: int) -> list[str]:
    return [f"{batch_id}:{i}" for i in range(n)]


def test_duplicates_within_a_batch_are_dropped(rconn: redis.Redis, keys: RedisKeys) -> None:
    dedup = DedupWindow(rconn, keys, 3600)
    ids = ["a", "b", "a", "c", "b"]
    assert dedup.check_and_mark(ids, tokens("b1", 5)) == [True, True, False, True, False]


def test_duplicates_across_batches_are_dropped(rconn: redis.Redis, keys: RedisKeys) -> None:
    dedup = DedupWindow(rconn, keys, 3600)
    assert dedup.check_and_mark(["a", "b"], tokens("b1", 2)) == [True, True]
    assert dedup.check_and_mark(["c", "a", "b"], tokens("b2", 3)) == [True, False, False]


def test_redelivered_batch_keeps_its_own_orders(rconn: redis.Redis, keys: RedisKeys) -> None:
    dedup = DedupWindow(rconn, keys, 3600)
    ids = ["a", "b", "a"]
    first = dedup.check_and_mark(ids, tokens("b1", 3))
    # The same batch again (reclaimed after its worker died): same ids, same tokens.
    again = dedup.check_and_mark(ids, tokens("b1", 3))
    assert first == again == [True, True, False]
    # A different batch carrying the same ids is still a duplicate.
    assert dedup.check_and_mark(ids, tokens("b2", 3)) == [False, False, False]


def test_ids_are_forgotten_after_the_window(rconn: redis.Redis, keys: RedisKeys) -> None:
    dedup = DedupWindow(rconn, keys, window_seconds=1)
    assert dedup.check_and_mark(["a"], ["b1:0"]) == [True]
    assert dedup.check_and_mark(["a"], ["b2:0"]) == [False]

    deadline = time.monotonic() + 5
    n = 3
    while dedup.check_and_mark(["a"], [f"b{n}:0"]) == [False]:
        assert time.monotonic() < deadline, "id was still remembered 5 s after a 1 s window"
        time.sleep(0.1)
        n += 1


def test_every_dedup_key_has_a_ttl(rconn: redis.Redis, keys: RedisKeys) -> None:
    dedup = DedupWindow(rconn, keys, 600)
    ids = [f"id-{i}" for i in range(50)]
    dedup.check_and_mark(ids, tokens("b1", 50))

    found = list(rconn.scan_iter(match=f"{keys.prefix}:*", count=1000))
    assert len(found) == 51  # 50 ids and the counter of this minute
    for key in found:
        ttl = rconn.ttl(key)
        assert 0 < ttl <= 600 + 120, (key, ttl)
    for order_id in ids:
        assert 0 < rconn.ttl(keys.dedup(order_id)) <= 600


def test_size_counts_ids_first_seen(rconn: redis.Redis, keys: RedisKeys) -> None:
    dedup = DedupWindow(rconn, keys, 3600)
    assert dedup.size() == 0
    dedup.check_and_mark(["a", "b", "a"], tokens("b1", 3))
    dedup.check_and_mark(["a", "b", "a"], tokens("b1", 3))  # redelivery: nothing new
    dedup.check_and_mark(["b", "c"], tokens("b2", 2))
    assert dedup.size() == 3


def test_clear_forgets_everything_of_this_prefix_only(rconn: redis.Redis,
                                                      keys: RedisKeys) -> None:
    dedup = DedupWindow(rconn, keys, 3600)
    other = RedisKeys(f"{keys.prefix}-other")
    other_dedup = DedupWindow(rconn, other, 3600)
    try:
        dedup.check_and_mark(["a", "b"], tokens("b1", 2))
        other_dedup.check_and_mark(["a"], tokens("b1", 1))
        rconn.lpush(keys.ingestion, b"{}")

        assert dedup.clear() == 3  # two ids and one minute counter

        assert dedup.size() == 0
        assert dedup.check_and_mark(["a"], ["b9:0"]) == [True]
        assert other_dedup.size() == 1
        assert rconn.llen(keys.ingestion) == 1
    finally:
        other_dedup.clear()


def test_check_and_mark_arguments(rconn: redis.Redis, keys: RedisKeys) -> None:
    dedup = DedupWindow(rconn, keys, 3600)
    assert dedup.check_and_mark([], []) == []
    with pytest.raises(ValueError):
        dedup.check_and_mark(["a", "b"], ["b1:0"])

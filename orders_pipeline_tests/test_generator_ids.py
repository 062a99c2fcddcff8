"""Issue 12 item 5: producer order ids are unique across hosts and seeds, and time-ordered.

The seed's example: `generate --seed S` and `--seed S+1` produced overlapping order ids (each
100k chunk used seed + chunk number, and the id token came from that seed). Ids are now
UUIDv7 whose random part never comes from the seed.
"""

import random
import uuid
from datetime import UTC, datetime, timedelta

import polars as pl
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orders_pipeline import contract
from orders_pipeline.generator import References, build_payloads, valid_orders

REFS = References(
    pl.DataFrame({"product_id": ["P000001", "P000002"], "base_price": [9.5, 120.0]}),
    pl.DataFrame({"currency": ["USD", "EUR"], "rate_to_usd": [1.0, 1.08]}),
    ["10001", "94105"],
)
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def ids(seed: int, chunk: int, count: int) -> list[str]:
    """The order ids `generate --seed seed` builds for its `chunk`-th chunk."""
    return valid_orders(REFS, count, random.Random(seed + chunk), now=NOW)["order_id"].to_list()


def test_adjacent_seeds_of_the_old_example_do_not_collide() -> None:
    """Seed 7's second chunk used the generator state of seed 8's first: same ids then."""
    first, second = ids(7, 1, 5_000), ids(8, 0, 5_000)
    assert len(set(first) | set(second)) == 10_000


@hypothesis_settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), chunks=st.integers(1, 3), count=st.integers(1, 3_000))
def test_generated_producers_with_adjacent_or_equal_seeds_never_collide(
        seed: int, chunks: int, count: int) -> None:
    """Producers on several hosts: seeds S and S+1, and S twice (same instant), chunk by
    chunk; every id is a UUIDv7 and unique, and ids rise in the order they were made."""
    produced = [ids(s, chunk, count) for s in (seed, seed + 1, seed) for chunk in range(chunks)]
    every = [order_id for batch in produced for order_id in batch]
    assert len(set(every)) == len(every)
    for batch in produced:
        assert batch == sorted(batch)
        parsed = [uuid.UUID(order_id) for order_id in batch]
        assert {(u.version, u.variant) for u in parsed} == {(7, uuid.RFC_4122)}
        assert [str(u) for u in parsed] == batch
        # The 48-bit timestamp is the generation time (ms), 4,096 ids per millisecond.
        assert parsed[0].int >> 80 == int(NOW.timestamp() * 1000)
        assert parsed[-1].int >> 80 == int(NOW.timestamp() * 1000) + (count - 1) // 4096


def test_ids_obey_the_order_contract_and_later_chunks_sort_later() -> None:
    payloads, mix = build_payloads(REFS, 2_000, seed=3)
    frame = pl.read_ndjson(b"\n".join(payloads))
    assert mix["unique_valid"] == 2_000 and frame["order_id"].n_unique() == 2_000
    assert frame["order_id"].str.len_chars().max() <= contract.ORDER_ID_MAX_CHARS
    early = valid_orders(REFS, 10, random.Random(1), now=NOW)["order_id"].max()
    late = valid_orders(REFS, 10, random.Random(1), now=NOW + timedelta(seconds=1))
    assert late["order_id"].min() > early

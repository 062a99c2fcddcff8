"""The books balance in every state a batch can be in, not only at rest."""

import psycopg
import redis

from orders_pipeline import pipeline
from orders_pipeline.conservation import check_conservation
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.settings import Settings
from orders_pipeline.worker import StagingWorker
from orders_pipeline_tests.helpers import assert_exactly_once, push_orders


def _books(rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection) -> dict[str, int]:
    books = check_conservation(rconn, keys, pg)
    assert books.balanced, books
    return books.as_dict()


def test_balanced_through_every_state(settings: Settings, rconn: redis.Redis, keys: RedisKeys,
                                      pg: psycopg.Connection,
                                      loaded_cache: LookupCache) -> None:
    push_orders(settings, rconn, pg, 3000, batch_size=1000, duplicates=0.1, invalid=0.05)
    assert _books(rconn, keys, pg)["queued"] == 3000

    worker = StagingWorker(settings)
    claimed = worker.next_batch(1000)
    assert claimed is not None
    assert _books(rconn, keys, pg)["in_flight"] == 1000  # claimed, not staged

    worker.process(claimed)
    staged = _books(rconn, keys, pg)
    assert staged["in_flight"] == 0 and staged["awaiting_promotion"] > 0

    pg.execute("TRUNCATE orders_staging")  # what a Postgres crash does to UNLOGGED staging
    result = pipeline.promote_staged(settings)
    assert result.lost_batches == [claimed.batch_id]
    lost = _books(rconn, keys, pg)
    assert lost["in_flight"] == 1000 and lost["awaiting_promotion"] == 0

    pipeline.stage_queue(settings, workers=1, batch_size=1000)
    pipeline.promote_staged(settings)
    done = _books(rconn, keys, pg)
    assert done["queued"] == done["in_flight"] == done["awaiting_promotion"] == 0
    assert done["orders"] + done["rejected"] + done["duplicates_dropped"] == 3000


def test_unbalanced_books_are_detected(settings: Settings, rconn: redis.Redis, keys: RedisKeys,
                                       pg: psycopg.Connection,
                                       loaded_cache: LookupCache) -> None:
    push_orders(settings, rconn, pg, 1000, batch_size=1000)
    pipeline.stage_queue(settings, workers=1, batch_size=1000)
    pipeline.promote_staged(settings)
    pg.execute("DELETE FROM orders WHERE order_id IN (SELECT order_id FROM orders LIMIT 3)")
    books = check_conservation(rconn, keys, pg)
    assert not books.balanced and books.difference == 3


def test_staged_batch_whose_commit_was_lost_is_restaged(settings: Settings, rconn: redis.Redis,
                                                        keys: RedisKeys, pg: psycopg.Connection,
                                                        loaded_cache: LookupCache) -> None:
    """Staging commits asynchronously: a crash may take back a commit Redis already saw."""
    payloads, summary = push_orders(settings, rconn, pg, 2000, batch_size=1000, invalid=0.05)
    pipeline.stage_queue(settings, workers=1, batch_size=1000)
    victim = rconn.zrange(keys.staged, 0, 0)[0].decode()
    with pg.transaction():  # what the crash leaves: no ledger row, no rows, no rejects
        for table in ("orders_staging", "orders_rejected", "ingest_batches"):
            pg.execute(f"DELETE FROM {table} WHERE batch_id = %s", (victim,))
    assert check_conservation(rconn, keys, pg).balanced  # counted as in flight again
    pipeline.promote_staged(settings)  # reconciles: the victim goes back to the queue
    pipeline.stage_queue(settings, workers=1, batch_size=1000)
    pipeline.promote_staged(settings)
    assert_exactly_once(settings, rconn, pg, payloads)
    assert pg.execute("SELECT count(*) FROM orders").fetchone()[0] == summary["unique_valid"]


"""Conservation of orders: every delivered order is in exactly one place.

    accepted + redriven + replayed = orders + promotion conflicts + rejected
                                     + duplicates dropped + awaiting promotion + quarantined
                                     + queued + in flight + dropped by retention

`accepted` is counted by producers in the same MULTI as their LPUSH. `redriven` counts the
rejected orders a re-drive put back in flight, in the same MULTI as that push
(`OrderQueue.push_redriven`): each is one more delivery, whose outcome counts again (an order
rejected, re-driven and rejected again counts twice in `rejected`, once per verdict);
`replayed` likewise counts the archived orders a replay put back in flight. The
Postgres side comes from the logged batch ledger (a batch's rejects and duplicates count once
its staging has committed, and a quarantined batch's orders count as quarantined until it is
re-admitted); the Redis side counts only batches the ledger does not already account for
(claimed and not yet staged, lost to a Postgres crash and requeued, re-admitted,
re-driven or replayed). Orders that `orders-pipeline retention` dropped with their months
are counted by it (`orders_retention.dropped_orders`). The two servers are read one after
the other, so the books are exact whenever no batch changes state between the two reads: at
rest, after every run, which is when the asset check evaluates them.
"""

from dataclasses import asdict, dataclass

import psycopg
import redis

from orders_pipeline.postgres_patterns.promotion import batch_statuses
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.queue import REDRIVEN_COUNTER, REPLAYED_COUNTER, OrderQueue

# A lost batch's rejects and duplicates are counted again when it is staged again.
_LEDGER_TOTALS = """
SELECT (SELECT count(*) FROM orders),
       (SELECT coalesce(sum(staged_rows - inserted_rows), 0) FROM promotions),
       coalesce(sum(rejected_rows) FILTER (WHERE status <> 'lost'), 0),
       coalesce(sum(duplicate_rows) FILTER (WHERE status <> 'lost'), 0),
       coalesce(sum(staged_rows) FILTER (WHERE status = 'staged'), 0),
       coalesce(sum(staged_rows) FILTER (WHERE status = 'quarantined'), 0),
       (SELECT coalesce(sum(dropped_orders), 0) FROM orders_retention)
FROM ingest_batches
"""


@dataclass(frozen=True)
class Conservation:
    accepted: int
    redriven: int
    replayed: int
    orders: int
    promotion_conflicts: int
    rejected: int
    duplicates_dropped: int
    awaiting_promotion: int
    quarantined: int
    queued: int
    in_flight: int
    dropped_by_retention: int = 0

    @property
    def accounted(self) -> int:
        return (self.orders + self.promotion_conflicts + self.rejected
                + self.duplicates_dropped + self.awaiting_promotion + self.quarantined
                + self.queued + self.in_flight + self.dropped_by_retention)

    @property
    def difference(self) -> int:
        """Deliveries (accepted, re-driven and replayed orders) not found anywhere (positive)
        or found twice (negative)."""
        return self.accepted + self.redriven + self.replayed - self.accounted

    @property
    def balanced(self) -> bool:
        return self.difference == 0

    def as_dict(self) -> dict[str, int | bool]:
        return {**asdict(self), "accounted": self.accounted, "difference": self.difference,
                "balanced": self.balanced}


def unstaged_batch_orders(client: redis.Redis, keys: RedisKeys,
                          conn: psycopg.Connection) -> int:
    """Orders held in Redis batches whose rows the ledger does not account for yet."""
    queue = OrderQueue(client, keys)
    batch_ids = queue.claimed_batch_ids() + queue.staged_batch_ids()
    statuses = batch_statuses(conn, batch_ids)
    return queue.orders_in([b for b in batch_ids if statuses.get(b, "lost") == "lost"])


def check_conservation(client: redis.Redis, keys: RedisKeys,
                       conn: psycopg.Connection) -> Conservation:
    (orders, conflicts, rejected, duplicates, awaiting, quarantined,
     dropped) = conn.execute(_LEDGER_TOTALS).fetchone()
    conn.rollback()
    in_flight = unstaged_batch_orders(client, keys, conn)
    accepted = redriven = replayed = queued = 0
    for space in keys.shard_spaces:
        pipe = client.pipeline(transaction=True)  # no producer's MULTI lands between the two
        pipe.hmget(space.counters, ["accepted", REDRIVEN_COUNTER, REPLAYED_COUNTER])
        pipe.llen(space.ingestion)
        counts, length = pipe.execute()
        accepted, redriven, replayed = (total + int(count or 0) for total, count in
                                        zip((accepted, redriven, replayed), counts,
                                            strict=True))
        queued += int(length)
    return Conservation(
        accepted=accepted, redriven=redriven, replayed=replayed,
        orders=int(orders),
        promotion_conflicts=int(conflicts),
        rejected=int(rejected), duplicates_dropped=int(duplicates),
        awaiting_promotion=int(awaiting), quarantined=int(quarantined), queued=int(queued),
        in_flight=in_flight, dropped_by_retention=int(dropped))

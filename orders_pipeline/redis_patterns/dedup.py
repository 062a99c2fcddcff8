"""Sliding dedup window: one key per order id with its own TTL, checked a batch at a time.

Each id is marked with the token `batch_id:position` of the order that first claimed it. A
redelivered batch (reclaimed after a worker died) carries the same tokens, so it is recognised
as the owner and never dropped as a duplicate of itself; a different order with the same id
is a true duplicate. Every key expires `window_seconds` after it was set: no cron.

With K shards (`RedisKeys.shards`) each shard has its own window under its hash tag: a batch
is checked in the shard it was claimed from, which holds every copy of its ids that producers
routed by id (`OrderQueue.push_orders`), so the check stays one atomic call per batch.
"""

from collections.abc import Sequence

import redis

from orders_pipeline.connections import await_replication
from orders_pipeline.redis_patterns.keys import RedisKeys, glob_escape, unlink_matching

# KEYS: count key of this minute, then one dedup key per order
# ARGV: ttl, count_ttl, then one token per order
# Returns 1 per order that is new (or ours again), 0 for a duplicate.
_CHECK_AND_MARK = """
local ttl = tonumber(ARGV[1])
local out = {}
local fresh = 0
for i = 2, #KEYS do
  local token = ARGV[i + 1]
  if redis.call('SET', KEYS[i], token, 'NX', 'EX', ttl) then
    out[#out + 1] = 1
    fresh = fresh + 1
  elseif redis.call('GET', KEYS[i]) == token then
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if fresh > 0 then
  redis.call('INCRBY', KEYS[1], fresh)
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return out
"""


class DedupWindow:
    def __init__(self, client: redis.Redis, keys: RedisKeys, window_seconds: int) -> None:
        self.client = client
        self.keys = keys
        self.spaces = keys.shard_spaces
        self.window_seconds = window_seconds
        self._check_and_mark = client.register_script(_CHECK_AND_MARK)

    def check_and_mark(self, order_ids: Sequence[str], tokens: Sequence[str], *,
                       shard: int = 0) -> list[bool]:
        """For each order: True if it should be kept, False if it is a duplicate.

        One server-side call per batch, in the window of `shard`; ids are marked atomically
        with the check.
        """
        if not order_ids:
            return []
        if len(order_ids) != len(tokens):
            raise ValueError("one token per order id")
        space = self.spaces[shard]
        minute = int(self.client.time()[0]) // 60
        keys = [space.dedup_count(minute), *map(space.dedup, order_ids)]
        args = [self.window_seconds, self.window_seconds + 120, *tokens]
        result = self._check_and_mark(keys=keys, args=args)
        await_replication(self.client, space.replication_probe)  # marks acted on at once
        return [bool(flag) for flag in result]

    def size(self) -> int:
        """Ids first seen within the window (minute granularity at its far edge)."""
        now_minute = int(self.client.time()[0]) // 60
        minutes = range(now_minute - self.window_seconds // 60, now_minute + 1)
        return sum(int(v) for space in self.spaces
                   for v in self.client.mget([space.dedup_count(m) for m in minutes])
                   if v is not None)

    def clear(self) -> int:
        """Forget every id (CLI `clear --dedup`); returns the number of keys removed."""
        return sum(unlink_matching(self.client, f"{glob_escape(prefix)}*")
                   for space in self.spaces
                   for prefix in (space.dedup_id_prefix, space.dedup_count_prefix))

"""Orders per minute over the last hour, from a sorted set scored by order time.

Each staged batch adds one member per minute it touched (`minute:batch_id:count`, score =
that minute's start), so the set grows with batches, not orders. Members older than the
window are trimmed on every write, and the key itself carries a TTL. Re-adding a batch after a
retry writes the same members again: the counts never double.
"""

import time

import redis

from orders_pipeline.redis_patterns.keys import RedisKeys

WINDOW_SECONDS = 3600


class OrderRateWindow:
    def __init__(self, client: redis.Redis, keys: RedisKeys,
                 window_seconds: int = WINDOW_SECONDS) -> None:
        self.client = client
        self.keys = keys
        self.window_seconds = window_seconds

    def add_counts(self, batch_id: str, per_minute: dict[int, int],
                   pipe: redis.client.Pipeline | None = None) -> None:
        """Record a batch's order counts by minute (epoch seconds of the minute's start)."""
        target = pipe if pipe is not None else self.client.pipeline(transaction=False)
        cutoff = time.time() - self.window_seconds
        members = {f"{minute}:{batch_id}:{count}": minute
                   for minute, count in per_minute.items() if minute >= cutoff - 60}
        if members:
            target.zadd(self.keys.order_window, members)
        target.zremrangebyscore(self.keys.order_window, "-inf", f"({int(cutoff) - 60}")
        target.expire(self.keys.order_window, self.window_seconds * 2)
        if pipe is None:
            target.execute()

    def per_minute(self, now: float | None = None) -> dict[int, int]:
        """Orders per minute (minute start -> count) for the minutes inside the window."""
        now = time.time() if now is None else now
        start = int(now - self.window_seconds) // 60 * 60
        counts: dict[int, int] = {}
        for member in self.client.zrangebyscore(self.keys.order_window, start, "+inf"):
            minute, _, count = member.decode().split(":")
            counts[int(minute)] = counts.get(int(minute), 0) + int(count)
        return dict(sorted(counts.items()))

    def total(self, now: float | None = None) -> int:
        return sum(self.per_minute(now).values())

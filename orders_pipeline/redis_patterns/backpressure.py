"""Backpressure: producers wait while the ingestion queue is deeper than the limit.

Orders are never dropped: `wait_for_room` blocks (with a message through `on_wait`) until
workers drain the queue below `MAX_QUEUE_DEPTH`, and counts how often it had to wait.
"""

import time
from collections.abc import Callable

import redis

from orders_pipeline.redis_patterns.keys import RedisKeys


class Backpressure:
    def __init__(self, client: redis.Redis, keys: RedisKeys, max_queue_depth: int,
                 poll_seconds: float = 0.2) -> None:
        self.client = client
        self.keys = keys
        self.max_queue_depth = max_queue_depth
        self.poll_seconds = poll_seconds

    def depth(self) -> int:
        """Orders queued in every shard (`RedisKeys.shard_spaces`)."""
        pipe = self.client.pipeline(transaction=False)
        for space in self.keys.shard_spaces:
            pipe.llen(space.ingestion)
        return sum(int(n) for n in pipe.execute())

    def is_active(self) -> bool:
        return self.depth() >= self.max_queue_depth

    def wait_for_room(self, on_wait: Callable[[int], None] | None = None,
                      timeout_seconds: float | None = None) -> float:
        """Block while the queue is at or over the limit; returns seconds waited."""
        started = time.monotonic()
        announced = False
        while (depth := self.depth()) >= self.max_queue_depth:
            if not announced:
                self.client.hincrby(self.keys.counters, "backpressure_waits", 1)
                if on_wait is not None:
                    on_wait(depth)
                announced = True
            if timeout_seconds is not None and time.monotonic() - started > timeout_seconds:
                raise TimeoutError(
                    f"queue depth {depth} stayed over MAX_QUEUE_DEPTH={self.max_queue_depth} "
                    f"for {timeout_seconds:.0f}s")
            time.sleep(self.poll_seconds)
        return time.monotonic() - started

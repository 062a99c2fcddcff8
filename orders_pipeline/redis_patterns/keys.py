"""Every Redis key name the pipeline uses, derived from one prefix.

With a prefix such as `{orders}` every key shares one Redis Cluster hash tag, so the Lua
scripts that touch several keys stay on one slot.
"""

import hashlib
from dataclasses import dataclass

import redis

GLOB_SPECIAL = "\\*?[]"


def glob_escape(text: str) -> str:
    """`text` as a literal inside a Redis MATCH pattern."""
    return "".join(f"\\{c}" if c in GLOB_SPECIAL else c for c in text)


def unlink_matching(client: redis.Redis, pattern: str, chunk: int = 5000) -> int:
    """Delete every key matching `pattern` (SCAN, never KEYS); returns how many went."""
    removed = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=chunk):
        batch.append(key)
        if len(batch) >= chunk:
            removed += client.unlink(*batch)
            batch = []
    if batch:
        removed += client.unlink(*batch)
    return removed


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "orders"

    @property
    def ingestion(self) -> str:
        """List of raw JSON orders; producers LPUSH, workers claim from the right."""
        return f"{self.prefix}:ingestion"

    @property
    def dequeued(self) -> str:
        """Counter of the orders ever claimed from `ingestion` (the claim script adds to it)."""
        return f"{self.prefix}:ingestion:dequeued"

    @property
    def queue_marks(self) -> str:
        """Sorted set dating the queue: when (member, ms by the Redis clock) how many orders had
        entered `ingestion` since it began (score); see `OrderQueue.gauges`."""
        return f"{self.prefix}:ingestion:marks"

    @property
    def inflight(self) -> str:
        """Sorted set: claimed batch id -> lease deadline (ms, Redis clock)."""
        return f"{self.prefix}:inflight"

    @property
    def owners(self) -> str:
        """Hash: claimed batch id -> token of the worker holding the lease."""
        return f"{self.prefix}:inflight:owners"

    @property
    def staged(self) -> str:
        """Sorted set: batch id -> staged time; kept until its rows are promoted."""
        return f"{self.prefix}:staged"

    @property
    def quarantined(self) -> str:
        """Set of batch ids promotion quarantined (poison); their batch lists are kept."""
        return f"{self.prefix}:quarantined"

    @property
    def redriven(self) -> str:
        """Hash: re-drive (or replay) batch id -> its orders, for each batch
        `OrderQueue.push_redriven` put in flight; kept until its outbox in Postgres records the
        push."""
        return f"{self.prefix}:redriven"

    def batch(self, batch_id: str) -> str:
        """List holding the raw payloads of one claimed batch, in claim order."""
        return f"{self.prefix}:batch:{batch_id}"

    def dedup(self, order_id: str) -> str:
        """Marker of one order id in the dedup window.

        Named by a 128-bit BLAKE2b digest of the id's UTF-8 bytes, so the key's length never
        depends on the id's (DESIGN.md: ids are 1-256 characters, compared exactly).
        """
        digest = hashlib.blake2b(order_id.encode(), digest_size=16).hexdigest()
        return f"{self.prefix}:dedup:{digest}"

    @property
    def dedup_id_prefix(self) -> str:
        return f"{self.prefix}:dedup:"

    @property
    def dedup_count_prefix(self) -> str:
        return f"{self.prefix}:dedupcount:"

    def dedup_count(self, minute: int) -> str:
        """Counter of ids first seen in one minute; the window size is the sum over it."""
        return f"{self.dedup_count_prefix}{minute}"

    def lookup(self, table: str) -> str:
        return f"{self.prefix}:lookup:{table}"

    @property
    def lookup_meta(self) -> str:
        return f"{self.prefix}:lookup:meta"

    @property
    def lookup_lock(self) -> str:
        return f"{self.prefix}:lookup:lock"

    @property
    def signals_channel(self) -> str:
        """Pub/sub channel of completion signals (contract: `{P}:ingested`)."""
        return f"{self.prefix}:ingested"

    @property
    def signals_stream(self) -> str:
        """Durable record of every completion signal, read by the sensor from its cursor."""
        return f"{self.prefix}:signals"

    def signal_seen(self, batch_id: str) -> str:
        """Marker (with TTL) that a batch's signal is already in the stream."""
        return f"{self.prefix}:signal:{batch_id}"

    @property
    def order_window(self) -> str:
        """Sorted set of per-minute order counts scored by order time, trimmed as it slides."""
        return f"{self.prefix}:window:orders"

    @property
    def counters(self) -> str:
        """Hash of monotonic counters (accepted orders, backpressure waits)."""
        return f"{self.prefix}:counters"

    @property
    def promoted(self) -> str:
        """Stream of promoted orders, one entry per order, read by consumer groups (fan-out:
        `PromotedStream`); trimmed to what some group has not acknowledged."""
        return f"{self.prefix}:promoted"

"""Every Redis key name the pipeline uses, derived from one prefix.

With a prefix such as `{orders}` every key shares one Redis Cluster hash tag, so the Lua
scripts that touch several keys stay on one slot.

Shards (REDIS_SHARDS = K): the queue and the dedup window can be split over K key spaces,
each under its own hash tag, so that a Redis Cluster of several masters holds and serves K
times as much. Shard 0 is the prefix itself (`{P}:ingestion` stays the list that foreign
producers LPUSH to); shard s > 0 replaces the prefix's hash tag `{t}` by `{t.n}` (an untagged
prefix `P` gets `P:{s.n}`), with the smallest n that puts the tag's slot in the s-th of K equal
ranges of the 16,384 slots, skipping the range of shard 0's slot: on a cluster whose masters
hold equal slot ranges, K shards (K a multiple of the masters) spread evenly. Everything of one
shard (its list, leases, batch lists, dedup keys, counters) stays in one slot, so each shard's
claims and dedup remain atomic Lua calls. Global keys (lookup snapshot, completion signals,
the promoted stream, the order-rate window) stay under the prefix.
"""

import functools
import hashlib
import re
from dataclasses import dataclass, replace
from typing import Protocol

import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

GLOB_SPECIAL = "\\*?[]"


class KeySettings(Protocol):
    """What `RedisKeys.of` reads (`settings.RedisSettings` has both)."""

    key_prefix: str
    shards: int


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


def _hash_tag(key: str) -> tuple[int, int] | None:
    """(start, end) of the hash tag's text in `key` (the cluster specification's rule: the
    first `{` and the first `}` after it, with at least one character between), or None."""
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    return (start + 1, end) if start >= 0 and end > start + 1 else None


def _slot_range(slot: int, shards: int) -> int:
    return slot * shards // REDIS_CLUSTER_HASH_SLOTS


@functools.lru_cache(maxsize=64)
def shard_prefixes(prefix: str, shards: int) -> tuple[str, ...]:
    """The key prefix of each of `shards` shards; shard 0 is `prefix` itself (see the module
    docstring for how the others are named and spread over the slots)."""
    if shards <= 1:
        return (prefix,)
    tag = _hash_tag(prefix)
    base = prefix[tag[0]:tag[1]] if tag else "s"

    def named(n: int) -> tuple[str, str]:
        inner = f"{base}.{n}"
        if tag:
            return inner, f"{prefix[:tag[0]]}{inner}{prefix[tag[1]:]}"
        return inner, f"{prefix}:{{{inner}}}"

    own = _slot_range(key_slot(prefix.encode()), shards)
    ranges = [r for r in range(shards) if r != own]
    prefixes = [prefix]
    n = 0
    for wanted in ranges:
        while True:
            inner, candidate = named(n)
            n += 1
            if _slot_range(key_slot(inner.encode()), shards) == wanted:
                prefixes.append(candidate)
                break
    return tuple(prefixes)


def shard_of_order(order_id: bytes, shards: int) -> int:
    """The shard a producer routes an order to: BLAKE2b of its id's UTF-8 bytes, modulo
    `shards`; every copy of one id goes to one shard, where its dedup key lives."""
    if shards <= 1:
        return 0
    digest = hashlib.blake2b(order_id, digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


_SHARDED_BATCH_ID = re.compile(r"[0-9a-f]{32}\.s([0-9]{1,3})")


def batch_id_in(shard: int, token: str) -> str:
    """The id of a batch claimed from `shard` (`token`: 32 hex digits): the token itself in
    shard 0, `<token>.s<shard>` elsewhere, so the shard can be read back from the id alone."""
    return token if shard == 0 else f"{token}.s{shard}"


def shard_of_batch(batch_id: str) -> int:
    """The shard holding a batch, read from its id (`batch_id_in`); re-drive, replay and
    foreign batch ids belong to shard 0."""
    match = _SHARDED_BATCH_ID.fullmatch(batch_id)
    return int(match.group(1)) if match else 0


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "orders"
    # Shards of the queue and the dedup window (REDIS_SHARDS); these keys are shard 0's.
    shards: int = 1

    @classmethod
    def of(cls, settings: KeySettings) -> "RedisKeys":
        """The key space of a deployment: its prefix and shard count."""
        return cls(settings.key_prefix, settings.shards)

    @property
    def shard_spaces(self) -> list["RedisKeys"]:
        """One single-shard key space per shard, shard 0 first (keys named as this one's)."""
        return [replace(self, prefix=p, shards=1)
                for p in shard_prefixes(self.prefix, self.shards)]

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

    @property
    def dedup_id_prefix(self) -> str:
        """Prefix of every key holding dedup marks: `dedup_generation`, `dedup_level` (and,
        before issue 10 item 4, one string key per order id: `<prefix>` + 32 hex digits)."""
        return f"{self.prefix}:dedup:"

    def dedup_generation(self, window_seconds: int, generation: int) -> str:
        """Hash describing one generation of the dedup window (`DedupWindow`): `levels`, the
        bits of its levels newest first (e.g. `14,10`), `ids` marked in it, `top` marked in
        its newest level. Generation g spans [g * window_seconds, (g + 1) * window_seconds)
        seconds of the Redis clock."""
        return f"{self.dedup_id_prefix}{window_seconds}:{generation}"

    def dedup_level(self, window_seconds: int, generation: int, bits: int) -> str:
        """Prefix of the 2**bits hashes of one level of a generation (`dedup_generation`): the
        hash of bucket b (0 <= b < 2**bits) is this prefix + b in lowercase hex. It holds the
        marks of the ids whose 16-byte BLAKE2b digest (of the id's UTF-8 bytes) begins with
        the `bits` bits of b: field = that digest, value = the 8-byte BLAKE2b digest of the
        token that marked it."""
        return f"{self.dedup_id_prefix}{window_seconds}:{generation}:{bits}:"

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
    def replication_probe(self) -> str:
        """Short-lived key written just before WAIT (`connections.await_replication`)."""
        return f"{self.prefix}:replication:probe"

    @property
    def signals_channel(self) -> str:
        """Pub/sub channel of completion signals (contract: `{P}:ingested`)."""
        return f"{self.prefix}:ingested"

    @property
    def signals_stream(self) -> str:
        """Durable record of every completion signal, read by the sensor from its cursor."""
        return f"{self.prefix}:signals"

    def claimed(self, batch_id: str) -> str:
        """Marker (with TTL) that a claim under this batch id took orders (`_CLAIM`)."""
        return f"{self.prefix}:claimed:{batch_id}"

    def pushed(self, batch_id: str) -> str:
        """Marker (with TTL) that a batch is queued in this shard, when its signal's marker
        `signal_seen` lives in another slot (`QueueShard.push_batch`)."""
        return f"{self.prefix}:pushed:{batch_id}"

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

"""Sliding dedup window: order ids marked in generations of small hashes, a batch at a time.

Each id is marked with the token `batch_id:position` of the order that first claimed it. A
redelivered batch (reclaimed after a worker died) carries the same tokens, so it is recognised
as the owner and never dropped as a duplicate of itself; a different order with the same id
is a true duplicate; within one batch the first copy wins.

Layout (issue 10 item 4: ~34 bytes of Redis per remembered id, measured at 1M ids, instead of
~210 for a key per id). Time by the Redis clock is cut into generations of `window_seconds`
(g = seconds // window_seconds).
A generation is a few levels, each of 2**bits hashes (`RedisKeys.dedup_level`): an id's mark
sits in the hash named by the first `bits` bits of its 128-bit BLAKE2b digest, field = that
digest (16 bytes), value = an 8-byte BLAKE2b digest of its token. A batch looks for each id
in every level of the current and the previous generation and marks the new ones in the
current generation's newest level; every hash of generation g expires at (g + 2) *
window_seconds. So an id is remembered at least `window_seconds` after it was marked and at
most twice that, and a mark is never rewritten. Redis holds between one and two windows of
ids: up to ~70 bytes per id of one window's traffic.

Levels keep the hashes small (listpack encoding, ~28 bytes per mark, under Redis's default
hash-max-listpack-entries 128; a server set below ~100 turns them into hashtables, ~85 bytes
per mark): a generation starts with one level sized for as many ids as
the previous generation marked, FILL ids per hash on average, at least 2**MIN_BITS hashes;
once its newest level holds FILL per hash, a level 2**STEP_BITS times larger is added (at
most 2**MAX_BITS hashes; past that, hashes simply grow). Steady traffic thus uses one level
per generation, a surge a few more. The generation's hash (`RedisKeys.dedup_generation`)
records its levels and counts; the caller names the hashes (every key of a Lua call is
declared) from the levels it knows, and the script, which reads the clock and the levels
itself, refuses a call made with stale ones and answers the right ones, so a worker that
missed a new generation or level retries once.

With K shards (`RedisKeys.shards`) each shard has its own window under its hash tag: a batch
is checked in the shard it was claimed from, which holds every copy of its ids that producers
routed by id (`OrderQueue.push_orders`), so the check stays one atomic call per batch.

Every worker must run with the same DEDUP_WINDOW_SECONDS (the generations are named by it):
after a change the window starts empty, as it does after an upgrade from the key-per-id
layout, whose keys are no longer read and expire within their old window. A copy that only
those would have caught is staged again and counted as a promotion conflict, never doubled
in `orders`.
"""

import hashlib
import struct
from collections.abc import Sequence

import redis

from orders_pipeline.connections import await_replication
from orders_pipeline.redis_patterns.keys import RedisKeys, glob_escape, unlink_matching

FILL = 64  # mean marks per hash at which a level is full
MIN_BITS = 10  # a level has at least 2**10 hashes
STEP_BITS = 4  # each new level of a generation has 2**4 times the hashes of the last
MAX_BITS = 24  # and at most 2**24
# A call is refused at most once for a new generation and once per new level; more refusals
# in a row mean the levels keep changing under us (they cannot, in normal operation).
_ATTEMPTS = 5

# KEYS: 1 the count key of this minute, 2 this generation's hash, 3 the previous one's, then
#       the mark hashes named in ARGV[8...].
# ARGV: 1 this generation, 2 window seconds, 3 and 4 the levels of this generation and of the
#       previous one as the caller knows them ('?': unknown), 5 count ttl, 6 the ids' 16-byte
#       digests, 7 the tokens' 8-byte digests, 8... one blob per level (this generation's
#       newest first, then the previous one's): per order, the 4-byte little-endian position
#       in KEYS of its hash in that level.
# Returns a string of '1' (new, or ours again) and '0' (duplicate), one per order; or, having
# done nothing, {server seconds} when the generation is not the current one, {server seconds,
# levels, previous levels} when the caller's levels are stale.
_CHECK_AND_MARK = f"""
local now = tonumber(redis.call('TIME')[1])
local window = tonumber(ARGV[2])
local gen = math.floor(now / window)
if gen ~= tonumber(ARGV[1]) then
  return {{now}}
end
local expire_at = (gen + 2) * window
local levels = redis.call('HGET', KEYS[2], 'levels')
if not levels then
  local seen = tonumber(redis.call('HGET', KEYS[3], 'ids') or '0')
  local bits = {MIN_BITS}
  while bits < {MAX_BITS} and {FILL} * 2 ^ bits < seen do
    bits = bits + 1
  end
  levels = tostring(bits)
  redis.call('HSET', KEYS[2], 'levels', levels, 'ids', 0, 'top', 0)
  redis.call('EXPIREAT', KEYS[2], expire_at)
end
local previous = redis.call('HGET', KEYS[3], 'levels') or ''
if levels ~= ARGV[3] or previous ~= ARGV[4] then
  return {{now, levels, previous}}
end
local ids, marks = ARGV[6], ARGV[7]
local function key(level, i)
  local a, b, c, d = string.byte(ARGV[level], 4 * i + 1, 4 * i + 4)
  return KEYS[((d * 256 + c) * 256 + b) * 256 + a]
end
local out, written, fresh = {{}}, {{}}, 0
for i = 0, #ids / 16 - 1 do
  local id = string.sub(ids, 16 * i + 1, 16 * i + 16)
  local mark = string.sub(marks, 8 * i + 1, 8 * i + 8)
  local owner = false
  for level = 9, #ARGV do
    owner = redis.call('HGET', key(level, i), id)
    if owner then
      break
    end
  end
  if not owner then
    local hash = key(8, i)
    if redis.call('HSETNX', hash, id, mark) == 1 then
      if not written[hash] then
        written[hash] = true
        redis.call('EXPIREAT', hash, expire_at)
      end
      fresh = fresh + 1
    else
      owner = redis.call('HGET', hash, id)
    end
  end
  if not owner or owner == mark then
    out[i + 1] = '1'
  else
    out[i + 1] = '0'
  end
end
if fresh > 0 then
  redis.call('HINCRBY', KEYS[2], 'ids', fresh)
  local top = redis.call('HINCRBY', KEYS[2], 'top', fresh)
  local bits = tonumber(string.match(levels, '^%d+'))
  if bits < {MAX_BITS} and top >= {FILL} * 2 ^ bits then
    local next_bits = math.min(bits + {STEP_BITS}, {MAX_BITS})
    redis.call('HSET', KEYS[2], 'levels', next_bits .. ',' .. levels, 'top', 0)
  end
  redis.call('INCRBY', KEYS[1], fresh)
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
end
return table.concat(out)
"""


def _digest(text: str, size: int) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=size).digest()


def counted_minutes(now: int, window_seconds: int) -> range:
    """The minutes (Unix seconds // 60) whose counters `DedupWindow.size` adds at Redis time
    `now` (seconds): every minute holding a second of [now - window_seconds, now], so an id
    marked in the window is counted even when its minute began before the window did (for a
    window shorter than a minute, the previous minute too once `now` crosses into a new one).
    Each counter lives window_seconds + 120 s after its last increment, so all are present."""
    return range((now - window_seconds) // 60, now // 60 + 1)


def _level_bits(levels: str) -> list[int]:
    """The bits of each level in a generation's `levels` field, newest first."""
    return [int(bits) for bits in levels.split(",")] if levels else []


class DedupWindow:
    """The dedup window of a key space, one per shard: an id is remembered from its first mark
    for at least `window_seconds` and at most twice that (see the module docstring)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, window_seconds: int) -> None:
        self.client = client
        self.keys = keys
        self.spaces = keys.shard_spaces
        self.window_seconds = window_seconds
        self._check_and_mark = client.register_script(_CHECK_AND_MARK)
        # (shard, generation) -> its levels as last answered by the script ('' for none).
        self._levels: dict[tuple[int, int], str] = {}

    def check_and_mark(self, order_ids: Sequence[str], tokens: Sequence[str], *,
                       shard: int = 0) -> list[bool]:
        """For each order: True if it should be kept, False if it is a duplicate.

        `tokens[i]` names the order `order_ids[i]` (`batch_id:position`); an id already marked
        by the same token is kept again. One server-side call per batch in the window of
        `shard` (two when this process has not yet seen the current generation or its newest
        level); ids are marked atomically with the check. Raises ValueError unless there is one
        token per id, RuntimeError if the window's levels changed under five calls in a row.
        """
        if not order_ids:
            return []
        if len(order_ids) != len(tokens):
            raise ValueError("one token per order id")
        space = self.spaces[shard]
        window = self.window_seconds
        ids = b"".join(_digest(order_id, 16) for order_id in order_ids)
        heads = [head for (head,) in struct.iter_unpack(">I12x", ids)]
        marks = b"".join(_digest(token, 8) for token in tokens)
        now = int(self.client.time()[0])
        for _ in range(_ATTEMPTS):
            gen = now // window
            current = self._levels.get((shard, gen), "?")
            previous = self._levels.get((shard, gen - 1), "?")
            keys = [space.dedup_count(now // 60), space.dedup_generation(window, gen),
                    space.dedup_generation(window, gen - 1)]
            blobs: list[bytes] = []
            if "?" not in (current, previous):
                for level_gen, levels in ((gen, current), (gen - 1, previous)):
                    for bits in _level_bits(levels):
                        blobs.append(self._name_hashes(space, level_gen, bits, heads, keys))
            reply = self._check_and_mark(
                keys=keys, args=[gen, window, current, previous, window + 120, ids, marks,
                                 *blobs])
            if isinstance(reply, bytes):
                await_replication(self.client, space.replication_probe)  # marks acted on at once
                return [flag == ord("1") for flag in reply]
            now = int(reply[0])
            if len(reply) == 3:
                self._levels = {k: v for k, v in self._levels.items()
                                if k[0] != shard or k[1] >= gen - 1}
                self._levels[shard, gen] = reply[1].decode()
                self._levels[shard, gen - 1] = reply[2].decode()
        raise RuntimeError(f"the dedup window's levels changed under {_ATTEMPTS} calls in a row")

    def _name_hashes(self, space: RedisKeys, gen: int, bits: int, heads: Sequence[int],
                     keys: list[str]) -> bytes:
        """Append to `keys` the hashes of level `bits` of `gen` that hold `heads` (the first 4
        bytes of each id's digest, big-endian); return each id's position in `keys` (Lua's,
        from 1) as 4-byte little-endian integers."""
        shift = 32 - bits
        first = len(keys) + 1
        positions: dict[int, int] = {}
        where = [positions.setdefault(head >> shift, first + len(positions)) for head in heads]
        prefix = space.dedup_level(self.window_seconds, gen, bits)
        keys.extend(f"{prefix}{bucket:x}" for bucket in positions)
        return struct.pack(f"<{len(where)}I", *where)

    def size(self) -> int:
        """Ids first seen within the window (minute granularity at its far edge)."""
        minutes = counted_minutes(int(self.client.time()[0]), self.window_seconds)
        return sum(int(v) for space in self.spaces
                   for v in self.client.mget([space.dedup_count(m) for m in minutes])
                   if v is not None)

    def clear(self) -> int:
        """Forget every id (CLI `clear --dedup`); returns the number of keys removed (mark
        hashes, generation hashes, minute counters, and old per-id keys if any remain)."""
        self._levels.clear()
        return sum(unlink_matching(self.client, f"{glob_escape(prefix)}*")
                   for space in self.spaces
                   for prefix in (space.dedup_id_prefix, space.dedup_count_prefix))

"""The raw archive: every claimed batch's payloads kept in Postgres, compact and byte exact.

One row of `raw_batches` per claimed batch (sql/050_raw_batches.sql), written in the staging
transaction that first records the batch in the ledger (`staging.stage_batch`). Its
`payloads` are the batch's raw payloads in claim order, framed so that any bytes survive
(newlines, NUL, invalid UTF-8): each payload as a 4-byte big-endian length followed by its
bytes, and the whole compressed with zlib. The table is partitioned by the UTC day of
`archived_at`; whole days older than RAW_RETENTION_DAYS are dropped (`prune`, also run by
the first batch staged each day).
"""

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

# zlib level 1: about 50 bytes per generated order (a fifth of the JSON) for 3 ms per
# 1,000 orders; level 6 saves another fifth for twice the time, on the staging path.
COMPRESSION_LEVEL = 1
_LENGTH = struct.Struct(">I")


class ArchiveCorrupt(ValueError):
    """An archived blob that does not decode into whole framed payloads."""


def encode(payloads: Sequence[bytes]) -> bytes:
    """The payloads framed (4-byte big-endian length, bytes) and compressed with zlib."""
    framed = b"".join(part for payload in payloads
                      for part in (_LENGTH.pack(len(payload)), payload))
    return zlib.compress(framed, COMPRESSION_LEVEL)


def decode(blob: bytes) -> list[bytes]:
    """The payloads `encode` framed, in order, byte for byte; ArchiveCorrupt if it cannot."""
    try:
        framed = memoryview(zlib.decompress(blob))
    except zlib.error as exc:
        raise ArchiveCorrupt(f"archived payloads do not decompress: {exc}") from exc
    payloads: list[bytes] = []
    at = 0
    while at < len(framed):
        if at + _LENGTH.size > len(framed):
            raise ArchiveCorrupt(f"archived payloads end inside a length prefix at byte {at}")
        (length,) = _LENGTH.unpack_from(framed, at)
        at += _LENGTH.size
        if at + length > len(framed):
            raise ArchiveCorrupt(f"archived payload {len(payloads)} is cut short")
        payloads.append(bytes(framed[at:at + length]))
        at += length
    return payloads


@dataclass(frozen=True)
class RawBatch:
    """A claimed batch's raw payloads ready for the archive: `orders` payloads of `raw_bytes`
    bytes in all, `blob` as `encode` made it, kept for `keep_days` whole days."""
    orders: int
    raw_bytes: int
    blob: bytes
    keep_days: int

    @classmethod
    def of(cls, payloads: Sequence[bytes], keep_days: int) -> "RawBatch":
        """Encode the payloads (before the staging transaction opens, so as not to hold it)."""
        return cls(len(payloads), sum(map(len, payloads)), encode(payloads), keep_days)


def archive(conn: psycopg.Connection, batch_id: str, raw: RawBatch) -> None:
    """Inside the staging transaction: archive the batch. The first batch of a day that finds
    no partition for the next day creates it (and today's) and drops expired days."""
    conn.execute("SELECT archive_raw_batch(%s, %s, %s, %s, %s)",
                 (batch_id, raw.orders, raw.raw_bytes, raw.blob, raw.keep_days))


def prune(conn: psycopg.Connection, keep_days: int) -> list[str]:
    """Drop the day partitions older than `keep_days` whole days (committed here), except a
    day a pending replay still reads; returns the partitions dropped, oldest first."""
    with conn.transaction():
        return [row[0] for row in conn.execute("SELECT raw_batches_prune(%s)", (keep_days,))]

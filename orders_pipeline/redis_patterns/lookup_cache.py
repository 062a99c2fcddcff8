"""Lookup snapshot: products, currency rates and zip codes copied from Postgres into Redis.

Each table becomes one hash (id -> tab-separated attributes) with a TTL. A snapshot is written
under temporary keys and swapped in with RENAME inside MULTI, so readers see the old snapshot
or the new one, never a half-written one. Enrichment asks for a batch's distinct ids with one
HMGET per table, all in one round trip: no Postgres join on the hot path.
"""

import time
from dataclasses import dataclass

import polars as pl
import psycopg
import redis
from psycopg import sql

from orders_pipeline.redis_patterns.keys import RedisKeys


@dataclass(frozen=True)
class LookupTable:
    name: str
    id_column: str
    value_columns: tuple[str, ...]
    query: str


LOOKUP_TABLES = (
    LookupTable("products", "product_id", ("category",),
                "SELECT product_id, category FROM products"),
    LookupTable("currencies", "currency", ("rate_to_usd",),
                "SELECT currency_code, rate_to_usd::text FROM currencies"),
    LookupTable("zip_codes", "zip_code", ("region", "shipping_zone"),
                "SELECT zip_code, region, shipping_zone::text FROM zip_codes"),
)
_CHUNK = 2000


class LookupCacheMissing(RuntimeError):
    """The snapshot expired or was never loaded; run `init-cache`."""


@dataclass(frozen=True)
class SnapshotInfo:
    rows: dict[str, int]
    loaded_at: float
    seconds: float


class LookupCache:
    def __init__(self, client: redis.Redis, keys: RedisKeys, ttl_seconds: int) -> None:
        self.client = client
        self.keys = keys
        self.ttl_seconds = ttl_seconds
        self._snapshot: tuple[bytes, list[pl.DataFrame]] | None = None

    def load_snapshot(self, conn: psycopg.Connection) -> SnapshotInfo:
        """Copy the lookup tables into Redis and swap them in atomically."""
        started = time.perf_counter()
        rows: dict[str, int] = {}
        staging_keys = {}
        for table in LOOKUP_TABLES:
            tmp = f"{self.keys.lookup(table.name)}:loading"
            self.client.delete(tmp)
            count = 0
            with conn.cursor() as cur:
                cur.execute(table.query)
                while chunk := cur.fetchmany(_CHUNK):
                    mapping = {r[0]: "\t".join(str(v) for v in r[1:]) for r in chunk}
                    self.client.hset(tmp, mapping=mapping)
                    count += len(chunk)
            conn.rollback()
            rows[table.name] = count
            staging_keys[table.name] = tmp
        loaded_at = time.time()
        pipe = self.client.pipeline(transaction=True)
        for table in LOOKUP_TABLES:
            live = self.keys.lookup(table.name)
            if rows[table.name]:
                pipe.rename(staging_keys[table.name], live)
                pipe.expire(live, self.ttl_seconds)
            else:
                pipe.delete(live)
        pipe.delete(self.keys.lookup_meta)
        pipe.hset(self.keys.lookup_meta, mapping={"loaded_at": loaded_at,
                                                  **{f"rows:{k}": v for k, v in rows.items()}})
        pipe.expire(self.keys.lookup_meta, self.ttl_seconds)
        pipe.execute()
        return SnapshotInfo(rows, loaded_at, time.perf_counter() - started)

    def is_loaded(self) -> bool:
        names = [self.keys.lookup(t.name) for t in LOOKUP_TABLES]
        return self.client.exists(*names) == len(names)

    def ensure_loaded(self, conn: psycopg.Connection) -> SnapshotInfo | None:
        """Reload the snapshot if it expired; one process does it, others wait for it."""
        if self.is_loaded():
            return None
        with self.client.lock(self.keys.lookup_lock, timeout=120, blocking_timeout=120):
            if self.is_loaded():
                return None
            return self.load_snapshot(conn)

    def info(self) -> dict[str, float]:
        """Rows per table, age and TTL left of the live snapshot (empty if absent)."""
        meta = self.client.hgetall(self.keys.lookup_meta)
        if not meta:
            return {}
        out: dict[str, float] = {k.decode(): float(v) for k, v in meta.items()}
        out["age_seconds"] = time.time() - out["loaded_at"]
        out["ttl_seconds"] = float(min(self.client.ttl(self.keys.lookup(t.name))
                                       for t in LOOKUP_TABLES))
        return out

    def source_counts(self, conn: psycopg.Connection) -> dict[str, int]:
        """Rows of each lookup table in Postgres, to compare with the snapshot."""
        counts = {t.name: int(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(t.name))).fetchone()[0]) for t in LOOKUP_TABLES}
        conn.rollback()
        return counts

    def size(self) -> int:
        pipe = self.client.pipeline(transaction=False)
        for table in LOOKUP_TABLES:
            pipe.hlen(self.keys.lookup(table.name))
        return sum(pipe.execute())

    def fetch(self, ids: dict[str, list[str]]) -> dict[str, pl.DataFrame]:
        """Attributes for the given distinct ids per table.

        The process keeps the whole snapshot (a few thousand rows) in memory, keyed by its
        version: while that is current a batch costs one round trip (EXISTS + version, in
        MULTI); a new or expired snapshot is read whole, atomically, once. Returns one frame
        per table with the id column and its value columns (as strings); ids that are not
        in the snapshot are simply absent.
        """
        names = [self.keys.lookup(t.name) for t in LOOKUP_TABLES]
        pipe = self.client.pipeline(transaction=True)
        pipe.exists(*names)
        pipe.hget(self.keys.lookup_meta, "loaded_at")
        present, version = pipe.execute()
        if present != len(names) or version is None:
            raise LookupCacheMissing(
                "lookup cache is not loaded (run `orders-pipeline init-cache`)")
        if self._snapshot is None or self._snapshot[0] != version:
            self._snapshot = self._read_snapshot()
        return {table.name: frame.filter(pl.col(table.id_column).is_in(
                    ids.get(table.name) or []))
                for table, frame in zip(LOOKUP_TABLES, self._snapshot[1], strict=True)}

    def _read_snapshot(self) -> tuple[bytes, list[pl.DataFrame]]:
        names = [self.keys.lookup(t.name) for t in LOOKUP_TABLES]
        pipe = self.client.pipeline(transaction=True)
        pipe.exists(*names)
        pipe.hget(self.keys.lookup_meta, "loaded_at")
        for name in names:
            pipe.hgetall(name)
        present, version, *tables = pipe.execute()
        if present != len(names) or version is None:
            raise LookupCacheMissing(
                "lookup cache is not loaded (run `orders-pipeline init-cache`)")
        frames = []
        for table, mapping in zip(LOOKUP_TABLES, tables, strict=True):
            frame = pl.DataFrame(
                {table.id_column: list(mapping), "_packed": list(mapping.values())},
                schema={table.id_column: pl.Binary, "_packed": pl.Binary})
            columns = (frame["_packed"].cast(pl.String)
                       .str.split_exact("\t", len(table.value_columns) - 1).struct.unnest())
            columns.columns = list(table.value_columns)
            frames.append(pl.concat([frame.select(pl.col(table.id_column).cast(pl.String)),
                                     columns], how="horizontal"))
        return version, frames

    def clear(self) -> None:
        self.client.delete(*(self.keys.lookup(t.name) for t in LOOKUP_TABLES),
                           self.keys.lookup_meta)

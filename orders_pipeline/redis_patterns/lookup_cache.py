"""Lookup snapshot: products, currency rates and zip codes copied from Postgres into Redis.

Each table becomes one hash (id -> tab-separated attributes) with a TTL. A snapshot is written
under temporary keys and swapped in with RENAME inside MULTI, so readers see the old snapshot
or the new one, never a half-written one. Enrichment asks for a batch's distinct ids with one
HMGET per table, all in one round trip: no Postgres join on the hot path.

The snapshot follows its sources: every change to a lookup table raises its version in
`lookup_source_versions` (a trigger, sql/040_redrive.sql), and each snapshot records in
`{P}:lookup:meta` the versions it was copied from, so a reader (`lookup_sources_sensor`) sees
when Postgres is ahead, and the re-drive of rejects for unknown references knows since when
the changes the live snapshot picked up date.
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
_SOURCE_VERSIONS = "SELECT table_name, version FROM lookup_source_versions ORDER BY 1"
# The earliest change after the versions an earlier snapshot covered, up to the new ones.
_FIRST_CHANGE = """
SELECT extract(epoch FROM min(c.changed_at))
FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS s(table_name, covered, version)
JOIN lookup_source_changes c
    ON c.table_name = s.table_name AND c.version > s.covered AND c.version <= s.version
"""


class LookupCacheMissing(RuntimeError):
    """The snapshot expired or was never loaded; run `init-cache`."""


@dataclass(frozen=True)
class SnapshotInfo:
    rows: dict[str, int]
    loaded_at: float
    seconds: float


@dataclass(frozen=True)
class LookupChanges:
    """The last lookup changes a reload picked up: the earliest of them was made at `since`,
    and the snapshot holding them went live at `loaded_at` (epoch seconds). Orders rejected
    in between for an unknown reference were judged by a snapshot that lacked them."""
    since: float
    loaded_at: float


@dataclass(frozen=True)
class SnapshotSources:
    """What the live snapshot was copied from: each lookup table's version, when it was
    loaded (epoch seconds), and the last changes a reload picked up (carried over by reloads
    that pick up none; None until one has)."""
    versions: dict[str, int]
    loaded_at: float
    changes: LookupChanges | None


def source_versions(conn: psycopg.Connection) -> dict[str, int]:
    """Each lookup table's change counter in Postgres (3 rows; cheap enough for every tick)."""
    versions = {name: int(version) for name, version in conn.execute(_SOURCE_VERSIONS)}
    conn.rollback()
    return versions


class LookupCache:
    def __init__(self, client: redis.Redis, keys: RedisKeys, ttl_seconds: int) -> None:
        self.client = client
        self.keys = keys
        self.ttl_seconds = ttl_seconds
        self._snapshot: tuple[bytes, list[pl.DataFrame]] | None = None

    def load_snapshot(self, conn: psycopg.Connection) -> SnapshotInfo:
        """Copy the lookup tables into Redis and swap them in atomically, with the versions
        they were copied from (read first, so the copy covers at least those changes)."""
        started = time.perf_counter()
        versions = source_versions(conn)
        previous = self.sources()
        first_change = self._first_change(conn, previous, versions)
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
                # RENAME by name: a Redis Cluster pipeline refuses `pipe.rename` (redis-py
                # blocks the method) yet sends the command; both keys share the prefix's slot.
                pipe.execute_command("RENAME", staging_keys[table.name], live)
                pipe.expire(live, self.ttl_seconds)
            else:
                pipe.delete(live)
        changes = (LookupChanges(first_change, loaded_at) if first_change is not None
                   else previous.changes if previous is not None else None)
        pipe.delete(self.keys.lookup_meta)
        pipe.hset(self.keys.lookup_meta, mapping={
            "loaded_at": loaded_at, **{f"rows:{k}": v for k, v in rows.items()},
            **{f"version:{k}": v for k, v in versions.items()},
            **({} if changes is None else {"changes_since": changes.since,
                                           "changes_loaded_at": changes.loaded_at})})
        pipe.expire(self.keys.lookup_meta, self.ttl_seconds)
        pipe.execute()
        return SnapshotInfo(rows, loaded_at, time.perf_counter() - started)

    def sources(self) -> SnapshotSources | None:
        """What the live snapshot was copied from (None without a snapshot, or for one loaded
        before snapshots recorded it)."""
        fields = {k.decode(): float(v) for k, v in
                  self.client.hgetall(self.keys.lookup_meta).items()}
        if not any(k.startswith("version:") for k in fields):
            return None
        return SnapshotSources(
            versions={k.removeprefix("version:"): int(v) for k, v in fields.items()
                      if k.startswith("version:")},
            loaded_at=fields["loaded_at"],
            changes=LookupChanges(fields["changes_since"], fields["changes_loaded_at"])
            if "changes_since" in fields else None)

    @staticmethod
    def _first_change(conn: psycopg.Connection, previous: SnapshotSources | None,
                      versions: dict[str, int]) -> float | None:
        """When the earliest change after the previous snapshot's versions (up to `versions`)
        was made; None if there is none, or no previous snapshot to compare with."""
        if previous is None:
            return None
        tables = list(versions)
        first = conn.execute(_FIRST_CHANGE, (
            tables, [previous.versions.get(t, 0) for t in tables],
            [versions[t] for t in tables])).fetchone()[0]
        conn.rollback()
        return None if first is None else float(first)

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

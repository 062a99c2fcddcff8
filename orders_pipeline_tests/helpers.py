"""Shared helpers: resources, subprocess environments and independent expectations."""

import dataclasses
import functools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import dagster as dg
import psycopg
import redis
from psycopg import sql

from orders_pipeline import generator
from orders_pipeline.connections import close_all, pg_connect
from orders_pipeline.postgres_patterns.schema import apply_schema, ensure_database
from orders_pipeline.postgres_patterns.views import ROLLUPS
from orders_pipeline.redis_patterns.backpressure import Backpressure
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LOOKUP_TABLES, LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.resources import PostgresResource, RedisResource
from orders_pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60,
             interval: float = 0.05) -> None:
    """Return once `predicate()` is true; fail the test naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def free_port() -> int:
    """A TCP port nobody listens on right now, for a test's own server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@functools.cache
def _pg_bin() -> Path:
    """Directory of the local Postgres server binaries (initdb, pg_ctl)."""
    return Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                               check=True).stdout.strip())


class ThrowawayPostgres:
    """A private cluster on a free loopback port (initdb + pg_ctl), for tests that crash it.

    Run as the `postgres` user when the tests run as root. An immediate stop (`crash`) skips
    the shutdown checkpoint, so the next `start` runs crash recovery, which empties every
    UNLOGGED table: exactly what happens to `orders_staging` when a real server dies.
    """

    def __init__(self, root: Path) -> None:
        self.data = root / "data"
        self.port = free_port()
        self.log = root / "postgres.log"
        self._as = (["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else [])
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
        self._run(str(_pg_bin() / "initdb"), "-D", str(self.data), "-A", "trust",
                  "-U", "postgres", "--no-sync")

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data}"
                   " -c max_connections=50")
        self._run(str(_pg_bin() / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o",
                  options, "-w", "-t", "60", "start")

    def crash(self) -> None:
        """Immediate shutdown: no checkpoint, crash recovery at the next start."""
        self._run(str(_pg_bin() / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                  "stop")

    def stop(self) -> None:
        subprocess.run([*self._as, str(_pg_bin() / "pg_ctl"), "-D", str(self.data), "-m",
                        "fast", "-w", "stop"], capture_output=True, timeout=60)


@contextmanager
def crashable_postgres(settings: Settings, rconn: redis.Redis
                       ) -> Iterator[tuple[Settings, ThrowawayPostgres]]:
    """`settings` moved onto a private Postgres cluster the test may crash at will.

    Database `orders` with the schema applied, PgBouncer off, the lookup cache loaded under
    the test's key prefix; the cluster is stopped and deleted at the end.
    """
    root = Path(tempfile.mkdtemp(prefix="op_pgcrash_"))
    server = ThrowawayPostgres(root)
    server.start()
    own = dataclasses.replace(settings, postgres=dataclasses.replace(
        settings.postgres, port=server.port, use_pgbouncer=False, dbname="orders"))
    ensure_database(own.postgres)
    with pg_connect(own.postgres) as conn:
        apply_schema(conn)
        LookupCache(rconn, RedisKeys(own.redis.key_prefix), 3600).load_snapshot(conn)
    try:
        yield own, server
    finally:
        close_all()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def resources_for(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """Dagster resources pointing at a test's own database and key prefix."""
    r, p, t = settings.redis, settings.postgres, settings.pipeline
    return {
        "redis": RedisResource(host=r.host, port=r.port, db=r.db, username=r.username,
                               password=r.password, ssl=r.ssl, ssl_ca_certs=r.ssl_ca_certs,
                               key_prefix=r.key_prefix,
                               dedup_window_seconds=t.dedup_window_seconds,
                               max_queue_depth=t.max_queue_depth,
                               lookup_ttl_seconds=t.lookup_ttl_seconds,
                               claim_timeout_seconds=t.claim_timeout_seconds),
        "postgres": PostgresResource(host=p.host, port=p.port, user=p.user,
                                     password=p.password, dbname=p.dbname,
                                     pgbouncer_host=p.pgbouncer_host,
                                     pgbouncer_port=p.pgbouncer_port,
                                     use_pgbouncer=p.use_pgbouncer, sslmode=p.sslmode,
                                     sslrootcert=p.sslrootcert),
    }


def pipeline_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """Environment for a CLI or worker subprocess: the test's own database and prefix."""
    p, r = settings.postgres, settings.redis
    return {
        **os.environ,
        "POSTGRES_HOST": p.host, "POSTGRES_PORT": str(p.port), "POSTGRES_USER": p.user,
        "POSTGRES_PASSWORD": p.password or "", "POSTGRES_DB": p.dbname,
        "PGBOUNCER_HOST": p.pgbouncer_host, "PGBOUNCER_PORT": str(p.pgbouncer_port),
        "USE_PGBOUNCER": "true" if p.use_pgbouncer else "false",
        "POSTGRES_SSLMODE": p.sslmode, "POSTGRES_SSLROOTCERT": p.sslrootcert or "",
        "REDIS_HOST": r.host, "REDIS_PORT": str(r.port), "REDIS_KEY_PREFIX": r.key_prefix,
        "REDIS_USERNAME": r.username or "", "REDIS_PASSWORD": r.password or "",
        "REDIS_SSL": "true" if r.ssl else "false", "REDIS_SSL_CA_CERTS": r.ssl_ca_certs or "",
        "BATCH_SIZE": str(settings.pipeline.batch_size),
        "WORKER_COUNT": str(settings.pipeline.worker_count),
        "CLAIM_TIMEOUT_SECONDS": str(settings.pipeline.claim_timeout_seconds),
        "DEDUP_WINDOW_SECONDS": str(settings.pipeline.dedup_window_seconds),
        **overrides,
    }


def dagster_env(settings: Settings, home: Path) -> dict[str, str]:
    """Environment for a Dagster subprocess: the test's database/prefix, its own home."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    return pipeline_env(settings, DAGSTER_HOME=str(home))


def expected_orders(payloads: list[bytes], pg: psycopg.Connection
                    ) -> dict[str, tuple[Decimal, Decimal]]:
    """order_id -> (total_amount, total_amount_usd) computed independently with Decimal."""
    rates = dict(pg.execute("SELECT currency_code::text, rate_to_usd FROM currencies"))
    out: dict[str, tuple[Decimal, Decimal]] = {}
    for raw in payloads:
        try:
            order = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(order, dict) or "unit_price" not in order:
            continue
        price = Decimal(str(order["unit_price"])).quantize(Decimal("0.0001"))
        quantity = order["quantity"]
        if not isinstance(quantity, int) or quantity <= 0:
            continue
        total = price * quantity
        rate = rates.get(order.get("currency"))
        if rate is None:
            continue
        usd = (total * rate).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
        out[order["order_id"]] = (total, usd)
    return out


def push_orders(settings: Settings, rconn: redis.Redis, pg: psycopg.Connection, count: int,
                *, batch_size: int = 2000, seed: int = 7, **mix: float
                ) -> tuple[list[bytes], dict[str, int]]:
    """Generate `count` payloads (duplicates/invalid fractions in `mix`) and enqueue them."""
    refs = generator.References.load(pg)
    payloads, summary = generator.build_payloads(refs, count, seed=seed, **mix)
    keys = RedisKeys(settings.redis.key_prefix)
    generator.push_payloads(OrderQueue(rconn, keys), Backpressure(rconn, keys, 10**9),
                            payloads, batch_size=batch_size)
    return payloads, summary


def valid_order_ids(payloads: list[bytes]) -> set[str]:
    """Ids of the generator's valid orders (its invalid ones are named `bad-…`)."""
    return {json.loads(p)["order_id"] for p in payloads if p.startswith(b'{"order_id":"ord-')}


def assert_exactly_once(settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
                        payloads: list[bytes]) -> None:
    """Every valid order in `orders` once, every invalid one rejected once, nothing left."""
    expected = valid_order_ids(payloads)
    ids = [r[0] for r in pg.execute("SELECT order_id FROM orders")]
    assert len(ids) == len(set(ids))
    assert set(ids) == expected, (len(ids), len(expected))
    invalid = sorted(p for p in payloads if not p.startswith(b'{"order_id":"ord-'))
    rejected = sorted(bytes(r[0]) for r in pg.execute("SELECT raw_payload FROM orders_rejected"))
    assert rejected == invalid
    assert pg.execute("SELECT count(*) FROM orders_staging").fetchone()[0] == 0
    duplicates = pg.execute("SELECT coalesce(sum(duplicate_rows), 0) FROM ingest_batches"
                            " WHERE status = 'promoted'").fetchone()[0]
    assert len(ids) + len(rejected) + duplicates == len(payloads)
    keys = RedisKeys(settings.redis.key_prefix)
    assert rconn.llen(keys.ingestion) == 0
    assert rconn.zcard(keys.inflight) == 0 and rconn.zcard(keys.staged) == 0
    assert not list(rconn.scan_iter(match=f"{keys.prefix}:batch:*", count=10_000))


def fresh_example(settings: Settings, rconn: redis.Redis, pg: psycopg.Connection) -> Settings:
    """Empty tables and a new key prefix (under the test's) with a copy of the lookup cache.

    For one example of a property test: the orders tables, the ledger and the view rollups
    are emptied. A new prefix instead of deleting keys: SCAN over a busy shared Redis is
    slow, and the test's own prefix, with everything under it, is removed by the fixture at
    the end.
    """
    tables = ("orders", "orders_staging", "orders_rejected", "ingest_batches", "promotions",
              *ROLLUPS)
    pg.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(map(sql.Identifier, tables))))
    base = RedisKeys(settings.redis.key_prefix)
    prefix = f"{base.prefix}:{uuid.uuid4().hex[:8]}"
    fresh = RedisKeys(prefix)
    for table in LOOKUP_TABLES:
        assert rconn.copy(base.lookup(table.name), fresh.lookup(table.name))
    assert rconn.copy(base.lookup_meta, fresh.lookup_meta)
    return dataclasses.replace(settings, redis=dataclasses.replace(settings.redis,
                                                                   key_prefix=prefix))

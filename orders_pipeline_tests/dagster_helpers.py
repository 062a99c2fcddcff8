"""Shared helpers for the Dagster-level tests."""

import json
import os
import shutil
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import dagster as dg
import psycopg

from orders_pipeline.resources import PostgresResource, RedisResource
from orders_pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def resources_for(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """Dagster resources pointing at a test's own database and key prefix."""
    r, p, t = settings.redis, settings.postgres, settings.pipeline
    return {
        "redis": RedisResource(host=r.host, port=r.port, db=r.db, password=r.password,
                               ssl=r.ssl, key_prefix=r.key_prefix,
                               dedup_window_seconds=t.dedup_window_seconds,
                               max_queue_depth=t.max_queue_depth,
                               lookup_ttl_seconds=t.lookup_ttl_seconds,
                               claim_timeout_seconds=t.claim_timeout_seconds),
        "postgres": PostgresResource(host=p.host, port=p.port, user=p.user,
                                     password=p.password, dbname=p.dbname,
                                     pgbouncer_host=p.pgbouncer_host,
                                     pgbouncer_port=p.pgbouncer_port,
                                     use_pgbouncer=p.use_pgbouncer),
    }


def dagster_env(settings: Settings, home: Path) -> dict[str, str]:
    """Environment for a Dagster subprocess: the test's database/prefix, its own home."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    p, r = settings.postgres, settings.redis
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "POSTGRES_HOST": p.host, "POSTGRES_PORT": str(p.port), "POSTGRES_USER": p.user,
        "POSTGRES_PASSWORD": p.password or "", "POSTGRES_DB": p.dbname,
        "PGBOUNCER_HOST": p.pgbouncer_host, "PGBOUNCER_PORT": str(p.pgbouncer_port),
        "USE_PGBOUNCER": "true" if p.use_pgbouncer else "false",
        "REDIS_HOST": r.host, "REDIS_PORT": str(r.port), "REDIS_KEY_PREFIX": r.key_prefix,
        "BATCH_SIZE": str(settings.pipeline.batch_size),
        "WORKER_COUNT": str(settings.pipeline.worker_count),
    }


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

"""One Redis connection pool and one Postgres connection pool per process.

Pools are cached per (process id, settings): a forked or spawned worker never reuses its
parent's sockets, and repeated calls in one process share the same pool instead of opening a
connection per call.
"""

import atexit
import os
import threading

import psycopg
import redis
from psycopg_pool import ConnectionPool
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from orders_pipeline.settings import PostgresSettings, RedisSettings

_lock = threading.Lock()
_redis_clients: dict[tuple[int, RedisSettings], redis.Redis] = {}
_pg_pools: dict[tuple[int, PostgresSettings, bool], ConnectionPool] = {}


def redis_client(settings: RedisSettings) -> redis.Redis:
    """The process's pooled Redis client; bytes in, bytes out (payloads are raw bytes)."""
    key = (os.getpid(), settings)
    with _lock:
        client = _redis_clients.get(key)
        if client is None:
            client = redis.Redis(
                host=settings.host,
                port=settings.port,
                db=settings.db,
                username=settings.username,
                password=(None if settings.password is None
                          else settings.password.get_secret_value()),
                ssl=settings.ssl,
                # TLS always verifies the server: its chain and that it is `host`.
                ssl_cert_reqs="required",
                ssl_check_hostname=True,
                ssl_ca_certs=settings.ssl_ca_certs,
                socket_connect_timeout=5,
                socket_timeout=60,
                health_check_interval=30,
                retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=3),
                retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            )
            _redis_clients[key] = client
        return client


def _configure(conn: psycopg.Connection) -> None:
    # PgBouncer in transaction mode cannot keep server-side prepared statements.
    conn.prepare_threshold = None


def pg_pool(settings: PostgresSettings, *, via_pgbouncer: bool | None = None) -> ConnectionPool:
    """The process's Postgres pool: through PgBouncer when enabled (workers), else direct."""
    bouncer = settings.use_pgbouncer if via_pgbouncer is None else via_pgbouncer
    key = (os.getpid(), settings, bouncer)
    with _lock:
        pool = _pg_pools.get(key)
        if pool is None:
            pool = ConnectionPool(
                kwargs=settings.conninfo(via_pgbouncer=bouncer),
                configure=_configure,
                # A long-lived worker outlives Postgres restarts: test each connection as it
                # leaves the pool (one empty round trip) instead of failing a batch on it.
                check=ConnectionPool.check_connection,
                min_size=1,
                max_size=4,
                open=False,
                name=f"orders_pipeline-{os.getpid()}",
            )
            pool.open(wait=True, timeout=15)
            _pg_pools[key] = pool
        return pool


def pg_connect(settings: PostgresSettings, *, via_pgbouncer: bool = False) -> psycopg.Connection:
    """A single direct connection, for DDL and administration outside the pools."""
    conn = psycopg.connect(**settings.conninfo(via_pgbouncer=via_pgbouncer))
    _configure(conn)
    return conn


def close_all() -> None:
    """Close this process's pools (tests and CLI exit)."""
    with _lock:
        pid = os.getpid()
        for key in [k for k in _pg_pools if k[0] == pid]:
            _pg_pools.pop(key).close()
        for key in [k for k in _redis_clients if k[0] == pid]:
            _redis_clients.pop(key).close()


atexit.register(close_all)

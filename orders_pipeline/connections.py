"""One Redis client and one Postgres connection pool per process.

Pools are cached per (process id, settings): a forked or spawned worker never reuses its
parent's sockets, and repeated calls in one process share the same pool instead of opening a
connection per call.

Redis comes in three shapes, chosen by `RedisSettings` (`redis_client`):

- one server (REDIS_HOST:REDIS_PORT): a plain `redis.Redis`;
- Redis Cluster (REDIS_CLUSTER=true): a `redis.cluster.RedisCluster` that starts from
  REDIS_HOST:REDIS_PORT (any node, master or replica), learns the others and the slot map,
  follows MOVED/ASK redirections and re-reads the map after a failover or a resharding;
- Sentinel (REDIS_SENTINEL_HOSTS): a `redis.Redis` on a Sentinel-managed pool that asks the
  Sentinels for the master of REDIS_SENTINEL_MASTER on every new connection, and drops the
  connection when it meets a demoted master (READONLY) or a master that lost the replicas it
  must write to (NOREPLICAS), so the next attempt reaches the new master.

`TRANSIENT_REDIS_ERRORS` lists what a retry with backoff can fix in each shape;
`await_replication` makes a write durable across a Sentinel failover before it is acted on.
"""

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
import redis
import redis.cluster
import redis.exceptions
import redis.sentinel
from psycopg_pool import ConnectionPool
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.retry import Retry
from redis.typing import EncodableT, KeyT

from orders_pipeline.settings import (
    ConfigError,
    PostgresSettings,
    RedisSettings,
    sentinel_addresses,
)

# Every client this module builds: `redis.Redis` (one server, or Sentinel's master) or
# `redis.cluster.RedisCluster`. Both have the same command methods, `register_script`,
# `pipeline`, `transaction`, `scan_iter`, `pubsub` (see README "Scaling" for what differs).
RedisClient = redis.Redis | redis.cluster.RedisCluster

# Errors that mean "the server or the topology is changing under you, try again shortly",
# as they surface *past* redis-py's own retries (each class is raised by redis-py 8):
TRANSIENT_REDIS_ERRORS: tuple[type[Exception], ...] = (
    # Network trouble, a server restarting (BusyLoadingError), no master known to the
    # Sentinels yet (MasterNotFoundError), a demoted master (ReadOnlyError and NOREPLICAS
    # become ConnectionError on a Sentinel pool), a write no replica acknowledged in time
    # (NotReplicated): all subclasses of these two.
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    # A demoted master answering a write on a plain client (no Sentinel pool to translate
    # it), e.g. REDIS_HOST pointed at a master that a failover turned into a replica.
    redis.exceptions.ReadOnlyError,
    # Redis Cluster. ClusterError: MOVED/ASK/TRYAGAIN kept coming for 16 redirections
    # ("TTL exhausted": a slot migrating while a multi-key script runs gets TRYAGAIN until
    # the migration ends); its subclasses ClusterDownError (CLUSTERDOWN: a master failed and
    # no replica took over yet) and MasterDownError (MASTERDOWN) after the client's retries.
    redis.exceptions.ClusterError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.MasterDownError,
    # Raised as such by a cluster MULTI (pipeline(transaction=True)): TRYAGAIN at once,
    # MOVED and ASK once the pipeline's own retries ran out.
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.TryAgainError,
    # The slot map the client holds has no node for a key's slot (mid-failover), after the
    # client re-read it as many times as it retries.
    redis.exceptions.SlotNotCoveredError,
)

# How a client retries on its own before an error reaches the caller: exponential backoff
# 0.1, 0.2, 0.4 ... capped at 2 s. A Redis Cluster client re-reads the slot map between
# attempts (redis-py 8 counts its attempts with `retry` but does not sleep between them,
# except 0.25 s after CLUSTERDOWN), so it gets more attempts: a manual failover or a
# resharding settles within them, an automatic failover (node timeout + election) may not,
# and surfaces as one of TRANSIENT_REDIS_ERRORS for the caller's own backoff.
RETRIES = 3
CLUSTER_RETRIES = 6
BACKOFF = ExponentialBackoff(cap=2.0, base=0.1)
SOCKET_CONNECT_TIMEOUT_SECONDS = 5
SOCKET_TIMEOUT_SECONDS = 60
HEALTH_CHECK_SECONDS = 30

_lock = threading.Lock()
_redis_clients: dict[tuple[int, RedisSettings], RedisClient] = {}
_pg_pools: dict[tuple[int, PostgresSettings, bool], ConnectionPool] = {}


log = logging.getLogger(__name__)
T = TypeVar("T")

# Attempts of `retry_transient` before the error propagates: backoff 0.4, 0.8, 1.6, 3.2, 5 s
# between them, about 11 s in all: a restart, a Sentinel failover or a slot moving settles
# within it.
TRANSIENT_ATTEMPTS = 6
# A producer's push (`QueueShard.push_batch_once`) waits longer: 36 s of backoff (five more
# steps of 5 s), plus each attempt's own time (up to WAIT_TIMEOUT_MS for a push no replica
# confirmed, and redis-py's retries): about a minute. A failed-over Sentinel master refuses
# writes until its old master rejoins as a replica, and a push given up is a batch the
# producer must keep and send again (under its id: `push_batch` never queues it twice).
PUSH_ATTEMPTS = 11


def retry_transient(call: Callable[[], T], *, what: str,
                    errors: tuple[type[BaseException], ...] = TRANSIENT_REDIS_ERRORS,
                    attempts: int = TRANSIENT_ATTEMPTS,
                    after_wait: Callable[[], None] | None = None) -> T:
    """`call()`, retried through `errors` (transient server errors: a restart, a failover, a
    slot moving) with exponential backoff (0.4 s doubling, at most 5 s), each logged as a
    warning naming `what`; after `attempts` attempts the last error propagates, and any other
    error at once. `after_wait` runs after each backoff (e.g. to extend a lease). `call` must
    be safe to repeat: it may have taken effect before an error reached us."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except errors as exc:
            if attempt >= attempts:
                raise
            delay = min(0.2 * 2**attempt, 5.0)
            log.warning("%s: %s: %s; retry %d in %.1fs", what, type(exc).__name__, exc,
                        attempt, delay)
            time.sleep(delay)
            if after_wait is not None:
                after_wait()


# How long a write the pipeline acts on may take to reach the replicas (`await_replication`).
WAIT_TIMEOUT_MS = 2000
# The probe written before WAIT expires on its own (ms).
PROBE_TTL_MS = 60_000


class NotReplicated(redis.exceptions.ConnectionError):
    """The master took a write, but no replica acknowledged it within WAIT_TIMEOUT_MS: a
    failover now would lose it. Whether it lasts is known only once the master is settled
    (a transient error: the caller backs off and looks again)."""


def replicas_to_await(client: RedisClient) -> int:
    """Replicas that must hold a write before the pipeline acts on it: 1 on a Sentinel-managed
    client, 0 on any other.

    A Sentinel failover promotes a replica without letting it catch up first: writes the old
    master acknowledged but had not yet sent are lost (`min-replicas-to-write` only stops the
    old master from taking more once its replica is promoted). A plain server has no failover,
    and a Redis Cluster's manual CLUSTER FAILOVER waits for the replica to catch up.
    """
    pool = getattr(client, "connection_pool", None)
    return 1 if isinstance(pool, redis.sentinel.SentinelConnectionPool) else 0


def await_replication(client: RedisClient, probe_key: str, *,
                      timeout_ms: int = WAIT_TIMEOUT_MS) -> None:
    """Return once the replicas (`replicas_to_await`) hold every write the master took
    before this call, from any connection; a no-op when there are none to await.

    WAIT counts only its own connection's writes, so it follows a write of its own, to
    `probe_key` (a short-lived key of the caller's key space): one round trip. The replicas
    apply the master's writes in order, so once they hold the probe they hold everything
    before it. Raises NotReplicated if they do not within `timeout_ms`, ConnectionError if the
    master refuses the probe (NOREPLICAS: it has lost its replica, e.g. to a failover).
    """
    replicas = replicas_to_await(client)
    if not replicas:
        return
    pipe = client.pipeline(transaction=False)
    pipe.set(probe_key, b"1", px=PROBE_TTL_MS)
    pipe.wait(replicas, timeout_ms)
    _, acknowledged = pipe.execute()
    if int(acknowledged) < replicas:
        raise NotReplicated(
            f"{acknowledged} of {replicas} replica(s) acknowledged the master's writes within "
            f"{timeout_ms} ms; a failover now would lose them")


def _auth_and_tls(settings: RedisSettings) -> dict[str, Any]:
    """Credentials and TLS options, the same for every node, master and Sentinel."""
    options: dict[str, Any] = {
        "username": settings.username,
        "password": (None if settings.password is None
                     else settings.password.get_secret_value()),
        "socket_connect_timeout": SOCKET_CONNECT_TIMEOUT_SECONDS,
        "socket_timeout": SOCKET_TIMEOUT_SECONDS,
    }
    if settings.ssl:
        # TLS always verifies the server: its chain and that it is the host connected to.
        options.update(ssl=True, ssl_cert_reqs="required", ssl_check_hostname=True,
                       ssl_ca_certs=settings.ssl_ca_certs)
    return options


def _plain_client(settings: RedisSettings) -> redis.Redis:
    return redis.Redis(
        host=settings.host, port=settings.port, db=settings.db, **_auth_and_tls(settings),
        health_check_interval=HEALTH_CHECK_SECONDS,
        retry=Retry(BACKOFF, retries=RETRIES),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def _cluster_client(settings: RedisSettings) -> redis.cluster.RedisCluster:
    """A cluster client that has read the slot map from REDIS_HOST:REDIS_PORT.

    redis-py reports every failure to read it as RedisClusterException, which is not a
    RedisError; here it becomes what it is: ConfigError for a server that is not a cluster
    node, the node's own error (ConnectionError, AuthenticationError, ...) for one that
    cannot be reached or refuses us, ConnectionError for a map that leaves slots uncovered.
    """
    endpoint = f"{settings.host}:{settings.port}"
    try:
        # `retry` replaces the deprecated `cluster_error_retry_attempts` (redis-py >= 6): its
        # retry count is the number of attempts after MOVED storms, CLUSTERDOWN, connection
        # errors and uncovered slots; per-node connections do not retry (the client does).
        return redis.cluster.RedisCluster(
            host=settings.host, port=settings.port, **_auth_and_tls(settings),
            retry=Retry(BACKOFF, retries=CLUSTER_RETRIES),
            # After a failover the old master answers MOVED: re-read the whole slot map on
            # every second one instead of patching one slot at a time.
            reinitialize_steps=2,
            require_full_coverage=True)
    except redis.exceptions.RedisClusterException as exc:
        cause = exc.__cause__
        if isinstance(cause, redis.exceptions.RedisClusterException) and (
                "Cluster mode is not enabled" in str(cause)):
            raise ConfigError(
                f"REDIS_CLUSTER is true but the Redis at {endpoint} is not a cluster node "
                "(cluster mode is not enabled on it): unset REDIS_CLUSTER, or point "
                "REDIS_HOST/REDIS_PORT at a node of the cluster") from None
        if isinstance(cause, redis.exceptions.RedisError):
            raise cause.with_traceback(None) from None
        raise redis.ConnectionError(f"the Redis Cluster at {endpoint} is not usable: {exc}"
                                    ) from exc


class _FailoverAwareConnection(redis.sentinel.SentinelManagedConnection):
    """A Sentinel-managed connection that also treats NOREPLICAS as "talking to a master that
    was failed over": with `min-replicas-to-write` set, a master whose replicas left (the
    promoted one stopped replicating from it at once) refuses writes with NOREPLICAS while it
    waits for the Sentinels to demote it. The connection is dropped and ConnectionError raised,
    so the client's retry connects again, asking the Sentinels for the master (READONLY, from
    a demoted master, is handled the same way by redis-py)."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except redis.exceptions.ResponseError as exc:
            if self.connection_pool.is_master and str(exc).startswith("NOREPLICAS"):
                self.disconnect()
                raise redis.ConnectionError(
                    f"the master at {self.host}:{self.port} refuses writes ({exc}); asking "
                    "the Sentinels for the master again") from exc
            raise


class _FailoverAwareSSLConnection(_FailoverAwareConnection, redis.connection.SSLConnection):
    pass


def _sentinel_client(settings: RedisSettings) -> redis.Redis:
    assert settings.sentinel_hosts is not None
    options = _auth_and_tls(settings)
    sentinels = redis.sentinel.Sentinel(
        sentinel_addresses(settings.sentinel_hosts),
        # Sentinels are asked with the same timeouts and TLS, without the data credentials
        # (a Sentinel has its own `requirepass`, rarely set).
        sentinel_kwargs={k: v for k, v in options.items()
                         if k not in ("username", "password")})
    return sentinels.master_for(
        settings.sentinel_master, db=settings.db, **options,
        connection_class=(_FailoverAwareSSLConnection if settings.ssl
                          else _FailoverAwareConnection),
        health_check_interval=HEALTH_CHECK_SECONDS,
        retry=Retry(BACKOFF, retries=RETRIES),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        # PING each new connection: one that reached a dead address fails at once.
        check_connection=True)


def queue_script(pipe: redis.client.Pipeline | redis.cluster.ClusterPipeline, script: Script,
                 keys: Sequence[KeyT], args: Sequence[EncodableT]) -> None:
    """Queue a call of `script` on `pipe` (a MULTI, or a plain pipeline), on any client.

    On a one-server or Sentinel client this is `script(keys, args, client=pipe)`: EVALSHA,
    the pipeline loading the script first if the server lacks it. A cluster pipeline refuses
    EVALSHA (redis-py blocks it: it could not load a missing script inside MULTI), so there
    the script's text goes with the call (EVAL): always present, on whichever master the
    slot has moved to. `keys` must all be in the slot of the pipeline's other keys.
    """
    if isinstance(pipe, redis.cluster.ClusterPipeline):
        pipe.execute_command("EVAL", script.script, len(keys), *keys, *args)
    else:
        script(keys=keys, args=args, client=pipe)


def redis_client(settings: RedisSettings) -> RedisClient:
    """The process's Redis client for `settings`; bytes in, bytes out (payloads are raw bytes).

    A `redis.cluster.RedisCluster` when `settings.cluster`, a Sentinel-managed master client
    when `settings.sentinel_hosts`, else a plain `redis.Redis` (see the module docstring).
    Building a cluster client asks REDIS_HOST:REDIS_PORT for the slot map: raises ConfigError
    if that is no cluster node, redis.ConnectionError (or AuthenticationError) if it cannot be
    reached or its map leaves slots uncovered.
    """
    key = (os.getpid(), settings)
    with _lock:
        client = _redis_clients.get(key)
        if client is None:
            if settings.cluster:
                client = _cluster_client(settings)
            elif settings.sentinel_hosts:
                client = _sentinel_client(settings)
            else:
                client = _plain_client(settings)
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

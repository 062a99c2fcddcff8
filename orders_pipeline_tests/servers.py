"""Throwaway servers for the tests that crash, restart or reconfigure one.

The shared Postgres, Redis and PgBouncer (`bash .ci/services`) are never touched: a test that
needs to kill a server, fill its memory, or turn on TLS or passwords starts its own here, on a
free loopback port, in a directory of its own.

- `free_port()`, `free_ports(n)`: TCP ports nobody listens on right now.
- `PostgresServer`: a private cluster (initdb + pg_ctl), which may be crashed and restarted;
  `crashable_postgres` puts a test's settings on one, schema applied.
- `RedisServer`: a private `redis-server`, which may be SIGKILLed and restarted on its port
  and data directory; the `redis_servers` fixture starts them and stops them all at the end.
- `PgBouncer`: a private `pgbouncer` in front of a Postgres of the test's choice.
- `RedisCluster`: six `redis-server --cluster-enabled yes` nodes made one cluster (3 masters,
  3 replicas) by `redis-cli --cluster create`, with failover and slot migration helpers; the
  `redis_cluster` fixture starts one.
- `RedisSentinelGroup`: a master, its replicas and `SentinelServer`s monitoring it, with
  `failover()` (SENTINEL FAILOVER); the `redis_sentinel_groups` fixture starts them.

Every server (and cluster, and group) is a context manager: leaving the block stops it and
removes its directory when the server made that directory itself. A server that does not come
up fails the test with the tail of its log.
"""

import contextlib
import dataclasses
import functools
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import pytest
import redis
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS as CLUSTER_SLOTS
from redis.retry import Retry

from orders_pipeline.connections import close_all, pg_connect
from orders_pipeline.postgres_patterns.schema import apply_schema, ensure_database
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.settings import Settings

HOST = "127.0.0.1"
START_TIMEOUT_SECONDS = 30
STOP_TIMEOUT_SECONDS = 30
LOG_TAIL_CHARS = 3000
# Postgres and PgBouncer refuse to run as root: under root they run as this system user.
SERVICE_USER = "postgres"


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now, for a test's own server."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 nobody listens on right now (all are held open
    while they are picked, so none comes twice)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((HOST, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def listening(port: int, host: str = HOST) -> bool:
    """True when something accepts TCP connections on `host`:`port`."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class Server:
    """What every throwaway server has: a port, a directory, a log, cleanup on exit.

    `directory`: where the server keeps its data and log; by default a new temporary one
    (owned by SERVICE_USER under root when `as_service_user`), removed when the block exits.
    A directory the caller gives is kept (pytest's tmp_path, say, to read the logs later).
    `port`: the port to listen on; by default a free one.
    """

    name = "server"

    def __init__(self, directory: Path | None = None, port: int | None = None,
                 as_service_user: bool = False) -> None:
        self.port = port if port is not None else free_port()
        self._own_directory = directory is None
        self.directory = (Path(tempfile.mkdtemp(prefix=f"op_{self.name}_"))
                          if directory is None else directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._as_service_user = as_service_user and os.geteuid() == 0
        if self._as_service_user:
            shutil.chown(self.directory, SERVICE_USER, SERVICE_USER)
        self.log = self.directory / f"{self.name}.log"

    @property
    def run_as(self) -> list[str]:
        """Command prefix that runs a program as SERVICE_USER when the tests run as root."""
        return ["runuser", "-u", SERVICE_USER, "--"] if self._as_service_user else []

    def give_to_service_user(self, *paths: Path) -> None:
        """Hand files the caller wrote into `directory` to SERVICE_USER (when root)."""
        if self._as_service_user:
            for path in paths:
                shutil.chown(path, SERVICE_USER, SERVICE_USER)

    def log_tail(self) -> str:
        """The last LOG_TAIL_CHARS characters of the server's log ('' before it has one)."""
        if not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-LOG_TAIL_CHARS:]

    def fail(self, what: str) -> AssertionError:
        """An AssertionError saying `what` went wrong, with the log's tail."""
        return AssertionError(f"{self.name} on port {self.port}: {what}\n--- log tail ---\n"
                              f"{self.log_tail()}")

    def stop(self) -> None:
        """Shut the server down; a no-op when it is not running."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        try:
            self.stop()
        finally:
            if self._own_directory:
                shutil.rmtree(self.directory, ignore_errors=True)


class ForegroundServer(Server):
    """A server run in the foreground as a child process in `directory`, its output in `log`."""

    def __init__(self, directory: Path | None = None, port: int | None = None,
                 as_service_user: bool = False) -> None:
        super().__init__(directory, port, as_service_user)
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The command line that runs the server in the foreground."""
        raise NotImplementedError

    def answers(self) -> bool:
        """True once the server serves requests (it may listen a while before that)."""
        return listening(self.port)

    def start(self) -> None:
        """Start the server and return once it answers; AssertionError with its log if not."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command(), cwd=self.directory, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self.answers():
            if self.process.poll() is not None:
                raise self.fail(f"exited with code {self.process.returncode} while starting")
            if time.monotonic() > deadline:
                self.kill()
                raise self.fail(f"did not answer within {START_TIMEOUT_SECONDS} s")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final write, exactly like a crash of the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)

    def restart(self) -> None:
        """Kill the server and start it again on the same port and directory."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT_SECONDS."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()


# ---------------------------------------------------------------------------- Redis


class RedisServer(ForegroundServer):
    """A private `redis-server` on 127.0.0.1: no RDB snapshots, `noeviction`, no AOF.

    `options`: more redis-server arguments, which win over those defaults (`--appendonly
    yes`, `--maxmemory 2mb`, ACL users, TLS ports). `client_options`: what a client needs
    to get in (username/password, ssl/ssl_ca_certs); `client()` and the start-up probe use
    them. A TLS-only server lists `--port 0 --tls-port <port>` in `options` with `port`.
    """

    name = "redis"

    def __init__(self, *options: str, directory: Path | None = None, port: int | None = None,
                 client_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(directory, port)
        self.options = options
        self.client_options = dict(client_options or {})

    def command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed")
        return [binary, "--port", str(self.port), "--bind", HOST, "--dir", str(self.directory),
                "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction",
                "--daemonize", "no", *self.options]

    def answers(self) -> bool:
        """PING answered: listening and done loading its AOF (BusyLoadingError until then)."""
        probe = self.client(socket_timeout=2)
        try:
            return bool(probe.ping())
        except redis.ConnectionError:
            return False
        finally:
            probe.close()

    def client(self, **options: Any) -> redis.Redis:
        """A client that does not retry: a test must see every failure itself.

        `options` override `client_options` and the defaults (socket_timeout=10)."""
        return redis.Redis(**{"host": HOST, "port": self.port, "socket_timeout": 10,
                              "retry": Retry(NoBackoff(), 0), "retry_on_error": [],
                              **self.client_options, **options})


class RedisFactory(Protocol):
    """What `redis_servers` yields: makes a RedisServer (its arguments), started by default."""

    def __call__(self, *options: str, port: int | None = None,
                 client_options: Mapping[str, Any] | None = None,
                 start: bool = True) -> RedisServer: ...


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[RedisFactory]:
    """Make private redis-servers (RedisServer's arguments; started unless start=False).

    Each gets its own directory under tmp_path (kept for its logs); all are stopped at the
    end of the test, whatever happened.
    """
    servers: list[RedisServer] = []

    def make(*options: str, port: int | None = None,
             client_options: Mapping[str, Any] | None = None,
             start: bool = True) -> RedisServer:
        server = RedisServer(*options, directory=tmp_path / f"redis-{len(servers)}",
                             port=port, client_options=client_options)
        servers.append(server)
        if start:
            server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


# ---------------------------------------------------------------------------- Postgres


@functools.cache
def _pg_bin() -> Path:
    """Directory of the local Postgres server binaries (initdb, pg_ctl)."""
    return Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                               check=True).stdout.strip())


class PostgresServer(Server):
    """A private cluster (initdb + pg_ctl) on a free loopback port, for tests that crash it.

    Entering the block runs initdb (superuser `postgres`, trust); `data` may then be edited
    (certificates, pg_hba.conf) before `start()`. `config`: server settings given as
    `-c name=value` at every start, over postgresql.conf. Runs as `postgres` when the tests
    run as root. An immediate stop (`crash`) skips the shutdown checkpoint, so the next
    `start` runs crash recovery, which empties every UNLOGGED table: exactly what happens
    to `orders_staging` when a real server dies. The server's Unix socket is in `data`.
    """

    name = "postgres"

    def __init__(self, config: Mapping[str, str] | None = None,
                 directory: Path | None = None, port: int | None = None) -> None:
        super().__init__(directory, port, as_service_user=True)
        self.data = self.directory / "data"
        self.config = {"listen_addresses": HOST, "max_connections": "50",
                       "unix_socket_directories": str(self.data), **(config or {})}

    def __enter__(self) -> Self:
        try:
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                              "--no-sync")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _run(self, program: str, *args: str, check: bool = True) -> None:
        """Run a Postgres server program (initdb, pg_ctl); when `check`, AssertionError with
        its output and the server log's tail if it fails."""
        done = subprocess.run([*self.run_as, str(_pg_bin() / program), *args],
                              capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise self.fail(f"{program} {' '.join(args)} exited with {done.returncode}:\n"
                            f"{done.stdout}{done.stderr}")

    def start(self) -> None:
        """Start the cluster and wait until it accepts connections (crash recovery included)."""
        options = " ".join(["-p", str(self.port), *(
            f"-c {shlex.quote(f'{name}={value}')}" for name, value in self.config.items())])
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
                          "-w", "-t", "60", "start")

    def crash(self) -> None:
        """Immediate shutdown: no checkpoint, crash recovery at the next start."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        """Fast shutdown; a no-op when the cluster is not running (or was never made)."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop",
                              check=False)


@contextmanager
def crashable_postgres(settings: Settings, rconn: redis.Redis
                       ) -> Iterator[tuple[Settings, PostgresServer]]:
    """`settings` moved onto a private Postgres cluster the test may crash at will.

    Database `orders` with the schema applied, PgBouncer off, the lookup cache loaded under
    the test's key prefix; the cluster is stopped and deleted at the end.
    """
    with PostgresServer() as server:
        server.start()
        own = dataclasses.replace(settings, postgres=dataclasses.replace(
            settings.postgres, port=server.port, use_pgbouncer=False, dbname="orders"))
        try:
            ensure_database(own.postgres)
            with pg_connect(own.postgres) as conn:
                apply_schema(conn)
                LookupCache(rconn, RedisKeys(own.redis.key_prefix), 3600).load_snapshot(conn)
            yield own, server
        finally:
            close_all()


# ---------------------------------------------------------------------------- PgBouncer


class PgBouncer(ForegroundServer):
    """A private `pgbouncer` on 127.0.0.1 (no Unix socket), logging to `log` (stderr).

    `databases`: the `[databases]` section (name -> connection string, `*` for any).
    `settings`: more of the `[pgbouncer]` section (auth, pool mode, TLS). Files they name
    (auth_file, certificates) go into `directory` before `start()`, handed over with
    `give_to_service_user`. PgBouncer refuses to run as root: under root it drops to
    `postgres`, which must be able to read them.
    """

    name = "pgbouncer"

    def __init__(self, databases: Mapping[str, str], settings: Mapping[str, str],
                 directory: Path | None = None, port: int | None = None) -> None:
        super().__init__(directory, port, as_service_user=True)
        self.databases = dict(databases)
        self.settings = {"listen_addr": HOST, "listen_port": str(self.port),
                         "unix_socket_dir": "", **settings}
        if self._as_service_user:
            self.settings["user"] = SERVICE_USER

    def command(self) -> list[str]:
        ini = self.directory / "pgbouncer.ini"
        sections = {"databases": self.databases, "pgbouncer": self.settings}
        ini.write_text("".join(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in
                                                           entries.items()) + "\n"
                               for section, entries in sections.items()))
        self.give_to_service_user(ini)
        return [shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", str(ini)]



# ---------------------------------------------------------------------------- Redis Cluster

CLUSTER_READY_TIMEOUT_SECONDS = 60
CLUSTER_POLL_SECONDS = 0.05


class Probed(Protocol):
    """A throwaway server a test asks questions: RedisServer or SentinelServer."""

    def client(self) -> redis.Redis: ...


@contextmanager
def probing(server: Probed) -> Iterator[redis.Redis]:
    """A client of `server` (no retries) for a question or two, closed afterwards."""
    client = server.client()
    try:
        yield client
    finally:
        client.close()


def _text(reply: bytes | str) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


@dataclasses.dataclass(frozen=True)
class ClusterNodeView:
    """One line of a node's CLUSTER NODES: a node as that node sees it."""
    node_id: str
    port: int
    flags: frozenset[str]
    slots: frozenset[int]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags and "fail" not in self.flags


def _slot_ranges(fields: list[str]) -> frozenset[int]:
    """Slots of CLUSTER NODES' trailing fields ("0-5460", "5461"; "[slot->-id]" migration
    markers are not ownership and are skipped)."""
    slots: set[int] = set()
    for field in fields:
        if not field.startswith("["):
            low, _, high = field.partition("-")
            slots.update(range(int(low), int(high or low) + 1))
    return frozenset(slots)


class RedisCluster:
    """A throwaway Redis Cluster on 127.0.0.1: `masters` masters with `replicas` replicas each.

    Every node is a RedisServer (no persistence: `--save "" --appendonly no`) with
    `--cluster-enabled yes` and its own bus port, in its own directory under `directory`
    (kept for the logs); the cluster is created with `redis-cli --cluster create ...
    --cluster-replicas N --cluster-yes`, and `start()` returns once it is `settled()`. A
    context manager: leaving the block stops every node.

    For tests: `owner(slot)` (the master serving a slot), `non_owner(slot)` (a master that
    does not: a client asking it is answered MOVED), `replicas_of(master)`, `failover(slot)`
    (CLUSTER FAILOVER on a replica of the slot's master), `migrate_slot` (the documented
    resharding steps, slowly enough for clients to meet ASK and TRYAGAIN), `redirections()`
    (how often the nodes answered MOVED, ASK, TRYAGAIN), `keys_per_master()`.
    """

    def __init__(self, directory: Path, masters: int = 3, replicas: int = 1,
                 node_timeout_ms: int = 5000) -> None:
        self.masters = masters
        count = masters * (1 + replicas)
        self.replicas = replicas
        # The bus port is given: by default it is the port + 10000, which a free port above
        # 55535 does not have.
        ports = free_ports(2 * count)
        self.nodes = [
            RedisServer("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", str(node_timeout_ms),
                        "--cluster-port", str(ports[count + i]),
                        directory=directory / f"node-{i}", port=ports[i])
            for i in range(count)]

    def node(self, port: int) -> RedisServer:
        """The node listening on `port`."""
        return next(node for node in self.nodes if node.port == port)

    def start(self) -> None:
        """Start every node, create the cluster and wait until it is settled."""
        for node in self.nodes:
            node.start()
        binary = shutil.which("redis-cli")
        if binary is None:
            pytest.fail("redis-cli is not installed")
        created = subprocess.run(
            [binary, "--cluster", "create", *(f"{HOST}:{node.port}" for node in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=CLUSTER_READY_TIMEOUT_SECONDS)
        if created.returncode != 0:
            raise AssertionError(f"redis-cli --cluster create exited with "
                                 f"{created.returncode}:\n{created.stdout}{created.stderr}")
        self.wait_until_settled("the new cluster")

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL); a no-op for nodes not running."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    # -- what the nodes say

    def view(self, server: RedisServer) -> list[ClusterNodeView]:
        """Every node as `server` sees it (its CLUSTER NODES)."""
        with probing(server) as probe:
            text = _text(probe.execute_command("CLUSTER", "NODES"))
        nodes = []
        for line in text.splitlines():
            fields = line.split()
            nodes.append(ClusterNodeView(
                node_id=fields[0], port=int(fields[1].split("@")[0].rsplit(":", 1)[1]),
                flags=frozenset(fields[2].split(",")), slots=_slot_ranges(fields[8:])))
        return nodes

    def info(self, server: RedisServer) -> dict[str, str]:
        """CLUSTER INFO of `server` (`cluster_state`: ok or fail, ...)."""
        with probing(server) as probe:
            text = _text(probe.execute_command("CLUSTER", "INFO"))
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def node_id(self, server: RedisServer) -> str:
        """The cluster node id of `server` (CLUSTER MYID)."""
        with probing(server) as probe:
            return _text(probe.execute_command("CLUSTER", "MYID"))

    def role(self, server: RedisServer) -> tuple[str, int | None]:
        """("master", None), or ("slave", the port of its master), from ROLE."""
        with probing(server) as probe:
            reply = probe.execute_command("ROLE")
        kind = _text(reply[0])
        return (kind, int(reply[2])) if kind == "slave" else (kind, None)

    def owner(self, slot: int) -> RedisServer:
        """The master that serves `slot`, by its own account."""
        for server in self.nodes:
            me = next(n for n in self.view(server) if "myself" in n.flags)
            if me.is_master and slot in me.slots:
                return server
        raise AssertionError(f"no master serves slot {slot}")

    def masters_now(self) -> list[RedisServer]:
        """The nodes that are masters now (ROLE)."""
        return [server for server in self.nodes if self.role(server)[0] == "master"]

    def non_owner(self, slot: int) -> RedisServer:
        """A master that does not serve `slot`: a client asking it for a key of the slot is
        answered MOVED."""
        owner = self.owner(slot)
        return next(server for server in self.masters_now() if server is not owner)

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        """The nodes replicating from `master` whose link to it is up."""
        found = []
        for server in self.nodes:
            if self.role(server) == ("slave", master.port):
                with probing(server) as probe:
                    if probe.info("replication").get("master_link_status") == "up":
                        found.append(server)
        return found

    def settled(self) -> bool:
        """Every node says cluster_state:ok, knows every node, none failing, and has the same
        map of who serves which slot, covering all of them; there are `masters` masters and
        every other node replicates from one with its link up."""
        maps = []
        for server in self.nodes:
            info = self.info(server)
            if (info.get("cluster_state") != "ok"
                    or info.get("cluster_known_nodes") != str(len(self.nodes))
                    or info.get("cluster_slots_assigned") != str(CLUSTER_SLOTS)):
                return False
            view = self.view(server)
            if any("fail" in n.flags or "fail?" in n.flags for n in view):
                return False
            maps.append({n.node_id: n.slots for n in view if n.slots})
        if any(m != maps[0] for m in maps):
            return False
        masters = self.masters_now()
        replicas = sum(len(self.replicas_of(master)) for master in masters)
        return len(masters) == self.masters and replicas == len(self.nodes) - len(masters)

    def wait_until_settled(self, what: str,
                           timeout: float = CLUSTER_READY_TIMEOUT_SECONDS) -> None:
        """Return once `settled()`; AssertionError naming `what` with the nodes' log tails."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(redis.ConnectionError, redis.ResponseError):
                if self.settled():
                    return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what}: the cluster did not settle within {timeout:.0f} s\n" + "\n".join(
                        f"--- node {n.port} ---\n{n.log_tail()[-800:]}" for n in self.nodes))
            time.sleep(CLUSTER_POLL_SECONDS)

    def redirections(self) -> dict[str, int]:
        """How often the nodes answered MOVED, ASK, TRYAGAIN or CLUSTERDOWN since they
        started (INFO errorstats, summed over every node)."""
        totals: dict[str, int] = {}
        for server in self.nodes:
            with probing(server) as probe:
                stats = probe.info("errorstats")
            for name, value in stats.items():
                kind = name.removeprefix("errorstat_")
                if kind in ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"):
                    totals[kind] = totals.get(kind, 0) + int(value["count"])
        return totals

    def keys_per_master(self) -> dict[int, int]:
        """Master port -> DBSIZE: where the cluster keeps its keys."""
        counts = {}
        for master in self.masters_now():
            with probing(master) as probe:
                counts[master.port] = int(probe.dbsize())
        return counts

    # -- changes a test makes

    def failover(self, slot: int) -> RedisServer:
        """Promote a replica of `slot`'s master with CLUSTER FAILOVER (the coordinated manual
        failover: the master stops its clients, the replica catches up and takes over, the
        old master becomes its replica and answers MOVED); returns the new master once the
        cluster settled."""
        replica = self.replicas_of(self.owner(slot))[0]
        with probing(replica) as probe:
            probe.execute_command("CLUSTER", "FAILOVER")
        self.wait_until_settled(f"failover of slot {slot} to node {replica.port}")
        assert self.owner(slot) is replica
        return replica

    def migrate_slot(self, slot: int, to: RedisServer, *, keys_per_step: int = 100,
                     pause_seconds: float = 0.0) -> int:
        """Move `slot` to the master `to` as `redis-cli --cluster reshard` does.

        CLUSTER SETSLOT IMPORTING on `to`, MIGRATING on the owner; then MIGRATE the slot's
        keys `keys_per_step` at a time (sleeping `pause_seconds` between steps, so that clients
        meet the slot half-moved: ASK for keys gone, TRYAGAIN for commands whose keys are
        split); last SETSLOT NODE on `to`, the old owner and every other master. Returns how
        many keys moved, once the cluster settled.
        """
        source = self.owner(slot)
        assert source is not to, f"node {to.port} serves slot {slot} already"
        source_id, target_id = self.node_id(source), self.node_id(to)
        moved = 0
        with probing(source) as src, probing(to) as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, keys_per_step):
                src.execute_command("MIGRATE", HOST, to.port, "", 0, 10_000, "KEYS", *keys)
                moved += len(keys)
                time.sleep(pause_seconds)
            dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for master in self.masters_now():
            if master not in (source, to):
                with probing(master) as probe:
                    probe.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.wait_until_settled(f"migration of slot {slot} to node {to.port}")
        assert self.owner(slot) is to
        return moved


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A started RedisCluster (3 masters, 3 replicas) under tmp_path; stopped at the end of the
    test, whatever happened."""
    with RedisCluster(tmp_path / "redis-cluster") as cluster:
        cluster.start()
        yield cluster


# ---------------------------------------------------------------------------- Redis Sentinel


class SentinelServer(ForegroundServer):
    """A private Redis Sentinel (`redis-server sentinel.conf --sentinel`) on 127.0.0.1 that
    monitors `master_name` at `master_port` with quorum `quorum`, declaring it down after
    `down_after_ms` and giving a failover `failover_timeout_ms`. It rewrites its own
    sentinel.conf in `directory` as it learns replicas, peers and failovers."""

    name = "sentinel"

    def __init__(self, master_name: str, master_port: int, *, quorum: int = 1,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 5000,
                 directory: Path | None = None, port: int | None = None) -> None:
        super().__init__(directory, port)
        self.master_name = master_name
        self.master_port = master_port
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    def command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed")
        conf = self.directory / "sentinel.conf"
        if not conf.exists():  # a restart keeps what the Sentinel wrote
            name = self.master_name
            conf.write_text("\n".join([
                f"port {self.port}", f"bind {HOST}", f"dir {self.directory}",
                f"sentinel monitor {name} {HOST} {self.master_port} {self.quorum}",
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {name} 1", ""]))
        return [binary, str(conf), "--sentinel"]

    def client(self) -> redis.Redis:
        """A client of the Sentinel itself (SENTINEL commands), without retries."""
        return redis.Redis(host=HOST, port=self.port, socket_timeout=10,
                           retry=Retry(NoBackoff(), 0), retry_on_error=[])

    def answers(self) -> bool:
        with probing(self) as probe:
            try:
                return bool(probe.ping())
            except redis.ConnectionError:
                return False


class RedisSentinelGroup:
    """A throwaway master with `replicas` replicas and `sentinels` Sentinels on 127.0.0.1.

    The master is monitored as `master_name` with quorum 1, down after `down_after_ms` (1 s);
    `options` go to every data node (the master and the replicas, which may become masters),
    e.g. `--min-replicas-to-write 1`. `start()` returns once the group is `settled()`.
    `failover()` runs SENTINEL FAILOVER and waits until the Sentinels name the new master to
    clients. A context manager: leaving the block stops everything; every directory is under
    `directory` (kept for the logs).
    """

    def __init__(self, directory: Path, *options: str, master_name: str = "mymaster",
                 replicas: int = 1, sentinels: int = 2, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 5000) -> None:
        self.master_name = master_name
        self.master = RedisServer(*options, directory=directory / "node-0")
        self.replicas = [RedisServer(*options, "--replicaof", HOST, str(self.master.port),
                                     directory=directory / f"node-{i + 1}")
                         for i in range(replicas)]
        self.sentinels = [SentinelServer(master_name, self.master.port,
                                         down_after_ms=down_after_ms,
                                         failover_timeout_ms=failover_timeout_ms,
                                         directory=directory / f"sentinel-{i}")
                          for i in range(sentinels)]

    @property
    def data_nodes(self) -> list[RedisServer]:
        return [self.master, *self.replicas]

    @property
    def sentinel_hosts(self) -> str:
        """REDIS_SENTINEL_HOSTS for this group: `127.0.0.1:port,...`."""
        return ",".join(f"{HOST}:{s.port}" for s in self.sentinels)

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.data_nodes if node.port == port)

    def start(self) -> None:
        for server in [*self.data_nodes, *self.sentinels]:
            server.start()
        self.wait_until_settled("the new group")

    def stop(self) -> None:
        for server in [*self.sentinels, *self.data_nodes]:
            server.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def master_port(self, sentinel: SentinelServer | None = None) -> int:
        """The master's port as a Sentinel (the first by default) names it to clients that
        ask SENTINEL MASTERS, as redis-py does (GET-MASTER-ADDR-BY-NAME names a promoted
        replica earlier, while the failover still reconfigures the other replicas)."""
        with probing(sentinel or self.sentinels[0]) as probe:
            return int(probe.sentinel_master(self.master_name)["port"])

    def current_master(self) -> RedisServer:
        return self.node(self.master_port())

    def role(self, server: RedisServer) -> tuple[str, int | None, str | None]:
        """("master", None, None), or ("slave", its master's port, "up" or "down": its link)."""
        with probing(server) as probe:
            info = probe.info("replication")
        if info["role"] == "master":
            return "master", None, None
        return "slave", int(info["master_port"]), info.get("master_link_status")

    def settled(self) -> bool:
        """The Sentinels agree on the master, it is one, every other data node replicates
        from it with its link up, and every Sentinel lists each of them as a replica that is
        not down."""
        master_port = self.master_port()
        if any(self.master_port(s) != master_port for s in self.sentinels):
            return False
        if self.role(self.node(master_port))[0] != "master":
            return False
        others = {n.port for n in self.data_nodes} - {master_port}
        if any(self.role(self.node(port)) != ("slave", master_port, "up") for port in others):
            return False
        for sentinel in self.sentinels:
            with probing(sentinel) as probe:
                listed = probe.sentinel_slaves(self.master_name)
            healthy = {int(r["port"]) for r in listed
                       if not r["is_sdown"] and not r["is_disconnected"]
                       and r.get("master-link-status") == "ok"}
            if not others <= healthy:
                return False
        return True

    def wait_until_settled(self, what: str,
                           timeout: float = CLUSTER_READY_TIMEOUT_SECONDS) -> None:
        """Return once `settled()`; AssertionError naming `what` with the servers' log tails."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(redis.ConnectionError, redis.ResponseError):
                if self.settled():
                    return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what}: the Sentinel group did not settle within {timeout:.0f} s\n"
                    + "\n".join(f"--- {s.name} {s.port} ---\n{s.log_tail()[-800:]}"
                                for s in [*self.sentinels, *self.data_nodes]))
            time.sleep(CLUSTER_POLL_SECONDS)

    def failover(self) -> RedisServer:
        """SENTINEL FAILOVER: returns the new master once every Sentinel names it to clients
        and it is a master. The old master is not demoted yet: the Sentinels do that some
        seconds later (`role(old)` then says it replicates from the new one)."""
        old = self.master_port()
        with probing(self.sentinels[0]) as probe:
            probe.execute_command("SENTINEL", "FAILOVER", self.master_name)
        deadline = time.monotonic() + CLUSTER_READY_TIMEOUT_SECONDS
        while True:
            ports = {self.master_port(s) for s in self.sentinels}
            if len(ports) == 1 and old not in ports:
                new = self.node(ports.pop())
                if self.role(new)[0] == "master":
                    return new
            assert time.monotonic() < deadline, "the Sentinels named no new master"
            time.sleep(CLUSTER_POLL_SECONDS)


class SentinelGroupFactory(Protocol):
    """What `redis_sentinel_groups` yields: makes and starts a RedisSentinelGroup (options for
    its data nodes, its number of replicas and Sentinels)."""

    def __call__(self, *options: str, replicas: int = 1,
                 sentinels: int = 2) -> RedisSentinelGroup: ...


@pytest.fixture
def redis_sentinel_groups(tmp_path: Path) -> Iterator[SentinelGroupFactory]:
    """Start RedisSentinelGroups (default: a master, one replica, two Sentinels) under
    tmp_path; every one is stopped at the end of the test, whatever happened."""
    groups: list[RedisSentinelGroup] = []

    def make(*options: str, replicas: int = 1, sentinels: int = 2) -> RedisSentinelGroup:
        group = RedisSentinelGroup(tmp_path / f"redis-sentinel-{len(groups)}", *options,
                                   replicas=replicas, sentinels=sentinels)
        groups.append(group)
        group.start()
        return group

    try:
        yield make
    finally:
        for group in groups:
            group.stop()

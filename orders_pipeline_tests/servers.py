"""Throwaway servers for the tests that crash, restart or reconfigure one.

The shared Postgres, Redis and PgBouncer (`bash .ci/services`) are never touched: a test that
needs to kill a server, fill its memory, or turn on TLS or passwords starts its own here, on a
free loopback port, in a directory of its own.

- `free_port()`: a TCP port nobody listens on right now.
- `PostgresServer`: a private cluster (initdb + pg_ctl), which may be crashed and restarted;
  `crashable_postgres` puts a test's settings on one, schema applied.
- `RedisServer`: a private `redis-server`, which may be SIGKILLed and restarted on its port
  and data directory; the `redis_servers` fixture starts them and stops them all at the end.
- `PgBouncer`: a private `pgbouncer` in front of a Postgres of the test's choice.

Every server is a context manager: leaving the block stops it and removes its directory
when the server made that directory itself. A server that does not come up fails the test
with the tail of its log.
"""

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


"""Secrets and transport security against real, throwaway servers.

Every server here is the test's own (redis-server, initdb + pg_ctl, pgbouncer on free
ports); the shared Redis, Postgres and PgBouncer are never reconfigured. Certificates come
from a private CA made with `openssl` for 127.0.0.1, so verification is always on and
must succeed for the right CA and fail without it.
"""

import dataclasses
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import redis
import yaml
from pydantic import SecretStr

from orders_pipeline import pipeline
from orders_pipeline.connections import close_all, pg_connect, pg_pool, redis_client
from orders_pipeline.postgres_patterns.schema import apply_schema, ensure_database
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.resources import resources_from_env
from orders_pipeline.settings import PostgresSettings, RedisSettings, Settings
from orders_pipeline_tests.helpers import REPO, assert_exactly_once, pipeline_env, push_orders
from orders_pipeline_tests.servers import (
    PgBouncer,
    PostgresServer,
    RedisFactory,
    free_port,
)

REDIS_PASSWORD = "redis-S3cret-7f1"
PG_PASSWORD = "pg-S3cret-9c2"
WRONG_PASSWORD = "not-the-Passw0rd-4d8"
SECRETS = (REDIS_PASSWORD, PG_PASSWORD, WRONG_PASSWORD)


# ---------------------------------------------------------------------------- helpers


@dataclasses.dataclass(frozen=True)
class Pki:
    """A private CA, a server certificate it signed for 127.0.0.1, and an unrelated CA."""

    ca: Path
    cert: Path
    key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             f"/CN=orders_pipeline test {name}", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    _make_ca(directory, "ca")
    _make_ca(directory, "other-ca")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "server.key", "-out", "server.csr", cwd=directory)
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.pem",
             cwd=directory)
    return Pki(ca=directory / "ca.pem", cert=directory / "server.pem",
               key=directory / "server.key", other_ca=directory / "other-ca.pem")


def run_cli(env: dict[str, str], cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess, from a directory without a `.env`."""
    return subprocess.run([sys.executable, "-m", "orders_pipeline", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI failed with exactly one line on stderr, which names no secret."""
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("orders-pipeline: error: "), result.stderr
    for secret in SECRETS:
        assert secret not in result.stderr + result.stdout
    return lines[0]


def push_and_claim(client: redis.Redis, prefix: str) -> None:
    """A small real pipeline step: push a batch onto the queue and claim it back."""
    queue = OrderQueue(client, RedisKeys(prefix))
    queue.push_batch([b'{"order_id": "a"}', b'{"order_id": "b"}'])
    claimed = queue.claim_batch(10, "security-test")
    assert claimed is not None
    assert sorted(claimed.payloads) == [b'{"order_id": "a"}', b'{"order_id": "b"}']
    assert queue.depth() == 0 and queue.in_flight_orders() == 2


# ---------------------------------------------------------------------------- Redis


def test_redis_acl_user(settings: Settings, redis_servers: RedisFactory, tmp_path: Path) -> None:
    server = redis_servers("--user", "default", "off",
                           "--user", "app", "on", f">{REDIS_PASSWORD}", "~*", "&*", "+@all",
                           client_options={"username": "app", "password": REDIS_PASSWORD})
    port = server.port
    acl = dataclasses.replace(settings.redis, port=port, username="app",
                              password=REDIS_PASSWORD)
    client = redis_client(acl)
    assert client.acl_whoami() == "app"
    push_and_claim(client, acl.key_prefix)

    env = pipeline_env(dataclasses.replace(settings, redis=acl))
    ok = run_cli(env, tmp_path, "stats", "--json")
    assert ok.returncode == 0, ok.stderr
    assert "queue_depth" in ok.stdout

    wrong = one_error_line(run_cli({**env, "REDIS_PASSWORD": WRONG_PASSWORD}, tmp_path,
                                   "stats"))
    assert f"wrong Redis password for user 'app' at 127.0.0.1:{port}" in wrong
    # The default user is off: no username means no way in, whatever the password.
    default = one_error_line(run_cli({**env, "REDIS_USERNAME": ""}, tmp_path, "stats"))
    assert "wrong Redis password for default user" in default


@pytest.fixture(scope="module")
def redis_has_tls() -> None:
    """Skip when redis-server was built without TLS: such builds reject the tls-* directives.

    The probe fails on purpose at its second directive, so it exits at once either way; only
    the directive it names tells the two builds apart.
    """
    probe = subprocess.run(["redis-server", "--tls-port", "0", "--no-such-directive", "x"],
                           capture_output=True, text=True, timeout=30)
    output = probe.stdout + probe.stderr
    if "no-such-directive" not in output:
        pytest.skip(f"redis-server on this machine was built without TLS: {output.strip()}")


@pytest.fixture
def tls_redis(redis_has_tls: None, pki: Pki, redis_servers: RedisFactory) -> int:
    """A TLS-only redis-server (plain port 0) on 127.0.0.1 and 127.0.0.2; returns its port."""
    port = free_port()
    redis_servers("--bind", "127.0.0.1", "127.0.0.2", "--port", "0", "--tls-port", str(port),
                  "--tls-cert-file", str(pki.cert), "--tls-key-file", str(pki.key),
                  "--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "no",
                  port=port, client_options={"ssl": True, "ssl_ca_certs": str(pki.ca)})
    return port


def test_redis_tls_verifies_the_server(settings: Settings, pki: Pki, tls_redis: int,
                                       tmp_path: Path) -> None:
    port = tls_redis
    tls = dataclasses.replace(settings.redis, port=port, ssl=True, ssl_ca_certs=str(pki.ca))
    client = redis_client(tls)
    push_and_claim(client, tls.key_prefix)
    with pytest.raises(redis.ConnectionError):  # nothing is served without TLS
        redis.Redis(port=port, socket_timeout=5, retry=None).ping()

    env = pipeline_env(dataclasses.replace(settings, redis=tls))
    ok = run_cli(env, tmp_path, "stats", "--json")
    assert ok.returncode == 0, ok.stderr

    # Without our CA the system store is used, which does not trust it: refused.
    with pytest.raises(redis.ConnectionError) as refused:
        redis_client(dataclasses.replace(tls, ssl_ca_certs=None)).ping()
    assert isinstance(refused.value.__context__, ssl.SSLCertVerificationError)
    line = one_error_line(run_cli({**env, "REDIS_SSL_CA_CERTS": ""}, tmp_path, "stats"))
    assert f"TLS certificate of Redis at 127.0.0.1:{port} failed verification" in line
    assert "REDIS_SSL_CA_CERTS" in line
    # A CA that did not sign the certificate is no better.
    line = one_error_line(run_cli({**env, "REDIS_SSL_CA_CERTS": str(pki.other_ca)},
                                  tmp_path, "stats"))
    assert "failed verification" in line
    # A CA file that is not there is a configuration error, caught before connecting.
    line = one_error_line(run_cli({**env, "REDIS_SSL_CA_CERTS": str(tmp_path / "nope.pem")},
                                  tmp_path, "stats"))
    assert "bad configuration: REDIS_SSL_CA_CERTS: no such file" in line


def test_redis_tls_checks_the_host_name(pki: Pki, tls_redis: int) -> None:
    """The certificate names 127.0.0.1 and localhost; the right CA alone is not enough."""
    tls = RedisSettings(port=tls_redis, ssl=True, ssl_ca_certs=str(pki.ca))
    assert redis_client(dataclasses.replace(tls, host="localhost")).ping()
    with pytest.raises(redis.ConnectionError) as refused:
        redis_client(dataclasses.replace(tls, host="127.0.0.2")).ping()
    cause = refused.value.__context__
    assert isinstance(cause, ssl.SSLCertVerificationError)
    assert "IP address mismatch" in cause.verify_message


# ---------------------------------------------------------------------------- Postgres


@dataclasses.dataclass(frozen=True)
class SecurePostgres:
    """A private cluster serving TCP only over TLS, with SCRAM logins for the role `app`."""

    server: PostgresServer
    admin: PostgresSettings  # superuser over the cluster's Unix socket (trust)
    app: PostgresSettings  # `app` over TCP, sslmode=verify-full, database `orders`


@pytest.fixture(scope="module")
def secure_postgres(pki: Pki) -> Iterator[SecurePostgres]:
    tls = {"ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key",
           "password_encryption": "scram-sha-256"}
    with PostgresServer(tls) as server:
        data = server.data
        for source, name in ((pki.cert, "server.crt"), (pki.key, "server.key")):
            shutil.copy(source, data / name)
            (data / name).chmod(0o600)  # Postgres refuses a key that others can read
            server.give_to_service_user(data / name)
        # Superuser only through the socket; over TCP only TLS and SCRAM, nothing in clear.
        (data / "pg_hba.conf").write_text(
            "local   all  postgres                trust\n"
            "hostssl all  all       127.0.0.1/32  scram-sha-256\n")
        server.start()
        try:
            admin = PostgresSettings(host=str(data), port=server.port, user="postgres",
                                     dbname="postgres")
            with pg_connect(admin) as conn:
                conn.autocommit = True
                conn.execute(f"CREATE ROLE app LOGIN CREATEDB PASSWORD '{PG_PASSWORD}'")
                conn.execute("CREATE DATABASE orders OWNER app")
            app = PostgresSettings(host="127.0.0.1", port=server.port, user="app",
                                   password=PG_PASSWORD, dbname="orders",
                                   sslmode="verify-full", sslrootcert=str(pki.ca))
            with pg_connect(app) as conn:
                apply_schema(conn)
            yield SecurePostgres(server=server, admin=admin, app=app)
        finally:
            close_all()


def _ssl_in_use(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                        ).fetchone()[0]


def test_postgres_verify_full_over_tls(secure_postgres: SecurePostgres, pki: Pki) -> None:
    app = secure_postgres.app
    with pg_connect(app) as conn:
        assert _ssl_in_use(conn) and conn.pgconn.ssl_in_use  # as the server and libpq see it
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        pg_connect(dataclasses.replace(app, sslrootcert=str(pki.other_ca)))
    # verify-full also checks the name: same address, a name the certificate does not have.
    with pytest.raises(psycopg.OperationalError, match="does not match host name"):
        psycopg.connect(**{**app.conninfo(), "host": "db.example.invalid",
                           "hostaddr": "127.0.0.1"})
    # The hostssl-only pg_hba.conf has no line for connections without TLS.
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        pg_connect(dataclasses.replace(app, sslmode="disable"))


def test_postgres_tls_through_the_cli(secure_postgres: SecurePostgres, pki: Pki,
                                      settings: Settings, tmp_path: Path) -> None:
    env = pipeline_env(dataclasses.replace(settings, postgres=secure_postgres.app))
    assert env["POSTGRES_SSLMODE"] == "verify-full" and env["POSTGRES_SSLROOTCERT"]
    ok = run_cli(env, tmp_path, "stats", "--json")
    assert ok.returncode == 0, ok.stderr
    port = secure_postgres.server.port

    line = one_error_line(run_cli({**env, "POSTGRES_PASSWORD": WRONG_PASSWORD}, tmp_path,
                                  "stats"))
    assert f"password authentication failed for user 'app' (Postgres at 127.0.0.1:{port})" \
        in line
    line = one_error_line(run_cli({**env, "POSTGRES_SSLMODE": "disable"}, tmp_path, "stats"))
    assert "no encryption" in line
    line = one_error_line(run_cli({**env, "POSTGRES_SSLROOTCERT": str(pki.other_ca)},
                                  tmp_path, "stats"))
    assert "certificate verify failed" in line
    line = one_error_line(run_cli({**env, "POSTGRES_SSLMODE": "verify-everything"}, tmp_path,
                                  "stats"))
    assert "bad configuration: POSTGRES_SSLMODE must be one of" in line


# ---------------------------------------------------------------------------- PgBouncer


@contextmanager
def scram_pgbouncer(secure: SecurePostgres, pki: Pki) -> Iterator[int]:
    """A private PgBouncer (transaction pool, SCRAM, TLS on both sides); yields its port.

    Its files (user list, certificates) are named relative to its directory, where it runs.
    """
    with pg_connect(secure.admin) as conn:
        secret = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'"
                              ).fetchone()[0]
    assert secret.startswith("SCRAM-SHA-256$")
    settings = {
        "auth_type": "scram-sha-256", "auth_file": "userlist.txt", "pool_mode": "transaction",
        "server_reset_query": "", "ignore_startup_parameters": "extra_float_digits",
        "client_tls_sslmode": "require", "client_tls_cert_file": pki.cert.name,
        "client_tls_key_file": pki.key.name, "server_tls_sslmode": "verify-full",
        "server_tls_ca_file": pki.ca.name}
    with PgBouncer({"*": f"host=127.0.0.1 port={secure.server.port}"}, settings) as bouncer:
        # The SCRAM secret, not the password: PgBouncer checks clients with it and, having
        # done so, logs in to Postgres as them.
        root = bouncer.directory
        (root / "userlist.txt").write_text(f'"app" "{secret}"\n')
        for source in (pki.ca, pki.cert, pki.key):
            shutil.copy(source, root / source.name)
        (root / pki.key.name).chmod(0o600)
        bouncer.give_to_service_user(*root.iterdir())
        bouncer.start()
        yield bouncer.port


def test_pgbouncer_scram_and_tls_for_the_workers(secure_postgres: SecurePostgres, pki: Pki,
                                                 settings: Settings, rconn: redis.Redis,
                                                 test_id: str) -> None:
    with scram_pgbouncer(secure_postgres, pki) as bouncer_port:
        own = dataclasses.replace(settings, postgres=dataclasses.replace(
            secure_postgres.app, dbname=f"op_bouncer_{test_id}", pgbouncer_port=bouncer_port,
            use_pgbouncer=True))
        ensure_database(own.postgres)
        with pg_connect(own.postgres) as pg:
            pg.autocommit = True
            apply_schema(pg)
            LookupCache(rconn, RedisKeys(own.redis.key_prefix), 3600).load_snapshot(pg)
            payloads, _ = push_orders(own, rconn, pg, 3000, batch_size=1000, duplicates=0.05,
                                      invalid=0.02)

        # The real worker path: COPY into orders_staging, then promotion, all through the
        # transaction pool, whose own logins to Postgres are TLS + SCRAM as well.
        pool = pg_pool(own.postgres)
        assert pool.kwargs["port"] == bouncer_port
        with pool.connection() as conn:
            assert _ssl_in_use(conn)  # PgBouncer -> Postgres
            assert conn.execute("SHOW port").fetchone()[0] == str(secure_postgres.server.port)
        staged = pipeline.stage_queue(own, workers=1, batch_size=1000)
        assert staged.staged > 0
        pipeline.promote_staged(own)
        with pg_connect(own.postgres) as pg:
            pg.autocommit = True
            assert_exactly_once(own, rconn, pg, payloads)

        bouncer = own.postgres.conninfo(via_pgbouncer=True)
        with pytest.raises(psycopg.OperationalError, match="SASL authentication failed"):
            psycopg.connect(**{**bouncer, "password": WRONG_PASSWORD})
        with pytest.raises(psycopg.OperationalError, match="SSL required"):
            psycopg.connect(**{**bouncer, "sslmode": "disable"})
        close_all()


# ---------------------------------------------------------------------------- Dagster UI


def test_secrets_stay_env_vars_and_out_of_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The UI shows a resource's configured values: set secrets must stay EnvVar names."""
    monkeypatch.setenv("REDIS_USERNAME", "app")
    monkeypatch.setenv("REDIS_PASSWORD", REDIS_PASSWORD)
    monkeypatch.setenv("POSTGRES_PASSWORD", PG_PASSWORD)
    resources = resources_from_env()
    for name, variable in (("redis", "REDIS_PASSWORD"), ("postgres", "POSTGRES_PASSWORD")):
        password = resources[name].password
        assert isinstance(password, dg.EnvVar) and password.env_var_name == variable
    settings = Settings.from_env()
    assert settings.redis.password is not None and settings.postgres.password is not None
    assert (settings.redis.password.get_secret_value(),
            settings.postgres.password.get_secret_value()) == (REDIS_PASSWORD, PG_PASSWORD)
    # What runs see: the EnvVars resolved, still without the secret in repr().
    with dg.build_resources(resources) as built:
        resolved = [built.redis, built.postgres, built.redis.settings(),
                    built.postgres.settings()]
        assert built.redis.settings().password == SecretStr(REDIS_PASSWORD)
    shown = [*resources.values(), *resolved, settings, settings.redis, settings.postgres,
             redis_client(settings.redis)]
    for text in [repr(o) for o in shown] + [str(o) for o in shown]:
        for secret in SECRETS:
            assert secret not in text, text


# ---------------------------------------------------------------------------- docker-compose


def test_docker_compose_is_locked_down() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    ports = [p for s in services.values() for p in s.get("ports", [])]
    assert ports and all(str(p).startswith("127.0.0.1:") for p in ports), ports

    # Passwords only come from the environment, and compose refuses to start without them.
    for variable in ("POSTGRES_PASSWORD", "REDIS_PASSWORD"):
        uses = re.findall(r"\$\{" + variable + r"([^}]*)\}", text)
        assert uses and all(u.startswith(":?") for u in uses), (variable, uses)
    for service in services.values():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key:
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), (key, value)
    assert not re.search(r"--requirepass|password\s*[:=]\s*['\"]?\w", text, re.IGNORECASE)

    redis_command = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis_command
    assert "$$REDIS_PASSWORD" in redis_command  # read by the container's shell, not compose
    assert services["pgbouncer"]["environment"]["AUTH_TYPE"] == "scram-sha-256"
    assert services["pgbouncer"]["environment"]["POOL_MODE"] == "transaction"
    assert services["postgres"]["environment"]["POSTGRES_HOST_AUTH_METHOD"] == "scram-sha-256"

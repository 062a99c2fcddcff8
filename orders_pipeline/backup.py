"""Back up a deployment and restore it onto empty servers: the restore drill.

`backup(settings, directory)` writes into a new or empty directory:

- `redis-keys.jsonl`: every key under `{P}:`, one JSON object per line: `key`, `expire_at_ms`
  (absolute expiry by the source Redis clock, null for none) and `dump` (its DUMP payload,
  base64). Portable to any Redis of the same or a newer version, restored key by key with
  RESTORE, under the target's own prefix if that differs.
- `postgres.dump`: `pg_dump --format=custom` of the database (the UNLOGGED staging table's
  rows included), restored with `pg_restore`.
- `manifest.json`, written last (by rename): versions, times, counts, and each file's size
  and SHA-256. A directory without it holds an unfinished backup, and `restore` refuses it.

**One instant for every batch.** A batch moves by a Postgres commit followed by a Redis step
(staged, then marked staged; promoted, then released; quarantined, re-admitted, re-driven).
If a promotion committed after the Postgres snapshot and released its batch before the Redis
copy, the backup would hold its orders nowhere. So the two are taken while no such commit
can happen:

1. the keys of EARLY_FAMILIES (dedup window, lookup snapshot, signal markers, rate window:
   the bulk of the keys) are copied key by key (SCAN, DUMP);
2. the ledger is held still: `LOCK TABLE ... IN SHARE MODE` on LEDGER_TABLES (the batch
   ledger, the re-drive and replay outboxes: every commit paired with a Redis step writes
   one of them) waits for the transactions writing them and makes new writers wait; claims,
   pushes and reads go on;
3. a second transaction exports its snapshot (`pg_export_snapshot`): Postgres as of now;
4. one Lua call copies, atomically, every other key: the queue with its counters and marks,
   the claimed, staged and quarantined batches with their lists, re-drive markers, the
   signal stream, the fan-out stream, and any key a later feature adds
   (`queue_state_keys`, plus what step 1 found outside its families);
5. the ledger is released: staging and promotion waited only for steps 2-4;
6. `pg_dump --snapshot` dumps the database as of step 3 while the pipeline runs on.

With REDIS_SHARDS = K the keys of every shard's space are copied: step 4 is then one Lua call
per shard (a shard's keys share one slot), all while the ledger is held, so each shard's copy
is an instant of its own and `manifest.redis.snapshot_at` is the earliest of them. A restore
needs the same REDIS_SHARDS (each shard's keys go to the same shard under the target prefix).

Between steps 3 and 4 only Redis-only moves happen (claims, pushes, the Redis step of a
commit made before step 2), so every batch is in a state crash recovery already handles:
queued (no trace in Postgres), claimed without a ledger row (reclaimed and staged again),
claimed or staged with ledger `staged` (its staging rows are in the dump: promoted), ledger
`promoted` but not yet released in Redis (released by reconciliation), `lost` (requeued),
quarantined (in both), a re-drive or replay batch pushed but not yet recorded (its marker
says so), pending (pushed by the next promotion). An outbox row of promoted orders relayed
before the copy is in the copied fan-out stream; one still in the dump is relayed again (at
least once, as always). A key of step 1 is as of step 1: a dedup mark is only made by a
batch claimed before it, which step 4 holds or Postgres has promoted; a mark made later is
missing, and then at worst a later copy of that order is staged again and counted as a
promotion conflict, never doubled in `orders`.

Not in a backup: orders pushed after the Redis snapshot (`manifest.redis.snapshot_at`; with
shards, some pushed after the earliest shard's copy may be in it: resend them from their
source, and a copy of one the backup holds is dropped as a duplicate), and Dagster's own
instance storage (runs, sensor cursors). Step 4 blocks Redis for the time it takes to copy
the queue and the batches (bounded by MAX_QUEUE_DEPTH) and this process holds that copy in
memory.

`restore(settings, directory)` checks the manifest and checksums, refuses a target that is
not empty (unless `force`, which drops the database and the prefix's keys first), runs
`pg_restore` and this release's DDL (as `init-db`), RESTOREs the keys, hands every claimed
batch back (its worker is not on these servers), runs `pipeline.reconcile_batches`, records
one completion signal for the orders waiting, and reads the books (`check_conservation`).
"""

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import IO, Literal

import psycopg
import redis
from psycopg import sql
from pydantic import BaseModel, ValidationError

from orders_pipeline.connections import pg_connect, pg_pool, redis_client
from orders_pipeline.conservation import Conservation, check_conservation
from orders_pipeline.faults import crash_point
from orders_pipeline.pipeline import Reconciled, reconcile_batches
from orders_pipeline.postgres_patterns.schema import apply_schema, ensure_database
from orders_pipeline.redis_patterns.keys import RedisKeys, glob_escape, unlink_matching
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.settings import PostgresSettings, Settings

MANIFEST_FILE = "manifest.json"
POSTGRES_FILE = "postgres.dump"
REDIS_FILE = "redis-keys.jsonl"
# 1: one shard; 2: REDIS_SHARDS > 1 (`RedisPart.shards`), which a release reading only
# format 1 refuses instead of restoring every shard's keys into shard 0's names.
FORMAT = 1
SHARDED_FORMAT = 2
# The tables whose commits move a batch: the ledger (staging, promotion, quarantine,
# re-admission) and the re-drive and replay outboxes. A table whose commit is paired with a
# Redis step belongs here; those the database does not have (an older schema) are skipped.
LEDGER_TABLES = ("ingest_batches", "redrive_batches", "replay_batches")
LEDGER_LOCK_TIMEOUT_SECONDS = 30
KEYS_PER_ROUND_TRIP = 500
# Key families (`{P}:<family>...`) safe to copy before the queue state, key by key: the dedup
# window, the lookup snapshot, signal and push markers, the rate window (see the module
# docstring). Every other key is copied atomically with the queue state, a future one too.
EARLY_FAMILIES = frozenset({"claimed", "dedup", "dedupcount", "lookup", "pushed", "signal",
                            "window"})
PG_INSTALL_ROOT = Path("/usr/lib/postgresql")  # Debian's versioned client tools

# KEYS: ingestion, inflight, staged, quarantined, redriven, counters, then the rest of the
# queue state; ARGV[1]: the batch list key prefix `{P}:batch:`.
# -> {time s, time us, queued, claimed, staged, quarantined, batch orders, accepted,
#     then key, pttl, dump for every key that exists}
# Batch lists are found through the sets that name them (with a prefix that is a hash tag,
# they share the slot of KEYS in a Redis Cluster).
_COPY_QUEUE_STATE = """
local t = redis.call('TIME')
local claimed = redis.call('ZRANGE', KEYS[2], 0, -1)
local staged = redis.call('ZRANGE', KEYS[3], 0, -1)
local quarantined = redis.call('SMEMBERS', KEYS[4])
local lists, seen, batch_orders = {}, {}, 0
for _, group in ipairs({claimed, staged, quarantined, redis.call('HKEYS', KEYS[5])}) do
  for _, id in ipairs(group) do
    local key = ARGV[1] .. id
    if not seen[key] then
      seen[key] = true
      lists[#lists + 1] = key
      batch_orders = batch_orders + redis.call('LLEN', key)
    end
  end
end
local out = {t[1], t[2], redis.call('LLEN', KEYS[1]), #claimed, #staged, #quarantined,
             batch_orders, tonumber(redis.call('HGET', KEYS[6], 'accepted') or '0')}
local function copy(key)
  local payload = redis.call('DUMP', key)
  if payload then
    out[#out + 1] = key
    out[#out + 1] = redis.call('PTTL', key)
    out[#out + 1] = payload
  end
end
for _, key in ipairs(KEYS) do copy(key) end
for _, key in ipairs(lists) do copy(key) end
return out
"""


class BackupError(RuntimeError):
    """A backup or restore that cannot go on; the text is one line: what is wrong, what to do."""


class LedgerBusy(BackupError):
    """The ledger could not be held still in time (a long transaction writes it): transient."""


# ---------------------------------------------------------------------------- the manifest


class FileEntry(BaseModel):
    """One file of a backup: its size in bytes and SHA-256 (hex)."""
    bytes: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> "FileEntry":
        with open(path, "rb") as data:
            digest = hashlib.file_digest(data, "sha256").hexdigest()
        return cls(bytes=path.stat().st_size, sha256=digest)


class RedisPart(BaseModel):
    """The Redis side: server, prefix, the instant of the queue-state copy, counts."""
    version: str
    run_id: str
    key_prefix: str
    shards: int = 1  # REDIS_SHARDS of the deployment (backups before sharding: 1)
    # By the Redis clock (with shards, the earliest shard's copy): orders pushed after it may
    # not be in the backup.
    snapshot_at: datetime
    keys: int
    keys_by_family: dict[str, int]  # `{P}:<family>...` -> keys
    queued_orders: int
    claimed_batches: int
    staged_batches: int
    quarantined_batches: int
    batch_orders: int  # orders in the lists of those batches
    accepted: int  # the `accepted` counter at the snapshot


class PostgresPart(BaseModel):
    """The Postgres side: server, database, the exported snapshot, counts as of it."""
    server_version: str
    pg_dump_version: str
    database: str
    snapshot_at: datetime
    ledger_paused_seconds: float  # how long staging and promotion waited for the backup
    orders: int
    rejected: int
    ledger: dict[str, int]  # batches by status


class Manifest(BaseModel):
    """`manifest.json`: what a complete backup holds."""
    format: Literal[1, 2]
    orders_pipeline_version: str
    started_at: datetime
    finished_at: datetime
    seconds: float
    redis: RedisPart
    postgres: PostgresPart
    files: dict[str, FileEntry]


def read_manifest(directory: Path) -> Manifest:
    """The manifest of a complete backup in `directory`, its files checked against it.

    BackupError if the directory or its manifest is missing (an unfinished backup writes
    none), the manifest is not one this release reads, or a file is missing or changed.
    """
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise BackupError(f"no backup directory {str(directory)!r}")
    if not path.is_file():
        raise BackupError(f"{str(directory)!r} holds no {MANIFEST_FILE}: not a complete backup "
                          "(a backup that did not finish writes none); use another backup")
    try:
        manifest = Manifest.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise BackupError(f"{path} is not a manifest of format {FORMAT} or {SHARDED_FORMAT} "
                          f"({where}: {problem['msg']})") from exc
    for name, entry in manifest.files.items():
        file = directory / name
        if not file.is_file():
            raise BackupError(f"backup file {name} is missing from {str(directory)!r}")
        if FileEntry.of(file) != entry:
            raise BackupError(f"backup file {name} in {str(directory)!r} does not match its "
                              "size and SHA-256 in the manifest: it was changed or truncated")
    return manifest


# ---------------------------------------------------------------------------- helpers


def pg_tool(name: str) -> str:
    """Path of a PostgreSQL client program (`pg_dump`, `pg_restore`): on PATH, else the
    newest in Debian's versioned directories; BackupError if neither has it."""
    found = shutil.which(name)
    if found:
        return found
    versions = [path for path in PG_INSTALL_ROOT.glob(f"*/bin/{name}")
                if path.parent.parent.name.isdigit()]
    if versions:
        return str(max(versions, key=lambda path: int(path.parent.parent.name)))
    raise BackupError(f"{name} not found on PATH or in {PG_INSTALL_ROOT}/*/bin: install the "
                      "PostgreSQL client programs (Debian: postgresql-client) of the server's "
                      "major version or newer")


_LIBPQ_ENV = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "dbname": "PGDATABASE",
              "password": "PGPASSWORD", "sslmode": "PGSSLMODE",
              "sslrootcert": "PGSSLROOTCERT", "connect_timeout": "PGCONNECT_TIMEOUT"}


def _run_tool(argv: list[str], pg: PostgresSettings) -> str:
    """Run a libpq client program against Postgres directly (never PgBouncer); the password
    goes in the environment, never on the command line. Returns stdout; BackupError with the
    program's first error line if it fails."""
    params = pg.conninfo(via_pgbouncer=False)
    env = {**os.environ, **{_LIBPQ_ENV[k]: str(v) for k, v in params.items() if k in _LIBPQ_ENV}}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"no output, exit code {done.returncode}"]
        line = next((line for line in lines if "error:" in line), lines[0])
        raise BackupError(f"{Path(argv[0]).name} failed: {' '.join(line.split())}")
    return done.stdout


def _redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _instant(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _endpoint(settings: Settings) -> tuple[str, str]:
    """(Postgres, Redis) as users know them: host:port, never a password."""
    pg, rd = settings.postgres, settings.redis
    return f"Postgres at {pg.host}:{pg.port}", f"Redis at {rd.host}:{rd.port}"


def _sync(file: IO[bytes]) -> None:
    file.flush()
    os.fsync(file.fileno())


# ---------------------------------------------------------------------------- key spaces


def _scan_patterns(keys: RedisKeys) -> list[str]:
    """MATCH patterns that together cover every key of every shard of `keys` once: `{P}:*`,
    and each shard's own when it is not under `{P}:` (a tagged prefix's shards)."""
    spaces = keys.shard_spaces
    return [f"{glob_escape(space.prefix)}:*" for space in spaces
            if space is spaces[0] or not space.prefix.startswith(f"{keys.prefix}:")]


def _space_of(name: str, spaces: list[RedisKeys]) -> int:
    """The shard whose key space holds the key `name`: the longest prefix it starts with (an
    untagged prefix P's shards are `P:{s.n}`, under P's own)."""
    matches = [n for n, space in enumerate(spaces) if name.startswith(f"{space.prefix}:")]
    if not matches:
        raise BackupError(f"key {name!r} is under none of the shards' prefixes")
    return max(matches, key=lambda n: len(spaces[n].prefix))


# ---------------------------------------------------------------------------- backup


class _KeyFile:
    """Writes `redis-keys.jsonl` and counts the keys by family (`{P}:<family>...`)."""

    def __init__(self, out: IO[bytes], keys: RedisKeys) -> None:
        self.out = out
        self.keys = keys
        self.spaces = keys.shard_spaces
        self.by_family: dict[str, int] = {}

    def family(self, name: str, space: RedisKeys | None = None) -> str:
        """`<family>` of `{P}:<family>...`, under `space` (found by `_space_of` if not given)."""
        space = space or self.spaces[_space_of(name, self.spaces)]
        return name[len(space.prefix) + 1:].split(":", 1)[0]

    def write(self, key: bytes, pttl: int, payload: bytes, now_ms: int) -> None:
        name = key.decode("utf-8", "surrogateescape")
        family = self.family(name)
        self.by_family[family] = self.by_family.get(family, 0) + 1
        record = {"key": name, "expire_at_ms": now_ms + pttl if pttl >= 0 else None,
                  "dump": base64.b64encode(payload).decode()}
        self.out.write(json.dumps(record).encode() + b"\n")

    def copy_early_keys(self, client: redis.Redis) -> list[list[bytes]]:
        """Step 1: copy the keys of EARLY_FAMILIES now; return the other keys found, by shard
        (batch lists aside: the queue state names them), to copy with the queue state."""
        later: list[list[bytes]] = [[] for _ in self.spaces]
        chunk: list[bytes] = []
        for pattern in _scan_patterns(self.keys):
            for key in client.scan_iter(match=pattern, count=KEYS_PER_ROUND_TRIP):
                name = key.decode("utf-8", "surrogateescape")
                shard = _space_of(name, self.spaces)
                space = self.spaces[shard]
                if self.family(name, space) in EARLY_FAMILIES:
                    chunk.append(key)
                elif not name.startswith(space.batch("")):
                    later[shard].append(key)
                if len(chunk) >= KEYS_PER_ROUND_TRIP:
                    self._copy(client, chunk)
                    chunk = []
        self._copy(client, chunk)
        return later

    def _copy(self, client: redis.Redis, chunk: list[bytes]) -> None:
        if not chunk:
            return
        pipe = client.pipeline(transaction=False)
        pipe.time()
        for key in chunk:
            pipe.pttl(key)
            pipe.dump(key)
        (seconds, micros), *replies = pipe.execute()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        for key, pttl, payload in zip(chunk, replies[::2], replies[1::2], strict=True):
            if payload is not None:  # gone (expired, deleted) since the SCAN
                self.write(key, int(pttl), payload, now_ms)

    def copy_queue_state(self, client: redis.Redis, found: list[list[bytes]]) -> RedisPart:
        """Step 4, one Lua call per shard: its `queue_state_keys`, the other keys of it step 1
        `found`, and every batch list its queue state names. Counts are summed over the
        shards; the snapshot instant is the earliest shard's."""
        totals = [0] * 6  # queued, claimed, staged, quarantined, batch orders, accepted
        instants: list[int] = []
        for space, found_here in zip(self.spaces, found, strict=True):
            fixed = queue_state_keys(space)
            named = {key.encode() for key in fixed}
            keys = [*fixed, *(key for key in found_here if key not in named)]
            reply = client.eval(_COPY_QUEUE_STATE, len(keys), *keys, space.batch(""))
            seconds, micros = reply[:2]
            totals = [total + int(n) for total, n in zip(totals, reply[2:8], strict=True)]
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            instants.append(now_ms)
            copied = reply[8:]
            for key, pttl, payload in zip(copied[::3], copied[1::3], copied[2::3], strict=True):
                self.write(key, int(pttl), payload, now_ms)
        queued, claimed, staged, quarantined, batch_orders, accepted = totals
        info = client.info("server")
        return RedisPart(
            version=str(info["redis_version"]), run_id=str(info["run_id"]),
            key_prefix=self.keys.prefix, shards=len(self.spaces),
            snapshot_at=_instant(min(instants)),
            keys=sum(self.by_family.values()), keys_by_family=dict(sorted(self.by_family.items())),
            queued_orders=queued, claimed_batches=claimed, staged_batches=staged,
            quarantined_batches=quarantined, batch_orders=batch_orders, accepted=accepted)


def queue_state_keys(keys: RedisKeys) -> list[str]:
    """The keys always copied in step 4, even those step 1 did not see, in
    `_COPY_QUEUE_STATE`'s order (the first six are read by position)."""
    return [keys.ingestion, keys.inflight, keys.staged, keys.quarantined, keys.redriven,
            keys.counters, keys.owners, keys.dequeued, keys.queue_marks, keys.signals_stream,
            keys.promoted]


@contextlib.contextmanager
def _ledger_held(pg: PostgresSettings) -> Iterator[None]:
    """Step 2: hold the LEDGER_TABLES the database has still (SHARE lock) for the block;
    released at its end, or when this process dies (the server ends a dead client's
    transaction)."""
    with pg_connect(pg) as conn:
        conn.execute(f"SET LOCAL lock_timeout = '{LEDGER_LOCK_TIMEOUT_SECONDS}s'")
        present = [row[0] for row in conn.execute(
            "SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NOT NULL",
            (list(LEDGER_TABLES),))]
        try:
            conn.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(
                sql.SQL(", ").join(map(sql.Identifier, present))))
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
            raise LedgerBusy(
                f"could not hold {', '.join(present)} still within "
                f"{LEDGER_LOCK_TIMEOUT_SECONDS} s: a long transaction is writing them (a big "
                "promotion?); run the backup again") from exc
        yield
        conn.rollback()


_POSTGRES_COUNTS = """
SELECT current_setting('server_version'), now(),
       (SELECT count(*) FROM orders), (SELECT count(*) FROM orders_rejected),
       (SELECT coalesce(jsonb_object_agg(status, n), '{}'::jsonb)
        FROM (SELECT status, count(*) AS n FROM ingest_batches GROUP BY status) AS s)
"""


def _write_backup(settings: Settings, directory: Path,
                  pg_dump: str) -> tuple[RedisPart, PostgresPart]:
    """Steps 1-6 of the module's docstring: the two data files; the counts as of them."""
    pg = settings.postgres
    client = redis_client(settings.redis)
    with open(directory / REDIS_FILE, "xb") as out:
        key_file = _KeyFile(out, RedisKeys.of(settings.redis))
        found = key_file.copy_early_keys(client)
        with pg_connect(pg) as exporter:
            exporter.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            with _ledger_held(pg):
                held = time.perf_counter()
                snapshot = exporter.execute("SELECT pg_export_snapshot()").fetchone()[0]
                redis_part = key_file.copy_queue_state(client, found)
                crash_point("backup_ledger_paused")
            paused = time.perf_counter() - held
            server, snapshot_at, orders, rejected, ledger = exporter.execute(
                _POSTGRES_COUNTS).fetchone()
            _run_tool([pg_dump, "--no-password", "--format=custom", f"--snapshot={snapshot}",
                       f"--file={directory / POSTGRES_FILE}"], pg)
        _sync(out)
    with open(directory / POSTGRES_FILE, "rb+") as dump:
        _sync(dump)
    return redis_part, PostgresPart(
        server_version=server, pg_dump_version=_run_tool([pg_dump, "--version"], pg).strip(),
        database=pg.dbname, snapshot_at=snapshot_at, ledger_paused_seconds=round(paused, 6),
        orders=orders, rejected=rejected, ledger=ledger)


def _write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write the manifest atomically: a temporary file, synced, renamed, directory synced."""
    partial = directory / f".{MANIFEST_FILE}.partial"
    with open(partial, "wb") as out:
        out.write(manifest.model_dump_json(indent=2).encode() + b"\n")
        _sync(out)
    os.replace(partial, directory / MANIFEST_FILE)
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def backup(settings: Settings, directory: Path) -> Manifest:
    """Back up Postgres and the Redis keys of the prefix into `directory` (see the module).

    `directory` must not exist or be empty (BackupError otherwise). The manifest is written
    last; if this raises, the files it wrote are removed (a killed backup leaves them, but no
    manifest). Raises BackupError (pg_dump missing or failing), LedgerBusy (the ledger could
    not be held still in time: try again), and the servers' connection errors.
    """
    pg_dump = pg_tool("pg_dump")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise BackupError(f"{str(directory)!r} is not an empty directory: back up into a new "
                          "one (a backup never overwrites another)")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    clock = time.perf_counter()
    try:
        redis_part, postgres_part = _write_backup(settings, directory, pg_dump)
        files = {name: FileEntry.of(directory / name) for name in (POSTGRES_FILE, REDIS_FILE)}
        crash_point("backup_before_manifest")
        manifest = Manifest(
            format=FORMAT if redis_part.shards == 1 else SHARDED_FORMAT,
            orders_pipeline_version=version("orders_pipeline"),
            started_at=started, finished_at=datetime.now(UTC),
            seconds=round(time.perf_counter() - clock, 3), redis=redis_part,
            postgres=postgres_part, files=files)
        _write_manifest(directory, manifest)
    except BaseException:
        for name in (REDIS_FILE, POSTGRES_FILE, f".{MANIFEST_FILE}.partial"):
            (directory / name).unlink(missing_ok=True)
        if created:
            directory.rmdir()
        raise
    return manifest


# ---------------------------------------------------------------------------- restore


@dataclasses.dataclass(frozen=True)
class RestoreReport:
    """What `restore` did: the backup's manifest; whether it replaced a non-empty target
    (`force`); keys restored and keys skipped because their expiry had passed; claimed
    batches handed back; what reconciliation released and requeued; the books afterwards;
    the completion signal recorded for the orders waiting (None if none wait)."""
    manifest: Manifest
    replaced: list[str]
    keys_restored: int
    keys_expired: int
    leases_handed_back: int
    reconciled: Reconciled
    books: Conservation
    signal: str | None


def _relations(pg: PostgresSettings) -> int | None:
    """Tables, views and sequences outside the system schemas; None if no such database."""
    with pg_connect(dataclasses.replace(pg, dbname="postgres")) as admin:
        if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                             (pg.dbname,)).fetchone():
            return None
    with pg_connect(pg) as conn:
        return int(conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')"
            " AND n.nspname !~ '^pg_(toast|temp)'"
            " AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')").fetchone()[0])


def _has_keys(client: redis.Redis, keys: RedisKeys) -> bool:
    """Whether any key of any shard of `keys` exists."""
    return any(next(client.scan_iter(match=pattern, count=KEYS_PER_ROUND_TRIP), None)
               is not None for pattern in _scan_patterns(keys))


def _clear_targets(settings: Settings, client: redis.Redis, force: bool) -> list[str]:
    """Check that the targets are empty; with `force`, empty them. Returns what was replaced.

    Both are checked before either is touched, so a refused restore changes nothing.
    """
    pg, rd = settings.postgres, settings.redis
    pg_at, redis_at = _endpoint(settings)
    relations = _relations(pg)
    keys = RedisKeys.of(rd)
    has_keys = _has_keys(client, keys)
    occupied = []
    if relations:
        occupied.append(f"database {pg.dbname!r} ({pg_at}) holds {relations} relations")
    if has_keys:
        occupied.append(f"{redis_at} db {rd.db} holds keys under {rd.key_prefix}:")
    if occupied and not force:
        raise BackupError(f"the restore target is not empty: {'; '.join(occupied)}; restore onto "
                          "empty servers, or pass --force to replace them")
    if relations:
        with pg_connect(dataclasses.replace(pg, dbname="postgres")) as admin:
            admin.autocommit = True
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
                sql.Identifier(pg.dbname)))
    if has_keys:
        for pattern in _scan_patterns(keys):
            unlink_matching(client, pattern)
    return occupied


def _restore_keys(client: redis.Redis, path: Path, source: RedisKeys, target: RedisKeys
                  ) -> tuple[int, int]:
    """RESTORE every key of the file in the same shard of the target key space (its prefix
    for the source's); keys whose expiry has passed are skipped. Returns (restored,
    expired)."""
    sources, targets = source.shard_spaces, target.shard_spaces
    now_ms = _redis_now_ms(client)
    restored = expired = 0
    pipe = client.pipeline(transaction=False)
    with open(path, "rb") as lines:
        for line in lines:
            record = json.loads(line)
            shard = _space_of(record["key"], sources)
            name = targets[shard].prefix + record["key"][len(sources[shard].prefix):]
            expire_at = record["expire_at_ms"]
            if expire_at is not None and expire_at <= now_ms:
                expired += 1
                continue
            # REPLACE: SCAN may return a key twice, and then the file holds it twice (the
            # later line is the later copy); the target was checked empty before.
            pipe.restore(name.encode("utf-8", "surrogateescape"), expire_at or 0,
                         base64.b64decode(record["dump"]), absttl=expire_at is not None,
                         replace=True)
            if len(pipe) >= KEYS_PER_ROUND_TRIP:
                restored += len(pipe.execute())
        restored += len(pipe.execute())
    return restored, expired


def _hand_back_leases(queue: OrderQueue) -> int:
    """Every claimed batch's lease ends now, without owner, in every shard: the workers that
    held them are not on these servers, so the next drain reclaims them at once."""
    handed_back = 0
    for shard in queue.shards:
        claimed = shard.claimed_batch_ids()
        if claimed:
            pipe = shard.client.pipeline(transaction=True)
            pipe.zadd(shard.keys.inflight, dict.fromkeys(claimed, 0), xx=True)
            pipe.delete(shard.keys.owners)
            pipe.execute()
        handed_back += len(claimed)
    return handed_back


def restore(settings: Settings, directory: Path, *, force: bool = False) -> RestoreReport:
    """Restore the backup in `directory` onto the configured (empty) servers and reconcile.

    Raises BackupError: no complete backup there or a file changed (`read_manifest`),
    pg_restore missing or failing (its single transaction then committed nothing), the target
    not empty without `force`, or the target Redis refusing the copied keys (older than the
    source), or REDIS_SHARDS not the backup's. With `force` the database is dropped and the
    prefix's keys (every shard's) deleted first.
    """
    manifest = read_manifest(directory)
    pg_restore = pg_tool("pg_restore")
    pg, rd = settings.postgres, settings.redis
    client = redis_client(rd)
    keys = RedisKeys.of(rd)
    if manifest.redis.shards != rd.shards:
        raise BackupError(f"the backup holds {manifest.redis.shards} shard(s) of the queue and "
                          f"REDIS_SHARDS is {rd.shards}: restore with "
                          f"REDIS_SHARDS={manifest.redis.shards}")
    replaced = _clear_targets(settings, client, force)
    ensure_database(pg)
    _run_tool([pg_restore, "--no-password", "--single-transaction", "--exit-on-error",
               "--no-owner", "--no-acl", f"--dbname={pg.dbname}",
               str(directory / POSTGRES_FILE)], pg)
    with pg_connect(pg) as conn:
        apply_schema(conn)  # a backup of an older release gets this release's DDL
    try:
        restored, expired = _restore_keys(
            client, directory / REDIS_FILE,
            RedisKeys(manifest.redis.key_prefix, manifest.redis.shards), keys)
    except redis.ResponseError as exc:
        raise BackupError(
            f"{_endpoint(settings)[1]} refused the copied keys ({exc}); restore onto an empty "
            f"Redis {manifest.redis.version} or newer") from exc
    queue = OrderQueue(client, keys)
    handed_back = _hand_back_leases(queue)
    reconciled = reconcile_batches(settings)
    with pg_pool(pg).connection() as conn:
        books = check_conservation(client, keys, conn)
    waiting = books.queued + books.in_flight + books.awaiting_promotion
    signal = None
    if waiting:  # so that a sensor starts the run that finishes them
        signal = f"restore:{uuid.uuid4().hex}"
        queue.signals.record_alone(signal, waiting)
    return RestoreReport(manifest, replaced, restored, expired, handed_back, reconciled,
                         books, signal)

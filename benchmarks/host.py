"""What a benchmark ran on, and what every process on the host used while it ran."""

import importlib.metadata
import os
import platform
import threading
import time
from collections.abc import Callable
from typing import Any

from orders_pipeline.connections import pg_connect, redis_client
from orders_pipeline.settings import Settings


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo
                         if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def machine_info(settings: Settings) -> dict[str, Any]:
    """What the numbers were measured on, so results from different hosts are comparable."""
    names = ("shared_buffers", "max_wal_size", "synchronous_commit", "autovacuum", "fsync",
             "work_mem", "wal_level", "full_page_writes")
    with pg_connect(settings.postgres) as conn:
        server_version = conn.execute("SHOW server_version").fetchone()[0]
        postgres_settings = dict(conn.execute(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)",
            (list(names),)).fetchall())
    client = redis_client(settings.redis)
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
                            1),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "polars": _version("polars"),
        "redis_py": _version("redis"),
        "hiredis": _version("hiredis"),
        "psycopg": _version("psycopg"),
        "postgres_server": server_version,
        "postgres_settings": postgres_settings,
        "redis_server": client.info("server").get("redis_version"),
        "workers_via_pgbouncer": settings.postgres.use_pgbouncer,
    }


class ProcessSampler:
    """CPU seconds of every process on the host during a window, grouped by role, and the
    peak RSS of the staging workers.

    Samples /proc every `interval` so processes that exit meanwhile (worker processes and
    their Postgres backends) are still counted up to their last sample. `roles` names this
    benchmark's own processes by pid; other children of this process are the staging
    workers ("worker"). Postgres backends of `database` count as "postgres", its shared
    processes (WAL writer, checkpointer...) as "postgres_shared", backends of other databases
    as "other"; Redis and PgBouncer count whole (anyone else's commands included), the rest
    as "other" (anything else running on the host disturbs the figures; this shows how much).
    A worker's peak RSS is its kernel high-water mark (VmHWM) at its last sample.
    """

    SERVERS = {"redis-server": "redis", "pgbouncer": "pgbouncer"}

    def __init__(self, roles: Callable[[], dict[int, str]], database: str,
                 interval: float = 0.5) -> None:
        self.roles = roles
        self.database = f" {database} "
        self._postgres: dict[int, str] = {}
        self._children: dict[int, str] = {}
        self.interval = interval
        self.tick = os.sysconf("SC_CLK_TCK")
        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self.worker_peak_rss_kib: dict[int, int] = {}
        self.host_first = self._host()
        self.host_last = self.host_first
        self.started = time.perf_counter()
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-sampler", daemon=True)
        self._sample(initial=True)
        self._thread.start()

    @staticmethod
    def _host() -> list[int]:
        with open("/proc/stat") as stat:
            return [int(v) for v in stat.readline().split()[1:]]

    @staticmethod
    def _peak_rss_kib(pid: int) -> int | None:
        try:
            with open(f"/proc/{pid}/status") as status:
                return next((int(line.split()[1]) for line in status
                             if line.startswith("VmHWM:")), None)
        except OSError:
            return None

    def _sample(self, initial: bool = False) -> None:
        roles = self.roles()
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    text = stat.read()
            except OSError:
                continue
            pid = int(entry)
            comm = text[text.index("(") + 1:text.rindex(")")]
            fields = text[text.rindex(")") + 2:].split()
            used = (int(fields[11]) + int(fields[12])) / self.tick
            if initial:
                self.first[pid] = used
            role = (roles.get(pid) or self.SERVERS.get(comm)
                    or (self._postgres_role(pid) if comm == "postgres" else None)
                    or (self._child_role(pid) if int(fields[1]) == me else "other"))
            self.last[pid] = (role, used)
            if role == "worker" and (peak := self._peak_rss_kib(pid)) is not None:
                self.worker_peak_rss_kib[pid] = peak
        self.host_last = self._host()

    def _child_role(self, pid: int) -> str:
        """A child not in `roles`: a staging worker, or multiprocessing's resource tracker."""
        if pid not in self._children:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    tracker = b"resource_tracker" in cmdline.read()
            except OSError:
                tracker = False
            self._children[pid] = "benchmark" if tracker else "worker"
        return self._children[pid]

    def _postgres_role(self, pid: int) -> str:
        if pid not in self._postgres:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    title = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                title = ""
            self._postgres[pid] = ("postgres" if self.database in title else
                                   "other" if "(" in title or "[local]" in title else
                                   "postgres_shared")
        return self._postgres[pid]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> dict[str, Any]:
        """End the window: CPU seconds by role and host-wide busy, iowait and steal shares."""
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = time.perf_counter() - self.started
        by_role: dict[str, float] = {}
        for pid, (role, used) in self.last.items():
            by_role[role] = by_role.get(role, 0.0) + used - self.first.get(pid, 0.0)
        delta = [b - a for a, b in zip(self.host_first, self.host_last, strict=True)]
        total = sum(delta) or 1
        # /proc/stat: user nice system idle iowait irq softirq steal ...
        return {
            "window_seconds": round(self.seconds, 2),
            "cpu_seconds_by_role": {k: round(v, 2) for k, v in
                                    sorted(by_role.items(), key=lambda kv: -kv[1])},
            "host_busy_percent": round(100 * (total - delta[3] - delta[4]) / total, 1),
            "host_iowait_percent": round(100 * delta[4] / total, 1),
            "host_steal_percent": round(100 * delta[7] / total, 1) if len(delta) > 7 else 0,
        }

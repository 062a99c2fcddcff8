"""Deterministic fault points for the delivery-guarantee tests.

`ORDERS_PIPELINE_CRASH_AT=<point>`: the process SIGKILLs itself the first time it reaches
that point: no cleanup, no `finally`, exactly like a power cut.
`ORDERS_PIPELINE_PAUSE_AT=<point>` with `ORDERS_PIPELINE_PAUSE_FILE=<path>`: the process
creates the file at that point and waits until it is deleted, so a test can crash a server
at exactly that instant. Unset (the normal case) each point costs two dictionary lookups.
"""

import os
import signal
import time
from pathlib import Path

CRASH_ENV = "ORDERS_PIPELINE_CRASH_AT"
PAUSE_ENV = "ORDERS_PIPELINE_PAUSE_AT"
PAUSE_FILE_ENV = "ORDERS_PIPELINE_PAUSE_FILE"
CRASH_POINTS = ("after_claim", "after_dedup", "mid_copy", "after_copy", "mid_promotion")
# Points of a re-drive of rejected orders (`pipeline.redrive_rejected`): after its rows are
# marked and its batches written to the outbox, and after one batch's Redis push, before the
# outbox records it.
REDRIVE_CRASH_POINTS = ("after_redrive_plan", "after_redrive_push")
# Points of a replay of archived batches (`pipeline.replay_window`): after its batches are
# written to the outbox, after one batch's Redis push (before the outbox records it), and
# after its first chunk of batches is pushed, staged and promoted (the rest still pending).
REPLAY_CRASH_POINTS = ("after_replay_plan", "after_replay_push", "after_replay_chunk")
# Points of a backup (`backup.backup`): while it holds the ledger still, and after its data
# files are written, before its manifest.
BACKUP_CRASH_POINTS = ("backup_ledger_paused", "backup_before_manifest")
# Points of the fan-out (`orders_pipeline.fanout`): the relay after an outbox row's entries
# are in Redis, before the row is deleted; a consumer after its handler, before the XACK.
FANOUT_CRASH_POINTS = ("after_relay_publish", "after_consume_handler")
# Points of a retention (`partitions.apply_retention`): after the horizon is recorded (the
# months not yet counted nor dropped), and after the months are dropped (their ids not yet
# deleted from the guard).
RETENTION_CRASH_POINTS = ("retention_after_horizon", "retention_after_drops")
MAX_PAUSE_SECONDS = 120


def crash_point(name: str) -> None:
    """Die here, now, if the environment names this point; or pause here for a test."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(PAUSE_ENV) == name:
        _pause(Path(os.environ[PAUSE_FILE_ENV]))


def _pause(marker: Path) -> None:
    # Pause once per process: later batches run through, as after a real hiccup.
    os.environ.pop(PAUSE_ENV, None)
    marker.touch()
    deadline = time.monotonic() + MAX_PAUSE_SECONDS
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)

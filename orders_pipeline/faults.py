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

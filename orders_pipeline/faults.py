"""Deterministic crash points for the delivery-guarantee tests.

Set `ORDERS_PIPELINE_CRASH_AT` to one of `CRASH_POINTS` and the process SIGKILLs itself the
first time it reaches that point: no cleanup, no `finally`, exactly like a power cut. Unset
(the normal case) it costs one dictionary lookup.
"""

import os
import signal

CRASH_ENV = "ORDERS_PIPELINE_CRASH_AT"
CRASH_POINTS = ("after_claim", "after_dedup", "mid_copy", "after_copy", "mid_promotion")


def crash_point(name: str) -> None:
    """Die here, now, if the environment names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)

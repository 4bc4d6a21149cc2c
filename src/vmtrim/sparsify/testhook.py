"""The crash-test hook ``sparsify`` and ``compact`` share (tests kill a run mid-way)."""

from __future__ import annotations

import os
import time


def pause(point: str) -> None:
    """A test hook: VMTRIM_TEST_PAUSE=POINT makes a run stop there for a SIGKILL."""
    if os.environ.get("VMTRIM_TEST_PAUSE") == point:
        print(f"vmtrim-test: paused at {point}", flush=True)
        time.sleep(3600)

"""The trim engine's rules that need no guest: deadlines per target, and when a trim
that gave little back is worth an audit (``shortfall``).

The agents here are fake unix sockets that never answer (plumbing); the real guests
are in test_trim_direct.py and test_live_libvirt.py.
"""

from __future__ import annotations

import time

from test_channels_replies import fake
from vmtrim.channels.qmp import FstrimPath
from vmtrim.trim import QemuTarget, TrimOptions, trim_all
from vmtrim.trim.engine import NOTHING_TO_TRIM, DiskResult, TrimResult, shortfall

MiB = 1024 * 1024


def test_each_target_gets_its_whole_timeout_from_its_own_start() -> None:
    """--parallel 1, two hung agents: the second is not skipped for the first one's wait."""
    with fake(lambda m: None) as one, fake(lambda m: None) as two:
        start = time.monotonic()
        results = trim_all(
            [QemuTarget(str(one.path), None), QemuTarget(str(two.path), None)],
            TrimOptions(timeout=2.0, parallel=1),
        )
        elapsed = time.monotonic() - start
    assert [r.status for r in results] == ["skipped", "skipped"]
    # Each waited its own 2 s (the agent had all of it to answer), one after the other.
    assert all(1.9 <= r.seconds <= 2 + 1 for r in results), [r.seconds for r in results]
    assert elapsed >= 3.8


def result(guest: int, host: int | None) -> TrimResult:
    disks = [] if host is None else [DiskResult("sda", "/x.qcow2", 10 * MiB + host, 10 * MiB)]
    return TrimResult("d", paths=[FstrimPath("/", trimmed=guest)], disks=disks)


def test_shortfall_is_only_a_real_trim_that_gave_little_back() -> None:
    assert shortfall(result(500 * MiB, 0))  # discard dropped somewhere
    assert shortfall(result(500 * MiB, 40 * MiB))  # under a tenth
    assert not shortfall(result(500 * MiB, 60 * MiB))  # first ext4 FITRIM: all free space
    assert not shortfall(result(NOTHING_TO_TRIM - 1, 0))  # nothing left to trim
    assert not shortfall(result(0, 0))
    assert not shortfall(result(500 * MiB, None))  # not measured: no verdict

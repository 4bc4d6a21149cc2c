"""`vmtrim verify` redirected: one line per step on stderr (none with --quiet), the table on stdout.

One real cell under TCG on the lab guest, as a cron job would run it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import vmtrim
from vmtrim.lab import Appliance

pytestmark = pytest.mark.vm

CELL = "virtio-scsi/qcow2/agent/unmap"
STEPS = [
    "booting the guest",
    "writing 8 MiB",
    "deleting",
    "trimming (guest-fstrim from the host)",
    "measuring the host image",
]


@pytest.fixture
def env(appliance: Appliance) -> Iterator[dict[str, str]]:
    tmp = Path(tempfile.mkdtemp(prefix="vmtrim-progress-", dir="/tmp"))
    try:
        yield {**os.environ, "TMPDIR": str(tmp), "NO_COLOR": "1"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_redirected_verify_reports_each_step_and_quiet_only_results(
    env: dict[str, str],
) -> None:
    args = ["verify", "--accel", "tcg", "--mode", "agent", "--size", "8"]
    loud = vmtrim(*args, env=env)
    assert loud.returncode == 0, loud.stderr
    assert loud.stderr.splitlines() == [f"verify {CELL}: {step}" for step in STEPS]
    assert "result" in loud.stdout and "ok" in loud.stdout
    quiet = vmtrim("--quiet", *args, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    assert [line.split()[0] for line in quiet.stdout.splitlines()[1:]] == [
        line.split()[0] for line in loud.stdout.splitlines()[1:]
    ]

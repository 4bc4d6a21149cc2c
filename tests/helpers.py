"""Helpers shared by the test modules; the fixtures are in conftest.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def vmtrim(
    *args: str,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m vmtrim ARGS`` as a user would; never raises on a non-zero exit.

    The timeout covers a TCG guest boot; a hung vmtrim then fails its test with
    TimeoutExpired instead of stalling until pytest-timeout.
    """
    return subprocess.run(
        [sys.executable, "-m", "vmtrim", *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run qemu-img, which must succeed."""
    return subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True, text=True)


def du_bytes(path: Path) -> int:
    """What `du -B1` says: the bytes the host really stores for the file."""
    out = subprocess.run(["du", "-B1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])

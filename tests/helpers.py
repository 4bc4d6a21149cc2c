"""Helpers shared by the test modules; the fixtures are in conftest.py."""

from __future__ import annotations

import difflib
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest


def vmtrim_argv(*args: str) -> list[str]:
    """The command line of ``python -m vmtrim ARGS``, for a test that starts it itself."""
    return [sys.executable, "-m", "vmtrim", *args]


def vmtrim(
    *args: str,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m vmtrim ARGS`` as a user would; never raises on a non-zero exit.

    The timeout covers a TCG guest boot; a hung vmtrim then fails its test with
    TimeoutExpired instead of stalling until pytest-timeout.
    """
    return subprocess.run(
        vmtrim_argv(*args),
        input=stdin,
        env=env,
        cwd=cwd,
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


def assert_refused_in_use(subcommand: str, image: Path, *needles: str) -> None:
    """``vmtrim SUBCOMMAND IMAGE`` while a QEMU holds the image: exit 3 (environment), a
    message with every one of NEEDLES, and not a byte of the image changed."""
    from sparsify_support import qemu_holding, sha256  # the holding QEMU is defined there

    with qemu_holding(image):
        before = sha256(image)
        refused = vmtrim(subcommand, str(image))
        assert refused.returncode == 3
        assert all(needle in refused.stderr for needle in needles), refused.stderr
        assert sha256(image) == before


# Set from `pytest --regenerate-output` by conftest.py's pytest_configure.
REGENERATE = False


def normalise(text: str, directory: Path) -> str:
    """``text`` with this machine's ``directory`` written as ``@DIR@``, as the inputs spell it."""
    return text.replace(str(directory), "@DIR@")


def assert_golden(actual: str, path: Path) -> None:
    """``actual`` must be the whole text of the golden file ``path``.

    With ``--regenerate-output`` the file is written instead (only if it changed, so that
    ``git status`` lists exactly the outputs that moved).
    """
    expected = path.read_text() if path.exists() else None
    if REGENERATE:
        if actual != expected:
            path.write_text(actual)
        return
    if expected is None:
        pytest.fail(f"{path} is missing: run pytest --regenerate-output, review it", pytrace=False)
    if actual != expected:
        diff = difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            fromfile=f"{path} (expected)",
            tofile="actual",
        )
        pytest.fail(
            "".join(diff) + "\nIf the change is intended: pytest --regenerate-output, then "
            "review `git diff` of the data files.",
            pytrace=False,
        )

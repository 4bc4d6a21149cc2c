"""What several benches share: ``-X importtime`` rows, and the lab-guest benches' steps.

The lab parts (``lab_session``, ``vmtrim_json``) import the tests' lab domains and
``helpers.vmtrim`` from ``tests/`` when called, so a bench that does not boot guests
imports nothing from there.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from test_live_libvirt import Lab, LabDomain

URI = "qemu:///system"
TESTS = Path(__file__).resolve().parents[1] / "tests"


def import_times(argv: Sequence[str]) -> list[tuple[int, str]]:
    """``python -X importtime ARGV``'s rows: (cumulative microseconds, module name); a
    nested module keeps its indentation (two spaces a level)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, check=True
    )
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split(":", 1)[1].split("|")
        rows.append((int(cumulative), name[1:].rstrip()))  # "| name": drop the separator's space
    return rows


def _tests_on_path() -> None:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


@contextlib.contextmanager
def lab_session() -> Iterator[Lab]:
    """A private libvirtd on qemu:///system and a Lab on it; the guests are destroyed and
    undefined and the daemons stopped however the bench ends."""
    _tests_on_path()
    import libvirt

    from services import start_libvirtd
    from test_live_libvirt import Lab
    from vmtrim.lab import ensure_appliance

    daemons = start_libvirtd()
    conn = libvirt.open(URI)
    lab = Lab(conn, ensure_appliance())
    try:
        yield lab
    finally:
        lab.cleanup()
        conn.close()
        daemons.stop()


def until_deleted(guests: list[LabDomain], label: str, write_mib: int, t0: float) -> None:
    """Waits until every guest has written and deleted its data; prints LABEL and the time."""
    for guest in guests:
        guest.until_deleted()
    print(f"{label}, {write_mib} MiB written+deleted each, in {time.monotonic() - t0:.1f} s")


def vmtrim_json(*args: str) -> tuple[float, dict[str, Any]]:
    """Runs ``vmtrim ARGS`` (a --json command) as a user would: its wall time and document."""
    _tests_on_path()
    from helpers import vmtrim

    start = time.monotonic()
    out = vmtrim(*args, timeout=3600)
    wall = time.monotonic() - start
    if not out.stdout:
        raise SystemExit(f"vmtrim {args[0]} printed nothing: {out.stderr}")
    doc: dict[str, Any] = json.loads(out.stdout)
    return wall, doc


def virsh_domfstrim(names: list[str], parallel: int) -> float:
    """The anchor: `virsh domfstrim` on each domain, PARALLEL at a time; the wall time."""

    def one(name: str) -> None:
        subprocess.run(["virsh", "-c", URI, "domfstrim", name], capture_output=True, check=True)

    start = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, names))
    return time.monotonic() - start

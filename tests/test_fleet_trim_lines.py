"""The lines below a disk's row are the same in ``vmtrim trim``, its fleet table and
``vmtrim run``: the thin pool before and after, and ``--explain``'s causes.

The result is built here, holding what a trim on an LVM thin pool brings back (the
readings are lvs's, as test_trim_pool.py gets them in a lab guest; the fleet hosts
here have no device-mapper) and a cause with its evidence; the three commands' own
renderers print it, piped, as cron or ``grep`` sees them. The fleet table puts each
line after its host, as each of its rows starts with the host. The live fleet
(``--explain`` over ``--hosts``) is in test_fleet_live.py.
"""

from __future__ import annotations

import re

import pytest

from vmtrim.channels.qmp import FstrimPath
from vmtrim.fleet.hosts import HostRun
from vmtrim.fleet.trim import HostTrim
from vmtrim.run.engine import Outcome
from vmtrim.run.record import trim_record
from vmtrim.storage.pool import PoolUsage
from vmtrim.trim.engine import DiskResult, TrimResult
from vmtrim.trim.explain import Cause

MiB = 1024 * 1024
HOST = "qemu+ssh://root@kvm7/system"
POOL_LINE = (
    "sdb: thin pool vg/pool (discards=passdown): data 61.20 % (300.0 MiB) -> 40.10 %"
    " (196.0 MiB), got back 104.0 MiB"
)
EVIDENCE = "1 internal snapshot (before-cleanup) [x]: it holds the freed clusters"
HEADER = "vdc: got back 0 B of the 24.0 MiB the guest trimmed on it"
WHY = f"vdc: why: internal_snapshots: {EVIDENCE}"


def usage(percent: float, used_mib: int) -> PoolUsage:
    return PoolUsage("vg/pool", "passdown", 64 * 1024, percent, 2.5, used_mib * MiB, 490 * MiB)


def result() -> TrimResult:
    return TrimResult(
        "db-02",
        paths=[FstrimPath("/", trimmed=110 * MiB), FstrimPath("/srv", trimmed=24 * MiB)],
        disks=[
            DiskResult(
                "sdb", "/dev/vg/db-02", 300 * MiB, 196 * MiB, "blockInfo",
                pool_before=usage(61.2, 300), pool_after=usage(40.1, 196),
                guest_trimmed=110 * MiB, causes=[],
            ),
            DiskResult(
                "vdc", "/var/lib/libvirt/images/db-02-data.qcow2", 80 * MiB, 80 * MiB, "du",
                guest_trimmed=24 * MiB,
                causes=[
                    Cause("internal_snapshots", "vdc", EVIDENCE, {"snapshot_count": 1}),
                ],
            ),
        ],
        seconds=2.5,
        explained=True,
    )  # fmt: skip


def below_rows(out: str) -> list[str]:
    """The lines below the rows (indented by four; a row's next disk, by more)."""
    return [line[4:] for line in out.splitlines() if re.match(r"    \S", line)]


@pytest.fixture(autouse=True)
def piped(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("COLUMNS", "TTY_COMPATIBLE", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)


def test_trim_shows_the_pool_and_the_causes(capsys: pytest.CaptureFixture[str]) -> None:
    from vmtrim.cli.trim import render

    render([result()])
    assert below_rows(capsys.readouterr().out) == [POOL_LINE, HEADER, WHY]


def test_the_fleet_table_shows_the_same_lines_after_the_host(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from vmtrim.cli.trim import render as render_one
    from vmtrim.fleet.trim import render

    other = TrimResult("web-01", status="skipped", reason="web-01: guest agent: no answer")
    render([HostRun(HOST, HostTrim([result(), other]), seconds=3.0)])
    fleet = capsys.readouterr().out
    render_one([result(), other])
    one = capsys.readouterr().out
    assert below_rows(fleet) == [f"{HOST}: {line}" for line in below_rows(one)]
    assert below_rows(fleet) == [
        f"{HOST}: {POOL_LINE}",
        f"{HOST}: {HEADER}",
        f"{HOST}: {WHY}",
        f"{HOST}: skipped: web-01: guest agent: no answer",
    ]
    # every row starts with its host (a domain's second disk too); the lines follow its rows
    rows = [line.split()[:3] for line in fleet.splitlines() if line.startswith(HOST)]
    assert rows == [[HOST, "db-02", "trimmed"], [HOST, "vdc", "80.0"], [HOST, "web-01", "skipped"]]


def test_explain_with_no_shortfall_says_so_in_the_fleet_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from vmtrim.fleet.trim import render

    quiet = TrimResult(
        "web-01",
        paths=[FstrimPath("/mnt", trimmed=32 * MiB)],
        disks=[DiskResult("sda", "/img/web-01.qcow2", 64 * MiB, 32 * MiB, "du", causes=[])],
        explained=True,
    )
    render([HostRun(HOST, HostTrim([quiet]))])
    assert below_rows(capsys.readouterr().out) == [
        f"{HOST}: explain: no disk fell short of what the guest trimmed on it"
    ]


def test_run_shows_the_same_lines_from_the_history_record(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`vmtrim run` prints its records, as the history holds them: the same lines."""
    from vmtrim.cli.run_policy import _table

    _table([Outcome(trim_record(result(), "qemu:///system"))], dry_run=False)
    assert below_rows(capsys.readouterr().out) == [POOL_LINE, HEADER, WHY]

"""The history database on a real SQLite file, checked with the real sqlite3 shell."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmtrim.errors import EXIT_ENVIRONMENT, HistoryUnavailable
from vmtrim.history.query import allocation_series, domain_summaries, last_run
from vmtrim.history.store import SCHEMA_VERSION, DiskRecord, DomainRecord, History

MiB = 1024 * 1024


def sqlite(db: Path, sql: str) -> str:
    out = subprocess.run(["sqlite3", str(db), sql], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def good(name: str, before: int, after: int, started: float) -> DomainRecord:
    return DomainRecord(
        domain=name,
        status="trimmed",
        started=started,
        seconds=1.5,
        guest_trimmed=before - after + MiB,
        disks=[
            DiskRecord(
                target="sda",
                source=f"/images/{name}.qcow2",
                virtual_size=128 * MiB,
                allocated_before=before,
                allocated_after=after,
                guest_used=2 * MiB,
                reclaimable_before=before - 2 * MiB,
                reclaimable_after=after - 2 * MiB,
                verdict="pass",
            )
        ],
    )


def test_new_database_is_wal_with_the_schema_version(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "history.db"
    with History.open(db) as history:
        run = history.begin_run("run", policy_hash="abc", trigger="policy")
        history.record(run, good("web", 70 * MiB, 3 * MiB, 1000.0))
        history.end_run(run)
    assert sqlite(db, "PRAGMA journal_mode") == "wal"
    assert sqlite(db, "PRAGMA user_version") == str(SCHEMA_VERSION)
    assert sqlite(db, "PRAGMA integrity_check") == "ok"
    # What a user (or the metrics exporter) reads with plain SQL.
    row = sqlite(
        db,
        "SELECT r.domain, r.status, r.reclaimed, d.allocated_before, d.allocated_after,"
        " d.reclaimed, d.virtual_size, d.guest_used, d.reclaimable_after, d.verdict, runs.kind,"
        " runs.policy_hash, runs.ended IS NOT NULL FROM domain_results r"
        " JOIN disk_results d ON d.result_id = r.id JOIN runs ON runs.id = r.run_id",
    )
    assert row.split("|") == [
        "web",
        "trimmed",
        str(67 * MiB),
        str(70 * MiB),
        str(3 * MiB),
        str(67 * MiB),
        str(128 * MiB),
        str(2 * MiB),
        str(1 * MiB),
        "pass",
        "run",
        "abc",
        "1",
    ]


def test_an_old_empty_database_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    sqlite(db, "CREATE TABLE notes (x); PRAGMA user_version = 0")
    with History.open(db) as history:
        assert history.version == SCHEMA_VERSION
    assert "domain_results" in sqlite(db, ".tables")
    assert "notes" in sqlite(db, ".tables")  # a migration adds, it never drops


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    History.open(db).close()
    sqlite(db, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(HistoryUnavailable, match="newer vmtrim") as err:
        History.open(db)
    assert err.value.exit_code == EXIT_ENVIRONMENT


def test_a_corrupt_file_is_one_error(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    db.write_bytes(b"this is not sqlite\n" * 500)
    with pytest.raises(HistoryUnavailable) as err:
        History.open(db)
    assert err.value.subject == str(db)
    assert "not a database" in err.value.message


def test_a_locked_database_is_one_error_not_a_hang(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    History.open(db).close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        history = History.open(db, busy_timeout=0.2)
        with history, pytest.raises(HistoryUnavailable) as err:
            history.begin_run("trim")
        assert "locked" in err.value.message
    finally:
        holder.execute("ROLLBACK")
        holder.close()


_WRITER = """
import os, sys, time
from vmtrim.history.store import History, DomainRecord, DiskRecord
history = History.open(sys.argv[1])
run = history.begin_run("run")
for i in range(2):
    disk = DiskRecord("sda", allocated_before=10, allocated_after=4)
    history.record(run, DomainRecord(f"dom{i}", "trimmed", disks=[disk]))
# The third domain's transaction is open, half written, when the kill comes.
history.db.execute("BEGIN IMMEDIATE")
history.db.execute(
    "INSERT INTO domain_results (run_id, domain, status, started, seconds)"
    " VALUES (?, 'dom2', 'trimmed', 0, 0)",
    (run,),
)
print("mid-transaction", flush=True)
time.sleep(60)
"""


def test_sigkill_mid_transaction_keeps_every_earlier_result(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_WRITER), str(db)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "mid-transaction"
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert sqlite(db, "PRAGMA integrity_check") == "ok"
    assert sqlite(db, "SELECT domain FROM domain_results ORDER BY id").split() == ["dom0", "dom1"]
    assert sqlite(db, "SELECT COUNT(*) FROM disk_results") == "2"
    assert sqlite(db, "SELECT ended IS NULL FROM runs") == "1"  # killed: never ended
    # A later writer works.
    with History.open(db) as history:
        run = history.begin_run("run")
        history.record(run, good("dom0", 10, 4, 5.0))
    assert sqlite(db, "SELECT COUNT(*) FROM domain_results") == "3"


def test_summaries_keep_verify_cells_apart(tmp_path: Path) -> None:
    with History.open(tmp_path / "h.db") as history:
        for day in range(3):
            run = history.begin_run("run", started=day * 86400.0)
            history.record(run, good("web", (70 - day) * MiB, 3 * MiB, day * 86400.0))
            history.record(
                run,
                DomainRecord("db", "blocked", reason="discard off", started=day * 86400.0),
            )
        cell = history.begin_run("verify")
        history.record(cell, good("virtio-scsi/qcow2/online/unmap/ext4", 9, 1, 10.0))
        fleet = domain_summaries(history, with_allocation=True)
        assert [s.domain for s in fleet] == ["db", "web"]
        web = fleet[1]
        assert (web.runs, web.last_status, web.last_started) == (3, "trimmed", 2 * 86400.0)
        assert web.total_reclaimed == (67 + 66 + 65) * MiB
        assert web.last_reclaimed == 65 * MiB
        assert [b // MiB for _, b in web.allocation] == [70, 3, 69, 3, 68, 3]
        assert (fleet[0].last_status, fleet[0].last_reason) == ("blocked", "discard off")
        since = domain_summaries(history, ["web"], since=86400.0)
        assert [(s.domain, s.runs) for s in since] == [("web", 2)]
        [verify] = domain_summaries(history, kinds=("verify",))
        assert verify.domain.startswith("virtio-scsi/")
        assert allocation_series(history, ["nosuch"]) == {}
        last = last_run(history)
        assert last is not None
        assert last.statuses == {"trimmed": 1, "blocked": 1}


def test_a_version_1_database_is_migrated_with_its_totals(tmp_path: Path) -> None:
    from vmtrim.history.store import MIGRATIONS

    db = tmp_path / "v1.db"
    raw = sqlite3.connect(db, isolation_level=None)
    MIGRATIONS[0](raw)
    raw.execute("PRAGMA user_version = 1")
    raw.execute("INSERT INTO runs VALUES (1, 'run', 10, 20, 'h', NULL, '0.1', 'policy')")
    raw.execute("INSERT INTO runs VALUES (2, 'verify', 30, 40, 'h', NULL, '0.1', NULL)")
    for i, (run, domain, status, reclaimed, started) in enumerate(
        [
            (1, "web", "trimmed", 5, 11.0),
            (1, "db", "blocked", None, 12.0),
            (2, "web", "trimmed", 7, 31.0),
        ]
    ):
        raw.execute(
            "INSERT INTO domain_results (id, run_id, domain, status, started, seconds, reclaimed)"
            " VALUES (?, ?, ?, ?, ?, 0, ?)",
            (i + 1, run, domain, status, started, reclaimed),
        )
    raw.close()
    with History.open(db) as history:
        assert history.version == SCHEMA_VERSION
        fleet = domain_summaries(history)
        assert [(s.domain, s.runs, s.total_reclaimed, s.last_status) for s in fleet] == [
            ("db", 1, 0, "blocked"),
            ("web", 1, 5, "trimmed"),  # the verify cell of the same name is kept apart
        ]
        [cell] = domain_summaries(history, kinds=("verify",))
        assert (cell.domain, cell.total_reclaimed) == ("web", 7)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["run", "trim", "watch", "verify"]),
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(["trimmed", "skipped", "blocked"]),
            st.one_of(st.none(), st.integers(-5, 50)),
            st.integers(0, 5).map(float),  # ties in time, on purpose
        ),
        max_size=25,
    ),
    st.lists(st.integers(0, 24), max_size=4),
)
def test_the_kept_totals_equal_the_results(
    results: list[tuple[str, str, str, int | None, float]], deletes: list[int]
) -> None:
    from vmtrim.history.query import _aggregate, _from_totals
    from vmtrim.history.store import FLEET_KINDS

    with tempfile.TemporaryDirectory() as tmp, History.open(Path(tmp) / "h.db") as history:
        ids = []
        for kind, domain, status, reclaimed, started in results:
            run = history.begin_run(kind)
            disks = [
                DiskRecord("sda", allocated_before=100, allocated_after=100 - (reclaimed or 0))
            ]
            disks = disks if reclaimed is not None else []
            record = DomainRecord(domain, status, started=started, disks=disks)
            ids.append(history.record(run, record))
        for index in deletes:
            if index < len(ids):
                history.db.execute("DELETE FROM disk_results WHERE result_id = ?", (ids[index],))
                history.db.execute("DELETE FROM domain_results WHERE id = ?", (ids[index],))
        for fleet, kinds in ((True, FLEET_KINDS), (False, ("verify",))):
            assert _from_totals(history, (), fleet) == _aggregate(history, (), None, kinds)

"""History schema 3 (pool and --explain columns): an older database stays readable.

A version-2 database (the last before the pool columns), written with the real
migrations, is read as it is by ``vmtrim history`` (``create=False``), and a recording
command upgrades it in place: every earlier row is kept, its new columns NULL.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from helpers import vmtrim
from vmtrim.history.store import MIGRATIONS, SCHEMA_VERSION, DiskRecord, DomainRecord, History


def version_2(db: Path) -> None:
    raw = sqlite3.connect(db, isolation_level=None)
    for step in MIGRATIONS[:2]:
        step(raw)
    raw.execute("PRAGMA user_version = 2")
    raw.execute("INSERT INTO runs VALUES (1, 'trim', 10, 20, 'h', NULL, '0.1', 'command line')")
    raw.execute(
        "INSERT INTO domain_results (id, run_id, domain, status, started, seconds, reclaimed)"
        " VALUES (1, 1, 'web', 'trimmed', 11, 0, 5)"
    )
    raw.execute(
        "INSERT INTO disk_results (result_id, target, allocated_before, allocated_after,"
        " reclaimed) VALUES (1, 'sda', 15, 10, 5)"
    )
    raw.close()


def test_a_version_2_database_is_read_then_upgraded(tmp_path: Path) -> None:
    db = tmp_path / "v2.db"
    version_2(db)
    shown = vmtrim("history", "--db", str(db), "--json", "web")
    assert shown.returncode == 0, shown.stderr
    [web] = json.loads(shown.stdout)["domains"]
    assert (web["runs"], web["total_reclaimed"]) == (1, 5)
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == 2  # untouched

    with History.open(db) as history:  # a recording command: migrated to 3
        assert history.version == SCHEMA_VERSION == 3
        run = history.begin_run("trim")
        disk = DiskRecord("sda", pool="vg/pool", pool_discards="passdown", causes="[]")
        disk.pool_used_before, disk.pool_used_after = 300, 200
        disk.pool_percent_before, disk.pool_percent_after = 61.2, 40.1
        history.record(run, DomainRecord("web", "trimmed", disks=[disk]))
    rows = sqlite3.connect(db).execute(
        "SELECT target, reclaimed, pool, pool_used_before - pool_used_after, causes"
        " FROM disk_results ORDER BY id"
    )
    assert rows.fetchall() == [("sda", 5, None, None, None), ("sda", None, "vg/pool", 100, "[]")]


def test_sparsify_records_into_a_version_2_database(tmp_path: Path) -> None:
    from vmtrim.sparsify.engine import SparsifyResult, record_history

    db = tmp_path / "v2.db"
    version_2(db)
    image = str(tmp_path / "template.qcow2")
    result = SparsifyResult(image, "qcow2", None, 1 << 30, False, 300, allocated_after=100)
    assert record_history(result, db) == db
    rows = sqlite3.connect(db).execute(
        "SELECT r.kind, d.domain, k.allocated_before - k.allocated_after FROM runs r"
        " JOIN domain_results d ON d.run_id = r.id JOIN disk_results k ON k.result_id = d.id"
        " WHERE r.kind = 'sparsify'"
    )
    assert rows.fetchall() == [("sparsify", image, 200)]

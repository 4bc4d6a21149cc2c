"""`vmtrim verify` records its cells as a verify run, kept apart from the fleet's domains."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from helpers import vmtrim

pytestmark = [pytest.mark.vm]


def test_verify_cells_are_a_verify_run_not_fleet_domains(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    result = vmtrim("verify", "--size", "32", "--json", "--db", str(db))
    assert result.returncode == 0, result.stderr
    [cell] = json.loads(result.stdout)["cells"]
    with sqlite3.connect(db) as conn:
        [(kind, domain, status, before, after)] = conn.execute(
            "SELECT runs.kind, r.domain, r.status, d.allocated_before, d.allocated_after"
            " FROM runs JOIN domain_results r ON r.run_id = runs.id"
            " JOIN disk_results d ON d.result_id = r.id"
        ).fetchall()
    assert kind == "verify"
    assert domain == "/".join(cell[k] for k in ("bus", "format", "mode", "discard", "fs"))
    assert status == "trimmed"
    assert (before, after) == (cell["allocated_before"], cell["allocated_after"])
    fleet = json.loads(vmtrim("history", "--db", str(db), "--json").stdout)
    assert fleet["domains"] == []
    cells = json.loads(vmtrim("history", "--db", str(db), "--json", "--verify").stdout)
    assert [d["domain"] for d in cells["domains"]] == [domain]

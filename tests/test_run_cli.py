"""`vmtrim run` and `vmtrim history` as a user runs them, on libvirt's own test driver.

``test:///default`` is a real libvirt driver inside the client (a running domain
``test`` with one virtio disk without discard, no guest agent): no daemon and no guest, so these
tests cover what does not need a trim: selection, recording, the lock, a locked
database, a connection that fails, the terminal sparkline. The trims themselves are
proven on real guests in test_run_live.py.
"""

from __future__ import annotations

import json
import os
import pty
import sqlite3
import subprocess
import sys
from pathlib import Path

from helpers import vmtrim
from vmtrim.history.store import DiskRecord, DomainRecord, History
from vmtrim.run.lock import run_lock

MiB = 1024 * 1024
TEST_URI = "test:///default"


def policy(tmp: Path, *connect: str) -> Path:
    path = tmp / "policy.toml"
    path.write_text(f'connect = {json.dumps(list(connect or [TEST_URI]))}\ninclude = ["test"]\n')
    return path


def run(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return vmtrim(
        "run", "--policy", str(tmp / "policy.toml"), "--lock", str(tmp / "run.lock"), *args
    )


def test_a_blocked_domain_is_recorded_not_trimmed(tmp_path: Path) -> None:
    policy(tmp_path)
    db = tmp_path / "history.db"
    result = run(tmp_path, "--db", str(db), "--json")
    assert result.returncode == 1, result.stderr  # blocked is a finding
    doc = json.loads(result.stdout)
    assert doc["schema"] == "vmtrim.run/1" and doc["recorded"] is True
    [domain] = doc["domains"]
    assert (domain["domain"], domain["status"]) == ("test", "blocked")
    assert domain["blocking_layer"] == "block_node"
    assert "has no discard setting" in domain["reason"]
    [disk] = domain["disks"]
    assert disk["target"] == "vda" and disk["error"]  # /guest/diskimage1 is not on this host
    with sqlite3.connect(db) as conn:
        [(kind, trigger, policy_hash, ended)] = conn.execute(
            "SELECT kind, trigger, policy_hash, ended FROM runs"
        ).fetchall()
    assert (kind, trigger, policy_hash) == ("run", "policy", doc["policy"]["hash"])
    assert ended is not None
    text = vmtrim("history", "--db", str(db))
    assert text.stdout.splitlines()[1].split()[:3] == ["test", "1", "0"]


def test_a_second_run_while_one_holds_the_lock_exits_3(tmp_path: Path) -> None:
    policy(tmp_path)
    with run_lock(tmp_path / "run.lock"):
        result = run(tmp_path, "--db", str(tmp_path / "history.db"))
    assert result.returncode == 3
    assert result.stderr.splitlines() == [
        f"vmtrim: {tmp_path / 'run.lock'}: another run holds the lock (PID {os.getpid()})"
    ]
    assert result.stdout == ""
    assert not (tmp_path / "history.db").exists()


def test_a_locked_database_prints_the_results_and_exits_3(tmp_path: Path) -> None:
    policy(tmp_path)
    db = tmp_path / "history.db"
    History.open(db).close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        result = run(tmp_path, "--db", str(db))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.returncode == 3
    assert "test" in result.stdout and "blocked" in result.stdout
    [line] = result.stderr.splitlines()
    assert line.startswith(f"vmtrim: {db}: history database: database is locked")
    assert line.endswith("these results were not recorded")


def test_a_connection_that_fails_is_one_line_and_the_others_still_run(tmp_path: Path) -> None:
    bad = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    policy(tmp_path, bad, TEST_URI)
    db = tmp_path / "history.db"
    result = run(tmp_path, "--db", str(db), "--json")
    assert result.returncode == 3
    [line] = result.stderr.splitlines()
    assert line.startswith(f"vmtrim: {bad}: cannot connect: ")
    assert [d["domain"] for d in json.loads(result.stdout)["domains"]] == ["test"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT domain, uri FROM domain_results").fetchall() == [
            ("test", TEST_URI)
        ]


def test_history_draws_allocation_on_a_terminal_only(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    with History.open(db) as history:
        for day, (before, after) in enumerate([(70, 3), (40, 3), (90, 3)]):
            run_id = history.begin_run("run", started=day * 86400.0)
            history.record(
                run_id,
                DomainRecord(
                    "web\x1b[31mred",  # a hostile name: printed escaped, never as a colour
                    "trimmed",
                    started=day * 86400.0,
                    disks=[
                        DiskRecord(
                            "vda", allocated_before=before * MiB, allocated_after=after * MiB
                        )
                    ],
                ),
            )
    piped = vmtrim("history", "--db", str(db))
    assert "allocation" not in piped.stdout
    assert "web\\x1b[31mred" in piped.stdout and "\x1b" not in piped.stdout
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmtrim", "history", "--db", str(db)],
        stdout=follower,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait()
    os.close(leader)
    text = out.decode()
    assert "allocation" in text
    # before/after of each run: high, low, lower-high, low, highest, low.
    assert "▆▁▄▁█▁" in text


def test_a_domain_due_after_the_window_closed_is_left_untouched() -> None:
    from datetime import datetime, timedelta

    from vmtrim.channels.libvirt import connection
    from vmtrim.run.engine import execute, plan, spread_offset
    from vmtrim.run.policy import parse_policy

    later = datetime.now() + timedelta(hours=2)
    window = f"{later:%H}:00-{later + timedelta(hours=1):%H}:00"
    closed = parse_policy(f'include = ["test"]\nspread = 0.5\nwindow = "{window}"')
    with connection(TEST_URI) as conn:
        [outcome] = list(execute([plan(conn, closed, "kvm1")], closed))
    assert outcome.record.status == "skipped"
    assert outcome.record.reason == f"the maintenance window {closed.window} closed"
    assert outcome.record.disks == []  # nothing was read or measured
    assert outcome.offset == spread_offset("kvm1", "test", 0.5)
    assert 0 <= outcome.offset < 0.5


def test_history_since_an_age_or_a_date(tmp_path: Path) -> None:
    import time

    db = tmp_path / "history.db"
    now = time.time()
    with History.open(db) as history:
        for age_days, name in ((40, "old"), (2, "new")):
            run_id = history.begin_run("run", started=now - age_days * 86400)
            history.record(run_id, DomainRecord(name, "trimmed", started=now - age_days * 86400))
    recent = json.loads(vmtrim("history", "--db", str(db), "--json", "--since", "30d").stdout)
    assert recent["schema"] == "vmtrim.history/1"
    assert [d["domain"] for d in recent["domains"]] == ["new"]
    every = json.loads(vmtrim("history", "--db", str(db), "--json", "--since", "2000-01-01").stdout)
    assert [d["domain"] for d in every["domains"]] == ["new", "old"]
    bad = vmtrim("history", "--db", str(db), "--since", "last tuesday")
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        "vmtrim: --since last tuesday: not an age (30d, 12h) or a date (2026-11-01)"
    ]
    missing = vmtrim("history", "--db", str(tmp_path / "none.db"), "--json")
    assert missing.returncode == 0 and json.loads(missing.stdout)["domains"] == []
    assert not (tmp_path / "none.db").exists()  # reading never creates the database

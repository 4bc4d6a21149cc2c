"""`vmtrim run` against the real libvirtd, four lab guests with their real qemu-ga.

The guests (booted once for the module, TCG):

- ``good``: writes and deletes 64 MiB on ext4 mounted without discard; discard=unmap;
- ``blocked``: the same with 16 MiB, but its XML has no discard (QEMU ignores trims);
- ``noagent``: no guest-agent channel at all;
- ``zhung``: a good guest whose qemu-ga is frozen (SIGSTOP) for the lock and kill test;
  its name sorts last, so with ``parallel = 1`` and no spread it is the last domain.

Every policy here includes only this module's guests (``vmtrim-live-<pid>-*``): the
libvirtd is shared, and other guests on it are not ours to trim.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import lab_domains
from helpers import du_bytes, vmtrim, vmtrim_argv
from lab_domains import OURS
from test_live_libvirt import Lab, LabDomain

lab = lab_domains.lab  # the shared module-scoped fixture: this module's guests

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]
MiB = 1024 * 1024
PREFIX = OURS


@pytest.fixture(scope="module")
def guests(lab: Lab) -> dict[str, LabDomain]:
    started = {
        "good": lab.start("good", write_mib=64),
        "blocked": lab.start("blocked", discard=False, write_mib=16),
        "noagent": lab.start("noagent", agent=False),
        "zhung": lab.start("zhung", write_mib=8),
    }
    for key in ("good", "blocked", "zhung"):
        started[key].until_deleted()
    return started


def write_policy(path: Path, *tags: str, **keys: object) -> Path:
    include = [f"{PREFIX}{tag}" for tag in tags] or [f"{PREFIX}*"]
    lines = [f"include = {json.dumps(include)}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(tmp: Path, policy: Path, *args: str, db: Path | None = None) -> Any:
    result = vmtrim(
        "run",
        "--policy",
        str(policy),
        "--db",
        str(db or tmp / "history.db"),
        "--lock",
        str(tmp / "run.lock"),
        *args,
    )
    return result


def rows(db: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def recorded_so_far(db: Path) -> int:
    if not db.exists():  # sqlite3.connect would create it under the run's feet
        return 0
    try:
        return int(rows(db, "SELECT COUNT(*) FROM domain_results")[0][0])
    except sqlite3.OperationalError:  # not created yet: the run is still creating the schema
        return 0


def test_dry_run_then_two_runs(guests: dict[str, LabDomain], tmp_path: Path) -> None:
    good, blocked, noagent = guests["good"], guests["blocked"], guests["noagent"]
    policy = write_policy(tmp_path / "policy.toml", "good", "blocked", "noagent", parallel=3)
    db = tmp_path / "history.db"

    # --dry-run: surveys and plans, changes nothing and records nothing.
    du_good, du_blocked = du_bytes(good.image), du_bytes(blocked.image)
    dry = run(tmp_path, policy, "--dry-run", "--json")
    assert dry.stdout, dry.stderr
    plan = {d["domain"]: d for d in json.loads(dry.stdout)["domains"]}
    assert plan[good.name]["status"] == "would_trim"
    assert (du_bytes(good.image), du_bytes(blocked.image)) == (du_good, du_blocked)
    assert not db.exists() and not (tmp_path / "run.lock").exists()

    first = run(tmp_path, policy, "--json")
    du_after = du_bytes(good.image)
    assert first.returncode == 1, first.stderr  # blocked and skipped are findings
    doc = json.loads(first.stdout)
    assert doc["schema"] == "vmtrim.run/1" and doc["recorded"] is True
    second = run(tmp_path, policy, "--json")
    assert second.returncode == 1, second.stderr

    # What the history says, read with plain SQL as the metrics and report will.
    results = rows(
        db,
        "SELECT r.run_id, r.domain, r.status, r.reason, r.blocking_layer, r.reclaimed,"
        " d.allocated_before, d.allocated_after, d.reclaimable_before, d.blocking_layer"
        " FROM domain_results r JOIN disk_results d ON d.result_id = r.id ORDER BY r.id",
    )
    runs = sorted({r[0] for r in results})
    assert len(runs) == 2
    by = {(r[0], r[1]): r for r in results}
    for run_id in runs:
        skipped = by[(run_id, noagent.name)]
        assert skipped[2] == "skipped" and "agent" in skipped[3]
        stopped = by[(run_id, blocked.name)]
        assert (stopped[2], stopped[4], stopped[9]) == ("blocked", "block_node", "block_node")
        assert stopped[3]  # the audit's reason
    # The blocked guest was not trimmed: its image kept what the guest freed.
    assert du_bytes(blocked.image) == du_blocked

    trimmed = by[(runs[0], good.name)]
    assert trimmed[2] == "trimmed"
    assert (trimmed[6], trimmed[7]) == (du_good, du_after)  # du, to the byte
    assert trimmed[5] == du_good - du_after >= 0.99 * 64 * MiB
    # The estimate made before the trim is within 10 % of what the trim got back.
    assert abs(trimmed[8] - trimmed[5]) <= 0.10 * trimmed[5]
    again = by[(runs[1], good.name)]
    assert again[2] == "trimmed" and abs(again[5]) <= 1 * MiB

    # Every disk row has what the metrics need: virtual size, guest used, reclaimable.
    [(virtual, used, left, verdict)] = rows(
        db,
        "SELECT d.virtual_size, d.guest_used, d.reclaimable_after, d.verdict FROM disk_results d"
        " JOIN domain_results r ON r.id = d.result_id WHERE r.run_id = ? AND r.domain = ?",
        runs[1],
        good.name,
    )
    assert virtual == 128 * MiB and 0 < used < 8 * MiB and left is not None
    assert verdict == "pass"

    history = vmtrim("history", "--db", str(db), "--json", good.name, blocked.name, noagent.name)
    assert history.returncode == 0, history.stderr
    summary = {d["domain"]: d for d in json.loads(history.stdout)["domains"]}
    assert summary[good.name]["runs"] == 2
    assert summary[good.name]["total_reclaimed"] == trimmed[5] + again[5]
    assert summary[good.name]["last_reclaimed"] == again[5]
    assert summary[blocked.name]["last_status"] == "blocked"
    assert summary[noagent.name]["last_status"] == "skipped"
    csv = vmtrim("history", "--db", str(db), "--csv", good.name)
    assert csv.stdout.splitlines()[1].startswith(f"{good.name},2,{trimmed[5] + again[5]},")
    table = vmtrim("history", "--db", str(db))
    assert good.name in table.stdout and "blocked" in table.stdout


def test_a_corrupt_database_loses_no_result(guests: dict[str, LabDomain], tmp_path: Path) -> None:
    noagent = guests["noagent"]
    db = tmp_path / "history.db"
    db.write_bytes(b"\x00garbage\x00" * 1000)
    policy = write_policy(tmp_path / "policy.toml", "noagent")
    result = run(tmp_path, policy, db=db)
    assert result.returncode == 3
    assert noagent.name in result.stdout and "skipped" in result.stdout  # printed anyway
    [line] = result.stderr.splitlines()
    assert line.startswith(f"vmtrim: {db}: history database: ")
    assert line.endswith("these results were not recorded")


def test_the_lock_and_a_kill_mid_domain(guests: dict[str, LabDomain], tmp_path: Path) -> None:
    hung = guests["zhung"]
    # Freeze qemu-ga in the guest: the channel stays open and nothing answers.
    hung.agent(
        {
            "execute": "guest-exec",
            "arguments": {"path": "/bin/sh", "arg": ["-c", "kill -STOP $(pidof qemu-ga)"]},
        }
    )
    time.sleep(1)
    db = tmp_path / "history.db"
    policy = write_policy(tmp_path / "policy.toml", parallel=1, timeout=120)
    first = subprocess.Popen(
        vmtrim_argv(
            "run", "--policy", str(policy), "--db", str(db), "--lock", str(tmp_path / "run.lock")
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Wait until the three guests before zhung are recorded: it is now inside zhung.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and first.poll() is None:
            if recorded_so_far(db) == 3:
                break
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        recorded = rows(db, "SELECT domain, status FROM domain_results ORDER BY id")
        assert [d for d, _ in recorded] == sorted(
            f"{PREFIX}{t}" for t in ("blocked", "good", "noagent")
        )

        second = run(tmp_path, policy)
        assert second.returncode == 3
        assert second.stderr.splitlines() == [
            f"vmtrim: {tmp_path / 'run.lock'}: another run holds the lock (PID {first.pid})"
        ]
        first.send_signal(signal.SIGKILL)
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL

    check = subprocess.run(
        ["sqlite3", str(db), "PRAGMA integrity_check"], capture_output=True, text=True, check=True
    )
    assert check.stdout.strip() == "ok"
    assert rows(db, "SELECT domain, status FROM domain_results ORDER BY id") == recorded
    assert rows(db, "SELECT COUNT(*) FROM disk_results")[0][0] == 3
    assert rows(db, "SELECT ended IS NULL FROM runs") == [(1,)]  # killed: never ended

    # A later run works: the lock went with the killed process, the database is whole.
    later = run(tmp_path, write_policy(tmp_path / "later.toml", parallel=2, timeout=4))
    assert later.returncode == 1, later.stderr
    last = rows(
        db,
        "SELECT domain, status FROM domain_results WHERE run_id = (SELECT MAX(id) FROM runs)"
        " ORDER BY domain",
    )
    assert [d for d, _ in last] == sorted(f"{PREFIX}{t}" for t in guests)
    assert dict(last)[hung.name] == "skipped"


def test_vmtrim_trim_records_unless_no_history(
    guests: dict[str, LabDomain], tmp_path: Path
) -> None:
    good, noagent = guests["good"], guests["noagent"]
    db = tmp_path / "history.db"
    trim = vmtrim("trim", "-c", "qemu:///system", "--db", str(db), good.name, noagent.name)
    assert trim.returncode == 1, trim.stderr  # noagent is skipped
    recorded = rows(
        db,
        "SELECT runs.kind, r.domain, r.status, d.allocated_after FROM runs"
        " JOIN domain_results r ON r.run_id = runs.id"
        " LEFT JOIN disk_results d ON d.result_id = r.id ORDER BY r.domain",
    )
    assert [(k, d, s) for k, d, s, _ in recorded] == [
        ("trim", good.name, "trimmed"),
        ("trim", noagent.name, "skipped"),
    ]
    assert recorded[0][3] == du_bytes(good.image)
    quiet = vmtrim("trim", "-c", "qemu:///system", "--db", str(db), "--no-history", good.name)
    assert quiet.returncode == 0, quiet.stderr
    assert rows(db, "SELECT COUNT(*) FROM runs") == [(1,)]

"""`vmtrim schedule`: the units it writes pass the real `systemd-analyze verify`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import vmtrim
from vmtrim.history.store import DomainRecord, History

UNITS = Path("etc/systemd/system")


def verify_units(*paths: Path) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify on the unit files themselves: no running systemd needed.

    (--root=DIR would look for sysinit.target and the rest under DIR too.) It exits 0
    on unknown keys or bad values, with a warning on stderr, so stderr must be empty.
    """
    return subprocess.run(
        ["systemd-analyze", "verify", *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
    )


def unit_keys(path: Path) -> dict[str, str]:
    keys = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            keys[key] = value
    return keys


def test_install_under_a_root_writes_units_systemd_accepts(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('include = ["web-*"]\n')
    result = vmtrim(
        "schedule",
        "install",
        "--root",
        str(tmp_path),
        "--on-calendar",
        "Sun 03:00",
        "--randomized-delay",
        "30m",
        "--policy",
        str(policy),
        "--watch",
    )
    assert result.returncode == 0, result.stderr
    directory = tmp_path / UNITS
    service, timer, watch = (
        directory / "vmtrim-run.service",
        directory / "vmtrim-run.timer",
        directory / "vmtrim-watch.service",
    )
    checked = verify_units(service, timer, watch)
    assert (checked.returncode, checked.stderr) == (0, "")
    run_keys, timer_keys = unit_keys(service), unit_keys(timer)
    assert run_keys["Type"] == "oneshot"
    assert run_keys["IOSchedulingClass"] == "idle"
    assert int(run_keys["Nice"]) > 0
    assert run_keys["ExecStart"].endswith(f"run --policy {policy}")
    assert (timer_keys["OnCalendar"], timer_keys["RandomizedDelaySec"]) == ("Sun 03:00", "1800")
    assert timer_keys["Persistent"] == "true"
    assert unit_keys(watch)["ExecStart"].endswith(f"watch --policy {policy}")
    # systemctl --root enabled them offline: the symlinks systemd reads at boot.
    assert (directory / "timers.target.wants" / "vmtrim-run.timer").is_symlink()
    assert (directory / "multi-user.target.wants" / "vmtrim-watch.service").is_symlink()


def test_a_changed_unit_is_backed_up_and_an_unchanged_one_left_alone(tmp_path: Path) -> None:
    first = vmtrim("schedule", "install", "--root", str(tmp_path))
    assert first.returncode == 0, first.stderr
    timer = tmp_path / UNITS / "vmtrim-run.timer"
    before = timer.read_text()
    again = vmtrim("schedule", "install", "--root", str(tmp_path))
    assert f"unchanged {timer}" in again.stdout
    assert not list(timer.parent.glob("*.bak"))
    daily = vmtrim("schedule", "install", "--root", str(tmp_path), "--on-calendar", "daily")
    assert daily.returncode == 0, daily.stderr
    [backup] = timer.parent.glob("vmtrim-run.timer.vmtrim-*.bak")
    assert backup.read_text() == before
    assert unit_keys(timer)["OnCalendar"] == "daily"
    assert verify_units(timer).stderr == ""


def test_bad_calendar_is_refused_by_systemd_analyze(tmp_path: Path) -> None:
    result = vmtrim(
        "schedule", "install", "--root", str(tmp_path), "--on-calendar", "every blue moon"
    )
    assert result.returncode == 2
    assert result.stderr.startswith("vmtrim: --on-calendar every blue moon: ")
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / UNITS).exists()


def test_without_systemd_install_prints_a_cron_line_and_exits_1() -> None:
    if Path("/run/systemd/system").is_dir():
        pytest.fail("this host runs systemd: the no-systemd case cannot be shown here")
    result = vmtrim("schedule", "install", "--randomized-delay", "10m")
    assert result.returncode == 1
    [line] = result.stdout.splitlines()
    fields = line.split()
    assert fields[:6] == ["0", "0", "*", "*", "1", "root"]  # systemd's weekly: Monday 00:00
    assert "shuf -i 0-600" in line and line.endswith(" run")
    assert "systemd is not running" in result.stderr
    assert not Path("/etc/systemd/system/vmtrim-run.timer").exists()


def test_status_shows_next_from_the_timer_and_last_from_the_history(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    with History.open(db) as history:
        run = history.begin_run("run", trigger="policy")
        history.record(run, DomainRecord("web", "trimmed"))
        history.record(run, DomainRecord("db", "blocked", reason="discard off"))
        history.end_run(run)
    missing = vmtrim("schedule", "status", "--root", str(tmp_path), "--db", str(db), "--json")
    assert missing.returncode == 1
    assert json.loads(missing.stdout)["installed"] is False
    assert vmtrim("schedule", "install", "--root", str(tmp_path)).returncode == 0
    status = vmtrim("schedule", "status", "--root", str(tmp_path), "--db", str(db), "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["schema"] == "vmtrim.schedule/1"
    assert (doc["installed"], doc["on_calendar"]) == (True, "weekly")
    assert doc["next"].startswith("Mon ")  # systemd-analyze's answer for "weekly"
    assert doc["last_run"]["statuses"] == {"trimmed": 1, "blocked": 1}
    text = vmtrim("schedule", "status", "--root", str(tmp_path), "--db", str(db))
    assert "next run: Mon " in text.stdout
    assert "1 blocked, 1 trimmed" in text.stdout


def test_remove_takes_the_units_and_their_links_away(tmp_path: Path) -> None:
    assert vmtrim("schedule", "install", "--root", str(tmp_path), "--watch").returncode == 0
    result = vmtrim("schedule", "remove", "--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    directory = tmp_path / UNITS
    assert sorted(p.name for p in directory.glob("vmtrim-*")) == []
    assert not os.path.lexists(directory / "timers.target.wants" / "vmtrim-run.timer")
    again = vmtrim("schedule", "remove", "--root", str(tmp_path))
    assert "no vmtrim units" in again.stdout

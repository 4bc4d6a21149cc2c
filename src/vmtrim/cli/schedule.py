"""``vmtrim schedule install|remove|status``: the systemd timer that runs the policy.

Exit codes: 0 done (status: the timer is installed); 1 no systemd here, so the
equivalent cron line is printed instead (status: no timer installed); 2 bad input;
3 a unit could not be written or systemctl failed.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import click

from vmtrim.errors import EXIT_FINDINGS, EXIT_OK, EnvironmentProblem

SCHEMA = "vmtrim.schedule/1"

_root = click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("/"),
    show_default=True,
    metavar="DIR",
    help="Write under DIR/etc/systemd/system (an image or a chroot).",
)


@click.group("schedule")
def schedule() -> None:
    """Install, remove or show the systemd timer that runs `vmtrim run`."""


@schedule.command("install")
@click.option("--on-calendar", default="weekly", show_default=True, metavar="WHEN")
@click.option("--randomized-delay", default="1h", show_default=True, metavar="DURATION")
@click.option("--policy", "policy_file", metavar="FILE", help="The policy the run uses.")
@click.option("--db", metavar="FILE", help="The history database the run writes.")
@click.option("--watch", is_flag=True, help="Also install vmtrim-watch.service.")
@_root
def install(
    on_calendar: str,
    randomized_delay: str,
    policy_file: str | None,
    db: str | None,
    watch: bool,
    root: Path,
) -> int:
    """Write vmtrim-run.service and vmtrim-run.timer (and vmtrim-watch.service), enable them."""
    from vmtrim.run import schedule as sched

    if policy_file:
        from vmtrim.run.policy import load_policy

        load_policy(policy_file)  # a bad policy fails now, not at 3 am
        policy_file = str(Path(policy_file).resolve())
    if db:
        db = str(Path(db).resolve())
    plan = sched.Schedule(
        on_calendar=sched.check_calendar(on_calendar),
        randomized_delay=sched.parse_delay(randomized_delay),
        policy=policy_file,
        db=db,
        watch=watch,
    )
    live = root.resolve() == Path("/")
    if live and not sched.systemd_running():
        click.echo(sched.cron_line(plan))
        click.echo(
            f"vmtrim: systemd is not running on this host (PID 1 is {_pid1()}): no timer "
            "installed; the line above is the cron equivalent (put it in /etc/cron.d/vmtrim)",
            err=True,
        )
        return EXIT_FINDINGS
    for item in sched.install(plan, root):
        if not item.changed:
            click.echo(f"unchanged {item.path}")
        else:
            backup = f" (the old one is in {item.backup})" if item.backup else ""
            click.echo(f"wrote {item.path}{backup}")
    names = [sched.RUN_TIMER, *([sched.WATCH_SERVICE] if watch else [])]
    if live:
        _systemctl(root, "daemon-reload")
        _systemctl(root, "enable", "--now", *names)
        click.echo(f"enabled and started {', '.join(names)}")
    else:
        result = sched.systemctl(root, "enable", *names)
        if result is not None and result.returncode == 0:
            click.echo(f"enabled {', '.join(names)} under {root}")
        else:
            why = "systemctl is not installed" if result is None else result.stderr.strip()
            click.echo(f"vmtrim: {root}: not enabled ({why})", err=True)
    return EXIT_OK


@schedule.command("remove")
@_root
def remove(root: Path) -> int:
    """Disable and remove the vmtrim units."""
    from vmtrim.run import schedule as sched

    names = [sched.RUN_TIMER, sched.WATCH_SERVICE]
    present = [n for n in names if (root / sched.UNIT_DIR / n).exists()]
    if present and (root.resolve() != Path("/") or sched.systemd_running()):
        sched.systemctl(
            root, "disable", *([] if root.resolve() != Path("/") else ["--now"]), *present
        )
    gone = sched.remove(root)
    for path in gone:
        click.echo(f"removed {path}")
    if not gone:
        click.echo(f"no vmtrim units under {root / sched.UNIT_DIR}")
    if gone and root.resolve() == Path("/") and sched.systemd_running():
        _systemctl(root, "daemon-reload")
    return EXIT_OK


@schedule.command("status")
@click.option("--db", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="Print one vmtrim.schedule/1 document.")
@_root
def status(db: Path | None, as_json: bool, root: Path) -> int:
    """The next and the last run: from systemd when it runs here, and from the history."""
    from vmtrim.run import schedule as sched

    timer = root / sched.UNIT_DIR / sched.RUN_TIMER
    installed = timer.exists()
    calendar = _calendar_of(timer) if installed else None
    systemd = sched.timer_times() if root.resolve() == Path("/") else None
    next_run = (systemd or {}).get("NextElapseUSecRealtime") or None
    if next_run is None and calendar:
        next_run = _next_elapse(calendar)
    last = _last_from_history(db)
    doc: dict[str, Any] = {
        "timer": str(timer),
        "installed": installed,
        "on_calendar": calendar,
        "systemd_running": sched.systemd_running(),
        "next": next_run,
        "systemd_last_trigger": (systemd or {}).get("LastTriggerUSec") or None,
        "last_run": last,
    }
    if as_json:
        from vmtrim.output import print_json

        print_json(SCHEMA, doc)
    else:
        _print_status(doc)
    return EXIT_OK if installed else EXIT_FINDINGS


def _pid1() -> str:
    try:
        return Path("/proc/1/comm").read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _systemctl(root: Path, *args: str) -> None:
    from vmtrim.run import schedule as sched

    result = sched.systemctl(root, *args)
    if result is not None and result.returncode != 0:
        raise EnvironmentProblem(
            f"systemctl {' '.join(args)} failed: {' '.join(result.stderr.split())}",
            subject=str(root),
        )


def _calendar_of(timer: Path) -> str | None:
    for line in timer.read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "OnCalendar":
            return value.strip()
    return None


def _next_elapse(calendar: str) -> str | None:
    """What systemd would run next, asked of systemd-analyze (works without systemd)."""
    import shutil
    import subprocess

    if shutil.which("systemd-analyze") is None:
        return None
    result = subprocess.run(
        ["systemd-analyze", "calendar", calendar], capture_output=True, text=True, check=False
    )
    for line in result.stdout.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Next elapse":
            return value.strip()
    return None


def _last_from_history(db: Path | None) -> dict[str, Any] | None:
    from vmtrim.history.query import last_run
    from vmtrim.history.store import History, default_db_path

    path = db or default_db_path()
    if not path.exists():
        return None
    with History.open(path, create=False) as history:
        run = last_run(history)
    if run is None:
        return None
    return {
        "started": run.started,
        "ended": run.ended,
        "host": run.host,
        "trigger": run.trigger,
        "statuses": run.statuses,
    }


def _print_status(doc: dict[str, Any]) -> None:
    from vmtrim.output import print_line

    if doc["installed"]:
        print_line(f"timer: {doc['timer']} (OnCalendar={doc['on_calendar']})")
    else:
        print_line(f"timer: not installed ({doc['timer']} does not exist)")
    if not doc["systemd_running"]:
        print_line("systemd: not running on this host; the next run is what the timer would do")
    print_line(f"next run: {doc['next'] or 'unknown'}")
    if doc["systemd_last_trigger"]:
        print_line(f"last trigger (systemd): {doc['systemd_last_trigger']}")
    last = doc["last_run"]
    if last is None:
        print_line("last run (history): none recorded")
        return
    started = datetime.fromtimestamp(last["started"]).strftime("%Y-%m-%d %H:%M:%S")
    if last["ended"] is None:
        state = "did not finish (running, or killed)"
    else:
        state = f"took {last['ended'] - last['started']:.1f} s"
    counts = ", ".join(f"{n} {status}" for status, n in sorted(last["statuses"].items()))
    print_line(f"last run (history): {started}, {state}: {counts or 'no domains'}")

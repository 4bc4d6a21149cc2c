"""systemd units for ``vmtrim run`` (a timer) and ``vmtrim watch`` (a service).

:func:`install` writes, under ``ROOT/etc/systemd/system``:

- ``vmtrim-run.service``: ``Type=oneshot``, ``Nice=10``, ``IOSchedulingClass=idle``;
  vmtrim's own flock keeps two runs apart (a second exits 3, "another run holds the
  lock"); exit 1 (a domain blocked, skipped or failed, all recorded) is not a failure.
- ``vmtrim-run.timer``: ``OnCalendar=``, ``RandomizedDelaySec=``, ``Persistent=true``
  (a run missed while the host was off happens at the next boot).
- with ``--watch``, ``vmtrim-watch.service``.

Each file is written atomically; a file that exists with other content is backed up
beside it first (``NAME.vmtrim-<UTC time>.bak``, which systemd does not load). On the
running system (``ROOT`` is ``/`` and systemd is PID 1) the timer is enabled and
started; for another root, ``systemctl --root`` enables it offline when systemctl is
installed. A host without systemd gets the equivalent cron line instead.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from vmtrim.errors import BadInput, EnvironmentProblem
from vmtrim.run.policy import parse_duration

RUN_SERVICE = "vmtrim-run.service"
RUN_TIMER = "vmtrim-run.timer"
WATCH_SERVICE = "vmtrim-watch.service"
UNIT_DIR = Path("etc/systemd/system")

# OnCalendar shorthands and the cron fields that mean the same (systemd's weekly is Monday).
_CRON = {
    "minutely": "* * * * *",
    "hourly": "0 * * * *",
    "daily": "0 0 * * *",
    "weekly": "0 0 * * 1",
    "monthly": "0 0 1 * *",
    "yearly": "0 0 1 1 *",
    "annually": "0 0 1 1 *",
}


@dataclass(frozen=True)
class Schedule:
    on_calendar: str = "weekly"
    randomized_delay: float = 3600.0
    policy: str | None = None
    db: str | None = None
    watch: bool = False


def systemd_running() -> bool:
    """sd_booted(): PID 1 is systemd exactly when /run/systemd/system exists."""
    return Path("/run/systemd/system").is_dir()


def vmtrim_command() -> list[str]:
    """How a unit starts this vmtrim: its console script beside the interpreter, or -m."""
    script = Path(sys.executable).parent / "vmtrim"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "vmtrim"]


def check_calendar(expression: str) -> str:
    """An OnCalendar= expression systemd accepts (asked of systemd-analyze when present)."""
    if not expression.strip() or "\n" in expression:
        raise BadInput("an empty or multi-line calendar expression", subject="--on-calendar")
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if expression not in _CRON:
            raise BadInput(
                f"without systemd-analyze only {', '.join(_CRON)} can be checked",
                subject="--on-calendar",
            )
        return expression
    result = subprocess.run(
        [analyze, "calendar", expression], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        why = " ".join(result.stderr.split()) or "not a calendar expression"
        raise BadInput(why, subject=f"--on-calendar {expression}")
    return expression


def parse_delay(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise BadInput(str(exc), subject="--randomized-delay") from None


def _args(schedule: Schedule) -> str:
    extra = []
    if schedule.policy:
        extra += ["--policy", schedule.policy]
    if schedule.db:
        extra += ["--db", schedule.db]
    return " ".join(shlex.quote(a) for a in extra)


def units(schedule: Schedule) -> dict[str, str]:
    """unit file name -> its text."""
    command = " ".join(shlex.quote(a) for a in vmtrim_command())
    args = _args(schedule)
    out = {
        RUN_SERVICE: f"""\
# Written by `vmtrim schedule install`; `vmtrim schedule remove` removes it.
[Unit]
Description=vmtrim: trim the guests the policy selects and record what came back
After=libvirtd.service virtqemud.service

[Service]
Type=oneshot
ExecStart={command} run {args}
# vmtrim's flock keeps runs apart: a second one exits 3 "another run holds the lock".
# Exit 1 means a domain was blocked, skipped or failed: recorded, not a unit failure.
SuccessExitStatus=1
Nice=10
IOSchedulingClass=idle
StateDirectory=vmtrim
""".replace(" run \n", " run\n"),
        RUN_TIMER: f"""\
# Written by `vmtrim schedule install`; `vmtrim schedule remove` removes it.
[Unit]
Description=vmtrim: run the trim policy ({schedule.on_calendar})

[Timer]
OnCalendar={schedule.on_calendar}
RandomizedDelaySec={int(schedule.randomized_delay)}
Persistent=true
Unit={RUN_SERVICE}

[Install]
WantedBy=timers.target
""",
    }
    if schedule.watch:
        out[WATCH_SERVICE] = f"""\
# Written by `vmtrim schedule install --watch`; `vmtrim schedule remove` removes it.
[Unit]
Description=vmtrim watch: trim a domain after a disk move, a migration or a start
After=libvirtd.service virtqemud.service

[Service]
Type=simple
ExecStart={command} watch {_args(Schedule(policy=schedule.policy, db=schedule.db))}
Restart=on-failure
RestartSec=10
Nice=10
IOSchedulingClass=idle
StateDirectory=vmtrim

[Install]
WantedBy=multi-user.target
""".replace(" watch \n", " watch\n")
    return out


def cron_line(schedule: Schedule) -> str:
    """The /etc/cron.d line that does what the timer would (no catch-up after downtime)."""
    fields = _CRON.get(schedule.on_calendar)
    if fields is None:
        raise BadInput(
            f"no cron equivalent of OnCalendar={schedule.on_calendar}; use one of "
            + ", ".join(_CRON),
            subject="--on-calendar",
        )
    command = " ".join(shlex.quote(a) for a in vmtrim_command())
    args = _args(schedule)
    delay = int(schedule.randomized_delay)
    # cron has no RandomizedDelaySec: sleep a random part of it (% is special in crontabs).
    sleep = f"sleep $(shuf -i 0-{delay} -n 1) && " if delay else ""
    return f"{fields} root {sleep}nice -n 10 ionice -c 3 {command} run{' ' + args if args else ''}"


@dataclass
class Written:
    path: Path
    changed: bool
    backup: Path | None = None


def install(schedule: Schedule, root: Path) -> list[Written]:
    """Write the units under ``root``; unchanged files are left alone, changed ones backed up."""
    from vmtrim._util.files import atomic_write, backup_beside

    directory = root / UNIT_DIR
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot create: {exc.strerror}", subject=str(directory)) from exc
    written = []
    for name, text in units(schedule).items():
        path = directory / name
        try:
            old = path.read_bytes()
        except FileNotFoundError:
            old = None
        except OSError as exc:
            raise EnvironmentProblem(f"cannot read: {exc.strerror}", subject=str(path)) from exc
        if old == text.encode():
            written.append(Written(path, changed=False))
            continue
        backup = backup_beside(path, old) if old is not None else None
        atomic_write(path, text, new_file_mode=0o644)
        written.append(Written(path, changed=True, backup=backup))
    return written


def remove(root: Path) -> list[Path]:
    """Delete the vmtrim units under ``root``; the ones that were there."""
    gone = []
    for name in (RUN_TIMER, RUN_SERVICE, WATCH_SERVICE):
        path = root / UNIT_DIR / name
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise EnvironmentProblem(f"cannot remove: {exc.strerror}", subject=str(path)) from exc
        gone.append(path)
    return gone


def systemctl(root: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
    """systemctl on the running system (root /) or offline on another root; None without it."""
    tool = shutil.which("systemctl")
    if tool is None:
        return None
    live = root.resolve() == Path("/")
    if live and not systemd_running():
        return None
    command = [tool, *([] if live else [f"--root={root}"]), *args]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)


def timer_times() -> dict[str, str] | None:
    """NextElapseUSecRealtime and LastTriggerUSec of the timer, from the running systemd."""
    if not systemd_running() or shutil.which("systemctl") is None:
        return None
    result = subprocess.run(
        [
            "systemctl",
            "show",
            RUN_TIMER,
            "-p",
            "NextElapseUSecRealtime",
            "-p",
            "LastTriggerUSec",
            "-p",
            "ActiveState",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if result.returncode != 0:
        return None
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)

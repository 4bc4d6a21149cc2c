"""``vmtrim run`` (this module is not cli/run.py: that name is vmtrim.cli.run, the entry function).

One pass of the policy over every selected domain, recorded in the history.

Exit codes: 0 every domain trimmed (or not running, or the window is closed);
1 a domain was blocked, skipped for want of an agent, or failed; 2 a bad policy;
3 another run holds the lock, a connection failed, or the results were not recorded.
"""

from __future__ import annotations

import socket
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vmtrim.cli.options import db_option, hosts_options, lock_option, policy_option
from vmtrim.errors import EXIT_ENVIRONMENT, EXIT_FINDINGS, EXIT_OK, EnvironmentProblem

if TYPE_CHECKING:
    from vmtrim.history.store import DiskRecord
    from vmtrim.run.engine import Outcome
    from vmtrim.run.policy import Policy

_FINDINGS = ("failed", "blocked", "no_effect")
_NOT_FINDINGS = ("the maintenance window", "the run was stopped")


@click.command("run")
@policy_option
@click.option("--dry-run", is_flag=True, help="Survey and plan only: trim and record nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one vmtrim.run/1 JSON document.")
@db_option
@lock_option
@hosts_options(  # fleet: the hosts, instead of the policy's connect list
    "A libvirt URI to run on instead of the policy's connect list; repeat for hosts."
)
def run(
    policy_file: Path | None,
    dry_run: bool,
    as_json: bool,
    db: Path | None,
    lock_file: Path | None,
    uris: tuple[str, ...] = (),
    hosts_file: str | None = None,
    connect_timeout: float = 15.0,
) -> int:
    """Trim every domain the policy selects, and record what the host got back.

    \b
    Each domain: audit (configuration and guest layers), guest-fstrim through the
    agent, the host allocation of each disk before and after, and an estimate of
    what is still reclaimable (allocation minus what the guest filesystems use).
    A domain blocked at a configuration or host layer is recorded, not trimmed.

    A disk on an LVM thin pool has the pool's data usage before and after in its
    record; a disk that got back clearly less than the guest trimmed on it has the
    causes that apply (as trim --explain lists them).

    \b
    Exit codes: 0 every domain trimmed (or not running, or outside the window),
    1 a domain was blocked, skipped for want of an agent, or failed, 2 a bad
    policy, 3 another run holds the lock, a connection failed, or the results
    could not be recorded (they are printed all the same), 4 internal error,
    130 interrupted, 141 stdout closed early.
    """
    from vmtrim.run.engine import execute, plan, window_open
    from vmtrim.run.lock import run_lock
    from vmtrim.run.policy import load_policy
    from vmtrim.run.record import Recorder

    policy = load_policy(policy_file)  # a bad policy stops here, exit 2, before anything runs
    if uris or hosts_file:  # fleet: -c/--hosts replace the policy's connect list
        from dataclasses import replace

        from vmtrim.fleet.hosts import host_list

        policy = replace(policy, connect=tuple(host_list(uris, hosts_file)))
    host = socket.gethostname()
    started = time.time()
    now = datetime.now()
    if not dry_run and not window_open(policy, now):
        message = (
            f"outside the maintenance window {policy.window} (now {now:%H:%M}): nothing trimmed"
        )
        _print(as_json, policy, host, started, [], dry_run, None, message=message)
        return EXIT_OK
    problems: list[EnvironmentProblem] = []
    outcomes: list[Outcome] = []
    recorder: Recorder | None = None
    recorded_in: str | None = None
    with ExitStack() as stack:
        if not dry_run:
            stack.enter_context(run_lock(lock_file))
            recorder = Recorder(db, "run", policy_hash=policy.hash, trigger="policy")
            recorded_in = recorder.path  # for the metrics textfile, after finish() closes it
            stack.callback(recorder.finish)
        plans = []
        # fleet: every host opened at once, each within the connect timeout, kept alive
        from vmtrim.fleet.hosts import connect_all

        for _uri, opened in connect_all(policy.connect, connect_timeout):
            try:
                if isinstance(opened, EnvironmentProblem):
                    raise opened
                stack.callback(opened.close)
                plans.append(plan(opened, policy, host))
            except EnvironmentProblem as exc:
                problems.append(exc)
                click.echo(f"vmtrim: {exc.one_line()}", err=True)
        total = sum(len(p.items) for p in plans)
        with _progress(total) as advance:
            for outcome in execute(plans, policy, dry_run=dry_run):
                if recorder is not None:
                    began = time.monotonic()
                    recorder.record(outcome.record)
                    outcome.record_seconds = time.monotonic() - began
                outcomes.append(outcome)
                advance(outcome)
    # Shown in start order (spread offset, then name), whatever order they finished in.
    outcomes.sort(key=lambda o: (o.offset, o.record.domain))
    failed = [{"host": p.subject, "reason": p.message} for p in problems]  # fleet
    _print(as_json, policy, host, started, outcomes, dry_run, recorder, failed_hosts=failed)
    code = EXIT_OK
    if policy.textfile and recorded_in is not None:
        from vmtrim.report.metrics import write_textfile

        try:  # the run is recorded already; a metrics file that cannot be written is exit 3
            write_textfile(policy.textfile, recorded_in)
        except EnvironmentProblem as exc:
            click.echo(f"vmtrim: {exc.one_line()}", err=True)
            code = EXIT_ENVIRONMENT
    if any(_finding(o) for o in outcomes):
        code = EXIT_FINDINGS
    if problems:
        code = EXIT_ENVIRONMENT
    if recorder is not None and recorder.report() is not None:
        code = EXIT_ENVIRONMENT
    return code


def _finding(outcome: Outcome) -> bool:
    from vmtrim.trim.engine import NOT_RUNNING

    r = outcome.record
    if r.status in _FINDINGS:
        return True
    # Skipped for want of an agent is a finding; not running or a closed window is not.
    return r.status == "skipped" and not (
        r.reason == NOT_RUNNING
        or (r.reason or "").startswith(("the maintenance window", "the run"))
    )


class _progress:
    """A progress bar on a terminal's stderr; nothing elsewhere."""

    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        from vmtrim.output import progress_console

        err = progress_console()
        self.bar = Progress(
            TextColumn("run"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            console=err,
            transient=True,
            disable=not err.is_terminal,
        )
        self.task = self.bar.add_task("", total=total)

    def __enter__(self) -> Any:
        self.bar.__enter__()
        return lambda o: self.bar.update(
            self.task, advance=1, description=f"{o.record.domain}: {o.record.status}"
        )

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)


def _print(
    as_json: bool,
    policy: Policy,
    host: str,
    started: float,
    outcomes: list[Outcome],
    dry_run: bool,
    recorder: Any,
    *,
    message: str | None = None,
    failed_hosts: list[dict[str, str | None]] | None = None,
) -> None:
    from vmtrim.run.engine import SCHEMA, window_open

    if as_json:
        from vmtrim.output import print_json

        print_json(
            SCHEMA,
            {
                "host": host,
                "started": started,
                "ended": time.time(),
                "dry_run": dry_run,
                "policy": {**policy.to_json(), "hash": policy.hash, "file": policy.source},
                "window_open": window_open(policy),
                "message": message,
                "recorded": bool(recorder is not None and recorder.error is None),
                "db": recorder.path if recorder is not None else None,
                "run_id": recorder.run_id if recorder is not None else None,
                "domains": [o.to_json() for o in outcomes],
                "failed_hosts": failed_hosts or [],  # the policy's connect URIs that failed
            },
        )
        return
    from vmtrim.output import print_line

    if message:
        print_line(message)
        return
    _table(outcomes, dry_run)
    if dry_run and not window_open(policy):
        print_line(f"outside the maintenance window {policy.window}: a run now would trim nothing")


def _table(outcomes: list[Outcome], dry_run: bool) -> None:
    from vmtrim.output import Column, Row, Styled, human_bytes, render_table
    from vmtrim.trim.render import record_lines  # a disk's pool and causes, as trim shows them

    styles = {"trimmed": "green", "blocked": "red", "failed": "bold red", "skipped": "yellow"}
    rows: list[Row] = []
    for o in outcomes:
        r = o.record
        disks: list[DiskRecord | None] = [*r.disks] or [None]
        for i, d in enumerate(disks):
            last = i == len(disks) - 1
            rows.append(
                Row(
                    [
                        r.domain if i == 0 else "",
                        Styled(r.status, styles.get(r.status)) if i == 0 else "",
                        d.target if d else "-",
                        d.source if d else "-",
                        human_bytes(d.allocated_before) if d else "-",
                        human_bytes(d.allocated_after) if d else "-",
                        human_bytes(d.reclaimed) if d else "-",
                        human_bytes(d.reclaimable_after) if d else "-",
                        (d.blocking_layer or d.verdict or "-") if d else "-",
                        f"{r.seconds:.2f}" if i == 0 else "",
                    ],
                    details=[
                        *([r.reason] if last and r.reason else []),
                        *(
                            [f"{d.target}: no estimate: {d.reclaimable_note}"]
                            if d and d.reclaimable_note and r.status != "skipped"
                            else []
                        ),
                        *(record_lines(d) if d else []),
                    ],
                )
            )
    render_table(
        [
            Column("domain", shorten="middle"),
            Column("status"),
            Column("disk", priority=3),
            Column("source", shorten="middle", priority=2),
            Column("before", justify="right", priority=1),
            Column("after", justify="right", priority=1),
            Column("reclaimed", justify="right"),
            Column("reclaimable", justify="right"),
            Column("discard path", priority=2),
            Column("secs", justify="right", priority=3),
        ],
        rows,
        title="vmtrim run (dry run: nothing trimmed, nothing recorded)"
        if dry_run
        else "vmtrim run",
        notes=[
            "reclaimable: host allocation minus what the guest filesystems use (an estimate)",
        ],
    )
    if not outcomes:
        from vmtrim.output import print_line

        print_line("no domain matches the policy")

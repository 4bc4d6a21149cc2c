"""``vmtrim watch``: trim a domain after a disk move, a migration into this host, or a start.

Runs until SIGTERM or Ctrl-C (exit 0). Its log goes to stderr, one line per event,
trim and reconnect; ``--json`` also prints one vmtrim.watch/1 document per trim on
stdout (JSON lines). Exit 2 for a bad policy, 3 when no connection ever opened.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import click

from vmtrim.cli.options import db_option, lock_option, policy_option
from vmtrim.errors import EXIT_OK

SCHEMA = "vmtrim.watch/1"


@click.command("watch")
@click.option(
    "-c",
    "--connect",
    "uris",
    metavar="URI",
    multiple=True,
    help="libvirt URI to watch (default: the policy's connect list).",
)
@policy_option
@db_option
@lock_option
@click.option("--json", "as_json", is_flag=True, help="One vmtrim.watch/1 JSON line per trim.")
def watch(
    uris: tuple[str, ...],
    policy_file: Path | None,
    db: Path | None,
    lock_file: Path | None,
    as_json: bool,
) -> int:
    """Trim each domain `settle` seconds after a block copy or commit, a migration in,
    or a start, and record it with the event as the reason."""
    from vmtrim.run.policy import load_policy
    from vmtrim.run.watch import Watcher

    policy = load_policy(policy_file)

    def say(text: str) -> None:
        sys.stderr.write(f"vmtrim: watch: {text}\n")
        sys.stderr.flush()

    def emit(item: Any) -> None:
        outcome, reason, recorded = item
        line = {"schema": SCHEMA, "trigger": reason, "recorded": recorded, **outcome.to_json()}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    watcher = Watcher(
        uris or policy.connect,
        policy,
        db=db,
        lock=lock_file,
        say=say,
        on_result=emit if as_json else None,
    )
    stopped: list[str] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopped.append(signal.Signals(signum).name)
        watcher.stop.set()
        # No lock here: a signal handler must not wait on the lock the loop may hold.

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    watcher.run()
    say(f"stopped ({stopped[0] if stopped else 'done'})")
    return EXIT_OK

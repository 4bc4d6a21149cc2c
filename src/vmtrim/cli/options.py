"""Options several subcommands share: the same flag, the same help, written once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

F = TypeVar("F", bound=Callable[..., object])

FILE = click.Path(path_type=Path, dir_okay=False)

policy_option = click.option(
    "--policy",
    "policy_file",
    type=FILE,
    metavar="FILE",
    help="The policy (default: /etc/vmtrim/policy.toml, or $XDG_CONFIG_HOME/vmtrim/ when "
    "not root; absent means every default).",
)
db_option = click.option(
    "--db",
    type=FILE,
    metavar="FILE",
    help="The history database (default: /var/lib/vmtrim/history.db, or $XDG_STATE_HOME).",
)
lock_option = click.option(
    "--lock",
    "lock_file",
    type=FILE,
    metavar="FILE",
    help="The run lock (default: /run/vmtrim/run.lock, or $XDG_RUNTIME_DIR).",
)


def hosts_options(connect_help: str, parallel_help: str | None = None) -> Callable[[F], F]:
    """``-c URI`` (repeatable), ``--hosts FILE``, ``--hosts-parallel N`` (when
    ``parallel_help`` is given) and ``--connect-timeout S``: the fleet's options."""

    def apply(command: F) -> F:
        decorators = [
            click.option(
                "-c", "--connect", "uris", metavar="URI", multiple=True, help=connect_help
            ),
            click.option(
                "--hosts", "hosts_file", metavar="FILE", help="Hosts: one URI per line, # comments."
            ),
        ]
        if parallel_help is not None:
            decorators.append(
                click.option(
                    "--hosts-parallel",
                    type=click.IntRange(min=1),
                    default=8,
                    show_default=True,
                    metavar="N",
                    help=parallel_help,
                )
            )
        decorators.append(
            click.option(
                "--connect-timeout",
                type=click.FloatRange(min=0, min_open=True),
                default=15.0,
                show_default=True,
                metavar="S",
                help="A host that does not answer within S seconds (or stops answering) "
                "has failed.",
            )
        )
        for decorate in reversed(decorators):  # click lists options top to bottom
            command = decorate(command)
        return command

    return apply

"""Man pages generated from the click help: ``vmtrim.1``, ``vmtrim-audit.1``, ...

The pages say what ``--help`` says, in roff, one page per command and subcommand
(``vmtrim-image-info.1``). They are committed under ``man/`` and installed to
``share/man/man1`` by ``pip install``; a test regenerates them and compares, so
they cannot go stale. Regenerate with::

    .venv/bin/python -m pytest tests/test_cli_manpage.py --regenerate-output
    .venv/bin/python -m vmtrim.cli.manpage man/     # the same, without pytest

No date goes into a page (it would change on every run); the version does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vmtrim import __version__
from vmtrim.cli.group import COMPLETION_HELP

__all__ = ["pages", "write_pages"]

EXIT_STATUS = [
    ("0", "everything passes, or the change was already applied"),
    ("1", "findings, or a verification failed"),
    ("2", "bad input or usage"),
    ("3", "environment or connection error (no libvirtd, no agent, QEMU failed)"),
    ("4", "internal error (a bug in vmtrim; --debug shows the traceback)"),
    ("130", "interrupted (Ctrl-C, SIGTERM)"),
    ("141", "standard output was a pipe that closed early (| head): the output was cut"),
]


ENVIRONMENT = [
    ("LIBVIRT_DEFAULT_URI", "the libvirt URI when -c/--connect is not given"),
    ("NO_COLOR", "when set, no colour or other styling, even on a terminal"),
    ("COLUMNS", "the terminal width that tables fit (otherwise the terminal's own)"),
    ("VMTRIM_DEBUG", "like --debug"),
]


def roff(text: str) -> str:
    """Escape text for roff: backslashes, hyphens, and a leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = [("\\&" + line) if line[:1] in (".", "'") else line for line in text.split("\n")]
    return "\n".join(lines)


def _paragraphs(help_text: str) -> list[str]:
    """click's help text as roff: blank lines split paragraphs, ``\\b`` keeps line breaks."""
    out: list[str] = []
    for block in click.unstyle(help_text).strip().split("\n\n"):
        lines = block.split("\n")
        if lines[0].strip() == "\b":
            out += [".PP", ".nf", *(roff(line) for line in lines[1:]), ".fi"]
        else:
            out += [".PP", roff(" ".join(line.strip() for line in lines))]
    return out


def _page(path: list[str], command: click.Command, ctx: click.Context) -> str:
    name = "-".join(path)
    lines = [
        f'.TH "{name.upper()}" "1" "" "vmtrim {__version__}" "vmtrim manual"',
        ".SH NAME",
        f"{roff(name)} \\- {roff(command.get_short_help_str(limit=200))}",
        ".SH SYNOPSIS",
        f".B {roff(' '.join(path))}",
        roff(" ".join(command.collect_usage_pieces(ctx))),
        ".SH DESCRIPTION",
        *_paragraphs(command.help or ""),
    ]
    options = [p.get_help_record(ctx) for p in command.get_params(ctx)]
    records = [r for r in options if r is not None and r[1]]  # arguments have no help
    if records:
        lines.append(".SH OPTIONS")
        for opts, help_text in records:
            lines += [".TP", f"\\fB{roff(opts)}\\fR", roff(click.unstyle(help_text))]
    if isinstance(command, click.Group):
        lines.append(".SH COMMANDS")
        for sub in command.list_commands(ctx):
            child = command.get_command(ctx, sub)
            if child is not None and not child.hidden:
                summary = child.get_short_help_str(limit=200)
                lines += [
                    ".TP",
                    f"\\fB{roff(sub)}\\fR",
                    f"{roff(summary)} See \\fB{roff(name + '-' + sub)}\\fR(1).",
                ]
    if len(path) == 1:
        lines += [".SH SHELL COMPLETION", *_paragraphs(COMPLETION_HELP)]
        lines += [".SH ENVIRONMENT"]
        for var, meaning in ENVIRONMENT:
            lines += [".TP", f"\\fB{var}\\fR", roff(meaning)]
    lines += [".SH EXIT STATUS"]
    for code, meaning in EXIT_STATUS:
        lines += [".TP", f"\\fB{code}\\fR", roff(meaning)]
    see = ["vmtrim"] if len(path) > 1 else []
    lines += [
        ".SH SEE ALSO",
        ", ".join(f"\\fB{roff(s)}\\fR(1)" for s in [*see, "virsh", "qemu\\-img"]),
    ]
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """File name -> page text, for ``vmtrim`` and every command below it."""
    from vmtrim.cli.group import cli

    result: dict[str, str] = {}

    def walk(path: list[str], command: click.Command, parent: click.Context | None) -> None:
        ctx = click.Context(command, info_name=path[-1], parent=parent, **command.context_settings)
        result["-".join(path) + ".1"] = _page(path, command, ctx)
        if isinstance(command, click.Group):
            for sub in command.list_commands(ctx):
                child = command.get_command(ctx, sub)
                if child is not None and not child.hidden:
                    walk([*path, sub], child, ctx)

    walk(["vmtrim"], cli, None)
    return result


def write_pages(directory: Path) -> list[Path]:
    """Write every page that changed into ``directory``; remove pages of gone commands."""
    directory.mkdir(parents=True, exist_ok=True)
    generated = pages()
    for stale in directory.glob("*.1"):
        if stale.name not in generated:
            stale.unlink()
    written = []
    for name, text in generated.items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written


if __name__ == "__main__":
    for path in write_pages(Path(sys.argv[1] if len(sys.argv) > 1 else "man")):
        print(path)

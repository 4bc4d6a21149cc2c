"""Shell completion of libvirt domain names for the ``[DOMAIN...]`` arguments.

Set up with ``eval "$(_VMTRIM_COMPLETE=bash_source vmtrim)"`` (zsh_source, fish_source).
Names come from ``-c URI`` on the line being completed, else ``$LIBVIRT_DEFAULT_URI``,
else libvirt's default, over a read-only connection. Completion runs inside the
user's shell at every TAB: it must be quick and must never print, so any failure
(no libvirt-python, no daemon, a hung daemon past :data:`TIMEOUT`) completes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import click
    from click.shell_completion import CompletionItem

TIMEOUT = 2.0  # seconds for connecting and listing; after that, no completions


def domain_names(uri: str | None) -> list[str]:
    """Every domain's name on ``uri`` (defined or running), sorted; raises on failure."""
    from vmtrim._util.deadline import call_with_deadline
    from vmtrim.channels.libvirt import libvirt_module, resolve_uri

    libvirt = libvirt_module()

    def names() -> list[str]:
        conn = libvirt.openReadOnly(resolve_uri(uri))
        try:
            return sorted(str(dom.name()) for dom in conn.listAllDomains(0))
        finally:
            conn.close()

    return call_with_deadline(names, TIMEOUT, "completion")


def complete_domains(
    ctx: click.Context, _param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    from click.shell_completion import CompletionItem

    try:
        uri = ctx.params.get("uri") or ctx.params.get("connect")
        if not uri and ctx.params.get("uris"):  # -c given more than once (fleet): the first
            uri = ctx.params["uris"][0]
        names = domain_names(uri if isinstance(uri, str) else None)
    except BaseException:  # a shell's TAB must never show a traceback
        return []
    given = set(ctx.params.get("names") or ctx.params.get("domains") or ())
    return [CompletionItem(n) for n in names if n.startswith(incomplete) and n not in given]

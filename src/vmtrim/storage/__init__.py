"""The host storage under a disk: one command runner, and parsers of what the storage
tools say (mountinfo, loop, device-mapper, LVM, md, ZFS, RBD).

Everything here reads; nothing changes the storage. The same probe code runs on this
host (:class:`~vmtrim.storage.runner.LocalRunner`) and inside a guest through its agent's
guest-exec (:class:`~vmtrim.storage.runner.AgentRunner`), so the lab guest can prove
what this host's kernel cannot run (device-mapper).
"""

from typing import TYPE_CHECKING

from vmtrim._util.lazy import lazy_exports

if TYPE_CHECKING:
    from vmtrim.storage.block import Stack, ThinPool, block_stack
    from vmtrim.storage.runner import AgentRunner, LocalRunner, Output, Runner

__all__ = [
    "AgentRunner",
    "LocalRunner",
    "Output",
    "Runner",
    "Stack",
    "ThinPool",
    "block_stack",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "AgentRunner": "vmtrim.storage.runner",
        "LocalRunner": "vmtrim.storage.runner",
        "Output": "vmtrim.storage.runner",
        "Runner": "vmtrim.storage.runner",
        "Stack": "vmtrim.storage.block",
        "ThinPool": "vmtrim.storage.block",
        "block_stack": "vmtrim.storage.block",
    },
)

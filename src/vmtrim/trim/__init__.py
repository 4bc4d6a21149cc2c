"""Trim guests through their agent and measure what the host got back."""

from typing import TYPE_CHECKING

from vmtrim._util.lazy import lazy_exports

if TYPE_CHECKING:
    from vmtrim.trim.engine import TrimOptions, TrimResult, trim_all, trim_target
    from vmtrim.trim.libvirt import LibvirtTarget
    from vmtrim.trim.qemu import QemuTarget

__all__ = [
    "LibvirtTarget",
    "QemuTarget",
    "TrimOptions",
    "TrimResult",
    "trim_all",
    "trim_target",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "TrimOptions": "vmtrim.trim.engine",
        "TrimResult": "vmtrim.trim.engine",
        "trim_all": "vmtrim.trim.engine",
        "trim_target": "vmtrim.trim.engine",
        "LibvirtTarget": "vmtrim.trim.libvirt",
        "QemuTarget": "vmtrim.trim.qemu",
    },
)

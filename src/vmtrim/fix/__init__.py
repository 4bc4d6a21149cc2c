"""Rewrite libvirt XML and QEMU command lines so discard passes."""

from typing import TYPE_CHECKING

from vmtrim._util.lazy import lazy_exports

if TYPE_CHECKING:
    from vmtrim.fix.libvirt import fix_live
    from vmtrim.fix.policy import FixOptions, FixResult
    from vmtrim.fix.qemu import fix_qemu_args
    from vmtrim.fix.xml import fix_domain_xml

__all__ = [
    "FixOptions",
    "FixResult",
    "fix_domain_xml",
    "fix_live",
    "fix_qemu_args",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "FixOptions": "vmtrim.fix.policy",
        "FixResult": "vmtrim.fix.policy",
        "fix_domain_xml": "vmtrim.fix.xml",
        "fix_qemu_args": "vmtrim.fix.qemu",
        "fix_live": "vmtrim.fix.libvirt",
    },
)

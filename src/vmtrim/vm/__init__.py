"""Throwaway guests under QEMU or libvirt."""

from typing import TYPE_CHECKING

from vmtrim._util.lazy import lazy_exports

if TYPE_CHECKING:
    from vmtrim.vm.accel import choose_accel
    from vmtrim.vm.guest import DirectGuest, DiskSpec, GuestSpec, cleanup_on_signals
    from vmtrim.vm.libvirt import LibvirtGuest

__all__ = [
    "DirectGuest",
    "DiskSpec",
    "GuestSpec",
    "LibvirtGuest",
    "choose_accel",
    "cleanup_on_signals",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "DirectGuest": "vmtrim.vm.guest",
        "DiskSpec": "vmtrim.vm.guest",
        "GuestSpec": "vmtrim.vm.guest",
        "cleanup_on_signals": "vmtrim.vm.guest",
        "LibvirtGuest": "vmtrim.vm.libvirt",
        "choose_accel": "vmtrim.vm.accel",
    },
)

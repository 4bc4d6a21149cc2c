"""Every input (libvirt XML, QEMU command lines, QMP, live libvirt) read into the model."""

from typing import TYPE_CHECKING

from vmtrim._util.lazy import lazy_exports

if TYPE_CHECKING:
    from vmtrim.sources.libvirt_live import audit_live, live_domain
    from vmtrim.sources.libvirt_xml import parse_domain_file, parse_domain_xml
    from vmtrim.sources.qemu_args import parse_qemu_command, read_args_file, read_pid
    from vmtrim.sources.qmp import read_qmp

__all__ = [
    "audit_live",
    "live_domain",
    "parse_domain_file",
    "parse_domain_xml",
    "parse_qemu_command",
    "read_args_file",
    "read_pid",
    "read_qmp",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "parse_domain_file": "vmtrim.sources.libvirt_xml",
        "parse_domain_xml": "vmtrim.sources.libvirt_xml",
        "parse_qemu_command": "vmtrim.sources.qemu_args",
        "read_args_file": "vmtrim.sources.qemu_args",
        "read_pid": "vmtrim.sources.qemu_args",
        "read_qmp": "vmtrim.sources.qmp",
        "audit_live": "vmtrim.sources.libvirt_live",
        "live_domain": "vmtrim.sources.libvirt_live",
    },
)

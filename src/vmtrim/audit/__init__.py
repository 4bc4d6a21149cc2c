"""Follow each disk through every layer and say which one blocks discard."""

from typing import TYPE_CHECKING

from vmtrim._util.lazy import lazy_exports

if TYPE_CHECKING:
    from vmtrim.audit.engine import audit_domain
    from vmtrim.audit.hostprobe import HostProbes

__all__ = [
    "HostProbes",
    "audit_domain",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "audit_domain": "vmtrim.audit.engine",
        "HostProbes": "vmtrim.audit.hostprobe",
    },
)

"""Give shut-off images their space back: ``sparsify`` in place through the lab guest,
and ``compact`` (a ``qemu-img convert`` rewrite); both refuse an image in use."""

from typing import TYPE_CHECKING

from vmtrim._util.lazy import lazy_exports

if TYPE_CHECKING:
    from vmtrim.sparsify.compact import CompactResult, compact
    from vmtrim.sparsify.engine import SparsifyResult, checksums, sparsify
    from vmtrim.sparsify.inuse import qemu_lock_holder, refuse_if_in_use

__all__ = [
    "CompactResult",
    "SparsifyResult",
    "checksums",
    "compact",
    "qemu_lock_holder",
    "refuse_if_in_use",
    "sparsify",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "CompactResult": "vmtrim.sparsify.compact",
        "compact": "vmtrim.sparsify.compact",
        "SparsifyResult": "vmtrim.sparsify.engine",
        "checksums": "vmtrim.sparsify.engine",
        "sparsify": "vmtrim.sparsify.engine",
        "qemu_lock_holder": "vmtrim.sparsify.inuse",
        "refuse_if_in_use": "vmtrim.sparsify.inuse",
    },
)

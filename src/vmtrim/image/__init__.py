"""Read qcow2 and raw allocation without QEMU."""

from typing import TYPE_CHECKING

from vmtrim._util.lazy import lazy_exports

if TYPE_CHECKING:
    from vmtrim.image.allocation import allocated_bytes
    from vmtrim.image.info import ImageInfo, inspect
    from vmtrim.image.map import Extents, map_image
    from vmtrim.image.pool import PoolEntry, scan_pool

__all__ = [
    "Extents",
    "ImageInfo",
    "PoolEntry",
    "allocated_bytes",
    "inspect",
    "map_image",
    "scan_pool",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "ImageInfo": "vmtrim.image.info",
        "inspect": "vmtrim.image.info",
        "Extents": "vmtrim.image.map",
        "map_image": "vmtrim.image.map",
        "allocated_bytes": "vmtrim.image.allocation",
        "PoolEntry": "vmtrim.image.pool",
        "scan_pool": "vmtrim.image.pool",
    },
)

"""The pool view: ``vmtrim image info PATH...`` over many images in one process.

PATH may be image files or directories (a libvirt storage pool); a directory
contributes the files directly in it. Every image is inspected on its own, without
following backing files (each layer is a row of its own, and a base shared by
fifty overlays is read once). An image that cannot be read is a row with its error;
the others still count.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from vmtrim.errors import ImageError
from vmtrim.image.info import SCHEMA, ImageInfo, inspect

POOL_SCHEMA = "vmtrim.image-pool/1"


@dataclass
class PoolEntry:
    path: str
    info: ImageInfo | None = None
    error: str | None = None

    @property
    def reclaimable(self) -> int:
        return self.info.reclaim.max_trim_bytes if self.info else -1

    def to_json(self) -> dict[str, object]:
        if self.info is None:
            return {"schema": SCHEMA, "path": self.path, "error": self.error}
        return {"schema": SCHEMA, **self.info.to_json()}


def pool_paths(paths: Iterable[str]) -> list[str]:
    """Files named, and the entries of directories named (not their subdirectories)."""
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            try:
                names = sorted(os.listdir(path))
            except OSError as exc:
                raise ImageError(f"cannot list directory: {exc.strerror}", subject=path) from exc
            found = [
                os.path.join(path, n)
                for n in names
                if not n.startswith(".") and not os.path.isdir(os.path.join(path, n))
            ]
            if not found:
                raise ImageError("is a directory with no image files in it", subject=path)
            out += found
        else:
            out.append(path)
    return out


def _one(path: str, fmt: str | None) -> PoolEntry:
    try:
        return PoolEntry(path, info=inspect(path, follow_backing=False, fmt=fmt))
    except ImageError as exc:
        return PoolEntry(path, error=" ".join(exc.message.split()))


def scan_pool(
    paths: Iterable[str], fmt: str | None = None, workers: int | None = None
) -> list[PoolEntry]:
    """Every image, most reclaimable first; images that failed last, by name.

    Images are read by a few threads: the table scans are numpy loops that release
    the GIL, so a pool uses every core while memory stays one image per thread.
    """
    from concurrent.futures import ThreadPoolExecutor

    files = pool_paths(paths)
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as ex:
        entries = list(ex.map(lambda p: _one(p, fmt), files))
    entries.sort(key=lambda e: (-e.reclaimable, e.path))
    return entries

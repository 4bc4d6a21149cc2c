"""Ceph RBD images: ``rbd info --format json`` and the defaults when it cannot answer.

The JSON is the ``image`` section of ceph's src/tools/rbd/action/Info.cc: ``name``,
``id``, ``size``, ``objects``, ``order``, ``object_size``, ``snapshot_count``,
``block_name_prefix``, ``format``, ``features`` ... (with ``stripe_unit`` and
``stripe_count`` when striping is on).

What it means: RBD deletes an object only when a discard covers all of it; a partial
discard truncates or zeroes (FIELD.md [H2]). The kernel client (krbd) rounds discards
to ``alloc_size`` and drops the ones smaller than that, default 64 KiB (Linux
0c93e1b7a26b "rbd: round off and ignore discards that are too small", 2019), and sets
``discard_granularity`` to it (16d80c54ad42). The default object size is 4 MiB
(order 22, rbd(8) ``--object-size``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

DEFAULT_OBJECT_SIZE = 4 << 20
KRBD_ALLOC_SIZE = 64 << 10
MAX_JSON = 1 << 20


def image_of(source: str) -> str | None:
    """``rbd://HOSTS/POOL/IMAGE`` (vmtrim's source text of a network disk) -> POOL/IMAGE."""
    rest = source.removeprefix("rbd://")
    if rest == source or "/" not in rest:
        return None
    name = rest.split("/", 1)[1].strip("/")
    return name[:512] if name and not name.startswith("-") else None


def rbd_argv(image: str) -> list[str]:
    return ["rbd", "info", "--format", "json", "--", image]


@dataclass(frozen=True)
class RbdImage:
    name: str
    object_size: int
    measured: bool  # False: the documented default, rbd info did not answer
    size: int | None = None
    snapshots: int | None = None

    def describe(self) -> str:
        how = "from rbd info" if self.measured else "the default: not measured"
        snaps = f", {self.snapshots} snapshot(s)" if self.snapshots else ""
        return (
            f"RBD image {self.name}: object size {self.object_size >> 10} KiB ({how}){snaps};"
            " only a discard that covers a whole object deletes it (librbd skips partial"
            " ones with rbd_skip_partial_discard), and krbd drops discards under its"
            f" alloc_size ({KRBD_ALLOC_SIZE >> 10} KiB by default)"
        )


def _uint(value: object, limit: int = 1 << 64) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value < limit else None


def parse_info(name: str, text: str) -> RbdImage | None:
    """``rbd info --format json``; None when it is not that document."""
    try:
        doc = json.loads(text[:MAX_JSON])
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    size = _uint(doc.get("object_size"), 1 << 40)
    order = _uint(doc.get("order"), 64)
    if size is None and order is not None:
        size = 1 << order
    if not size:
        return None
    return RbdImage(name, size, True, _uint(doc.get("size")), _uint(doc.get("snapshot_count")))


def default_image(name: str) -> RbdImage:
    return RbdImage(name, DEFAULT_OBJECT_SIZE, False)

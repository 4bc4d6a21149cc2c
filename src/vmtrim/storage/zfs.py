"""ZFS zvols: ``zfs get -Hp`` and ``zpool get -Hp`` output, and what it means for reclaim.

The format (zfs-get(8), zpool-get(8), OpenZFS 2.1): ``-H`` is scripted mode, no header
and the fields ``name property value source`` separated by a single tab; ``-p`` prints
numbers as exact values (bytes). A value that is not set prints ``-`` (``none`` for a
refreservation set to none).

- ``volblocksize``: the zvol's block; a discard frees whole blocks only.
- ``refreservation``: space kept for the zvol whatever it holds. A zvol made without
  ``-s`` (sparse) gets refreservation = volsize (zfsprops(7) "refreservation"; Proxmox
  creates sparse zvols only with the storage's ``sparse`` option, FIELD.md [P4]): its
  discards free blocks inside the zvol, and the pool still counts them as used.
- ``compression``; ``autotrim`` of the pool (zpoolprops(7)): whether freed pool space is
  trimmed on the pool's own devices; off means ``zpool trim`` must be run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ZFS_PROPS = ("volblocksize", "volsize", "refreservation", "compression")
MAX_LINES = 1_000
_NUM = re.compile(r"^\d{1,20}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/ -]{0,255}$")


def zfs_argv(dataset: str) -> list[str]:
    return ["zfs", "get", "-Hp", "-o", "name,property,value,source", ",".join(ZFS_PROPS), dataset]


def zpool_argv(pool: str) -> list[str]:
    return ["zpool", "get", "-Hp", "-o", "name,property,value,source", "autotrim", pool]


def parse_get(text: str) -> dict[tuple[str, str], str]:
    """(name, property) -> value, from ``zfs get -Hp`` or ``zpool get -Hp``."""
    out: dict[tuple[str, str], str] = {}
    for line in text.splitlines()[:MAX_LINES]:
        fields = line.split("\t")
        if len(fields) != 4 or len(line) > 4096:
            continue
        name, prop, value, _source = fields
        if _NAME.match(name) and re.match(r"^[a-z0-9_:.]{1,64}$", prop):
            out[(name, prop)] = value[:256]
    return out


def _bytes(value: str | None) -> int | None:
    return int(value) if value is not None and _NUM.match(value) else None


def dataset_of(device: str) -> str | None:
    """``/dev/zvol/POOL/VOL`` (the udev link zvol_id makes) -> ``POOL/VOL``."""
    prefix = "/dev/zvol/"
    if not device.startswith(prefix):
        return None
    name = device[len(prefix) :].strip("/")
    return name if "/" in name and _NAME.match(name) and ".." not in name.split("/") else None


@dataclass(frozen=True)
class Zvol:
    dataset: str
    volblocksize: int | None
    volsize: int | None
    refreservation: int | None  # bytes; 0 for none
    compression: str | None
    autotrim: str | None  # on | off, of the pool

    @property
    def thin(self) -> bool | None:
        """A zvol is thin when it reserves nothing (``zfs create -s``)."""
        return None if self.refreservation is None else self.refreservation == 0


def parse_zvol(dataset: str, zfs_text: str, zpool_text: str = "") -> Zvol | None:
    """The zvol's facts; None when ``zfs get`` said nothing about it."""
    props = parse_get(zfs_text)
    if not any(name == dataset for name, _ in props):
        return None
    pool = dataset.split("/", 1)[0]
    ref = props.get((dataset, "refreservation"))
    autotrim = parse_get(zpool_text).get((pool, "autotrim"))
    compression = props.get((dataset, "compression"))
    return Zvol(
        dataset,
        _bytes(props.get((dataset, "volblocksize"))),
        _bytes(props.get((dataset, "volsize"))),
        0 if ref in ("none", "0") else _bytes(ref),
        compression if compression and compression != "-" else None,
        autotrim if autotrim in ("on", "off") else None,
    )

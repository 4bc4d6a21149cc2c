"""Parsers of ``dmsetup table``, ``dmsetup status`` and ``lvs --reportformat json``.

Formats, from the kernel's Documentation/admin-guide/device-mapper/:

- a table or status line is ``START LENGTH TARGET ARGS...`` (sectors), after ``NAME: ``
  when dmsetup lists every device;
- ``thin-pool`` table (thin-provisioning.rst): ``META DATA BLOCK_SECTORS LOW_WATER
  NFEATURES FEATURES...`` with the features ``ignore_discard`` and
  ``no_discard_passdown``; its status: ``TRANSACTION USED_META/TOTAL_META
  USED_DATA/TOTAL_DATA HELD_ROOT ro|rw|out_of_data_space discard_passdown|
  no_discard_passdown error_if_no_space|queue_if_no_space needs_check|- [LOW_WATER]``
  (or ``Fail``);
- ``thin`` table: ``POOL_DEV DEV_ID [EXTERNAL_ORIGIN]``;
- ``crypt`` table (dm-crypt.rst): ``CIPHER KEY IV_OFFSET DEVICE OFFSET [NOPT OPT...]``
  with the option ``allow_discards`` (the key is never kept here);
- ``linear``: ``DEVICE OFFSET``; ``striped`` (striped.rst): ``NSTRIPES CHUNK (DEVICE
  OFFSET)...``.

lvs: lvm2's JSON report is ``{"report": [{"lv": [{FIELD: "VALUE", ...}]}]}``, every
value a string (lvmreport(7)); with ``--units b --nosuffix`` sizes are bytes.

Every parser takes untrusted text: lines and fields are bounded, and a line that is
not the expected shape is skipped or gives None, never a traceback.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

SECTOR = 512
MAX_LINES = 10_000
MAX_LINE = 65_536
_INT = re.compile(r"^\d{1,20}$")
_RATIO = re.compile(r"^(\d{1,20})/(\d{1,20})$")
_DEV = re.compile(r"^(\d{1,10}):(\d{1,10})$")
#: lvs --units: lowercase letters are powers of 1024, capitals of 1000 (lvm(8) --units)
_SIZE = re.compile(r"^(\d{1,20}(?:\.\d{1,6})?)([bBsSkKmMgGtTpP]?)$")

LVS_FIELDS = (
    "lv_name",
    "vg_name",
    "lv_attr",
    "pool_lv",
    "data_percent",
    "metadata_percent",
    "chunk_size",
    "discards",
    "lv_size",
)


def lvs_argv(lvm: str = "lvs") -> list[str]:
    """The lvs command whose output :func:`parse_lvs` reads."""
    return [
        lvm,
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "-a",
        "-o",
        ",".join(LVS_FIELDS),
    ]


def _int(text: str) -> int | None:
    return int(text) if _INT.match(text) else None


@dataclass(frozen=True)
class Target:
    """One line of a table or status: a target over ``length`` sectors from ``start``."""

    name: str | None  # the device's name when dmsetup listed every device
    start: int
    length: int
    target: str
    args: tuple[str, ...]


def parse_lines(text: str) -> list[Target]:
    """``dmsetup table`` or ``dmsetup status`` output, for one device or all of them."""
    out = []
    for line in text.splitlines()[:MAX_LINES]:
        if len(line) > MAX_LINE:
            continue
        name = None
        words = line.split()
        if words and words[0].endswith(":") and len(words) > 1 and not _INT.match(words[0][:-1]):
            name = words.pop(0)[:-1]
        if len(words) < 3:
            continue
        start, length = _int(words[0]), _int(words[1])
        if start is None or length is None:
            continue
        out.append(Target(name, start, length, words[2][:64], tuple(w[:4096] for w in words[3:])))
    return out


@dataclass(frozen=True)
class ThinPoolTable:
    metadata_dev: str
    data_dev: str
    block_bytes: int  # the chunk size: dm-thin's unit of allocation and of discard
    features: tuple[str, ...]

    @property
    def discards(self) -> str:
        """lvm2's name for the mode: ignore, nopassdown or passdown (lvmthin(7))."""
        if "ignore_discard" in self.features:
            return "ignore"
        if "no_discard_passdown" in self.features:
            return "nopassdown"
        return "passdown"


def thin_pool_table(target: Target) -> ThinPoolTable | None:
    if target.target != "thin-pool" or len(target.args) < 5:
        return None
    block, nfeat = _int(target.args[2]), _int(target.args[4])
    if block is None or block == 0 or nfeat is None:
        return None
    features = target.args[5 : 5 + min(nfeat, 64)]
    return ThinPoolTable(target.args[0], target.args[1], block * SECTOR, tuple(features))


@dataclass(frozen=True)
class ThinPoolStatus:
    used_meta: int
    total_meta: int  # metadata blocks (4 KiB each)
    used_data: int
    total_data: int  # data blocks: chunks
    mode: str  # rw, ro, out_of_data_space
    discard_passdown: bool | None  # what the kernel does now (it can turn passdown off)
    needs_check: bool

    @property
    def data_percent(self) -> float:
        return 100.0 * self.used_data / self.total_data if self.total_data else 0.0

    @property
    def metadata_percent(self) -> float:
        return 100.0 * self.used_meta / self.total_meta if self.total_meta else 0.0


def thin_pool_status(target: Target) -> ThinPoolStatus | None:
    if target.target != "thin-pool" or len(target.args) < 5:
        return None
    meta, data = _RATIO.match(target.args[1]), _RATIO.match(target.args[2])
    if meta is None or data is None:
        return None
    flags = target.args[4:]
    passdown = (
        True if "discard_passdown" in flags else False if "no_discard_passdown" in flags else None
    )
    return ThinPoolStatus(
        int(meta.group(1)),
        int(meta.group(2)),
        int(data.group(1)),
        int(data.group(2)),
        target.args[4] if target.args[4] in ("rw", "ro", "out_of_data_space") else "?",
        passdown,
        "needs_check" in flags,
    )


@dataclass(frozen=True)
class ThinTable:
    pool_dev: str
    dev_id: int


def thin_table(target: Target) -> ThinTable | None:
    if target.target != "thin" or len(target.args) < 2:
        return None
    dev_id = _int(target.args[1])
    return None if dev_id is None else ThinTable(target.args[0], dev_id)


def crypt_allows_discards(target: Target) -> bool | None:
    """dm-crypt's ``allow_discards`` option; None when this is not a crypt line."""
    if target.target != "crypt" or len(target.args) < 5:
        return None
    nopt = _int(target.args[5]) if len(target.args) > 5 else 0
    options = target.args[6 : 6 + min(nopt or 0, 64)]
    return "allow_discards" in options


def legs(target: Target) -> list[str]:
    """The devices under a linear or striped line (``MAJ:MIN`` or a path)."""
    if target.target == "linear" and len(target.args) >= 2:
        return [target.args[0]]
    if target.target == "striped" and len(target.args) >= 2:
        n = _int(target.args[0])
        if n is None:
            return []
        return list(target.args[2 : 2 + 2 * min(n, 1024) : 2])
    return []


def device_number(text: str) -> tuple[int, int] | None:
    match = _DEV.match(text)
    return (int(match.group(1)), int(match.group(2))) if match else None


# --- lvs ------------------------------------------------------------------------------


def parse_size(text: str) -> int | None:
    """An lvs size: bytes (``--units b --nosuffix``) or a number with a unit letter."""
    match = _SIZE.match(text.strip())
    if match is None:
        return None
    number, unit = match.groups()
    if unit in ("", "b", "B"):
        scale = 1
    elif unit in ("s", "S"):
        scale = SECTOR
    elif unit.islower():
        scale = 1024 ** "bkmgtp".index(unit)
    else:
        scale = 1000 ** "BKMGTP".index(unit)
    return int(float(number) * scale)


def parse_percent(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0.0 <= value <= 100.0 else None


@dataclass(frozen=True)
class LogicalVolume:
    name: str
    vg: str
    attr: str
    pool: str | None
    data_percent: float | None
    metadata_percent: float | None
    chunk_bytes: int | None
    discards: str | None
    size: int | None

    @property
    def is_thin_pool(self) -> bool:
        return self.attr[:1] == "t"  # lvs(8): lv_attr bit 1, volume type

    @property
    def is_thin(self) -> bool:
        return self.attr[:1] == "V"

    @property
    def full_name(self) -> str:
        return f"{self.vg}/{self.name}"


def _lv(row: dict[str, Any]) -> LogicalVolume | None:
    def text(key: str) -> str:
        value = row.get(key, "")
        return value[:256] if isinstance(value, str) else ""

    name, vg = text("lv_name"), text("vg_name")
    if not name or not vg:
        return None
    discards = text("discards")
    return LogicalVolume(
        name=name,
        vg=vg,
        attr=text("lv_attr"),
        pool=text("pool_lv") or None,
        data_percent=parse_percent(text("data_percent")),
        metadata_percent=parse_percent(text("metadata_percent")),
        chunk_bytes=parse_size(text("chunk_size")) or None,
        discards=discards if discards in ("ignore", "nopassdown", "passdown") else None,
        size=parse_size(text("lv_size")),
    )


def parse_lvs(text: str) -> list[LogicalVolume]:
    """``lvs --reportformat json`` output; [] when it is not that."""
    try:
        doc = json.loads(text[: 8 << 20])
    except (ValueError, RecursionError):
        return []
    reports = doc.get("report") if isinstance(doc, dict) else None
    out = []
    for report in reports if isinstance(reports, list) else []:
        rows = report.get("lv") if isinstance(report, dict) else None
        for row in rows if isinstance(rows, list) else []:
            lv = _lv(row) if isinstance(row, dict) else None
            if lv is not None:
                out.append(lv)
    return out

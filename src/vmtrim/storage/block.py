"""Follow a block device down its layers, through a :class:`Runner`, and say what each
layer does with a discard.

- **loop**: ``/sys/block/loopN/loop/backing_file``; the loop device turns a discard
  into a punched hole in that file (drivers/block/loop.c, ``lo_fallocate``), so the
  backing file's filesystem is the layer that decides.
- **device-mapper** (``/sys/block/dm-N/dm/name``): ``dmsetup table``/``status`` of the
  device, see :mod:`vmtrim.storage.dm`. A thin volume's pool is read too, and lvs when
  the device is an LV (``dm/uuid`` starts with ``LVM-``): the discard mode, chunk size
  and data/metadata usage.
- **md** (``/sys/block/mdN/md/level``): raid passes discards when its queue says so.
- every device: ``queue/discard_max_bytes`` (0: the block layer refuses discards) and
  ``queue/discard_granularity``.

Nothing here raises for what the tools or sysfs say: a layer it cannot read is
``unknown`` with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vmtrim.model import Verdict
from vmtrim.storage import dm
from vmtrim.storage.runner import Runner

MAX_DEPTH = 8  # loop on dm on md...: deeper than this is a loop in sysfs, not storage
_NAME = re.compile(r"^[A-Za-z0-9._:+-]{1,64}$")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


@dataclass(frozen=True)
class ThinPool:
    """The facts of one dm-thin pool (from the table, the status and lvs)."""

    name: str  # vg/lv from lvs, else the dm name
    discards: str  # passdown | nopassdown | ignore
    chunk_bytes: int
    data_percent: float | None
    metadata_percent: float | None
    passdown_active: bool | None = None  # status: the kernel may have turned passdown off
    used_bytes: int | None = None  # dmsetup status: used data chunks x chunk size
    total_bytes: int | None = None

    @property
    def verdict(self) -> Verdict:
        return Verdict.BLOCK if self.discards == "ignore" else Verdict.PASS

    def describe(self) -> str:
        usage = ""
        if self.data_percent is not None:
            usage = f", data {self.data_percent:.2f} %"
        if self.metadata_percent is not None:
            usage += f", metadata {self.metadata_percent:.2f} %"
        chunk = _size(self.chunk_bytes)
        return f"thin pool {self.name} (discards={self.discards}, chunk {chunk}{usage})"


@dataclass(frozen=True)
class StorageLayer:
    """One layer of the stack under a disk."""

    name: str  # loop0, dm-3 (vg-thin), md0, or a file's mount
    kind: str  # loop | dm-thin | dm-crypt | dm-linear | dm-striped | dm | md | disk | file
    verdict: Verdict
    reason: str
    facts: dict[str, object] = field(default_factory=dict)
    granularity: int | None = None  # discard_granularity in bytes, where read


@dataclass
class Stack:
    """The layers from the device the disk names down to what holds the data."""

    layers: list[StorageLayer] = field(default_factory=list)
    backing_file: str | None = None  # a loop device's file, for the file probe
    pool: ThinPool | None = None

    @property
    def verdict(self) -> Verdict:
        return Verdict.worst(layer.verdict for layer in self.layers)

    def reason(self) -> str:
        return "; ".join(layer.reason for layer in self.layers)


def _int(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if text.isdigit() and len(text) <= 20 else None


def kernel_name(runner: Runner, major: int, minor: int) -> str | None:
    """The kernel's name for a device number (``DEVNAME=`` in its sysfs uevent)."""
    for line in (runner.read(f"/sys/dev/block/{major}:{minor}/uevent") or "").splitlines()[:64]:
        key, _, value = line.partition("=")
        if key == "DEVNAME" and _NAME.match(value.strip()):
            return value.strip().rsplit("/", 1)[-1]
    return None


def device_name(runner: Runner, path: str) -> str | None:
    """The kernel name of the block device at ``path`` (a /dev node or symlink)."""
    number = runner.device_number(path)
    return kernel_name(runner, *number) if number is not None else None


def _queue(runner: Runner, name: str) -> tuple[int | None, int | None]:
    base = f"/sys/class/block/{name}/queue"
    return _int(runner.read(f"{base}/discard_max_bytes")), _int(
        runner.read(f"{base}/discard_granularity")
    )


def _queue_layer(
    name: str, kind: str, max_bytes: int | None, gran: int | None, what: str
) -> StorageLayer:
    if max_bytes is None:
        return StorageLayer(name, kind, Verdict.UNKNOWN, f"{what}: no queue/discard_max_bytes")
    if max_bytes == 0:
        return StorageLayer(
            name, kind, Verdict.BLOCK, f"{what} does not pass discards (discard_max_bytes=0)"
        )
    extra = f", granularity {_size(gran)}" if gran else ""
    return StorageLayer(
        name,
        kind,
        Verdict.PASS,
        f"{what} passes discards (discard_max_bytes={max_bytes}{extra})",
        {"discard_max_bytes": max_bytes},
        gran,
    )


def _lv_of(runner: Runner, uuid: str, dm_name: str) -> tuple[list[dm.LogicalVolume], str | None]:
    if not uuid.startswith("LVM-"):
        return [], None
    out = runner.run(dm.lvs_argv(), timeout=60.0)
    if not out.ok:
        return [], out.why()
    lvs = dm.parse_lvs(out.stdout)
    # dm names are VG-LV with '-' inside a name doubled (lvm2 dm_build_dm_name)
    for lv in lvs:
        if f"{lv.vg.replace('-', '--')}-{lv.name.replace('-', '--')}" == dm_name:
            return lvs, lv.full_name
    return lvs, None


def _pool_facts(
    runner: Runner, pool_dm: str, lvs: list[dm.LogicalVolume]
) -> tuple[ThinPool | None, str | None]:
    table = runner.run(["dmsetup", "table", pool_dm], timeout=30.0)
    status = runner.run(["dmsetup", "status", pool_dm], timeout=30.0)
    if not table.ok:
        return None, table.why()
    tables = [t for t in map(dm.thin_pool_table, dm.parse_lines(table.stdout)) if t]
    if not tables:
        return None, f"dmsetup table {pool_dm}: not a thin-pool line"
    statuses = [s for s in map(dm.thin_pool_status, dm.parse_lines(status.stdout)) if s]
    st = statuses[0] if statuses else None
    name = pool_dm
    data = st.data_percent if st else None
    meta = st.metadata_percent if st else None
    for lv in lvs:  # the pool's dm name is VG-POOL-tpool under lvm2
        dm_names = {
            f"{lv.vg.replace('-', '--')}-{lv.name.replace('-', '--')}{s}" for s in ("", "-tpool")
        }
        if lv.is_thin_pool and pool_dm in dm_names:
            name = lv.full_name
            data = lv.data_percent if lv.data_percent is not None else data
            meta = lv.metadata_percent if lv.metadata_percent is not None else meta
    return (
        ThinPool(
            name,
            tables[0].discards,
            tables[0].block_bytes,
            data,
            meta,
            st.discard_passdown if st else None,
            st.used_data * tables[0].block_bytes if st else None,
            st.total_data * tables[0].block_bytes if st else None,
        ),
        None,
    )


def _thin_layer(
    runner: Runner, name: str, label: str, target: dm.Target, stack: Stack, uuid: str, dm_name: str
) -> StorageLayer:
    """A thin volume: its pool's mode, chunk and usage decide (the pool is read too)."""
    gran = _queue(runner, name)[1]
    thin = dm.thin_table(target)
    lvs, lv_name = _lv_of(runner, uuid, dm_name)
    pool_name = None
    number = dm.device_number(thin.pool_dev) if thin else None
    if number is not None:
        pool_kname = kernel_name(runner, *number)
        if pool_kname:
            pool_name = (runner.read(f"/sys/class/block/{pool_kname}/dm/name") or "").strip()
    if not pool_name:
        return StorageLayer(
            name, "dm-thin", Verdict.UNKNOWN, f"{label}: thin volume, its pool not found"
        )
    pool, why = _pool_facts(runner, pool_name, lvs)
    if pool is None:
        return StorageLayer(
            name, "dm-thin", Verdict.UNKNOWN, f"{label}: thin volume; pool {pool_name}: {why}"
        )
    stack.pool = pool
    what = f"thin volume {lv_name or label} on {pool.describe()}"
    facts: dict[str, object] = {
        "pool": pool.name,
        "discards": pool.discards,
        "chunk_bytes": pool.chunk_bytes,
        "data_percent": pool.data_percent,
        "metadata_percent": pool.metadata_percent,
    }
    if pool.discards == "ignore":
        return StorageLayer(
            name,
            "dm-thin",
            Verdict.BLOCK,
            f"{what}: the pool ignores discards, nothing is freed",
            facts,
            gran,
        )
    tail = (
        "discards free pool chunks but are not passed to the pool's data device"
        if pool.discards == "nopassdown"
        else "discards free pool chunks and pass to its data device"
    )
    return StorageLayer(
        name,
        "dm-thin",
        Verdict.PASS,
        f"{what}: {tail}; a discard smaller than a chunk, or not aligned to one, frees nothing",
        facts,
        pool.chunk_bytes,
    )


def _dm_layer(runner: Runner, name: str, stack: Stack, below: list[str]) -> StorageLayer:
    dm_name = (runner.read(f"/sys/class/block/{name}/dm/name") or "").strip()[:128]
    uuid = (runner.read(f"/sys/class/block/{name}/dm/uuid") or "").strip()[:256]
    label = f"{name} ({dm_name})" if dm_name else name
    table = runner.run(["dmsetup", "table", dm_name or name], timeout=30.0)
    if not table.ok:
        return StorageLayer(name, "dm", Verdict.UNKNOWN, f"{label}: {table.why()}")
    targets = dm.parse_lines(table.stdout)
    if not targets:
        return StorageLayer(name, "dm", Verdict.UNKNOWN, f"{label}: dmsetup table gave no line")
    kinds = {t.target for t in targets}
    if kinds == {"thin"}:
        return _thin_layer(runner, name, label, targets[0], stack, uuid, dm_name)
    max_bytes, gran = _queue(runner, name)
    if kinds == {"crypt"}:
        allowed = dm.crypt_allows_discards(targets[0])
        if allowed is False:
            return StorageLayer(
                name,
                "dm-crypt",
                Verdict.BLOCK,
                f"{label}: dm-crypt without allow_discards drops discards",
                {"allow_discards": False},
            )
        below += targets[0].args[3:4]  # crypt's DEVICE: the layer below
        return StorageLayer(
            name,
            "dm-crypt",
            Verdict.PASS,
            f"{label}: dm-crypt with allow_discards",
            {"allow_discards": True},
            gran,
        )
    if kinds <= {"linear", "striped"}:
        for target in targets:
            below += dm.legs(target)
        layer = _queue_layer(
            name,
            "dm-" + "-".join(sorted(kinds)),
            max_bytes,
            gran,
            f"{label} ({'/'.join(sorted(kinds))})",
        )
        return layer
    return _queue_layer(name, "dm", max_bytes, gran, f"{label} ({', '.join(sorted(kinds))[:80]})")


def _resolve(runner: Runner, ref: str) -> str | None:
    number = dm.device_number(ref)
    if number is not None:
        return kernel_name(runner, *number)
    return device_name(runner, ref) if ref.startswith("/dev/") else None


def block_stack(runner: Runner, path: str) -> Stack:
    """The layers under the block device at ``path``, top first."""
    stack = Stack()
    name = device_name(runner, path)
    if name is None:
        stack.layers.append(
            StorageLayer(
                path, "disk", Verdict.UNKNOWN, f"{path}: not a block device on {runner.where}"
            )
        )
        return stack
    todo, seen = [name], set[str]()
    while todo and len(seen) < MAX_DEPTH:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        if name.startswith("loop"):
            backing = (runner.read(f"/sys/class/block/{name}/loop/backing_file") or "").strip()
            max_bytes, gran = _queue(runner, name)
            layer = _queue_layer(name, "loop", max_bytes, gran, f"{name}")
            if backing:
                stack.backing_file = backing[:4096]
                layer = StorageLayer(
                    name,
                    "loop",
                    layer.verdict,
                    f"{layer.reason}, backed by {stack.backing_file}",
                    {"backing_file": stack.backing_file},
                    gran,
                )
            stack.layers.append(layer)
        elif name.startswith("dm-"):
            below: list[str] = []
            stack.layers.append(_dm_layer(runner, name, stack, below))
            todo += [n for n in (_resolve(runner, ref) for ref in below) if n]
        elif name.startswith("md"):
            level = (runner.read(f"/sys/class/block/{name}/md/level") or "").strip()[:16]
            max_bytes, gran = _queue(runner, name)
            stack.layers.append(
                _queue_layer(name, "md", max_bytes, gran, f"{name} (md {level or '?'})")
            )
        else:
            max_bytes, gran = _queue(runner, name)
            stack.layers.append(_queue_layer(name, "disk", max_bytes, gran, name))
    return stack

"""``trim --explain``: why the host got back less than the guest says it trimmed.

After a trim, for each disk whose host figure fell clearly short of what the guest
trimmed on it (the guest's per-path figures put on disks with ``guest-get-fsinfo``),
the causes that apply to that disk are listed, each with a stable id
(:data:`vmtrim.facts.TRIM_CAUSES`) and the disk's own evidence:

- the image header (read-only, header only): internal snapshots, a backing file,
  compat=0.10, the cluster size against the guest's discard granularity;
- the configuration: ``discard-no-unref`` (QEMU >= 8.1; the clusters stay allocated
  while the file is punched, so only host bytes count);
- the host: the punch-hole probe of the image's directory, and the dm-thin pool under
  the disk (its discard mode);
- the guest: a path that reported (about) nothing on ext4, which trims only the block
  groups changed since its last trim in this mount; the partition under the filesystem
  starting part-way into a qcow2 cluster (its sysfs ``start``, read through the agent
  in the same one guest-exec as the audit's: facts ``alignment_cost``).

Granularity comes from the audit's :func:`~vmtrim.audit.granularity.granularity_stack`
(guest, device, qcow2 cluster, host, pool; ``coarser`` marks a unit larger than every
layer above). Without a disk model (a bare QEMU) the cluster is compared with the
guest granularity here. A cluster above QEMU's default 64 KiB is always named; the
default one only when no other cause applies to the disk: it is coarser than the 4 KiB
scsi-hd tells the guest too, and costs only when the freed ranges are small and
scattered (bench_granularity.py, facts.py ``granularity_cost``: scattered 4 KiB
files come back 0 % on 64 KiB clusters, 64 KiB files 95 %; the lab's 64 KiB-cluster
disk got back 99 % of a deleted 200 MiB file).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from vmtrim.channels.qmp import FstrimPath
from vmtrim.facts import TRIM_CAUSES
from vmtrim.model import Disk, Domain, GuestQueue, LayerGranularity, Verdict
from vmtrim.output import human_bytes
from vmtrim.storage.block import ThinPool

if TYPE_CHECKING:
    from vmtrim.audit.granularity import Misalignment
    from vmtrim.channels.qmp import ExecStatus
    from vmtrim.image.info import ImageInfo
    from vmtrim.trim.engine import DiskRef

#: What the guest reports on a path below this is "nothing" (the engine's own bound).
NOTHING = 1024 * 1024
#: QEMU's default discard_granularity for devices that do not set one
#: (hw/block/block.c DEFAULT_DISCARD_GRANULARITY, used by scsi-hd and ide-hd).
DEFAULT_GUEST_GRANULARITY = 4096
#: QEMU's default qcow2 cluster: the size every image has unless it was chosen.
DEFAULT_CLUSTER = 65536
_EXT4_DRIVER = ("ext4", "ext3", "ext2")  # all mounted by the ext4 driver on Linux >= 6.1


@dataclass(frozen=True)
class Cause:
    """One reason that applies to one disk, with what shows it."""

    id: str  # a TRIM_CAUSES key: stable, callers branch on it
    disk: str
    evidence: str
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return TRIM_CAUSES[self.id].summary

    @property
    def source(self) -> str:
        return TRIM_CAUSES[self.id].source

    def sentence(self) -> str:
        return f"{self.disk}: {self.id}: {self.evidence}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "disk": self.disk,
            "evidence": self.evidence,
            "summary": self.summary,
            "source": self.source,
            "facts": self.facts,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Cause:
        return cls(str(doc["id"]), str(doc["disk"]), str(doc["evidence"]), dict(doc["facts"]))


@dataclass
class DiskFacts:
    """What explain knows about one disk, gathered after the trim (reads only)."""

    target: str
    image: ImageInfo | None = None  # the top image, header only, its chain linked
    image_error: str | None = None
    discard_no_unref: bool | None = None
    guest_granularity: int | None = None
    granularity_from: str = "QEMU's default"
    punch: tuple[Verdict, str] | None = None  # the punch-hole probe of the image's directory
    pool: ThinPool | None = None
    filesystems: list[tuple[str, str]] = field(default_factory=list)  # (mountpoint, type)
    granularity: list[LayerGranularity] | None = None  # the audit's stack, with a disk model
    queue: GuestQueue | None = None  # the guest's sysfs facts, its partition's start


@dataclass
class Evidence:
    """A target's facts for explain: per disk, and which guest paths sit on which disks."""

    disks: dict[str, DiskFacts] = field(default_factory=dict)
    #: guest mountpoint -> the disk targets its filesystem sits on; None: not known
    path_disks: dict[str, set[str]] | None = None
    #: reads the costly facts (image header, host probes, the guest's sysfs) of the disks
    #: named, once each: explain asks only for the disks that fell short
    fill: Callable[[set[str]], None] = field(default=lambda targets: None)


def guest_granularity(disk: Disk | None) -> tuple[int, str]:
    """(bytes, where from): the device property, the guest's sysfs, or QEMU's default."""
    if disk is not None:
        configured = disk.device_properties.get("discard_granularity")
        if isinstance(configured, int) and configured > 0:
            return configured, "the device's discard_granularity"
        queue = disk.guest_queue
        if queue is not None and queue.discard_granularity:
            return queue.discard_granularity, "the guest's queue/discard_granularity"
    return DEFAULT_GUEST_GRANULARITY, "QEMU's default discard_granularity"


def image_facts(path: str) -> tuple[ImageInfo | None, str | None]:
    """The image's header facts and backing chain (read-only), or why they cannot be read."""
    from vmtrim.errors import VmtrimError
    from vmtrim.image.info import inspect

    try:
        return inspect(path, header_only=True), None
    except VmtrimError as exc:
        return None, exc.one_line()
    except OSError as exc:
        return None, f"{path}: {exc.strerror}"


def punch_facts(path: str) -> tuple[Verdict, str]:
    """The host probe's punch-hole verdict for the image's directory (a temporary file)."""
    from vmtrim.audit.hostprobe import punch_hole_probe

    probe = punch_hole_probe(os.path.dirname(os.path.abspath(path)) or "/")
    return probe.verdict, probe.reason


def disk_causes(facts: DiskFacts) -> list[Cause]:
    """The configuration and storage causes that apply to one disk (no guest figures)."""
    found: list[Cause] = []
    t = facts.target

    def add(key: str, evidence: str, **values: Any) -> None:
        found.append(Cause(key, t, evidence, values))

    image = facts.image
    if image is not None and image.snapshot_count:
        names = [str(s.get("name")) for s in image.snapshots][:5]
        add(
            "internal_snapshots",
            f"{image.path} has {image.snapshot_count} internal snapshot(s)"
            f" ({', '.join(names)}) in its qcow2 header: the clusters they share keep a"
            " reference, a discard frees none of them",
            snapshot_count=image.snapshot_count,
            snapshots=names,
        )
    if image is not None and image.backing is not None:
        chain: list[ImageInfo] = []
        node: ImageInfo | None = image.backing
        while node is not None:
            chain.append(node)
            node = node.backing
        held = sum(layer.allocated_bytes for layer in chain)
        add(
            "backing_chain",
            f"{image.path} is an overlay on {chain[0].path}"
            f"{f' (and {len(chain) - 1} more)' if len(chain) > 1 else ''}: the"
            f" {human_bytes(held)} allocated in the backing file(s) never shrink; the guest's"
            " discards only write zero clusters in the overlay",
            backing=[layer.path for layer in chain],
            backing_allocated_bytes=held,
        )
    # Without a backing file a v2 image frees discarded clusters (measured): no cause then.
    if image is not None and image.compat == "0.10" and image.backing is not None:
        add(
            "qcow2_compat_010",
            f"{image.path} is qcow2 compat=0.10 with a backing file: QEMU refuses every"
            " discard on it (no zero clusters); `qemu-img amend -o compat=1.1` fixes it",
            compat="0.10",
        )
    if facts.discard_no_unref:
        add(
            "discard_no_unref",
            "discard-no-unref is on: the clusters stay allocated in the qcow2 (its cluster"
            " counts and a block device's allocation do not drop), only the file is punched;"
            " count host bytes (du), not clusters",
            discard_no_unref=True,
        )
    if facts.punch is not None and facts.punch[0] is Verdict.BLOCK:
        add("host_fs_no_punch", facts.punch[1])
    pool = facts.pool
    if pool is not None and pool.discards in ("ignore", "nopassdown"):
        what = (
            "drops every discard: nothing returns to the pool"
            if pool.discards == "ignore"
            else "frees pool chunks but does not pass the discards to its data device"
        )
        add(
            "thin_pool_discards",
            f"{pool.describe()} {what}",
            pool=pool.name,
            discards=pool.discards,
            data_percent=pool.data_percent,
        )
    misaligned = _misaligned(facts)
    if misaligned is not None:
        add(
            "alignment",
            misaligned.evidence() + "; " + misaligned.advice(),
            **misaligned.to_json(),
        )
    # the default cluster is the likely cause only when nothing else explains the loss
    coarse = _granularity(facts, default_too=not found)
    return [*found, coarse] if coarse is not None else found


def _misaligned(facts: DiskFacts) -> Misalignment | None:
    """The guest partition against the qcow2 cluster: the stack's format layer, else the
    image header's cluster."""
    from vmtrim.audit.granularity import misalignment

    layers = facts.granularity
    image = facts.image
    if layers is None and image is not None and image.format == "qcow2" and image.cluster_size:
        layers = [LayerGranularity("format", "qcow2 cluster", int(image.cluster_size), True)]
    return misalignment(facts.queue, layers or [])


def _granularity(facts: DiskFacts, *, default_too: bool) -> Cause | None:
    """The first layer coarser than what the layers above send (the default 64 KiB
    cluster only with ``default_too``, see the module doc)."""
    if facts.granularity is not None:
        return _coarser_layer(facts, default_too)
    image = facts.image
    if image is None or image.format != "qcow2" or not image.cluster_size:
        return None
    gran = facts.guest_granularity or DEFAULT_GUEST_GRANULARITY
    floor = gran if default_too else max(gran, DEFAULT_CLUSTER)
    if image.cluster_size <= floor:
        return None
    return Cause(
        "granularity",
        facts.target,
        f"{image.path} has {human_bytes(image.cluster_size)} clusters, the guest may send"
        f" discards of {human_bytes(gran)} ({facts.granularity_from}): each freed range"
        " smaller than a cluster, or not aligned to one, is dropped; use a 64 KiB cluster, or"
        " set the device's discard_granularity to the cluster size",
        {"cluster_size": image.cluster_size, "guest_granularity": gran},
    )


def _coarser_layer(facts: DiskFacts, default_too: bool) -> Cause | None:
    stack = facts.granularity or []
    above = 0
    for layer in stack:
        if layer.bytes is None:
            continue
        default_cluster = layer.layer == "format" and layer.bytes <= DEFAULT_CLUSTER
        if layer.coarser and (default_too or not default_cluster):
            return Cause(
                "granularity",
                facts.target,
                f"the {layer.what} is {human_bytes(layer.bytes)}, the layers above send"
                f" discards of {human_bytes(above)}: each freed range smaller than"
                f" {human_bytes(layer.bytes)}, or not aligned to it, frees nothing there"
                + (
                    "; use a 64 KiB cluster, or set the device's discard_granularity to it"
                    if layer.layer == "format"
                    else ""
                ),
                {
                    "layer": layer.layer,
                    "what": layer.what,
                    "bytes": layer.bytes,
                    "above_bytes": above,
                    "stack": [g.to_json() for g in stack],
                },
            )
        above = max(above, layer.bytes)
    return None


def already_trimmed(facts: DiskFacts, paths: Iterable[FstrimPath]) -> list[Cause]:
    """ext4 paths on this disk that reported (about) nothing: trimmed since mount."""
    types = dict(facts.filesystems)
    out = []
    for path in paths:
        fstype = types.get(path.path, "")
        if path.trimmed is None or path.trimmed >= NOTHING or fstype not in _EXT4_DRIVER:
            continue
        out.append(
            Cause(
                "ext4_already_trimmed",
                facts.target,
                f"{path.path} ({fstype}) reported {human_bytes(path.trimmed)} trimmed: ext4"
                " skips the block groups already trimmed since mount (nothing was freed in"
                " them since); what the first trim freed is already on the host",
                {"path": path.path, "trimmed": path.trimmed, "fstype": fstype},
            )
        )
    return out


def guest_by_disk(
    paths: Sequence[FstrimPath], path_disks: dict[str, set[str]] | None
) -> dict[str, int]:
    """The guest's per-path figures on the disk each path's filesystem sits on (a path on
    several disks cannot be split and counts for none)."""
    out: dict[str, int] = {}
    for path in paths:
        targets = (path_disks or {}).get(path.path, set())
        if path.trimmed is not None and len(targets) == 1:
            [target] = targets
            out[target] = out.get(target, 0) + path.trimmed
    return out


def paths_on(target: str, paths: Sequence[FstrimPath], evidence: Evidence) -> list[FstrimPath]:
    if evidence.path_disks is None:
        return list(paths)
    return [p for p in paths if target in evidence.path_disks.get(p.path, set())]


class _Agent(Protocol):
    def execute(self, command: str, arguments: dict[str, Any] | None, timeout: float) -> Any: ...

    def run(self, path: str, args: list[str], timeout: float) -> ExecStatus: ...


def domain_evidence(
    domain: Domain,
    refs: dict[str, DiskRef],
    agent: _Agent | None,
    xml: str | None,
    timeout: float,
    *,
    local: bool,
    lazy: bool = False,
) -> Evidence:
    """Each measured disk's facts, and (with an agent and the domain XML) which guest
    filesystem sits on which disk. Reads only; the host is probed on a local connection.
    With ``lazy`` the per-disk facts wait for ``Evidence.fill``."""
    evidence = Evidence()
    by_target: dict[str, list[tuple[str, str]]] = {}
    pairs: dict[str, tuple[str, str]] = {}  # target -> (guest disk, partition)
    if agent is not None and xml is not None:
        evidence.path_disks = _path_disks(agent, xml, timeout, by_target, pairs)
    costly: dict[str, tuple[Disk, DiskRef]] = {}
    for disk in domain.disks:
        target = disk.target or disk.ident
        ref = refs.get(target)
        if ref is None:
            continue
        evidence.disks[target] = DiskFacts(target, filesystems=by_target.get(target, []))
        costly[target] = (disk, ref)

    def fill(targets: set[str]) -> None:
        wanted = {t: costly.pop(t) for t in sorted(targets) if t in costly}
        unread = [t for t, (disk, _) in wanted.items() if disk.guest_queue is None]
        asked = {t: pairs[t] for t in unread if t in pairs}
        queues = _queues(agent, asked, timeout) if agent is not None else {}
        for target, (disk, ref) in wanted.items():
            if disk.guest_queue is None and target in asked:
                disk.guest_queue = queues.get(asked[target])
            facts = evidence.disks[target]
            facts.queue = disk.guest_queue
            facts.guest_granularity, facts.granularity_from = guest_granularity(disk)
            node = disk.node
            facts.discard_no_unref = node.discard_no_unref if node is not None else None
            if ref.local_file and local:
                facts.image, facts.image_error = image_facts(ref.local_file)
                facts.punch = punch_facts(ref.local_file)
            facts.granularity = _stack(disk, facts.image, local)
            device = ref.source if (ref.source or "").startswith("/dev/") else None
            path = ref.local_file or device
            if local and path:
                facts.pool = _pool(path)

    evidence.fill = fill
    if not lazy:
        fill(set(costly))
    return evidence


def _path_disks(
    agent: _Agent,
    xml: str,
    timeout: float,
    by_target: dict[str, list[tuple[str, str]]],
    pairs: dict[str, tuple[str, str]],
) -> dict[str, set[str]] | None:
    from vmtrim.channels.qmp import parse_fsinfo
    from vmtrim.errors import VmtrimError
    from vmtrim.sources.libvirt_live import disk_addresses, guest_device, match_guest_disk

    try:
        filesystems = parse_fsinfo(agent.execute("guest-get-fsinfo", None, timeout))
    except VmtrimError:  # an agent without fsinfo: the domain's totals decide instead
        return None
    addresses = disk_addresses(xml)
    out: dict[str, set[str]] = {}
    for fs in filesystems:
        for entry in fs.disks:  # what to read in the guest's sysfs, as the audit does
            target, pair = match_guest_disk(entry, addresses), guest_device(entry, fs.name)
            if target is not None and pair is not None:
                pairs.setdefault(target, pair)
        targets = {t for t in (match_guest_disk(d, addresses) for d in fs.disks) if t}
        out.setdefault(fs.mountpoint, set()).update(targets)
        for target in targets:
            by_target.setdefault(target, []).append((fs.mountpoint, fs.type))
    return out


def _queues(
    agent: _Agent, pairs: dict[str, tuple[str, str]], timeout: float
) -> dict[tuple[str, str], GuestQueue]:
    """The guest's sysfs facts of the disks (partition starts among them): one guest-exec;
    nothing when guest-exec is refused (the other causes do not need it)."""
    from vmtrim.errors import VmtrimError
    from vmtrim.sources.libvirt_live import read_queues

    if not pairs:
        return {}
    try:
        return read_queues(agent, list(dict.fromkeys(pairs.values())), timeout)[0]
    except VmtrimError:
        return {}


def _stack(disk: Disk, image: ImageInfo | None, local: bool) -> list[LayerGranularity] | None:
    from vmtrim.audit.granularity import granularity_stack
    from vmtrim.audit.hostprobe import HostProbes

    try:
        return granularity_stack(disk, image, HostProbes(local=local))
    except Exception:  # the stack is evidence, not the trim: compare the cluster instead
        return None


def _pool(path: str) -> ThinPool | None:
    """The thin pool under a disk's file or device, as the host probe reads it."""
    from vmtrim.storage.block import block_stack
    from vmtrim.storage.pool import device_under
    from vmtrim.storage.runner import LocalRunner

    runner = LocalRunner()
    device = device_under(path, runner)
    return None if device is None else block_stack(runner, device).pool

"""Probe the host storage under a disk: can it give space back?

- a file: can its filesystem punch holes? Probed on a temporary file in the image's
  directory (never the image itself), once per filesystem (``st_dev``);
- a block device: ``/sys/dev/block/MAJ:MIN/queue/discard_max_bytes`` > 0;
- a network protocol: from :data:`vmtrim.facts.PROTOCOLS`.

Every probe returns a :class:`Probe` (verdict + reason) and never raises for a
path that is missing or unreadable, or a filesystem that is full: that is an
``unknown`` answer ("could not probe: no space"), and the audit goes on. A full disk is
exactly when people run this tool.

A filesystem that cannot punch holes, or a device without discard, carries the
``punch_hole_sticky`` note (:data:`vmtrim.facts.NOTES`) in :attr:`Probe.notes` and in
its fix: QEMU's file-posix driver clears ``has_discard`` on the first ``ENOTSUP``
(block/file-posix.c, ``handle_aiocb_discard``, for fallocate and BLKDISCARD alike) and
never tries again for that open file, so after the storage is fixed QEMU must reopen
the image (restart the guest) before discards free anything.

:class:`HostProbes` knows why it does not probe (``off_reason``): the user's
``--no-probe``, or disks that live on a remote libvirt host, whose paths name files
there and not here.

Beyond the punch-hole probe, the facts of the storage come from :mod:`vmtrim.storage`
through one :class:`~vmtrim.storage.runner.Runner` (this host by default): the mount's
filesystem type and options (NFS version, overlayfs, tmpfs, btrfs nodatacow and
compression), and for a block device its layers (a loop device's backing file, which is
then probed as a file; device-mapper thin, crypt, linear and striped; md raid).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vmtrim.facts import NOTES, PROTOCOLS, Note
from vmtrim.model import Verdict
from vmtrim.storage import rbd, zfs
from vmtrim.storage.block import Stack, StorageLayer, ThinPool, block_stack
from vmtrim.storage.files import FileFacts, file_facts
from vmtrim.storage.mounts import Mount
from vmtrim.storage.runner import LocalRunner, Runner

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


@dataclass(frozen=True)
class Probe:
    """A verdict on the host storage, why, what to change, and facts to show with it."""

    verdict: Verdict
    reason: str
    fix: str | None = None
    notes: tuple[Note, ...] = ()
    #: the storage layers under the disk, top first (a loop device, then its file's mount)
    layers: tuple[StorageLayer, ...] = ()
    #: the dm-thin pool under the disk, if any (for pool-level reclaim)
    pool: ThinPool | None = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    func = libc.fallocate
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if func(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def filesystem_of(path: str) -> tuple[str, str] | None:
    """(mount point, filesystem type) of the mount holding ``path``, from mountinfo."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mountpoint = fields[4].replace("\\040", " ")
        fstype = line.split(" - ", 1)[1].split()[0]
        inside = real == mountpoint or real.startswith(mountpoint.rstrip("/") + "/")
        if inside and (best is None or len(mountpoint) >= len(best[0])):
            best = (mountpoint, fstype)
    return best


def _could_not_probe(label: str, exc: OSError) -> Probe:
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    why = "no space" if full else exc.strerror
    return Probe(Verdict.UNKNOWN, f"{label}: could not probe: {why}")


def punch_hole_probe(directory: str) -> Probe:
    """Try FALLOC_FL_PUNCH_HOLE on a temporary file in ``directory`` and check st_blocks."""
    where = filesystem_of(directory)
    label = f"{where[1]} at {where[0]}" if where else directory
    try:
        fd, name = tempfile.mkstemp(prefix=".vmtrim-probe-", dir=directory)
    except OSError as exc:
        return _could_not_probe(f"{label} (a probe file in {directory})", exc)
    try:
        block = max(os.fstat(fd).st_blksize, 4096)
        os.write(fd, b"\xa5" * (block * 4))
        os.fsync(fd)
        before = os.fstat(fd).st_blocks
        try:
            _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, block, block * 2)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                sticky = NOTES["punch_hole_sticky"]
                return Probe(
                    Verdict.BLOCK,
                    f"{label} cannot punch holes (fallocate:"
                    f" {exc.strerror}); QEMU's discards free nothing on the host",
                    "move the image to a filesystem that supports"
                    " FALLOC_FL_PUNCH_HOLE (ext4, xfs, btrfs, tmpfs), then restart the"
                    f" guest's QEMU: {sticky.message}",
                    (sticky,),
                )
            return _could_not_probe(label, exc)
        os.fsync(fd)
        after = os.fstat(fd).st_blocks
    except OSError as exc:  # a full filesystem fails the write (or the fsync)
        return _could_not_probe(label, exc)
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)
    if after < before:
        return Probe(Verdict.PASS, f"{label} punches holes (probed in {directory})")
    return Probe(
        Verdict.BLOCK,
        f"{label} accepted a punch-hole but freed no blocks",
        "move the image to a filesystem that frees punched blocks",
    )


def block_device_probe(path: str) -> Probe:
    """Does the host block device at ``path`` support discard (sysfs discard_max_bytes)?"""
    try:
        st = os.stat(path)
    except OSError as exc:
        return Probe(Verdict.UNKNOWN, f"{path} is not on this host ({exc.strerror})")
    if not stat.S_ISBLK(st.st_mode):
        return Probe(Verdict.UNKNOWN, f"{path} is not a block device on this host")
    sysdir = Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    for queue in (sysdir / "queue", sysdir.resolve().parent / "queue"):  # partitions
        try:
            value = int((queue / "discard_max_bytes").read_text().strip())
        except (OSError, ValueError):
            continue
        if value > 0:
            return Probe(Verdict.PASS, f"{path} supports discard (discard_max_bytes={value})")
        sticky = NOTES["punch_hole_sticky"]  # BLKDISCARD's ENOTSUP is just as sticky
        return Probe(
            Verdict.BLOCK,
            f"{path} does not support discard (discard_max_bytes=0)",
            "put the disk on a device or LV that supports discard (thin LV, SSD), then"
            f" restart the guest's QEMU: {sticky.message}",
            (sticky,),
        )
    return Probe(Verdict.UNKNOWN, f"{path}: no queue/discard_max_bytes in {sysdir}")


def protocol_probe(protocol: str | None) -> Probe:
    rule = PROTOCOLS.get(protocol or "")
    if rule is None:
        return Probe(
            Verdict.UNKNOWN,
            f"protocol {protocol or '?'}: vmtrim does not know whether it passes discard",
        )
    return Probe(rule.verdict, f"{protocol}: {rule.reason}")


NO_PROBE = "host probes are off (--no-probe)"


@dataclass
class HostProbes:
    """The host probes an audit runs, with a per-filesystem cache.

    ``local=False`` answers ``unknown`` for every local path without touching it, with
    ``off_reason`` as the reason: build it with :meth:`no_probe` (the user said
    ``--no-probe``) or :meth:`remote` (the XML or command line is from another host).
    """

    local: bool = True
    off_reason: str = "host probes are off"
    #: where the storage tools and sysfs are read (the punch-hole probe is always local)
    runner: Runner = field(default_factory=LocalRunner)
    _punch_cache: dict[int, Probe] = field(default_factory=dict)
    _device_cache: dict[str, Probe] = field(default_factory=dict)
    # The audit's host layer and its granularity stack ask the same questions of the same
    # device: each stack, zvol and RBD image is read once per HostProbes.
    _stack_cache: dict[str, Stack] = field(default_factory=dict)
    _zvol_cache: dict[str, tuple[zfs.Zvol | None, str]] = field(default_factory=dict)
    _rbd_cache: dict[str, rbd.RbdImage] = field(default_factory=dict)

    @classmethod
    def no_probe(cls) -> HostProbes:
        """The user asked for no probes (``--no-probe``)."""
        return cls(local=False, off_reason=NO_PROBE)

    @classmethod
    def remote(cls, uri: str) -> HostProbes:
        """The disks are on the host behind ``uri``: their paths are not files here."""
        return cls(
            local=False,
            off_reason=f"not probed: the disks are on the remote host of {uri},"
            " and its files cannot be probed from here",
        )

    @classmethod
    def choose(cls, *, no_probe: bool = False, remote_uri: str | None = None) -> HostProbes:
        """``--no-probe`` wins; else a remote URI turns probes off; else probe here."""
        if no_probe:
            return cls.no_probe()
        if remote_uri is not None:
            return cls.remote(remote_uri)
        return cls()

    def file(self, path: str) -> Probe:
        if not self.local:
            return Probe(Verdict.UNKNOWN, self.off_reason)
        directory = os.path.dirname(os.path.abspath(path)) or "/"
        try:
            st = os.stat(directory)
        except OSError:
            return Probe(Verdict.UNKNOWN, f"{directory} does not exist on this host")
        cached = self._punch_cache.get(st.st_dev)
        if cached is None:
            cached = punch_hole_probe(directory)
            self._punch_cache[st.st_dev] = cached
        target = path if os.path.exists(path) else directory
        facts = file_facts(self.runner, target, st.st_dev)
        probe = _with_facts(cached, facts)
        if facts.mount is None or not facts.mount.source.startswith("/dev/"):
            return probe
        under = self.filesystem_device(facts.mount)
        if not under.layers:
            return probe
        # the file's own verdict stands (QEMU punches the image); the device under the
        # filesystem says whether the host's storage gets the blocks back in turn
        return dataclasses.replace(
            probe,
            reason=f"{probe.reason}; under it: {under.reason}",
            notes=(*probe.notes, *under.notes),
            layers=(*probe.layers, *under.layers),
            pool=under.pool,
        )

    def filesystem_device(self, mount: Mount) -> Probe:
        """The layers under a host filesystem's device (loop, dm, md), once per device;
        no layers for a plain disk. A thin pool there is a note: the blocks QEMU frees in
        the image reach the pool only when that filesystem discards them."""
        cached = self._device_cache.get(mount.source)
        if cached is not None:
            return cached
        stack = self.stack(mount.source)
        if all(layer.kind == "disk" for layer in stack.layers):
            cached = Probe(stack.verdict, stack.reason())
        else:
            notes: list[Note] = []
            if stack.pool is not None:
                how = (
                    "it is mounted with discard"
                    if mount.has("discard")
                    else "it is not mounted with discard: run fstrim on the host"
                    f" (fstrim {mount.mountpoint}, or fstrim.timer)"
                )
                notes.append(
                    Note(
                        "thin_under_filesystem",
                        f"{mount.label} is on thin pool {stack.pool.name}: space freed in the"
                        f" image returns to the pool only when {mount.fstype} discards it; {how}",
                        "lvmthin(7) 'Thin pool discard'; FIELD.md [S6]",
                    )
                )
            cached = Probe(
                stack.verdict, stack.reason(), None, tuple(notes), tuple(stack.layers), stack.pool
            )
        self._device_cache[mount.source] = cached
        return cached

    def block(self, path: str) -> Probe:
        if not self.local:
            return Probe(Verdict.UNKNOWN, self.off_reason)
        stack = self.stack(path)
        if all(layer.kind == "disk" for layer in stack.layers):
            # a plain disk or partition: the sysfs probe (it finds a partition's queue)
            return self._zvol(path, block_device_probe(path))
        return self._stack_probe(stack)

    def stack(self, path: str) -> Stack:
        """The storage layers under the block device at ``path``, read once."""
        cached = self._stack_cache.get(path)
        if cached is None:
            cached = self._stack_cache[path] = block_stack(self.runner, path)
        return cached

    def zvol(self, dataset: str) -> tuple[zfs.Zvol | None, str]:
        """The zvol's facts (``zfs get`` and its pool's ``zpool get``), or None and why."""
        cached = self._zvol_cache.get(dataset)
        if cached is None:
            got = self.runner.run(zfs.zfs_argv(dataset), timeout=20.0)
            pool = self.runner.run(zfs.zpool_argv(dataset.split("/", 1)[0]), timeout=20.0)
            vol = zfs.parse_zvol(dataset, got.stdout, pool.stdout) if got.ok else None
            why = got.why() if not got.ok else "zfs get said nothing about it"
            cached = self._zvol_cache[dataset] = (vol, why)
        return cached

    def rbd_image(self, name: str) -> rbd.RbdImage:
        """The image's object size from ``rbd info``, else the documented default."""
        cached = self._rbd_cache.get(name)
        if cached is None:
            image = None
            if not isinstance(self.runner, LocalRunner) or shutil.which(
                "rbd"
            ):  # no fork for nothing
                out = self.runner.run(rbd.rbd_argv(name), timeout=20.0)
                image = rbd.parse_info(name, out.stdout) if out.ok else None
            cached = self._rbd_cache[name] = image or rbd.default_image(name)
        return cached

    def _stack_probe(self, stack: Stack) -> Probe:
        layers = list(stack.layers)
        below: Probe | None = None
        if stack.backing_file is not None:
            below = self.file(stack.backing_file)  # a loop device: its file decides
            layers.append(StorageLayer(stack.backing_file, "file", below.verdict, below.reason))
        verdict = Verdict.worst(layer.verdict for layer in layers)
        reason = "; ".join(layer.reason for layer in layers)
        # the deepest blocking layer is the cause (a loop device blocks when its file does)
        blocking = next((la for la in reversed(layers) if la.verdict is Verdict.BLOCK), None)
        fix, notes = None, () if below is None else below.notes
        if blocking is not None:
            fix = _layer_fix(blocking, stack.pool)
            if blocking.kind == "file" and below is not None:
                fix = below.fix
            elif "discard_max_bytes=0" in blocking.reason:
                sticky = NOTES["punch_hole_sticky"]
                fix, notes = f"{fix}: {sticky.message}", (sticky,)
        if stack.pool is not None and stack.pool.discards != "ignore":
            notes = (*notes, _chunk_note(stack.pool))
        return Probe(verdict, reason, fix, tuple(notes), tuple(layers), stack.pool)

    def network(self, protocol: str | None, source: str | None = None) -> Probe:
        probe = protocol_probe(protocol)
        # --no-probe, or a remote host: rbd info would ask this host's cluster, not the disk's
        if not self.local or protocol != "rbd" or not source:
            return probe
        name = rbd.image_of(source)
        if name is None:
            return probe
        image = self.rbd_image(name)
        note = Note("rbd_objects", image.describe(), "FIELD.md [H2]; Linux 0c93e1b7a26b")
        return dataclasses.replace(probe, notes=(*probe.notes, note))

    def _zvol(self, path: str, probe: Probe) -> Probe:
        dataset = zfs.dataset_of(path)
        if dataset is None:
            return probe
        vol, why = self.zvol(dataset)
        if vol is None:
            return dataclasses.replace(probe, reason=f"{probe.reason}; zvol {dataset}: {why}")
        facts = [f"zvol {dataset}"]
        if vol.volblocksize:
            facts.append(f"volblocksize {vol.volblocksize >> 10} KiB")
        if vol.compression:
            facts.append(f"compression={vol.compression}")
        if vol.autotrim:
            facts.append(f"pool autotrim={vol.autotrim}")
        notes = list(probe.notes)
        if vol.thin is False:
            notes.append(
                Note(
                    "zvol_refreservation",
                    f"zvol {dataset} is not thin: refreservation={vol.refreservation} keeps"
                    " that space reserved in the pool however much the guest frees"
                    " (zfs set refreservation=none, or create zvols with -s)",
                    "zfsprops(7) refreservation; FIELD.md [P4]",
                )
            )
        if vol.autotrim == "off":
            notes.append(
                Note(
                    "zpool_autotrim_off",
                    f"pool {dataset.split('/', 1)[0]} has autotrim=off: space freed in the pool"
                    " is not trimmed on its own devices until zpool trim runs",
                    "zpoolprops(7) autotrim",
                )
            )
        return dataclasses.replace(
            probe, reason=f"{probe.reason} ({', '.join(facts)})", notes=tuple(notes)
        )


def _with_facts(probe: Probe, facts: FileFacts) -> Probe:
    """The punch-hole answer with the mount's facts; NFS < 4.2 blocks even unprobed."""
    if facts.mount is None or not (facts.facts or facts.blocks):
        return probe
    verdict, reason, fix, notes = probe.verdict, probe.reason, probe.fix, probe.notes
    if facts.blocks is not None and verdict is Verdict.UNKNOWN:
        sticky = NOTES["punch_hole_sticky"]
        verdict, reason = Verdict.BLOCK, f"{facts.blocks} ({reason})"
        fix = f"mount the export with -o vers=4.2, then restart the guest's QEMU: {sticky.message}"
        notes = (sticky,)
    elif facts.facts:
        reason = f"{reason} ({'; '.join(facts.facts)})"
    layer = StorageLayer(
        facts.mount.mountpoint,
        "file",
        verdict,
        reason,
        {"fstype": facts.mount.fstype, "facts": list(facts.facts)},
    )
    return Probe(verdict, reason, fix, notes, (layer,), probe.pool)


def _layer_fix(layer: StorageLayer, pool: ThinPool | None) -> str:
    if layer.kind == "dm-thin" and pool is not None:
        # lvmthin(7) "Discard": switching from ignore needs the pool inactive
        return (
            f"lvchange --discards passdown {pool.name} (deactivate the pool first when"
            " its mode is ignore, lvmthin(7))"
        )
    if layer.kind == "dm-crypt":
        return "cryptsetup refresh --allow-discards (add --persistent for LUKS2), cryptsetup(8)"
    return f"put the disk on a device that supports discard ({layer.name} does not)"


def _chunk_note(pool: ThinPool) -> Note:
    kib = pool.chunk_bytes >> 10
    return Note(
        "thin_chunk",
        f"thin pool {pool.name} frees whole {kib} KiB chunks only: a discard smaller than a"
        " chunk, or not aligned to one, frees nothing (prefer fstrim to online discard)",
        "FIELD.md [H1][H5]: dm-thin ignores discards to partial chunks; lvmthin(7)",
    )

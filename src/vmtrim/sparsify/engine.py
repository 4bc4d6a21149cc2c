"""``vmtrim sparsify``: give a shut-off image's free space back, in place.

The image is attached to the lab appliance's ``sparsify`` variant (see
``vmtrim/lab/sparsify.sh``) read-write with ``discard=unmap`` on virtio-scsi, in its
own format; QEMU opens any backing file read-only, so only the top image changes.
The guest mounts each filesystem with safe options, fstrims it and unmounts it, and
discards swap behind its header. Before and after each one the host measures the
image's allocation (``du``), so the report says what each filesystem really gave
back; FITRIM's own figure is an upper bound.

Cache mode: QEMU's default for ``-blockdev`` (writeback, flushes honoured), not
``cache=unsafe``. A SIGKILL of QEMU is safe either way (the qcow2 driver issues its
metadata writes in dependency order, and what it wrote is in the host page cache),
but ``unsafe`` drops the flushes that order those writes on the disk, so a host
crash or power cut could then leave L2 tables pointing at freed clusters.

LUKS (``--key``): the guest asks for a key per LUKS volume on the control port, and
the host answers there, so a key is on no command line (QEMU's ``-append`` shows in
``ps``). cryptsetup opens the volume with ``--allow-discards`` (fstrim's discards must
pass dm-crypt), and the guest closes it again; the header is only read.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmtrim.errors import BadInput, GuestFailed
from vmtrim.image.allocation import allocated_bytes
from vmtrim.sparsify.inuse import refuse_if_in_use
from vmtrim.sparsify.testhook import pause
from vmtrim.vm.guest import (
    ControlChannel,
    DirectGuest,
    DiskSpec,
    GuestSpec,
    make_workdir,
    parse_status,
)

SCHEMA = "vmtrim.sparsify/1"
GAP_MIN = 1024 * 1024  # smaller gaps are alignment padding, not worth a line
STEP_TIMEOUT = 900.0  # one filesystem's fstrim under TCG
MAX_KEY_BYTES = 64 * 1024  # cryptsetup allows 8 MiB; real key files are 4 KiB or less
# Opening LUKS2 runs its argon2 PBKDF in the guest: cryptsetup gives it up to 1 GiB
# (and at most half the RAM of the machine that formatted it). QEMU allocates lazily.
KEY_MEMORY_MIB = 1536


@dataclass(frozen=True)
class LuksKey:
    """One ``--key``: the LUKS volumes it is for (None: all) and the key file's bytes."""

    selector: str | None  # a device as the appliance names it (sda2, /dev/sda2) or a UUID
    source: str  # the key file, for messages
    data: bytes = field(repr=False)

    def candidates(self) -> list[bytes]:
        """The whole file (cryptsetup --key-file), then its first line (virt-sparsify)."""
        first = self.data.split(b"\n", 1)[0]
        return [self.data] if first in (self.data, b"") else [self.data, first]

    def matches(self, device: str, uuid: str | None) -> bool:
        if self.selector is None:
            return True
        wanted = self.selector.removeprefix("/dev/")
        return wanted == device or (uuid is not None and wanted.lower() == uuid.lower())


def read_key_file(path: Path) -> bytes:
    """A key file's bytes: a regular file, not empty, at most MAX_KEY_BYTES."""
    try:
        # O_NONBLOCK: a FIFO given by mistake must not hang the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise BadInput("no such key file (given with --key)", subject=str(path)) from None
    except OSError as exc:
        raise BadInput(f"cannot read the key file: {exc.strerror}", subject=str(path)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadInput("the key file is not a regular file", subject=str(path))
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_KEY_BYTES + 1)
    if len(data) > MAX_KEY_BYTES:
        raise BadInput(f"the key file is larger than {MAX_KEY_BYTES} bytes", subject=str(path))
    if not data:
        raise BadInput("the key file is empty", subject=str(path))
    return data


def parse_key(value: str) -> LuksKey:
    """``--key FILE`` (every LUKS volume) or virt-sparsify's ``--key ID:file:FILE``.

    ``ID:key:PASSPHRASE`` is refused: a passphrase on a command line is in every user's
    ``ps``. ``ID`` is the device as the appliance names it (``sda2``) or the LUKS UUID.
    """
    parts = value.split(":", 2)
    if len(parts) >= 2 and parts[1] in ("key", "clevis"):
        why = (
            "a passphrase on the command line shows in every user's ps: write it to a file"
            " and give ID:file:FILE"
            if parts[1] == "key"
            else "clevis is not supported: give ID:file:FILE"
        )
        raise BadInput(why, subject=f"--key {parts[0]}:{parts[1]}")
    if len(parts) == 3 and parts[1] == "file":
        selector, name = parts[0] or None, parts[2]
    else:
        selector, name = None, value
    if selector == "all":
        selector = None
    return LuksKey(selector, name, read_key_file(Path(name)))


class WrongKey(BadInput):
    """A --key opened none of the LUKS volumes it was for; the run did the rest."""

    def __init__(self, message: str, *, subject: str, result: SparsifyResult) -> None:
        super().__init__(message, subject=subject)
        self.result = result


@dataclass
class Filesystem:
    device: str  # as the guest names it: vda2, vg/lv
    type: str
    size: int
    uuid: str | None = None
    label: str | None = None
    action: str = "trimmed"  # trimmed | failed | would trim | checked
    error: str | None = None
    fitrim_bytes: int | None = None  # what FITRIM said: an upper bound
    allocated_before: int | None = None
    allocated_after: int | None = None
    uuid_after: str | None = None

    @property
    def freed(self) -> int | None:
        if self.allocated_before is None or self.allocated_after is None:
            return None
        return self.allocated_before - self.allocated_after


@dataclass
class LeftAlone:
    device: str
    type: str
    size: int | None
    reason: str


@dataclass
class SparsifyResult:
    path: str
    format: str
    backing: str | None
    virtual_size: int | None
    dry_run: bool
    allocated_before: int
    allocated_after: int | None = None
    filesystems: list[Filesystem] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    checksums: dict[str, dict[str, str]] = field(default_factory=dict)  # device -> path -> sha
    zeros_discarded: int | None = None
    wrong_keys: dict[str, str] = field(default_factory=dict)  # LUKS device -> key file
    warnings: list[str] = field(default_factory=list)  # the appliance's step=warn messages
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("checksums")
        for fs, out in zip(self.filesystems, data["filesystems"], strict=True):
            out["freed"] = fs.freed
        data["freed"] = (
            None if self.allocated_after is None else self.allocated_before - self.allocated_after
        )
        return data


def _image_facts(path: Path) -> tuple[str, str | None, int | None]:
    from vmtrim._util.proc import run_tool

    out = run_tool(["qemu-img", "info", "-U", "--output=json", str(path)], subject=str(path))
    info = json.loads(out)
    fmt = str(info.get("format"))
    if fmt not in ("qcow2", "raw"):
        raise BadInput(f"sparsify handles qcow2 and raw images, not {fmt}", subject=str(path))
    if info.get("format-specific", {}).get("data", {}).get("corrupt"):
        raise BadInput(
            "the image is marked corrupt: run qemu-img check -r first", subject=str(path)
        )
    backing = info.get("backing-filename")
    return fmt, str(backing) if backing else None, info.get("virtual-size")


def _read_only(argv: list[str]) -> list[str]:
    """The lab's -blockdev arguments with read-only on: --dry-run and checksums write nothing."""
    out = []
    for arg in argv:
        if arg.startswith("{") and '"node-name":"disk0' in arg:
            node = json.loads(arg)
            node["read-only"] = True
            node.pop("discard", None)
            arg = json.dumps(node, separators=(",", ":"))
        out.append(arg)
    return out


def _die_with_us(argv: list[str]) -> list[str]:
    """QEMU under ``setpriv --pdeathsig KILL``: if vmtrim is killed, so is its QEMU.

    Otherwise a SIGKILLed vmtrim would leave the appliance blocked on a control port
    nobody reads, holding the image's lock. A killed QEMU leaves a qcow2 consistent
    (leaked clusters at most): what it wrote is in the host's page cache, in order.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv


def _next_status(ctl: ControlChannel, timeout: float) -> dict[str, str]:
    # ControlChannel.expect waits for one named step; here every step matters, in order.
    deadline = time.monotonic() + timeout
    while True:
        fields = parse_status(ctl._readline(deadline, "the next step"))
        if fields is not None:
            return fields


def _answer(ctl: ControlChannel, line: str) -> None:
    # ControlChannel.go() sends only "go"; a key step is answered with its own line.
    try:
        ctl._sock.sendall(line.encode() + b"\n")
    except OSError as exc:
        raise ctl._fail(f"cannot send to the guest: {exc}") from exc


def _key_reply(keys: Sequence[LuksKey], device: str, uuid: str | None) -> tuple[str, str | None]:
    """The line that answers the guest's key step, and the key file it came from."""
    key = next((k for k in keys if k.matches(device, uuid)), None)
    if key is None:
        return "none", None
    return "key " + " ".join(base64.b64encode(c).decode() for c in key.candidates()), key.source


def _gaps(parts: list[tuple[int, int]], disk_size: int) -> list[tuple[int, int]]:
    """(start, length) of the unpartitioned space between and after partitions."""
    gaps = []
    pos = GAP_MIN  # the first MiB holds the partition table and alignment padding
    for start, size in sorted(parts):
        if start - pos >= GAP_MIN:
            gaps.append((pos, start - pos))
        pos = max(pos, start + size)
    if parts and disk_size - GAP_MIN - pos >= GAP_MIN:  # GPT keeps a backup at the end
        gaps.append((pos, disk_size - pos))
    return gaps


def run_appliance(
    path: Path,
    fmt: str,
    result: SparsifyResult,
    *,
    action: str,
    on_step: Callable[[str], None] | None = None,
    boot_timeout: float = 180.0,
    keys: Sequence[LuksKey] = (),
) -> None:
    """Boot the sparsify appliance on ``path`` and fill ``result`` from its report."""
    from vmtrim.lab import ensure_appliance

    def step(text: str) -> None:
        if on_step is not None:
            on_step(text)

    step("building the appliance")
    appliance = ensure_appliance(variant="sparsify")
    writes = action == "trim"
    spec = GuestSpec(
        appliance,
        scenario={"action": action, **({"keys": "1"} if keys else {})},
        disk=DiskSpec(path, fmt, "virtio-scsi", "unmap" if writes else "ignore"),
        memory_mib=KEY_MEMORY_MIB if keys else GuestSpec.memory_mib,
    )
    tried: dict[str, str] = {}  # LUKS device -> the key file sent for it
    workdir = make_workdir()
    parts: list[tuple[int, int]] = []
    disk_size = 0
    current: Filesystem | None = None
    try:
        step("booting the appliance")
        with DirectGuest(
            spec,
            workdir,
            subject=str(path),
            rewrite_argv=lambda argv: _die_with_us(argv if writes else _read_only(argv)),
        ) as guest:
            ctl = guest.ctl
            ready = ctl.expect("ready", boot_timeout)
            disk_size = int(ready.get("size", "0"))
            pause("booted")
            while True:
                f = _next_status(ctl, STEP_TIMEOUT)
                kind = f["step"]
                if kind == "error":
                    raise guest.failure(f"the appliance failed: {f.get('message', '?')}")
                if kind == "part":
                    parts.append((int(f["start"]), int(f["size"])))
                elif kind == "skip":
                    size = f.get("size")
                    result.left_alone.append(
                        LeftAlone(
                            f["dev"],
                            f.get("type", "unknown"),
                            int(size) if size else None,
                            f.get("message", ""),
                        )
                    )
                elif kind == "fs":
                    current = Filesystem(
                        f["dev"],
                        f["type"],
                        int(f.get("size") or 0),
                        uuid=f.get("uuid") or None,
                        label=f.get("message") or None,
                        action={"trim": "trimmed", "list": "would trim"}.get(action, "checked"),
                    )
                    result.filesystems.append(current)
                    step(f"{current.device} ({current.type})")
                    if writes:
                        current.allocated_before = allocated_bytes(path)
                    ctl.go()
                elif kind == "trimmed" and current is not None:
                    if writes:
                        current.allocated_after = allocated_bytes(path)
                    current.uuid_after = f.get("uuid") or None
                    if action == "trim":
                        current.fitrim_bytes = int(f.get("trimmed") or 0)
                    if f.get("rc") != "0":
                        current.action = "failed"
                        current.error = f.get("message") or f"exit status {f.get('rc')}"
                    current = None
                    pause("trimmed")
                    ctl.go()
                elif kind == "key":
                    reply, source = _key_reply(keys, f["dev"], f.get("uuid") or None)
                    if source is not None:
                        tried[f["dev"]] = source
                    _answer(ctl, reply)
                elif kind == "badkey":
                    source = tried.get(f["dev"], "?")
                    result.wrong_keys[f["dev"]] = source
                    size = f.get("size")
                    result.left_alone.append(
                        LeftAlone(
                            f["dev"],
                            "crypto_LUKS",
                            int(size) if size else None,
                            f"the key from {source} does not open it: left alone",
                        )
                    )
                elif kind == "warn" and f.get("message"):
                    result.warnings.append(f["message"])
                elif kind == "sum":
                    digest, _, name = f.get("message", "").partition("  ")
                    result.checksums.setdefault(f["dev"], {})[name] = digest
                elif kind == "done":
                    break
            guest.wait_exit(120)  # QEMU exits on the guest's poweroff, flushing the image
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for start, length in _gaps(parts, disk_size):
        result.left_alone.append(
            LeftAlone(f"gap@{start}", "gap", length, "space between partitions: left alone")
        )


def sparsify(
    path: Path,
    *,
    dry_run: bool = False,
    zeros: bool = False,
    uri: str | None = None,
    on_step: Callable[[str], None] | None = None,
    keys: Sequence[LuksKey] = (),
) -> SparsifyResult:
    """Sparsify ``path`` in place; WrongKey (exit 2, with the result) when a --key
    opened none of the LUKS volumes it was for: those are left alone, the rest is done."""
    start = time.monotonic()
    if not path.is_file():
        raise BadInput("no such image file", subject=str(path))
    path = path.absolute()
    refuse_if_in_use(path, uri=uri)
    fmt, backing, virtual = _image_facts(path)
    result = SparsifyResult(
        str(path), fmt, backing, virtual, dry_run, allocated_before=allocated_bytes(path)
    )
    try:
        run_appliance(
            path, fmt, result, action="list" if dry_run else "trim", on_step=on_step, keys=keys
        )
    except GuestFailed as exc:
        if "lock" in exc.message:
            from vmtrim.errors import ImageInUse

            raise ImageInUse(f"in use: {exc.message}", subject=str(path)) from exc
        raise
    if zeros and not dry_run:
        from vmtrim.sparsify.zeros import discard_zero_clusters

        if on_step is not None:
            on_step("discarding all-zero clusters")
        result.zeros_discarded = discard_zero_clusters(path, fmt)
    result.allocated_after = allocated_bytes(path)
    result.seconds = round(time.monotonic() - start, 1)
    if result.wrong_keys:
        raise WrongKey(
            "; ".join(
                f"{dev}: the key from {source} does not open this LUKS volume (left alone)"
                for dev, source in result.wrong_keys.items()
            ),
            subject=str(path),
            result=result,
        )
    return result


def checksums(path: Path, keys: Sequence[LuksKey] = ()) -> dict[str, dict[str, str]]:
    """sha256 of every file of every filesystem on ``path``, read through the appliance."""
    fmt, backing, virtual = _image_facts(path)
    result = SparsifyResult(str(path), fmt, backing, virtual, True, allocated_bytes(path))
    run_appliance(path.absolute(), fmt, result, action="checksum", keys=keys)
    return result.checksums


def record_history(result: SparsifyResult, db: Path | None = None) -> Path | None:
    """Store the run as kind "sparsify" when the history database exists; its path or None.

    The image path stands in the domain column (a shut-off image may belong to no
    domain libvirt knows). A database that cannot be written raises HistoryUnavailable.
    """
    from vmtrim.history.store import DiskRecord, DomainRecord, History, default_db_path

    where = db or default_db_path()
    if result.dry_run or result.allocated_after is None or not where.exists():
        return None
    failed = [fs for fs in result.filesystems if fs.action == "failed"]
    record = DomainRecord(
        domain=result.path,
        status="failed" if failed else "trimmed",
        reason="; ".join(f"{fs.device}: {fs.error}" for fs in failed) or None,
        seconds=result.seconds,
        guest_trimmed=sum(fs.fitrim_bytes or 0 for fs in result.filesystems),
        disks=[
            DiskRecord(
                target=Path(result.path).name,
                source=result.path,
                virtual_size=result.virtual_size,
                allocated_before=result.allocated_before,
                allocated_after=result.allocated_after,
                guest_trimmed=sum(fs.fitrim_bytes or 0 for fs in result.filesystems),
                verdict="failed" if failed else "trimmed",
                measured_by="du",
            )
        ],
    )
    # A writer opens as a recording command does, so an older schema is upgraded first;
    # the exists() check above is what keeps sparsify from creating the database.
    with History.open(where) as history:
        run_id = history.begin_run("sparsify", trigger="cli")
        history.record(run_id, record)
        history.end_run(run_id)
    return where

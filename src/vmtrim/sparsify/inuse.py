"""Is an image in use? Ask QEMU's own image lock, and libvirt's running domains.

QEMU's file-posix driver (block/file-posix.c, ``raw_apply_lock_bytes``) marks an open
image with OFD byte-range locks: a shared lock on byte ``100 + n`` for every
permission bit ``n`` it holds (0 consistent read, 1 write, 2 write-unchanged,
3 resize) and on byte ``200 + n`` for every permission it does not let others
share. Any lock in 100..299 held by another open file description means a QEMU,
qemu-img or qemu-nbd has the image open. ``F_OFD_GETLK`` with a write lock over
that range returns the first such lock (an OFD lock does not name its process).

:func:`hold_write_guard` takes the lock a writer that shares nothing but reads
would: byte 201 (others may not write). A QEMU that wants to write the image
then fails to open it, while ``qemu-img convert`` and ``compare`` (readers that
share writing with nobody else) still can.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vmtrim.errors import EnvironmentProblem, ImageInUse

PERM_BASE = 100
SHARED_BASE = 200
LOCK_SPAN = 200  # bytes 100..299: every permission and shared-permission byte
PERMISSIONS = ("consistent read", "write", "write unchanged", "resize")
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = "hhqqi"  # struct flock on Linux x86-64: type, whence, start, len, pid


def _lock_struct(kind: int, start: int, length: int) -> bytes:
    return struct.pack(_FLOCK + "4x", kind, os.SEEK_SET, start, length, 0)


def _what(offset: int) -> str:
    if PERM_BASE <= offset < PERM_BASE + len(PERMISSIONS):
        return f"holds the {PERMISSIONS[offset - PERM_BASE]} permission"
    if SHARED_BASE <= offset < SHARED_BASE + len(PERMISSIONS):
        return f"does not share the {PERMISSIONS[offset - SHARED_BASE]} permission"
    return "holds a lock"


def qemu_lock_holder(path: Path) -> str | None:
    """Why another process holds QEMU's image lock on ``path``, or None if nobody does."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot open: {exc.strerror}", subject=str(path)) from exc
    try:
        # The write byte first: "writes to it" is the reason a user most needs to read.
        for start, length in ((PERM_BASE + 1, 1), (PERM_BASE, LOCK_SPAN)):
            probe = _lock_struct(fcntl.F_WRLCK, start, length)
            try:
                reply = fcntl.fcntl(fd, F_OFD_GETLK, probe)
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOLCK):  # no OFD locks here
                    return None
                raise
            kind, _, held, _, _ = struct.unpack_from(_FLOCK, reply)
            if kind != fcntl.F_UNLCK:
                return f"another process {_what(held)} (QEMU's image lock, byte {held})"
        return None
    finally:
        os.close(fd)


@contextmanager
def hold_write_guard(path: Path) -> Iterator[None]:
    """While inside, no QEMU can open ``path`` for writing (see the module docstring)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.fcntl(fd, F_OFD_SETLK, _lock_struct(fcntl.F_RDLCK, SHARED_BASE + 1, 1))
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise ImageInUse(
                "another process holds QEMU's write lock on it", subject=str(path)
            ) from exc
        yield
    finally:
        os.close(fd)  # closing the last descriptor drops the OFD lock


_LOCAL_SOCKETS = (
    "/run/libvirt/libvirt-sock-ro",
    "/run/libvirt/virtqemud-sock-ro",
    "/var/run/libvirt/libvirt-sock-ro",
)


@dataclass(frozen=True)
class DomainUse:
    domain: str
    disk: str  # the domain's disk target (vda, sdb) or "?"
    role: str  # "disk" or "backing file"


def _sources(xml: str) -> Iterator[tuple[str, str, str]]:
    """(target, role, file) for every file a domain's disks and their chains name."""
    root = ET.fromstring(xml)
    for disk in root.iterfind("./devices/disk"):
        target = disk.find("target")
        dev = target.get("dev", "?") if target is not None else "?"
        node: ET.Element | None = disk
        role = "disk"
        while node is not None:
            source = node.find("source")
            if source is not None:
                for attr in ("file", "dev"):
                    if source.get(attr):
                        yield dev, role, str(source.get(attr))
            node = node.find("backingStore")
            role = "backing file"


def libvirt_users(path: Path, uri: str | None) -> list[DomainUse]:
    """The running libvirt domains whose disks (or their backing chains) use ``path``.

    Returns [] when libvirt is not installed or its daemon does not answer: then no
    libvirt domain can be running on this host's image either.
    """
    try:
        import libvirt
    except ImportError:
        return []
    uri = uri or os.environ.get("LIBVIRT_DEFAULT_URI") or None
    if uri is None and not any(Path(s).exists() for s in _LOCAL_SOCKETS):
        return []  # no daemon: connecting would only time out or start one
    target = path.resolve()
    # libvirt prints its own errors to stderr unless a handler takes them.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError:
        return []
    try:
        found: list[DomainUse] = []
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                xml = dom.XMLDesc(0)
            except libvirt.libvirtError:
                continue
            for dev, role, source in _sources(xml):
                try:
                    same = Path(source).resolve() == target
                except OSError:
                    same = False
                if same:
                    found.append(DomainUse(str(dom.name()), dev, role))
        return found
    finally:
        conn.close()


def refuse_if_in_use(path: Path, *, uri: str | None = None, check_libvirt: bool = True) -> None:
    """ImageInUse (exit 3) with the reason when a process or a running domain uses ``path``."""
    holder = qemu_lock_holder(path)
    if holder is not None:
        raise ImageInUse(f"in use: {holder}", subject=str(path))
    if check_libvirt:
        users = libvirt_users(path, uri)
        if users:
            u = users[0]
            raise ImageInUse(
                f"in use: the running libvirt domain {u.domain} has it as {u.role} of {u.disk}",
                subject=str(path),
            )

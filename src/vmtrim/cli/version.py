"""``vmtrim --version``: vmtrim's version and what it found on this host, fast.

Budget: 50 ms wall, of which Python itself takes 10-20. So this module imports
nothing beyond the standard library's builtins (no click, rich, subprocess,
shutil, hashlib or even pathlib: 4 ms) and reads each version the cheapest safe way:

* vmtrim: ``vmtrim.__version__`` (pyproject reads the same attribute);
* the facts table: a CRC-32 of ``vmtrim/facts.py`` as shipped, so two installs
  with the same id encode the same knowledge (importing the table costs more);
* libvirt: the library's file name, ``libvirt.so.0.9000.0`` is 9.0.0 (libtool
  numbers it ``0.(1000*major+minor).micro``), found without loading it;
* QEMU: ``qemu-system-x86_64 --version`` from PATH, spawned with
  ``os.posix_spawnp`` (about 10 ms; the only process started).
"""

from __future__ import annotations

import os
import sys
import zlib

QEMU = "qemu-system-x86_64"
_LIB_DIRS = ("/usr/lib", "/usr/lib64", "/lib", "/usr/local/lib", "/usr/local/lib64")


def facts_table_id() -> str:
    facts = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "facts.py")
    try:
        with open(facts, "rb") as file:
            return f"{zlib.crc32(file.read()):08x}"
    except OSError:
        return "not found"


def libvirt_library() -> tuple[str, str] | None:
    """(version, path) of the libvirt shared library, from its file name."""
    multiarch = getattr(sys.implementation, "_multiarch", None)
    dirs = [f"{d}/{multiarch}" for d in _LIB_DIRS if multiarch] + list(_LIB_DIRS)
    for directory in dirs:
        link = os.path.join(directory, "libvirt.so.0")
        if not os.path.exists(link):
            continue
        real = os.path.realpath(link)
        parts = os.path.basename(real).removeprefix("libvirt.so.").split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            packed, micro = int(parts[1]), int(parts[2])
            return f"{packed // 1000}.{packed % 1000}.{micro}", real
        return "unknown", real
    return None


def _which(name: str) -> str | None:
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(directory or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def qemu_version(timeout: float = 5.0) -> tuple[str, str] | None:
    """(version, path) from ``qemu-system-x86_64 --version``; None when it is not on PATH."""
    path = _which(QEMU)
    if path is None:
        return None
    read_end, write_end = os.pipe()
    try:
        null = os.open(os.devnull, os.O_RDWR)
        try:
            pid = os.posix_spawn(
                path,
                [QEMU, "--version"],
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, null, 0),
                    (os.POSIX_SPAWN_DUP2, write_end, 1),
                    (os.POSIX_SPAWN_DUP2, null, 2),
                ],
            )
        finally:
            os.close(null)
            os.close(write_end)
        out, finished = _read_until_eof(read_end, timeout)
        if not finished:  # a QEMU that hangs must not hang --version
            os.kill(pid, 9)
        os.waitpid(pid, 0)
    except OSError:
        return ("cannot run", path)
    finally:
        os.close(read_end)
    # "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
    head = out.decode(errors="replace").partition("\n")[0]
    marker = "QEMU emulator version "
    if marker not in head:
        return ("unknown", path)
    return head.split(marker, 1)[1].split(" ", 1)[0], path


def _read_until_eof(fd: int, timeout: float) -> tuple[bytes, bool]:
    """What the child wrote, and whether it closed its end (False: timed out or too much)."""
    import select

    chunks: list[bytes] = []
    while sum(map(len, chunks)) < 65536:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return b"".join(chunks), False
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
    return b"".join(chunks), False


def version_lines() -> list[str]:
    from vmtrim import __version__

    lines = [f"vmtrim {__version__}", f"facts table {facts_table_id()} (crc32 of vmtrim/facts.py)"]
    lib = libvirt_library()
    lines.append(f"libvirt {lib[0]} (library {lib[1]})" if lib else "libvirt: library not found")
    qemu = qemu_version()
    lines.append(f"QEMU {qemu[0]} ({qemu[1]})" if qemu else f"QEMU: {QEMU} not on PATH")
    return lines


def print_version() -> None:
    sys.stdout.write("\n".join(version_lines()) + "\n")

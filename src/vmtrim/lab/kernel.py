"""Find the guest kernel and its modules for the lab appliance.

Three sources, in this order:

1. ``--kernel PATH --modules DIR`` given by the user (DIR is ``.../lib/modules/<version>``
   and must hold ``modules.dep``);
2. the host's own ``/boot/vmlinuz-<uname -r>`` with ``/lib/modules/<uname -r>``;
3. Debian's generic kernel package, fetched with ``apt-get download`` and unpacked
   with ``dpkg -x``. The ``.deb`` is kept in the cache, so only the first build
   touches the package registry.

Debian's *cloud* flavour (linux-image-cloud-amd64) has no AHCI driver at all
(``# CONFIG_SATA_AHCI is not set`` in its config), so the sata cells could never
boot with it; the generic flavour (linux-image-amd64) has every driver as a module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmtrim._util.proc import run_tool
from vmtrim.errors import BadInput, EnvironmentProblem

META_PACKAGE = "linux-image-amd64"


@dataclass(frozen=True)
class KernelInput:
    """Where the kernel comes from, before anything is unpacked."""

    origin: str  # "override", "host" or "debian:<package>_<version>"
    deb: Path | None = None
    image: Path | None = None
    modules: Path | None = None


@dataclass(frozen=True)
class UnpackedKernel:
    image: Path
    modules: Path  # the directory that holds modules.dep
    version: str


def sha256_file(path: Path, digest: hashlib._Hash | None = None) -> str:
    h = digest or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def locate_kernel(
    cache: Path, kernel: Path | None = None, modules: Path | None = None
) -> KernelInput:
    """Pick the kernel source; download Debian's package only when nothing else exists."""
    if (kernel is None) != (modules is None):
        raise BadInput("--kernel and --modules go together", subject="lab")
    if kernel is not None and modules is not None:
        if not kernel.is_file():
            raise BadInput("no such kernel image", subject=str(kernel))
        if not (modules / "modules.dep").is_file():
            raise BadInput(
                "not a modules directory: no modules.dep (run depmod -b ROOT VERSION)",
                subject=str(modules),
            )
        return KernelInput("override", image=kernel, modules=modules)
    release = os.uname().release
    host_image = Path("/boot") / f"vmlinuz-{release}"
    host_modules = Path("/lib/modules") / release
    if os.access(host_image, os.R_OK) and (host_modules / "modules.dep").is_file():
        return KernelInput("host", image=host_image, modules=host_modules)
    deb = debian_kernel_deb(cache / "kernels")
    return KernelInput(f"debian:{deb.stem}", deb=deb)


def _apt_candidate() -> tuple[str, str] | None:
    """(package, version) that linux-image-amd64 depends on, or None if apt knows nothing."""
    try:
        depends = run_tool(["apt-cache", "depends", META_PACKAGE], timeout=60)
    except EnvironmentProblem:
        return None
    match = re.search(r"Depends:\s*(linux-image-\S+)", depends)
    if not match:
        return None
    package = match.group(1)
    try:
        show = run_tool(["apt-cache", "show", "--no-all-versions", package], timeout=60)
    except EnvironmentProblem:
        return None
    version = re.search(r"^Version:\s*(\S+)", show, re.MULTILINE)
    if not version:
        return None
    return package, version.group(1)


# apt-cache answers from the package lists: their stamp says when an answer may change.
APT_CACHE_FILES = ("/var/lib/apt/lists", "/etc/apt/sources.list.d")


def file_stamp(*paths: str | Path) -> str | None:
    """mtime and size of each path, as one string; None if one is missing."""
    parts = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            return None
        parts.append(f"{path}:{st.st_mtime_ns}:{st.st_size}")
    return "|".join(parts)


def memo(store: Path, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()``, remembered in ``store/inputs-memo.json`` under ``key``.

    Every lab boot asks the same questions (apt-cache for the kernel, ldd for each tool):
    seven subprocesses, 1-4 s under TCG load. A key carries the stamp of what its answer
    depends on, so a changed input is a new key.
    """
    path = store / "inputs-memo.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    if key in data:
        return data[key]
    value = compute()
    data[key] = value
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        store.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(dict(list(data.items())[-64:])))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a memo is only a shortcut
    return value


def debian_kernel_deb(store: Path) -> Path:
    """The cached kernel .deb, downloaded with ``apt-get download`` on first use."""
    store.mkdir(parents=True, exist_ok=True)
    stamp = file_stamp(*APT_CACHE_FILES)
    if stamp is None:
        candidate = _apt_candidate()
    else:
        found = memo(store, f"apt:{META_PACKAGE}:{stamp}", lambda: _apt_candidate())
        candidate = (str(found[0]), str(found[1])) if found else None
    cached = sorted(store.glob("linux-image-*.deb"), key=lambda p: p.stat().st_mtime)
    if candidate is None:
        if cached:  # offline, or apt lists gone: the kernel we already have still works
            return cached[-1]
        raise EnvironmentProblem(
            f"apt-cache does not know {META_PACKAGE}; run 'apt-get update' "
            "(bootstrap.sh does), or give --kernel and --modules",
            subject="lab",
        )
    package, version = candidate
    name = f"{package}_{version.replace(':', '%3a')}_amd64.deb"
    target = store / name
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=store, prefix=".download-") as tmp:
        try:
            # "=version" pins exactly one file; a glob would download every version.
            run_tool(["apt-get", "download", f"{package}={version}"], cwd=tmp, timeout=600)
        except EnvironmentProblem as exc:
            raise EnvironmentProblem(
                f"apt-get download {package}={version} failed: {exc.message}", subject="lab"
            ) from exc
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise EnvironmentProblem(
                f"apt-get download {package} left {len(debs)} .deb files", subject="lab"
            )
        os.replace(debs[0], target)
    return target


def unpack(kin: KernelInput, workdir: Path) -> UnpackedKernel:
    """Make the kernel image and a depmod'ed modules directory available under ``workdir``."""
    if kin.deb is None:
        assert kin.image is not None and kin.modules is not None
        return UnpackedKernel(kin.image, kin.modules, kin.modules.name)
    root = workdir / "deb"
    run_tool(["dpkg", "-x", str(kin.deb), str(root)], subject=str(kin.deb), timeout=600)
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise EnvironmentProblem("the package holds no single boot/vmlinuz-*", subject=str(kin.deb))
    version = images[0].name.removeprefix("vmlinuz-")
    modules = root / "lib" / "modules" / version
    if not modules.is_dir():
        raise EnvironmentProblem(
            f"the package holds no lib/modules/{version}", subject=str(kin.deb)
        )
    # Debian's package leaves modules.dep to its postinst; make it ourselves.
    run_tool(["depmod", "-b", str(root), version], subject=str(kin.deb), timeout=300)
    return UnpackedKernel(images[0], modules, version)


def remove_unpacked(workdir: Path) -> None:
    shutil.rmtree(workdir / "deb", ignore_errors=True)


# --- PVH boot ----------------------------------------------------------------------------
#
# Under TCG the kernel's own decompressor is slow: with Debian's xz bzImage, 4.5 of the
# 8 s from QEMU start to init. QEMU can instead load an uncompressed ELF vmlinux that
# carries a PVH entry note (CONFIG_PVH), which brings a lab boot down to about 3.5 s.

_PAYLOAD_MAGIC = {
    b"\xfd7zXZ\x00": "xz",
    b"\x1f\x8b\x08": "gzip",
    b"BZh": "bzip2",
    b"\x5d\x00\x00": "lzma",
}
XEN_ELFNOTE_PHYS32_ENTRY = 18


def _decompress(kind: str, data: bytes) -> bytes:
    import bz2
    import gzip
    import lzma

    if kind == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    if kind == "lzma":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
    if kind == "gzip":
        return gzip.decompress(data)
    return bz2.BZ2Decompressor().decompress(data)


def _has_pvh_note(elf: bytes) -> bool:
    """True if a 64-bit little-endian ELF has the Xen PHYS32_ENTRY note QEMU boots by."""
    import struct

    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\x00")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_pvh_kernel(bzimage: Path, dest: Path) -> bool:
    """Write the uncompressed vmlinux inside ``bzimage`` to ``dest`` if QEMU can PVH-boot it."""
    import struct

    data = bzimage.read_bytes()
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return False
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start : start + payload_length]
    kind = next((k for magic, k in _PAYLOAD_MAGIC.items() if payload.startswith(magic)), None)
    if kind is None:  # zstd, lz4, lzo: no decompressor in the standard library
        return False
    try:
        elf = _decompress(kind, payload)
    except (OSError, EOFError, ValueError):
        return False
    if not _has_pvh_note(elf):
        return False
    dest.write_bytes(elf)
    return True

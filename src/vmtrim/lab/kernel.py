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
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vmtrim.errors import BadInput, EnvironmentProblem
from vmtrim.lab.proc import run_tool

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
    if (
        os.access(host_image, os.R_OK)
        and (host_modules / "modules.dep").is_file()
    ):
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


def debian_kernel_deb(store: Path) -> Path:
    """The cached kernel .deb, downloaded with ``apt-get download`` on first use."""
    store.mkdir(parents=True, exist_ok=True)
    candidate = _apt_candidate()
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

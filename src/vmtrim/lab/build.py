"""Build and cache the lab appliance: a kernel plus a small initramfs.

The initramfs holds busybox (static), the kernel modules for every bus verify
tests (see :mod:`vmtrim.lab.modules`), qemu-ga with the shared libraries ``ldd``
names, ``init.sh`` as ``/init`` and the shell it sources, ``guestlib.sh``, as
``/lib/vmtrim/guestlib.sh`` (every variant's /init sources it).

Cache layout under ``$XDG_CACHE_HOME/vmtrim`` (default ``~/.cache/vmtrim``)::

    kernels/linux-image-*.deb      Debian's kernel package, downloaded once
    lab/<key>/vmlinux (or vmlinuz) the appliance; <key> hashes every input:
    lab/<key>/initrd.img             kernel, modules, busybox, qemu-ga and its
    lab/<key>/manifest.json          libraries, init.sh, guestlib.sh and BUILD_FORMAT
    lab.lock                       flock: one build at a time, across processes

A build happens in a temporary directory and is renamed into place, so a reader
never sees half an appliance.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from vmtrim._util.proc import run_tool
from vmtrim.errors import EnvironmentProblem
from vmtrim.lab.kernel import (
    KernelInput,
    extract_pvh_kernel,
    file_stamp,
    locate_kernel,
    memo,
    remove_unpacked,
    sha256_file,
    unpack,
)
from vmtrim.lab.modules import (
    FS_GROUPS,
    OPTIONAL,
    REQUIRED,
    SPARSIFY_GROUPS,
    ModuleTree,
    grouped_load_order,
    install_module,
)

# Bump when the layout of the initramfs changes in a way the inputs do not show.
BUILD_FORMAT = 4
KEEP_BUILDS = 3
# The shell every variant's /init sources (". /lib/vmtrim/guestlib.sh"): file, place.
GUEST_LIB = "guestlib.sh"
GUEST_LIB_PATH = Path("/lib/vmtrim/guestlib.sh")


@dataclass(frozen=True)
class Variant:
    """An appliance with another /init, more host tools and more module groups.

    The plain lab appliance is variant "lab"; its key and contents do not depend on
    the others, so a variant never makes the tests' appliance rebuild.
    """

    name: str
    init: str  # file in vmtrim.lab that becomes /init
    tools: tuple[str, ...] = ()  # host binaries copied to /usr/sbin with their libraries
    groups: dict[str, tuple[str, ...]] | None = None  # None: FS_GROUPS


VARIANTS = {
    "lab": Variant("lab", "init.sh"),
    # vmtrim sparsify: real blkid (partitions, swap UUID/label), lvm, xfs_logprint
    # (is the log clean?), thin_check (a thin pool activates only after it), cryptsetup
    # (LUKS with --key), and every filesystem's module group.
    "sparsify": Variant(
        "sparsify",
        "sparsify.sh",
        ("blkid", "lvm", "xfs_logprint", "thin_check", "cryptsetup"),
        SPARSIFY_GROUPS,
    ),
}


@dataclass(frozen=True)
class Appliance:
    """A built lab guest, ready to boot with -kernel/-initrd."""

    kernel: Path  # the fastest to boot: an uncompressed PVH vmlinux where possible
    initrd: Path
    kernel_version: str
    key: str
    origin: str
    built: bool  # True if this call built it, False if it came from the cache
    bzimage: Path  # the compressed kernel, for machine types that cannot PVH-boot

    def to_json(self) -> dict[str, Any]:
        return {
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "kernel_version": self.kernel_version,
            "key": self.key,
            "origin": self.origin,
            "built": self.built,
            "bzimage": str(self.bzimage),
        }


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vmtrim"


def init_script(name: str = "init.sh") -> bytes:
    return resources.files("vmtrim.lab").joinpath(name).read_bytes()


def find_tool(name: str, candidates: tuple[str, ...] = ()) -> Path:
    found = shutil.which(name) or next((c for c in candidates if os.access(c, os.X_OK)), None)
    if not found:
        raise EnvironmentProblem(f"{name} is not installed", subject="lab")
    return Path(found).resolve()


def shared_libraries(binary: Path) -> list[tuple[Path, Path]]:
    """(path the loader asks for, file to copy) for every library ``ldd`` lists."""
    try:
        out = run_tool(["ldd", str(binary)], subject=str(binary), timeout=60)
    except EnvironmentProblem as exc:
        if "not a dynamic executable" in exc.message:
            return []
        raise
    libs: list[tuple[Path, Path]] = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts:
            target = parts[parts.index("=>") + 1]
            if target.startswith("/"):
                libs.append((Path(target), Path(target).resolve()))
        elif parts and parts[0].startswith("/"):  # the loader itself
            libs.append((Path(parts[0]), Path(parts[0]).resolve()))
    return libs


def _libraries(binary: Path, store: Path) -> list[tuple[Path, Path]]:
    """shared_libraries, remembered while the binary is unchanged and every link still
    resolves to the file remembered."""
    stamp = file_stamp(binary)
    if stamp is None:
        return shared_libraries(binary)
    pairs = memo(
        store,
        f"ldd:{stamp}",
        lambda: [[str(a), str(b)] for a, b in shared_libraries(binary)],
    )
    libs = [(Path(a), Path(b)) for a, b in pairs]
    if all(wanted.resolve() == real and real.is_file() for wanted, real in libs):
        return libs
    return shared_libraries(binary)  # a library was upgraded under the same name


@dataclass(frozen=True)
class _Inputs:
    kernel: KernelInput
    busybox: Path
    qemu_ga: Path
    ga_libs: list[tuple[Path, Path]]
    busybox_libs: list[tuple[Path, Path]]
    init: bytes
    guestlib: bytes
    variant: Variant = VARIANTS["lab"]
    tools: tuple[Path, ...] = ()
    tool_libs: tuple[tuple[Path, Path], ...] = ()


def _gather(
    cache: Path, kernel: Path | None, modules: Path | None, variant: Variant = VARIANTS["lab"]
) -> _Inputs:
    busybox = find_tool("busybox", ("/bin/busybox", "/usr/bin/busybox"))
    qemu_ga = find_tool("qemu-ga", ("/usr/sbin/qemu-ga", "/usr/bin/qemu-ga"))
    tools = tuple(find_tool(t, (f"/usr/sbin/{t}", f"/sbin/{t}")) for t in variant.tools)
    return _Inputs(
        kernel=locate_kernel(cache, kernel, modules),
        busybox=busybox,
        qemu_ga=qemu_ga,
        ga_libs=_libraries(qemu_ga, cache / "kernels"),
        busybox_libs=_libraries(busybox, cache / "kernels"),
        init=init_script(variant.init),
        guestlib=init_script(GUEST_LIB),
        variant=variant,
        tools=tools,
        tool_libs=tuple(lib for t in tools for lib in _libraries(t, cache / "kernels")),
    )


def _key(inputs: _Inputs) -> str:
    """Hash of everything that ends up in the appliance."""
    h = hashlib.sha256(f"vmtrim-lab/{BUILD_FORMAT}\n".encode())
    h.update(repr((REQUIRED, OPTIONAL, FS_GROUPS)).encode())
    kin = inputs.kernel
    if kin.deb is not None:
        h.update(b"deb\n")
        sha256_file(kin.deb, h)  # a .deb is immutable: its bytes stand for the whole tree
    else:
        assert kin.image is not None and kin.modules is not None
        h.update(b"tree\n")
        sha256_file(kin.image, h)
        tree = ModuleTree.load(kin.modules)
        for _, rel in grouped_load_order(tree, inputs.variant.groups):
            h.update(rel.encode())
            sha256_file(kin.modules / rel, h)
    for path in (inputs.busybox, inputs.qemu_ga):
        sha256_file(path, h)
    for _, real in sorted(set(inputs.ga_libs + inputs.busybox_libs)):
        sha256_file(real, h)
    h.update(inputs.init)
    h.update(f"guestlib {len(inputs.guestlib)}\n".encode() + inputs.guestlib)
    if inputs.variant.name != "lab":  # the lab appliance's key stays what it always was
        h.update(repr((inputs.variant, inputs.variant.groups)).encode())
        for path in inputs.tools:
            sha256_file(path, h)
        for _, real in sorted(set(inputs.tool_libs)):
            sha256_file(real, h)
    return h.hexdigest()[:20]


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lab.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    files = (str(data.get("kernel_file")), "vmlinuz", "initrd.img")
    if not all((directory / name).is_file() for name in files):
        return None
    return data


def ensure_appliance(
    kernel: Path | None = None,
    modules: Path | None = None,
    *,
    rebuild: bool = False,
    cache: Path | None = None,
    variant: str = "lab",
) -> Appliance:
    """Return the cached appliance for the current inputs, building it if needed."""
    cache = cache or cache_root()
    with _locked(cache):
        inputs = _gather(cache, kernel, modules, VARIANTS[variant])
        key = _key(inputs)
        target = cache / "lab" / key
        manifest = None if rebuild else _read_manifest(target)
        built = manifest is None
        if manifest is None:
            manifest = _build(inputs, key, target)
            _prune(cache / "lab", keep=target, variant=inputs.variant.name)
        return Appliance(
            kernel=target / str(manifest["kernel_file"]),
            initrd=target / "initrd.img",
            kernel_version=str(manifest["kernel_version"]),
            key=key,
            origin=str(manifest["origin"]),
            built=built,
            bzimage=target / "vmlinuz",
        )


def _build(inputs: _Inputs, key: str, target: Path) -> dict[str, Any]:
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".build-{key}-"))
    try:
        unpacked = unpack(inputs.kernel, work)
        out = work / "out"
        out.mkdir()
        # Machine types before 4.0 cannot PVH-boot with an initrd: they get the bzImage.
        shutil.copyfile(unpacked.image, out / "vmlinuz")
        boot = "pvh" if extract_pvh_kernel(unpacked.image, out / "vmlinux") else "bzimage"
        tree = ModuleTree.load(unpacked.modules)
        order = grouped_load_order(tree, inputs.variant.groups)
        root = work / "root"
        loaded = _assemble_root(root, inputs, tree, order)
        remove_unpacked(work)
        _write_cpio(root, out / "initrd.img")
        manifest = {
            "key": key,
            "origin": inputs.kernel.origin,
            "kernel_version": unpacked.version,
            "kernel_file": "vmlinux" if boot == "pvh" else "vmlinuz",
            "boot": boot,
            "modules": loaded,
            "busybox": str(inputs.busybox),
            "qemu_ga": str(inputs.qemu_ga),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **({"variant": inputs.variant.name} if inputs.variant.name != "lab" else {}),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _copy_into(root: Path, inside: Path, source: Path, mode: int = 0o755) -> None:
    dest = root / inside.relative_to("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    dest.chmod(mode)


def _assemble_root(
    root: Path, inputs: _Inputs, tree: ModuleTree, order: list[tuple[str, str]]
) -> list[str]:
    for d in ("bin", "dev", "proc", "sys", "mnt", "tmp", "run", "var/lib", "etc/vmtrim", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var" / "run").symlink_to("../run")
    (root / "sbin").symlink_to("bin")
    _copy_into(root, Path("/bin/busybox"), inputs.busybox)
    applets = run_tool([str(inputs.busybox), "--list"], subject=str(inputs.busybox)).split()
    for applet in applets:
        # An applet called "busybox" would make bin/busybox a link to itself: ELOOP, panic.
        if applet != "busybox" and "/" not in applet:
            (root / "bin" / applet).symlink_to("busybox")
    _copy_into(root, Path("/usr/sbin/qemu-ga"), inputs.qemu_ga)
    for wanted, real in inputs.ga_libs + inputs.busybox_libs + list(inputs.tool_libs):
        _copy_into(root, wanted, real)
    for tool in inputs.tools:
        _copy_into(root, Path("/usr/sbin") / tool.name, tool)
    (root / "init").write_bytes(inputs.init)
    (root / "init").chmod(0o755)
    lib = root / GUEST_LIB_PATH.relative_to("/")
    lib.parent.mkdir(parents=True, exist_ok=True)
    lib.write_bytes(inputs.guestlib)
    lib.chmod(0o644)
    # One "group path" line per module; init.sh loads "base" and its filesystem's group.
    installed = [
        (group, install_module(tree, rel, root / "lib" / "modules")) for group, rel in order
    ]
    (root / "etc" / "vmtrim" / "modules").write_text(
        "".join(f"{group} {m}\n" for group, m in installed)
    )
    return [f"{group}:{m.rsplit('/', 1)[-1]}" for group, m in installed]


def _write_cpio(root: Path, dest: Path) -> None:
    """An uncompressed newc archive: the guest skips decompression, which is slow under TCG."""
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    listing = "\n".join(names).encode() + b"\n"
    with open(dest, "wb") as out:
        try:
            result = subprocess.run(
                ["cpio", "--quiet", "-o", "-H", "newc", "--reproducible"],
                cwd=root,
                input=listing,
                stdout=out,
                stderr=subprocess.PIPE,
                check=False,
                timeout=300,
            )
        except FileNotFoundError as exc:
            raise EnvironmentProblem("cpio is not installed", subject="lab") from exc
    if result.returncode != 0:
        raise EnvironmentProblem(
            f"cpio failed: {result.stderr.decode(errors='replace').strip()}", subject=str(dest)
        )


def _prune(lab: Path, keep: Path, variant: str = "lab") -> None:
    """Keep the newest few appliances of a variant; older keys belong to inputs that changed.

    Per variant, so that building one never removes the other while it may be booting.
    """
    builds = sorted(
        (
            p
            for p in lab.iterdir()
            if p.is_dir()
            and not p.name.startswith(".")
            and (_read_manifest(p) or {}).get("variant", "lab") == variant
        ),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in builds[KEEP_BUILDS:]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)

"""Pick kernel modules and their dependencies, in load order, from a depmod'ed tree.

The guest init loads them with busybox ``insmod`` in the order given here, so the
initramfs needs neither modprobe nor module tools that understand compression.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
from dataclasses import dataclass
from pathlib import Path

from vmtrim.errors import EnvironmentProblem

# The drivers for every bus verify tests, the virtio-serial ports, and ext4.
REQUIRED = (
    "virtio_pci",
    "virtio_scsi",
    "sd_mod",
    "virtio_blk",
    "ata_piix",
    "ahci",
    "virtio_console",
    "ext4",
)
# Loaded when the kernel has them: the checksum driver ext4/jbd2 ask for through a
# crypto alias at mount time (there is no modprobe in the guest to find it).
OPTIONAL = ("crc32c_generic",)
# Other filesystems, loaded only by a guest that mounts them: btrfs pulls in raid6_pq,
# whose start-up benchmark alone takes seconds under TCG.
FS_GROUPS = ("xfs", "btrfs")
# The sparsify appliance (vmtrim.lab.build VARIANTS) also mounts vfat and NTFS,
# activates LVM volumes and opens LUKS: group -> the modules (and their dependencies) it
# loads. "crypt": dm-crypt and the cipher modes LUKS uses (aes-xts-plain64 by default,
# aes-cbc-essiv in old LUKS1; aes_generic, cbc and sha256 are built in), and AF_ALG,
# through which cryptsetup decrypts the key slots with the kernel's ciphers (without
# it, libcryptsetup falls back to a temporary dm-crypt mapping per slot).
SPARSIFY_GROUPS: dict[str, tuple[str, ...]] = {
    "xfs": ("xfs",),
    "btrfs": ("btrfs",),
    "vfat": ("vfat", "nls_cp437", "nls_ascii", "nls_utf8"),
    "dm": ("dm_mod", "dm_thin_pool"),
    "ntfs3": ("ntfs3",),
    "crypt": ("dm_crypt", "xts", "ecb", "essiv", "algif_skcipher", "algif_hash"),
}


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.gz", ".ko.zst", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


@dataclass
class ModuleTree:
    root: Path
    deps: dict[str, list[str]]  # module path -> dependency paths
    by_name: dict[str, str]  # module name -> path
    builtin: set[str]
    aliases: dict[str, list[str]]  # alias -> module names
    softdeps: dict[str, list[str]]  # module name -> "pre:" names/aliases

    @classmethod
    def load(cls, root: Path) -> ModuleTree:
        deps: dict[str, list[str]] = {}
        for line in (root / "modules.dep").read_text().splitlines():
            if ":" not in line:
                continue
            path, _, rest = line.partition(":")
            deps[path.strip()] = rest.split()
        by_name = {module_name(p): p for p in deps}
        builtin: set[str] = set()
        builtin_file = root / "modules.builtin"
        if builtin_file.is_file():
            builtin = {module_name(p) for p in builtin_file.read_text().split()}
        aliases: dict[str, list[str]] = {}
        softdeps: dict[str, list[str]] = {}
        alias_file = root / "modules.alias"
        if alias_file.is_file():
            for line in alias_file.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == "alias":
                    aliases.setdefault(parts[1], []).append(module_name(parts[2]))
        softdep_file = root / "modules.softdep"
        if softdep_file.is_file():
            for line in softdep_file.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "softdep":
                    pre = parts[3:] if parts[2] == "pre:" else []
                    pre = pre[: pre.index("post:")] if "post:" in pre else pre
                    softdeps.setdefault(module_name(parts[1]), []).extend(pre)
        return cls(root, deps, by_name, builtin, aliases, softdeps)

    def _resolve(self, name: str) -> str | None:
        """Module path for a name or alias; None if built in or absent."""
        norm = name.replace("-", "_")
        if norm in self.by_name:
            return self.by_name[norm]
        for target in self.aliases.get(name, []):
            if target in self.by_name:
                return self.by_name[target]
        return None

    def has(self, name: str) -> bool:
        return name in self.builtin or self._resolve(name) is not None

    def load_order(self, required: tuple[str, ...], optional: tuple[str, ...]) -> list[str]:
        """Module paths in an order insmod accepts: every module after its dependencies."""
        missing = [n for n in required if not self.has(n)]
        if missing:
            raise EnvironmentProblem(
                f"the guest kernel has no {', '.join(missing)} (neither module nor built in)",
                subject=str(self.root),
            )
        order: list[str] = []
        seen: set[str] = set()

        def visit(path: str) -> None:
            if path in seen:
                return
            seen.add(path)
            for soft in self.softdeps.get(module_name(path), []):
                soft_path = self._resolve(soft)
                if soft_path is not None:
                    visit(soft_path)
            # modules.dep lists the full closure; visiting each keeps the order right.
            for dep in self.deps.get(path, []):
                visit(dep)
            order.append(path)

        for name in (*required, *optional):
            path = self._resolve(name)
            if path is not None:
                visit(path)
        return order


def grouped_load_order(
    tree: ModuleTree, groups: dict[str, tuple[str, ...]] | None = None
) -> list[tuple[str, str]]:
    """(group, module path) in load order: group "base" first, then one group per filesystem."""
    base = tree.load_order(REQUIRED, OPTIONAL)
    out = [("base", path) for path in base]
    for fs, names in (groups or {fs: (fs,) for fs in FS_GROUPS}).items():
        seen = set(base)
        out += [(fs, path) for path in tree.load_order((), names) if path not in seen]
    return out


def install_module(tree: ModuleTree, path: str, dest_root: Path) -> str:
    """Copy one module into ``dest_root`` as a plain .ko; return its path there."""
    src = tree.root / path
    rel = path
    dest = dest_root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if path.endswith(".ko.xz"):
        rel = path[: -len(".xz")]
        dest = dest_root / rel
        dest.write_bytes(lzma.decompress(src.read_bytes()))
    elif path.endswith(".ko.gz"):
        rel = path[: -len(".gz")]
        dest = dest_root / rel
        dest.write_bytes(gzip.decompress(src.read_bytes()))
    elif path.endswith(".ko.zst"):
        raise EnvironmentProblem("zstd-compressed modules are not supported", subject=str(src))
    else:
        shutil.copyfile(src, dest)
    return rel

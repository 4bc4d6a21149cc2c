"""Facts about the filesystem under an image file, read through a :class:`Runner`.

What each filesystem means for giving space back (the punch-hole probe in
:mod:`vmtrim.audit.hostprobe` still measures it where it can run):

- **NFS** punches holes only from NFS 4.2 on (the DEALLOCATE operation, RFC 7862
  section 15.4; oVirt's sparsify requires NFS >= 4.2, FIELD.md [O3]); the version is
  the ``vers=`` mount option.
- **overlayfs** hands fallocate to the upper layer's file (``upperdir=``), which is the
  filesystem that must punch.
- **tmpfs** punches holes, into memory (shmem_fallocate).
- **btrfs**: ``nodatacow`` (mount option) or the file's ``C`` attribute (``chattr +C``,
  lsattr) turn copy-on-write, checksums and compression off for the file; ``compress=``/
  ``compress-force=`` (mount) or the ``c`` attribute compress it. Space that a btrfs
  snapshot still references is not freed by a punched hole (btrfs(5), "NODATACOW",
  "COMPRESSION"; chattr(1) "C", "c").
- **xfs**, **ext4**: punch holes (fallocate(2), "FALLOC_FL_PUNCH_HOLE": supported by
  XFS since Linux 2.6.38, ext4 3.0, Btrfs 3.7, tmpfs 3.5).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from vmtrim.storage.mounts import Mount, mount_of, parse_mountinfo
from vmtrim.storage.runner import Runner

NFS_TYPES = ("nfs", "nfs4")
_VERS = re.compile(r"^(\d{1,3})(?:\.(\d{1,3}))?$")
# chattr(1): the attribute letters lsattr prints; only these two matter here.
_LSATTR = re.compile(r"^([A-Za-z-]{1,64})\s+(.+)$")


def nfs_version(mount: Mount) -> tuple[int, int] | None:
    """``vers=4.2`` (or ``nfsvers=``) as (4, 2); None when absent or unreadable."""
    for key in ("vers", "nfsvers"):
        value = mount.option(key)
        match = _VERS.match(value or "")
        if match:
            return int(match.group(1)), int(match.group(2) or 0)
    return None


def parse_lsattr(text: str) -> str | None:
    """The attribute letters of the first line of ``lsattr -d FILE`` (e.g. ``---C--``)."""
    for line in text.splitlines()[:4]:
        match = _LSATTR.match(line.strip())
        if match:
            return match.group(1)
    return None


@dataclass(frozen=True)
class FileFacts:
    """The mount under an image and what its type and options say about reclaim."""

    mount: Mount | None
    facts: tuple[str, ...] = ()  # short phrases for the reason: "NFS 4.2", "btrfs nodatacow"
    blocks: str | None = None  # the filesystem cannot punch holes: why (no probe needed)

    @property
    def fstype(self) -> str | None:
        return self.mount.fstype if self.mount else None


def _btrfs(mount: Mount, runner: Runner, path: str) -> list[str]:
    facts = []
    if mount.has("nodatacow"):
        facts.append("mounted nodatacow")
    compress = mount.option("compress-force") or mount.option("compress")
    if compress:
        facts.append(f"compress={compress}")
    attrs = parse_lsattr(runner.run(["lsattr", "-d", path], timeout=15.0).stdout)
    if attrs is not None:
        if "C" in attrs:
            facts.append("the file is No_COW (chattr +C)")
        if "c" in attrs:
            facts.append("the file is compressed (chattr +c)")
    return facts


def file_facts(runner: Runner, path: str, st_dev: int | None = None) -> FileFacts:
    """The facts for the file (or directory) at ``path``, as seen where ``runner`` runs."""
    text = runner.read("/proc/self/mountinfo")
    if text is None:
        return FileFacts(None)
    mount = mount_of(parse_mountinfo(text), os.path.realpath(path), st_dev)
    if mount is None:
        return FileFacts(None)
    facts: list[str] = []
    blocks = None
    if mount.fstype in NFS_TYPES:
        version = nfs_version(mount)
        if version is None:
            facts.append("NFS (version not in the mount options)")
        else:
            facts.append(f"NFS {version[0]}.{version[1]}")
            if version < (4, 2):
                blocks = (
                    f"NFS {version[0]}.{version[1]} cannot punch holes:"
                    " that needs NFS 4.2 (DEALLOCATE, RFC 7862)"
                )
    elif mount.fstype == "overlay":
        upper = mount.option("upperdir")
        facts.append(
            f"overlayfs: holes are punched in the upper layer{f' {upper}' if upper else ''}"
        )
    elif mount.fstype == "tmpfs":
        facts.append("tmpfs: holes free memory, not disk")
    elif mount.fstype == "btrfs":
        facts += _btrfs(mount, runner, path)
    return FileFacts(mount, tuple(facts), blocks)

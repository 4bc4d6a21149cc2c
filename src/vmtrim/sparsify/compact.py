"""``vmtrim compact``: rewrite an image with ``qemu-img convert`` so that ``ls -l`` shrinks.

1. refuse an image in use, one with internal snapshots (convert drops them) unless
   asked, and a directory without room for the allocated bytes plus a margin;
2. ``qemu-img convert`` into ``.NAME.vmtrim-compact-XXXX`` in the same directory,
   with the image's format, cluster size, compat level, refcount width, lazy
   refcounts, extended L2, compression type and backing file (``-B``, spelled as it
   was, so a relative link stays relative);
3. ``qemu-img compare`` the two; only then fsync, copy owner, mode and every extended
   attribute (SELinux label included), and ``rename`` over the original.

While it works it holds a lock that keeps any QEMU from opening the image for writing
(:func:`vmtrim.sparsify.inuse.hold_write_guard`), and an ``flock`` on its temporary
file; a later run removes every temporary file whose flock is free (a run that was
killed). A kill at any point leaves either the untouched original or the complete new
file under the image's name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmtrim._util.files import _copy_xattrs, _fsync_dir
from vmtrim._util.proc import run_tool
from vmtrim.errors import BadInput, EnvironmentProblem, ImageError
from vmtrim.image.allocation import allocated_bytes
from vmtrim.sparsify.inuse import hold_write_guard, refuse_if_in_use
from vmtrim.sparsify.testhook import pause

SCHEMA = "vmtrim.compact/1"
TEMP_MARK = ".vmtrim-compact-"
MARGIN_MIN = 64 * 1024 * 1024
MARGIN_RATIO = 0.05
# qemu-img info's format-specific qcow2 keys -> the -o option that sets each.
QCOW2_OPTIONS = {
    "compat": "compat",
    "refcount-bits": "refcount_bits",
    "lazy-refcounts": "lazy_refcounts",
    "extended-l2": "extended_l2",
    "compression-type": "compression_type",
}


@dataclass
class CompactResult:
    path: str
    format: str
    size_before: int  # ls -l
    size_after: int | None
    allocated_before: int  # du
    allocated_after: int | None
    backing: str | None
    options: list[str]
    command: list[str]
    dry_run: bool
    backup: str | None = None
    removed_leftovers: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def image_info(path: Path) -> dict[str, Any]:
    out = run_tool(["qemu-img", "info", "--output=json", str(path)], subject=str(path))
    try:
        data = json.loads(out)
    except ValueError as exc:
        raise ImageError("qemu-img info printed no JSON", subject=str(path)) from exc
    if not isinstance(data, dict):
        raise ImageError("qemu-img info printed no JSON object", subject=str(path))
    return data


def convert_options(info: dict[str, Any], subject: str) -> tuple[str, list[str]]:
    """(format, -o options) that rebuild the image as it was made."""
    fmt = str(info.get("format"))
    if fmt not in ("qcow2", "raw"):
        raise BadInput(f"compact handles qcow2 and raw images, not {fmt}", subject=subject)
    if fmt == "raw":
        return fmt, []
    data = info.get("format-specific", {}).get("data", {})
    if data.get("corrupt"):
        raise ImageError(
            "the image is marked corrupt: run qemu-img check -r first", subject=subject
        )
    if data.get("data-file"):
        raise BadInput("an image with an external data file is not compacted", subject=subject)
    if data.get("encrypt"):
        raise BadInput("an encrypted image is not compacted", subject=subject)
    options = [f"cluster_size={int(info['cluster-size'])}"]
    for key, option in QCOW2_OPTIONS.items():
        if key in data:
            value = data[key]
            options.append(
                f"{option}={'on' if value is True else 'off' if value is False else value}"
            )
    return fmt, options


def _leftovers(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}{TEMP_MARK}*"))


def remove_leftovers(path: Path) -> list[str]:
    """Remove the temporary files of earlier runs that were killed (their flock is free)."""
    removed = []
    for tmp in _leftovers(path):
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a compact that is running now
            tmp.unlink(missing_ok=True)
            removed.append(str(tmp))
        finally:
            os.close(fd)
    return removed


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _keep_metadata(source: Path, target_fd: int, subject: str) -> None:
    """Owner, mode and every extended attribute (SELinux label, ACLs) of the original."""
    st = os.stat(source)
    os.fchown(target_fd, st.st_uid, st.st_gid)
    os.fchmod(target_fd, st.st_mode & 0o7777)
    src_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _copy_xattrs(src_fd, target_fd, subject)
    finally:
        os.close(src_fd)


def compact(
    path: Path,
    *,
    dry_run: bool = False,
    keep_backup: bool = False,
    drop_snapshots: bool = False,
    compress: bool = False,
    uri: str | None = None,
) -> CompactResult:
    start = time.monotonic()
    subject = str(path)
    if not path.is_file():
        raise BadInput("no such image file", subject=subject)
    path = path.absolute()
    removed = [] if dry_run else remove_leftovers(path)
    refuse_if_in_use(path, uri=uri)
    info = image_info(path)
    fmt, options = convert_options(info, subject)
    if info.get("snapshots") and not drop_snapshots:
        names = ", ".join(str(s.get("name")) for s in info["snapshots"][:5])
        raise BadInput(
            f"the image has internal snapshots ({names}), which qemu-img convert drops;"
            " give --drop-snapshots to drop them",
            subject=subject,
        )
    backing = info.get("backing-filename")
    if compress and fmt != "qcow2":
        raise BadInput("--compress needs a qcow2 image", subject=subject)
    before_size = path.stat().st_size
    before_alloc = allocated_bytes(path)
    need = before_alloc + max(MARGIN_MIN, int(before_alloc * MARGIN_RATIO))
    free = _free_bytes(path.parent)
    result = CompactResult(
        path=subject,
        format=fmt,
        size_before=before_size,
        size_after=None,
        allocated_before=before_alloc,
        allocated_after=None,
        backing=str(backing) if backing else None,
        options=options,
        command=[],
        dry_run=dry_run,
        removed_leftovers=removed,
    )
    if free < need:
        raise EnvironmentProblem(
            f"{path.parent} has {free} bytes free, compact needs {need} (the allocated"
            f" {before_alloc} plus a margin): {need - free} bytes missing",
            subject=subject,
        )
    argv = ["qemu-img", "convert", "-f", fmt, "-O", fmt]
    if options:
        argv += ["-o", ",".join(options)]
    if backing:
        argv += ["-B", str(backing)]
        if info.get("backing-filename-format"):
            argv += ["-F", str(info["backing-filename-format"])]
    if compress:
        argv.append("-c")
    if dry_run:
        result.command = [*argv, subject, f"{path.parent}/.{path.name}{TEMP_MARK}XXXX"]
        result.seconds = round(time.monotonic() - start, 2)
        return result
    with hold_write_guard(path):
        fd, name = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
        tmp = Path(name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # "a compact owns it": see remove_leftovers
            result.command = [*argv, subject, str(tmp)]
            pause("convert")
            # qemu-img creates the image on this same inode (O_CREAT, then truncate),
            # so our flock stays on it.
            _run_convert([*argv, subject, str(tmp)], subject)
            pause("compare")
            _compare(path, tmp, fmt, subject)
            os.fsync(fd)
            _keep_metadata(path, fd, subject)
            pause("rename")
            if keep_backup:
                backup = path.with_name(
                    f"{path.name}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.bak"
                )
                os.link(path, backup)  # the original inode stays under this name
                result.backup = str(backup)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        finally:
            os.close(fd)
    result.size_after = path.stat().st_size
    result.allocated_after = allocated_bytes(path)
    result.seconds = round(time.monotonic() - start, 2)
    return result


def _run_convert(argv: list[str], subject: str) -> None:
    # No time limit: a big image takes as long as its data takes to copy.
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise EnvironmentProblem(
            f"qemu-img convert failed: {tail}; the image is unchanged", subject=subject
        )


def _compare(path: Path, tmp: Path, fmt: str, subject: str) -> None:
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", fmt, "-F", fmt, str(path), str(tmp)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        why = (proc.stdout + proc.stderr).strip().splitlines()
        raise EnvironmentProblem(
            f"qemu-img compare found the copy different ({why[0] if why else proc.returncode});"
            " the image is unchanged",
            subject=subject,
        )

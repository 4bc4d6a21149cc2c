"""`vmtrim lab build`: the appliance is built once, cached, and rebuilt when an input changes.

These use the real kernel package (the one the default build downloads), dpkg -x,
depmod, busybox, qemu-ga and cpio; the KVM probe boots the real lab guest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmtrim.lab import Appliance, cache_root


@pytest.fixture(scope="module")
def kernel_tree(
    appliance: Appliance, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Path]]:
    """A kernel image and depmod'ed modules directory, unpacked from the cached .deb."""
    debs = sorted((cache_root() / "kernels").glob("linux-image-*.deb"))
    assert debs, "the default build keeps Debian's kernel package in the cache"
    root = tmp_path_factory.mktemp("kernel")
    subprocess.run(["dpkg", "-x", str(debs[-1]), str(root)], check=True, timeout=300)
    (image,) = (root / "boot").glob("vmlinuz-*")
    version = image.name.removeprefix("vmlinuz-")
    subprocess.run(["depmod", "-b", str(root), version], check=True, timeout=300)
    yield image, root / "lib" / "modules" / version
    shutil.rmtree(root)  # 400 MB unpacked: do not leave it to pytest's retention


def lab_build(cache: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    done = subprocess.run(
        [sys.executable, "-m", "vmtrim", "lab", "build", "--json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    doc = json.loads(done.stdout) if done.returncode == 0 else {}
    return done.returncode, doc, done.stderr


def test_build_is_cached_and_rebuilt_when_the_kernel_changes(
    kernel_tree: tuple[Path, Path], tmp_path: Path
) -> None:
    image, modules = kernel_tree
    kernel = tmp_path / "vmlinuz"
    shutil.copyfile(image, kernel)
    cache = tmp_path / "cache"
    override = ("--kernel", str(kernel), "--modules", str(modules))

    code, first, err = lab_build(cache, *override)
    assert code == 0, err
    assert first["schema"] == "vmtrim.lab/1"
    assert (first["built"], first["origin"]) == (True, "override")
    assert first["kernel_version"] == modules.name
    assert Path(first["kernel"]).parent == cache / "vmtrim" / "lab" / first["key"]

    code, second, err = lab_build(cache, *override)
    assert code == 0, err
    assert (second["built"], second["key"]) == (False, first["key"])

    with open(kernel, "ab") as f:  # a different kernel: same size class, other bytes
        f.write(b"\0" * 512)
    code, third, err = lab_build(cache, *override)
    assert code == 0, err
    assert third["built"] is True and third["key"] != first["key"]


def test_initramfs_holds_busybox_modules_and_agent(appliance: Appliance) -> None:
    with open(appliance.initrd, "rb") as archive:
        listing = subprocess.run(
            ["cpio", "-t", "--quiet"],
            stdin=archive,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    names = set(listing.split())
    assert {"init", "bin/busybox", "bin/sh", "usr/sbin/qemu-ga", "etc/vmtrim/modules"} <= names
    for module in (
        "virtio_pci",
        "virtio_scsi",
        "sd_mod",
        "virtio_blk",
        "ata_piix",
        "ahci",
        "virtio_console",
        "ext4",
    ):
        assert any(n.endswith(f"/{module}.ko") for n in names), module
    # qemu-ga's loader and libraries are there too
    assert any(n.startswith("lib64/ld-linux") for n in names)
    assert any("libglib-2.0.so" in n for n in names)


def test_kernel_without_modules_is_bad_input(tmp_path: Path) -> None:
    code, _, err = lab_build(tmp_path / "cache", "--kernel", str(tmp_path / "missing"))
    assert code == 2
    assert err.strip() == "vmtrim: lab: --kernel and --modules go together"


def test_modules_dir_without_modules_dep_is_bad_input(
    kernel_tree: tuple[Path, Path], tmp_path: Path
) -> None:
    image, _ = kernel_tree
    code, _, err = lab_build(tmp_path / "cache", "--kernel", str(image), "--modules", str(tmp_path))
    assert code == 2
    assert err.strip().splitlines() == [
        f"vmtrim: {tmp_path}: not a modules directory: no modules.dep (run depmod -b ROOT VERSION)"
    ]


def test_accel_auto_probes_once_and_caches(
    appliance: Appliance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmtrim.vm.accel import choose_accel

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    chosen = choose_accel("auto", appliance)
    record = json.loads((tmp_path / "vmtrim" / "accel.json").read_text())
    assert chosen == ("kvm" if record["kvm"] else "tcg")
    assert record["reason"]
    stamp = (tmp_path / "vmtrim" / "accel.json").stat().st_mtime_ns
    assert choose_accel("auto", appliance) == chosen
    assert (tmp_path / "vmtrim" / "accel.json").stat().st_mtime_ns == stamp  # no second probe
    assert choose_accel("tcg", appliance) == "tcg"

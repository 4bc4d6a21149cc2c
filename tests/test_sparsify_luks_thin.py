"""vmtrim sparsify --key on LUKS2, and LVM thin and LVM-on-LUKS volumes, on one GPT disk.

The disk (tests/sparsify_support.make_crypt_thin_disk): cryptsetup formats partitions
1 and 3 as LUKS2 on this host; a setup guest (the Debian kernel has the device-mapper
this host lacks) fills an ext4 inside partition 1, makes partition 2 an LVM PV with a
thin pool (discards=passdown) and a thin volume holding an ext4, and partition 3's
LUKS a PV with a linear volume holding another (as Debian's encrypted install lays
it out). Each ext4 has kept files and 24 MiB written and deleted. What a user checks:
du before and after, the LUKS headers byte for byte, and every volume opened again in
that guest (cryptsetup and lvm, not vmtrim) with every file's sha256 as before; a
wrong key is one line and exit 2.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import du_bytes, vmtrim
from sparsify_support import (
    CRYPT_LV,
    JUNK_MIB,
    PASSPHRASE,
    THIN_LV,
    CryptThinDisk,
    MiB,
    guest_checksums,
    make_crypt_thin_disk,
    setup_guest,
    sha256,
)
from test_sparsify import check

pytestmark = pytest.mark.vm
# A cluster where a deleted file's extent meets kept data stays allocated: at most one
# 64 KiB cluster at each end of each free extent; 1 MiB per filesystem is plenty.
SLACK = MiB


# No history database: the stderr line asserted is the only one.
ENV = {**os.environ, "VMTRIM_HISTORY_DB": "/nonexistent/history.db"}


def sparsify(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return vmtrim("sparsify", "--json", *map(str, args), env=ENV)


def command_lines() -> dict[int, bytes]:
    """Every process's command line on this host, as ps reads it from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "cmdline").read_bytes()
            except OSError:  # it exited meanwhile
                continue
    return out


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> CryptThinDisk:
    return make_crypt_thin_disk(tmp_path_factory.mktemp("crypt-thin"))


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # As `echo PASSPHRASE >key` writes it: the whole file does not open the volume,
    # its first line does (what virt-sparsify reads).
    path = tmp_path_factory.mktemp("key") / "key"
    path.write_bytes(PASSPHRASE + b"\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def pristine_headers(disk: CryptThinDisk) -> list[bytes]:
    return disk.luks_headers()


@pytest.fixture(scope="module")
def dry_run(
    disk: CryptThinDisk, key_file: Path, pristine_headers: list[bytes]
) -> tuple[subprocess.CompletedProcess[str], str, str]:
    """--dry-run --key: (the run, the image's sha256 before, after)."""
    before = sha256(disk.path)
    # one --key per volume, in virt-sparsify's shape; the real run below gives one for all
    keys = ("--key", f"sda1:file:{key_file}", "--key", f"/dev/sda3:file:{key_file}")
    done = sparsify("--dry-run", *keys, disk.path)
    return done, before, sha256(disk.path)


@pytest.fixture(scope="module")
def sparsified(
    disk: CryptThinDisk, key_file: Path, dry_run: object
) -> tuple[int, dict[str, object], int]:
    """The real run; while it runs, every command line on the host is read: the key is
    on none of them, in clear or base64, and the appliance's QEMU is among them."""
    before = du_bytes(disk.path)
    secrets = (PASSPHRASE, base64.b64encode(PASSPHRASE), base64.b64encode(PASSPHRASE + b"\n"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmtrim", "sparsify", "--json", "--key", str(key_file),
         str(disk.path)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    appliance_seen = False
    while proc.poll() is None:
        for pid, line in command_lines().items():
            assert not any(secret in line for secret in secrets), (pid, line)
            appliance_seen |= b"qemu-system" in line and b"vmtrim.keys=1" in line
        time.sleep(0.05)  # a poll, not a measurement: leave the cores to the TCG guest
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert appliance_seen
    return before, json.loads(stdout), du_bytes(disk.path)


def test_wrong_key_is_one_line_exit_2_and_the_rest_is_done(
    disk: CryptThinDisk, pristine_headers: list[bytes], tmp_path: Path
) -> None:
    copy = dataclasses.replace(disk, path=tmp_path / "copy.qcow2")
    subprocess.run(["cp", "--sparse=always", str(disk.path), str(copy.path)], check=True)
    bad = tmp_path / "bad-key"
    bad.write_bytes(b"not the passphrase\n")
    done = sparsify("--key", f"sda1:file:{bad}", copy.path)
    assert done.returncode == 2
    assert done.stderr == (
        f"vmtrim: {copy.path}: sda1: the key from {bad} does not open this LUKS volume"
        " (left alone)\n"
    )
    doc = json.loads(done.stdout)  # the report of what was done comes all the same
    assert doc["wrong_keys"] == {"sda1": str(bad)}
    left = {x["device"]: x for x in doc["left_alone"]}
    assert left["sda1"]["type"] == "crypto_LUKS" and str(bad) in left["sda1"]["reason"]
    assert left["sda3"]["reason"] == "LUKS is left alone: no --key names it"
    # the LV inside sda3's LUKS stays out of sight without its key
    assert [(fs["device"], fs["action"]) for fs in doc["filesystems"]] == [(THIN_LV, "trimmed")]
    assert copy.luks_headers() == pristine_headers


def test_dry_run_with_key_opens_read_only_and_changes_nothing(
    dry_run: tuple[subprocess.CompletedProcess[str], str, str],
) -> None:
    done, before, after = dry_run
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    found = {(fs["device"], fs["type"], fs["action"]) for fs in doc["filesystems"]}
    assert found == {(dev, "ext4", "would trim") for dev in ("sda1:luks", THIN_LV, CRYPT_LV)}
    assert after == before


def test_luks_and_thin_volume_give_the_deleted_bytes_back(
    disk: CryptThinDisk, sparsified: tuple[int, dict[str, object], int]
) -> None:
    before, doc, after = sparsified
    filesystems = {fs["device"]: fs for fs in doc["filesystems"]}  # type: ignore[attr-defined]
    assert set(filesystems) == {"sda1:luks", THIN_LV, CRYPT_LV}
    for fs in filesystems.values():
        assert (fs["type"], fs["action"]) == ("ext4", "trimmed")
        # du measured around each filesystem: its deleted 24 MiB came back
        assert fs["freed"] >= JUNK_MIB * MiB - SLACK, fs
    assert before - after >= disk.deleted_bytes - len(filesystems) * SLACK, (before, after)
    left = {x["device"]: x["type"] for x in doc["left_alone"]}  # type: ignore[attr-defined]
    assert left.get("vgt/pool") == "thin-pool"
    # every volume was deactivated and every LUKS mapping closed again, in that order
    assert doc["warnings"] == []
    print(f"du {before} -> {after} B; deleted {disk.deleted_bytes} B")


def test_luks_header_untouched_volumes_open_files_intact(
    disk: CryptThinDisk, pristine_headers: list[bytes], sparsified: object
) -> None:
    assert disk.luks_headers() == pristine_headers  # all 16 MiB each: header and key slots
    assert "No errors were found" in check(disk.path)
    with setup_guest(disk.path) as runner:
        assert guest_checksums(runner) == disk.kept


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("sda1:key:hunter2", "a passphrase on the command line shows in every user's ps"),
        ("sda1:clevis", "clevis is not supported"),
        ("{tmp}/missing", "no such key file (given with --key)"),
        ("sda1:file:{tmp}", "the key file is not a regular file"),
        ("{tmp}/empty", "the key file is empty"),
        ("all:file:{tmp}/big", "the key file is larger than 65536 bytes"),
    ],
)
def test_bad_key_options_are_refused_before_anything_runs(
    spec: str, why: str, tmp_path: Path
) -> None:
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "big").write_bytes(b"k" * 65537)
    image = tmp_path / "never-opened.qcow2"
    image.write_bytes(b"")
    done = sparsify("--key", spec.format(tmp=tmp_path), image)
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert why in line and "hunter2" not in line
    assert image.read_bytes() == b""

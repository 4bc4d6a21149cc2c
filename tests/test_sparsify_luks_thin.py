"""vmtrim sparsify --key on LUKS2, and an LVM thin volume, on one GPT disk.

The disk (tests/sparsify_support.make_crypt_thin_disk): cryptsetup formats partition 1
as LUKS2 on this host; a setup guest (the Debian kernel has the device-mapper this
host lacks) fills an ext4 inside it, and makes partition 2 an LVM PV with a thin pool
(discards=passdown) and a thin volume holding another ext4. Each has kept files and
24 MiB written and deleted. What a user checks: du before and after, the LUKS header
byte for byte, and both volumes opened again in that guest (cryptsetup and lvm, not
vmtrim) with every file's sha256 as before; a wrong key is one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import du_bytes, vmtrim
from sparsify_support import (
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


def sparsify(*args: str | Path) -> subprocess.CompletedProcess[str]:
    # No history database: the stderr line asserted is the only one.
    env = {**os.environ, "VMTRIM_HISTORY_DB": "/nonexistent/history.db"}
    return vmtrim("sparsify", "--json", *map(str, args), env=env)


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
def pristine_header(disk: CryptThinDisk) -> bytes:
    return disk.luks_header()


@pytest.fixture(scope="module")
def dry_run(
    disk: CryptThinDisk, key_file: Path, pristine_header: bytes
) -> tuple[subprocess.CompletedProcess[str], str, str]:
    """--dry-run --key: (the run, the image's sha256 before, after)."""
    before = sha256(disk.path)
    done = sparsify("--dry-run", "--key", f"sda1:file:{key_file}", disk.path)
    return done, before, sha256(disk.path)


@pytest.fixture(scope="module")
def sparsified(
    disk: CryptThinDisk, key_file: Path, dry_run: object
) -> tuple[int, dict[str, object], int]:
    before = du_bytes(disk.path)
    done = sparsify("--key", key_file, disk.path)
    assert done.returncode == 0, done.stderr
    return before, json.loads(done.stdout), du_bytes(disk.path)


def test_wrong_key_is_one_line_exit_2_and_the_rest_is_done(
    disk: CryptThinDisk, pristine_header: bytes, tmp_path: Path
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
    assert [(fs["device"], fs["action"]) for fs in doc["filesystems"]] == [(THIN_LV, "trimmed")]
    assert copy.luks_header() == pristine_header


def test_dry_run_with_key_opens_read_only_and_changes_nothing(
    dry_run: tuple[subprocess.CompletedProcess[str], str, str],
) -> None:
    done, before, after = dry_run
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    found = {(fs["device"], fs["type"], fs["action"]) for fs in doc["filesystems"]}
    assert found == {("sda1:luks", "ext4", "would trim"), (THIN_LV, "ext4", "would trim")}
    assert after == before


def test_luks_and_thin_volume_give_the_deleted_bytes_back(
    disk: CryptThinDisk, sparsified: tuple[int, dict[str, object], int]
) -> None:
    before, doc, after = sparsified
    filesystems = {fs["device"]: fs for fs in doc["filesystems"]}  # type: ignore[attr-defined]
    assert set(filesystems) == {"sda1:luks", THIN_LV}
    for fs in filesystems.values():
        assert (fs["type"], fs["action"]) == ("ext4", "trimmed")
        # du measured around each filesystem: its deleted 24 MiB came back
        assert fs["freed"] >= JUNK_MIB * MiB - SLACK, fs
    assert before - after >= disk.deleted_bytes - 2 * SLACK, (before, after)
    left = {x["device"]: x["type"] for x in doc["left_alone"]}  # type: ignore[attr-defined]
    assert left.get("vgt/pool") == "thin-pool"
    print(f"du {before} -> {after} B; deleted {disk.deleted_bytes} B")


def test_luks_header_untouched_volumes_open_files_intact(
    disk: CryptThinDisk, pristine_header: bytes, sparsified: object
) -> None:
    assert disk.luks_header() == pristine_header  # all 16 MiB: header and key slots
    assert "No errors were found" in check(disk.path)
    with setup_guest(disk.path) as runner:
        assert guest_checksums(runner, disk, PASSPHRASE) == disk.kept


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

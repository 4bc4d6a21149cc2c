"""vmtrim sparsify on a raw MBR disk: what must be left alone is left alone, byte for byte.

sfdisk makes a DOS table with an ext4 whose journal needs recovery (debugfs sets the
flag a crash leaves), a clean xfs, a LUKS2 container (cryptsetup) and an ext2 in a
logical partition. The dirty ext4 and the LUKS container must be untouched (their
bytes hash the same), the others trimmed, measured by du on the raw file.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from helpers import du_bytes, vmtrim
from sparsify_support import MiB, loop, mounted, sh
from vmtrim.history.store import History

# name -> (start MiB, size MiB) as sfdisk lays them out below
PARTS = {"ext4": (1, 128), "xfs": (129, 300), "luks": (429, 40), "ext2": (471, 64)}


def region_sha(image: Path, name: str) -> str:
    import hashlib

    start, size = PARTS[name]
    with open(image, "rb") as f:
        f.seek(start * MiB)
        return hashlib.sha256(f.read(size * MiB)).hexdigest()


@pytest.fixture(scope="module")
def mbr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = tmp_path_factory.mktemp("mbr") / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(540 * MiB)
    table = (
        "label: dos\n"
        "start=1MiB, size=128MiB, type=83\n"
        "start=129MiB, size=300MiB, type=83\n"
        "start=429MiB, size=40MiB, type=83\n"
        "start=470MiB, type=5\n"
        "start=471MiB, size=64MiB, type=83\n"
    )
    subprocess.run(["sfdisk", "-q", str(image)], input=table, text=True, check=True)
    for name, (start, size) in PARTS.items():
        with loop(image, "--offset", str(start * MiB), "--sizelimit", str(size * MiB)) as dev:
            if name == "luks":
                subprocess.run(
                    [
                        "cryptsetup",
                        "luksFormat",
                        "-q",
                        "--type",
                        "luks2",
                        "--pbkdf",
                        "pbkdf2",
                        "--pbkdf-force-iterations",
                        "1000",
                        dev,
                        "-",
                    ],
                    input="secret",
                    text=True,
                    check=True,
                )
                continue
            sh(f"mkfs.{name}", "-q", *(["-f"] if name == "xfs" else ["-F"]), dev)
            with mounted(dev) as mnt:
                with open(mnt / "junk", "wb") as f:
                    f.write(os.urandom(20 * MiB))
                    os.fsync(f.fileno())
                (mnt / "junk").unlink()
            if name == "ext4":  # the flag a guest that crashed leaves behind
                sh("debugfs", "-w", "-R", "feature needs_recovery", dev)
    return image


def test_dirty_and_encrypted_left_alone_byte_for_byte(mbr: Path, tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    History.open(db).close()  # the run is recorded because the database exists
    before = {name: region_sha(mbr, name) for name in ("ext4", "luks")}
    du_before = du_bytes(mbr)
    done = vmtrim("sparsify", "--json", str(mbr), env={**os.environ, "VMTRIM_HISTORY_DB": str(db)})
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    trimmed = {fs["device"]: fs["type"] for fs in doc["filesystems"]}
    assert trimmed == {"sda2": "xfs", "sda5": "ext2"}
    left = {x["device"]: x for x in doc["left_alone"]}
    assert "journal needs recovery" in left["sda1"]["reason"]
    assert left["sda3"]["type"] == "crypto_LUKS"
    assert left["sda3"]["reason"] == "LUKS is left alone: no key given (vmtrim sparsify --key)"
    assert left["sda4"]["type"] == "extended"
    assert {name: region_sha(mbr, name) for name in ("ext4", "luks")} == before
    assert du_before - du_bytes(mbr) >= 2 * 18 * MiB  # most of xfs's and ext2's 20 MiB
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT runs.kind, r.domain, d.allocated_before, d.allocated_after FROM runs"
            " JOIN domain_results r ON r.run_id = runs.id JOIN disk_results d ON d.result_id = r.id"
        ).fetchall()
    assert rows == [("sparsify", str(mbr), du_before, du_bytes(mbr))]

"""Benchmark `vmtrim sparsify` and `vmtrim compact` against virt-sparsify, in one run.

The image (issue 15): a 1 GiB qcow2 with ext4 on the whole disk, 200 MiB of random
data written and deleted again (made on the host with mkfs.ext4 and a loop mount).
It is copied, and each copy goes through one tool:

  * ``vmtrim sparsify`` vs ``virt-sparsify --in-place``;
  * ``vmtrim compact`` (of the sparsified image) vs ``virt-sparsify`` copy mode (of
    the original), and ``sparsify + compact`` vs copy mode, which does both jobs.

virt-sparsify runs with ``LIBGUESTFS_BACKEND=direct``,
``LIBGUESTFS_BACKEND_SETTINGS=force_tcg`` and ``SUPERMIN_KERNEL``/``SUPERMIN_MODULES``
set to the lab's Debian kernel (the modules unpacked into a real directory). One
untimed virt-sparsify run first builds libguestfs's appliance cache, as a user's
second run would find it.

Targets: vmtrim's du after <= virt-sparsify's + 1 %, in at most half its time;
compact in at most half the time of copy mode.

    .venv/bin/python bench/bench_sparsify.py [--deleted-mib 200] [--gpt]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmtrim.lab import cache_root, ensure_appliance

MiB = 1024 * 1024


def sh(*argv: str | Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        sys.exit(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()[-600:]}")
    return done.stdout


def du(path: Path) -> int:
    return path.stat().st_blocks * 512


def make_image(directory: Path, deleted_mib: int) -> Path:
    raw = directory / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(1024 * MiB)
    sh("mkfs.ext4", "-q", "-F", raw)
    mnt = directory / "mnt"
    mnt.mkdir()
    sh("mount", "-o", "loop", raw, mnt)
    try:
        with open(mnt / "junk", "wb") as f:
            for _ in range(deleted_mib):
                f.write(os.urandom(MiB))
            f.flush()
            os.fsync(f.fileno())  # on disk before the delete, or it never reaches the image
        (mnt / "kept").write_bytes(os.urandom(4 * MiB))
        (mnt / "junk").unlink()
    finally:
        sh("umount", mnt)
        mnt.rmdir()
    image = directory / "src.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image)
    raw.unlink()
    return image


def supermin_env() -> dict[str, str]:
    """virt-sparsify's environment: TCG, and the lab kernel with a real modules directory."""
    appliance = ensure_appliance()
    debs = sorted((cache_root() / "kernels").glob("linux-image-*.deb"))
    if not debs:
        sys.exit("no cached kernel package: run vmtrim lab build first")
    root = cache_root() / "bench" / debs[-1].stem
    modules = root / "lib" / "modules" / appliance.kernel_version
    if not (modules / "modules.dep").is_file():
        root.mkdir(parents=True, exist_ok=True)
        sh("dpkg", "-x", debs[-1], root)
        sh("depmod", "-b", root, appliance.kernel_version)
    # supermin lstat()s the host's /lib/modules even when SUPERMIN_MODULES points elsewhere;
    # these machines have none (no host kernel package): an empty directory satisfies it.
    Path("/lib/modules").mkdir(exist_ok=True)
    return {
        **os.environ,
        "LIBGUESTFS_BACKEND": "direct",
        "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg",
        "SUPERMIN_KERNEL": str(appliance.bzimage),
        "SUPERMIN_MODULES": str(modules),
    }


def timed(*argv: str | Path, env: dict[str, str] | None = None) -> tuple[float, str]:
    start = time.monotonic()
    out = sh(*argv, env=env)
    return time.monotonic() - start, out


def vmtrim(*args: str | Path) -> tuple[float, str]:
    return timed(sys.executable, "-m", "vmtrim", *args)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deleted-mib", type=int, default=200)
    parser.add_argument("--gpt", action="store_true", help="the sparsify tests' GPT disk instead")
    parser.add_argument("--no-warmup", action="store_true")
    args = parser.parse_args()
    if shutil.which("virt-sparsify") is None:
        sys.exit("virt-sparsify is not installed (apt-get install libguestfs-tools)")
    env = supermin_env()
    with tempfile.TemporaryDirectory(prefix="vmtrim-bench-sparsify-") as tmp:
        work = Path(tmp)
        if args.gpt:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from sparsify_support import make_gpt_disk

            src = make_gpt_disk(work).path
        else:
            src = make_image(work, args.deleted_mib)
        copies = {name: work / f"{name}.qcow2" for name in ("vmtrim", "virt", "copy", "warm")}
        for path in copies.values():
            # Sparse copies: shutil.copyfile would fill every hole of the qcow2 file.
            sh("cp", "--sparse=always", src, path)
        ensure_appliance(variant="sparsify")  # built once, like libguestfs's cache below
        if not args.no_warmup:
            timed("virt-sparsify", "--quiet", "--in-place", copies["warm"], env=env)
        before = du(src)

        t_vm, _ = vmtrim("--quiet", "sparsify", copies["vmtrim"])
        du_vm = du(copies["vmtrim"])
        t_virt, _ = timed("virt-sparsify", "--quiet", "--in-place", copies["virt"], env=env)
        du_virt = du(copies["virt"])

        out = work / "copy-out.qcow2"
        t_copy, _ = timed("virt-sparsify", "--quiet", "--tmp", work, copies["copy"], out, env=env)
        copy_size, copy_du = out.stat().st_size, du(out)
        t_compact, compact_json = vmtrim("compact", "--json", copies["vmtrim"])
        compact = json.loads(compact_json)

    print(
        f"image: 1 GiB qcow2, {'GPT disk' if args.gpt else 'ext4'}, du before {before // 1024} KB"
    )
    print("in place                      seconds     du after (KB)")
    print(f"  vmtrim sparsify           {t_vm:9.1f}   {du_vm // 1024:12d}")
    print(f"  virt-sparsify --in-place  {t_virt:9.1f}   {du_virt // 1024:12d}")
    print(
        f"  ratio vmtrim/virt: time {ratio(t_vm, t_virt)} (target <= 0.5),"
        f" du {ratio(du_vm, du_virt)} (target <= 1.01)"
    )
    print("rewrite                       seconds     ls -l after (KB)")
    print(
        f"  vmtrim compact            {t_compact:9.1f}   {compact['size_after'] // 1024:12d}"
        f"  (du {compact['allocated_after'] // 1024})"
    )
    print(
        f"  virt-sparsify (copy)      {t_copy:9.1f}   {copy_size // 1024:12d}"
        f"  (du {copy_du // 1024})"
    )
    print(f"  ratio compact/copy mode: {ratio(t_compact, t_copy)} (target <= 0.5)")
    print(
        f"  sparsify + compact        {t_vm + t_compact:9.1f}   ratio to copy mode"
        f" {ratio(t_vm + t_compact, t_copy)}"
    )


if __name__ == "__main__":
    main()

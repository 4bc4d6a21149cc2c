"""Choose the accelerator: KVM only where a real boot shows that it works, else TCG.

On some hosts /dev/kvm exists and QEMU starts, but the guest then hangs (default
CPU) or QEMU aborts on an MSR error (``-cpu host``). So ``auto`` boots the lab
kernel once under KVM with a time limit (the guest's init powers off as soon as it
runs) and caches the answer in ``$XDG_CACHE_HOME/vmtrim/accel.json``, keyed by the
QEMU version, the host kernel and the appliance.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from vmtrim._util.files import atomic_write
from vmtrim._util.versions import format_version
from vmtrim.errors import BadInput, EnvironmentProblem
from vmtrim.lab import Appliance, cache_root
from vmtrim.vm.guest import DirectGuest, GuestSpec, make_workdir, qemu_version

ACCELS = ("auto", "kvm", "tcg")
PROBE_TIMEOUT = 10.0  # the lab guest reaches init in about 3.5 s even under TCG


def _cache_file() -> Path:
    return cache_root() / "accel.json"


def _probe_key(appliance: Appliance) -> str:
    return f"qemu {format_version(qemu_version())}|host {os.uname().release}|lab {appliance.key}"


def probe_kvm(appliance: Appliance, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot the lab guest under KVM; (works, why not)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    spec = GuestSpec(appliance, scenario={"mode": "probe"}, control=False, accel="kvm")
    workdir = make_workdir()
    try:
        with DirectGuest(spec, workdir, subject="kvm probe", connect_timeout=timeout) as guest:
            guest.wait_exit(timeout)
            log = guest.serial_log.read_text(errors="replace")
            status = guest.process.returncode if guest.process else None
            if status == 0 and "VMTRIM step=ready" in log:
                return True, "the lab guest booted under KVM"
            return False, f"QEMU exited with status {status} before the guest ran"
    except EnvironmentProblem as exc:
        return False, exc.message
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def choose_accel(requested: str, appliance: Appliance) -> str:
    """'kvm' or 'tcg' for ``--accel auto|kvm|tcg``."""
    if requested not in ACCELS:
        raise BadInput(f"--accel must be one of {', '.join(ACCELS)}", subject=requested)
    if requested != "auto":
        return requested
    key = _probe_key(appliance)
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
        if isinstance(cached, dict) and cached.get("key") == key:
            return "kvm" if cached.get("kvm") else "tcg"
    except (OSError, ValueError):
        pass
    works, reason = probe_kvm(appliance)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
        path,
        json.dumps(
            {
                "key": key,
                "kvm": works,
                "reason": reason,
                "probed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        ),
    )
    return "kvm" if works else "tcg"

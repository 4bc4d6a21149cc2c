"""The vmtrim.kvm Ansible collection, run by the real ansible-playbook (ansible-core from PyPI).

The inventory is this machine twice: ``local`` (connection local) and ``viassh`` (Ansible's
ssh connection to 127.0.0.1, through an sshd of our own on a loopback port with a key
made here). Both manage one libvirtd of their own (tests/fleet_hosts.py) with two lab
guests: ``good`` (discard on) and ``bad`` (no discard in its definition). Each guest
wrote and deleted WRITE_MIB MiB. ``ansible/examples/reclaim.yml`` runs with ``-f 1``
(one host at a time): first in check mode, then for real.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

from fleet_hosts import FleetHost, SshServer, refill, start_host, start_sshd
from helpers import du_bytes
from test_live_libvirt import Lab, LabDomain
from vmtrim.lab import Appliance

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]
MiB = 1024 * 1024
WRITE_MIB = 16
ROOT = Path(__file__).resolve().parents[1]
COLLECTION = ROOT / "ansible" / "vmtrim" / "kvm"
PLAYBOOK = ROOT / "ansible" / "examples" / "reclaim.yml"
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"
yaml: Any = importlib.import_module("yaml")  # PyYAML, an ansible-core dependency (no stubs)
MODULES = ("vmtrim_audit", "vmtrim_trim", "vmtrim_fix", "vmtrim_run")


@dataclass
class Setup:
    host: FleetHost
    good: LabDomain
    bad: LabDomain
    conn: Any
    work: Path
    env: dict[str, str]
    inventory: Path

    def ansible(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / tool), *args],
            env=self.env,
            cwd=self.work,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )

    def report(self, name: str) -> dict[str, Any]:
        return dict(json.loads((self.work / "reports" / f"{name}.json").read_text()))

    def inactive_xml(self, guest: LabDomain) -> str:
        return str(self.conn.lookupByName(guest.name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


def ansible_env(work: Path) -> dict[str, str]:
    collections = work / "collections" / "ansible_collections" / "vmtrim"
    collections.mkdir(parents=True)
    (collections / "kvm").symlink_to(COLLECTION)
    return {
        **os.environ,
        "ANSIBLE_COLLECTIONS_PATH": str(work / "collections"),
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(work / "tmp-local"),
        "ANSIBLE_REMOTE_TMP": str(work / "tmp-remote"),
        "ANSIBLE_STDOUT_CALLBACK": "default",
        "ANSIBLE_PYTHON_INTERPRETER": str(VENV_BIN / "python"),
    }


@pytest.fixture(scope="module")
def setup(appliance: Appliance, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("ansible")
    sshd: SshServer | None = None
    host: FleetHost | None = None
    lab: Lab | None = None
    conn = None
    try:
        sshd = start_sshd()
        host = start_host("ansible")
        conn = libvirt.open(host.local_uri)
        lab = Lab(conn, appliance)
        good = lab.start("good", write_mib=WRITE_MIB)
        bad = lab.start("bad", discard=False, write_mib=WRITE_MIB)
        for guest in (good, bad):
            guest.until_deleted()
        python = VENV_BIN / "python"
        common = {
            "ansible_python_interpreter": str(python),
            "vmtrim_connect": [host.local_uri],
            "vmtrim_report_dir": str(work / "reports"),
            "vmtrim_restart_allowed": False,
        }
        hosts: dict[str, dict[str, Any]] = {}
        for name in ("local", "viassh"):
            policy = work / f"{name}-policy.toml"
            policy.write_text(
                f'connect = ["{host.local_uri}"]\n'
                f'include = ["{good.name}", "{bad.name}"]\nminimum = 0\n'
            )
            hosts[name] = {
                **common,
                "vmtrim_policy": str(policy),
                "vmtrim_db": str(work / f"{name}-history.db"),
                "vmtrim_lock": str(work / f"{name}-run.lock"),
            }
        hosts["local"]["ansible_connection"] = "local"
        hosts["viassh"].update(
            ansible_connection="ssh",
            ansible_host="127.0.0.1",
            ansible_port=sshd.port,
            ansible_user="root",
            ansible_ssh_private_key_file=str(sshd.key),
            ansible_ssh_common_args="-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        )
        inventory = work / "inventory.yml"
        inventory.write_text(yaml.safe_dump({"all": {"hosts": hosts}}))
        yield Setup(host, good, bad, conn, work, ansible_env(work), inventory)
    finally:
        if lab is not None:
            lab.cleanup()
        if conn is not None:
            conn.close()
        if host is not None:
            host.stop()
        if sshd is not None:
            sshd.stop()


def test_ansible_doc_renders_every_module_and_galaxy_builds(setup: Setup) -> None:
    for module in MODULES:
        doc = setup.ansible("ansible-doc", f"vmtrim.kvm.{module}")
        assert doc.returncode == 0, doc.stderr
        assert f"vmtrim.kvm.{module}" in doc.stdout
        for section in ("OPTIONS", "EXAMPLES", "RETURN VALUES"):
            assert section in doc.stdout, (module, section)
        assert "fail_on" in doc.stdout and "document" in doc.stdout
    listed = setup.ansible("ansible-doc", "-l", "vmtrim.kvm")
    assert sorted(line.split()[0] for line in listed.stdout.splitlines()) == [
        f"vmtrim.kvm.{m}" for m in sorted(MODULES)
    ]
    built = setup.ansible(
        "ansible-galaxy", "collection", "build", str(COLLECTION), "--output-path", "dist"
    )
    assert built.returncode == 0, built.stderr
    assert (setup.work / "dist" / "vmtrim-kvm-0.1.0.tar.gz").is_file()
    # The YAML lint: every YAML file of the collection and the examples parses.
    for path in [*COLLECTION.rglob("*.yml"), *PLAYBOOK.parent.rglob("*.yml")]:
        assert yaml.safe_load(path.read_text()) is not None, path
    check = setup.ansible(
        "ansible-playbook", "--syntax-check", "-i", str(setup.inventory), str(PLAYBOOK)
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_check_mode_changes_nothing(setup: Setup) -> None:
    bad_xml, good_du = setup.inactive_xml(setup.bad), du_bytes(setup.good.image)
    result = setup.ansible(
        "ansible-playbook", "-i", str(setup.inventory), "-f", "1", "--check", str(PLAYBOOK)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("local", "viassh"):
        report = setup.report(name)
        disks = {d["domain"]: d for d in report["audit"]["disks"]}
        assert report["audit"]["schema"] == "vmtrim.audit/1"
        # Both block in the guest (ext4 without -o discard, no fstrim.timer); only bad's
        # definition blocks too, so only bad is given to vmtrim_fix.
        assert disks[setup.bad.name]["verdict"] == disks[setup.good.name]["verdict"] == "block"
        layers = {layer["layer"]: layer["verdict"] for layer in disks[setup.bad.name]["layers"]}
        assert layers["block_node"] == "block"
        [fixed] = report["fix"]["domains"]
        assert (fixed["domain"], fixed["mode"], fixed["defined"]) == (
            setup.bad.name,
            "dry-run",
            False,
        )
        assert "discard='unmap'" in fixed["diff"]
        assert report["run"]["dry_run"] is True
        planned = {d["domain"]: d["status"] for d in report["run"]["domains"]}
        assert planned[setup.good.name] == "would_trim"
        assert report["changed"] == {"fix": False, "run": False}
    assert setup.inactive_xml(setup.bad) == bad_xml  # nothing written
    assert du_bytes(setup.good.image) == good_du  # nothing trimmed


def test_real_run_fixes_trims_and_is_idempotent_over_ssh(setup: Setup) -> None:
    good_du = du_bytes(setup.good.image)
    result = setup.ansible("ansible-playbook", "-i", str(setup.inventory), "-f", "1", str(PLAYBOOK))
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = setup.report("local"), setup.report("viassh")
    # local ran each task first: it fixed the definition and trimmed the good guest.
    [fixed] = first["fix"]["domains"]
    assert fixed["domain"] == setup.bad.name and fixed["defined"] is True
    assert fixed["backup"] and Path(fixed["backup"]).is_file()
    assert "discard='unmap'" in setup.inactive_xml(setup.bad)
    runs = {d["domain"]: d for d in first["run"]["domains"]}
    reclaimed = good_du - du_bytes(setup.good.image)
    assert reclaimed >= 0.99 * WRITE_MIB * MiB
    assert runs[setup.good.name]["status"] == "trimmed"
    assert runs[setup.good.name]["reclaimed"] >= 0.99 * WRITE_MIB * MiB
    # The bad guest still runs the old configuration (no restart allowed): not trimmed.
    assert runs[setup.bad.name]["status"] == "blocked"
    assert first["changed"] == {"fix": True, "run": True}
    # viassh (over SSH) came second: the fix was already there and nothing was left to trim.
    [again] = second["fix"]["domains"]
    assert again["defined"] is False
    assert second["changed"] == {"fix": False, "run": False}


def test_fail_on_blocked_fails_the_task_never_does_not(setup: Setup) -> None:
    args = {"connect": [setup.host.local_uri], "domains": [setup.bad.name]}
    for fail_on, code in (("never", 0), ("blocked", 2)):
        result = setup.ansible(
            "ansible",
            "-i",
            str(setup.inventory),
            "viassh",
            "-m",
            "vmtrim.kvm.vmtrim_audit",
            "-a",
            json.dumps({**args, "fail_on": fail_on}),
        )
        assert result.returncode == code, result.stdout + result.stderr
        if code:
            assert "fail_on=blocked" in result.stdout
            assert f"domain {setup.bad.name}: discard is blocked" in result.stdout


def adhoc(setup: Setup, module: str, args: dict[str, Any], *extra: str) -> dict[str, Any]:
    """``ansible local -m MODULE -a JSON``: the module's result (after ``local | ... =>``)."""
    result = setup.ansible(
        "ansible", "-i", str(setup.inventory), "local", "-m", module, "-a", json.dumps(args), *extra
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(json.loads(result.stdout.split("=>", 1)[1]))


def test_trim_module_check_mode_trims_nothing_then_changed_by_what_came_back(
    setup: Setup,
) -> None:
    good = setup.good
    refill(good, WRITE_MIB)  # freed again in the guest; the host still holds it
    args = {"connect": [setup.host.local_uri], "domains": [good.name], "history": False}
    before = du_bytes(good.image)
    checked = adhoc(setup, "vmtrim.kvm.vmtrim_trim", args, "--check")
    assert checked["changed"] is False and checked["document"]["schema"] == "vmtrim.audit/1"
    assert du_bytes(good.image) == before
    trimmed = adhoc(setup, "vmtrim.kvm.vmtrim_trim", args)
    [dom] = trimmed["document"]["domains"]
    assert trimmed["document"]["schema"] == "vmtrim.trim/1" and dom["status"] == "trimmed"
    assert trimmed["reclaimed_bytes"] == before - du_bytes(good.image)
    assert trimmed["reclaimed_bytes"] >= 0.99 * WRITE_MIB * MiB
    assert trimmed["changed"] is True
    again = adhoc(setup, "vmtrim.kvm.vmtrim_trim", args)  # nothing left to give back
    assert again["reclaimed_bytes"] < MiB
    assert again["changed"] is (again["reclaimed_bytes"] > 0)

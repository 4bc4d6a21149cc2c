#!/usr/bin/python
# -*- coding: utf-8 -*-
# GNU General Public License v2.0 or later (see COPYING or https://www.gnu.org/licenses/gpl-2.0.txt)
"""Ansible module: vmtrim fix on the managed host."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: vmtrim_fix
short_description: Rewrite libvirt domain definitions so that discard passes
version_added: "0.1.0"
description:
  - Runs C(vmtrim fix -c URI DOMAIN... --json) on the managed host, through the vmtrim
    library, and returns its C(vmtrim.fix/1) document unchanged in RV(document).
  - vmtrim backs the definition up (0600) before it defines the fixed XML, and reads it back.
  - C(changed) is true only when a definition was rewritten (or a domain restarted).
  - In check mode vmtrim runs with C(--dry-run) and the document holds the unified diff.
extends_documentation_fragment:
  - vmtrim.kvm.common
options:
  connect:
    description: The libvirt URI. Empty means C($LIBVIRT_DEFAULT_URI), else libvirt's default.
    type: str
    aliases: [uri]
  domains:
    description: The domains to fix (names, UUIDs or IDs).
    type: list
    elements: str
    required: true
  restart:
    description:
      - Power-cycle a running domain so the fix takes effect (shut down and start, not a reboot).
      - Give it only where a restart is allowed.
    type: bool
    default: false
  restart_timeout:
    description: Seconds to wait for the guest to shut down.
    type: float
    default: 120.0
  force:
    description: With O(restart), destroy a domain still running at the timeout.
    type: bool
    default: false
  detect_zeroes:
    description: Also set detect_zeroes.
    type: str
    choices: ["unmap", "on", "off"]
  bus:
    description: Move disks to this bus (the guest must have the driver).
    type: str
    choices: [scsi]
  probe:
    description: Probe the host's storage.
    type: bool
    default: true
  fail_on:
    description:
      - V(never) returns the result without failing the task.
      - V(blocked) and V(failed) fail it when a disk still blocks discard after the fix.
attributes:
  check_mode:
    support: full
    description: C(--dry-run); the diff is in the result and nothing is written.
"""

EXAMPLES = r"""
- name: Show what fix would change
  vmtrim.kvm.vmtrim_fix:
    domains: [web1]
  check_mode: true
  register: plan

- name: Fix and restart where a restart is allowed
  vmtrim.kvm.vmtrim_fix:
    domains: [web1]
    restart: "{{ vmtrim_restart_allowed | default(false) }}"
"""

RETURN = r"""
document:
  description: The C(vmtrim.fix/1) document, as C(vmtrim fix -c URI DOMAIN --json) prints it.
  returned: when vmtrim ran
  type: dict
  contains:
    domains:
      description: One entry per domain with C(changes), C(defined), C(backup), C(restarted) and C(diff).
      type: list
      elements: dict
exit_code:
  description: vmtrim's exit code (0 fixed or nothing to fix, 1 a disk still blocks).
  returned: always
  type: int
blocked_domains:
  description: Domains with a disk that still blocks discard.
  returned: when vmtrim ran
  type: list
  elements: str
failed_domains:
  description: The same as RV(blocked_domains) for fix.
  returned: when vmtrim ran
  type: list
  elements: str
failed_hosts:
  description: Always empty for fix (one host).
  returned: when vmtrim ran
  type: list
  elements: str
command:
  description: The vmtrim command line this task ran.
  returned: always
  type: list
  elements: str
stderr:
  description: What vmtrim wrote on stderr (notes such as "full power cycle").
  returned: always
  type: str
"""

from ansible_collections.vmtrim.kvm.plugins.module_utils.runner import (
    domains_of,
    finish,
    label,
    start,
)


def changed(doc):
    return any(d.get("defined") or d.get("restarted") for d in domains_of(doc))


def blocked(doc):
    return [
        label(d)
        for d in domains_of(doc)
        if any(skip.get("blocking") for skip in d.get("skipped") or [])
    ]


def main():
    module = start(
        {
            "connect": {"type": "str", "aliases": ["uri"]},
            "domains": {"type": "list", "elements": "str", "required": True},
            "restart": {"type": "bool", "default": False},
            "restart_timeout": {"type": "float", "default": 120.0},
            "force": {"type": "bool", "default": False},
            "detect_zeroes": {"type": "str", "choices": ["unmap", "on", "off"]},
            "bus": {"type": "str", "choices": ["scsi"]},
            "probe": {"type": "bool", "default": True},
        }
    )
    if module is None:
        return
    params = module.params
    argv = ["fix", *(["-c", params["connect"]] if params["connect"] else [])]
    argv += [*params["domains"], "--json"]
    argv += ["--dry-run"] if module.check_mode else []
    if params["restart"] and not module.check_mode:
        argv += ["--restart", "--restart-timeout", str(params["restart_timeout"])]
        argv += ["--force"] if params["force"] else []
    argv += ["--detect-zeroes", params["detect_zeroes"]] if params["detect_zeroes"] else []
    argv += ["--bus", params["bus"]] if params["bus"] else []
    argv += [] if params["probe"] else ["--no-probe"]
    finish(module, argv, changed=changed, failed=blocked, blocked=blocked)


if __name__ == "__main__":
    main()

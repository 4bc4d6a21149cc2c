#!/usr/bin/python
# -*- coding: utf-8 -*-
# GNU General Public License v2.0 or later (see COPYING or https://www.gnu.org/licenses/gpl-2.0.txt)
"""Ansible module: vmtrim audit on the managed host."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: vmtrim_audit
short_description: Find the layer that blocks discard on every disk of the host's guests
version_added: "0.1.0"
description:
  - Runs C(vmtrim audit -c URI --json) on the managed host, through the vmtrim library, and
    returns its C(vmtrim.audit/1) document unchanged in RV(document).
  - Every layer of each disk's discard path (guest filesystem, guest driver, QEMU device, QEMU
    block nodes, host storage) gets a verdict, a reason and a fix.
  - Read-only. C(changed) is always false, in check mode too.
extends_documentation_fragment:
  - vmtrim.kvm.common
  - vmtrim.kvm.hosts
options:
  domains:
    description: Domain names, UUIDs or IDs. Empty means every domain (C(--all)).
    type: list
    elements: str
    default: []
  timeout:
    description: Seconds to wait for each guest agent.
    type: float
    default: 10.0
  probe:
    description: Probe the host's storage (punch-hole, block device discard). Off for remote URIs anyway.
    type: bool
    default: true
  fail_on:
    description:
      - V(never) returns the findings without failing the task.
      - V(blocked) fails the task when a disk blocks discard or a host failed.
      - V(failed) fails it only when a host failed.
attributes:
  check_mode:
    support: full
    description: An audit changes nothing; it runs the same in check mode.
"""

EXAMPLES = r"""
- name: Audit every guest of this host
  vmtrim.kvm.vmtrim_audit:
  register: audit

- name: Show the disks that block discard
  ansible.builtin.debug:
    msg: "{{ audit.document.disks | selectattr('verdict', 'equalto', 'block') | map(attribute='target') }}"

- name: Fail the play when any disk blocks discard
  vmtrim.kvm.vmtrim_audit:
    connect: [qemu:///system]
    domains: [web1, db1]
    fail_on: blocked
"""

RETURN = r"""
document:
  description: The C(vmtrim.audit/1) document, as C(vmtrim audit --json) prints it.
  returned: when vmtrim ran
  type: dict
  contains:
    schema:
      description: C(vmtrim.audit/1).
      type: str
    disks:
      description: One entry per disk with its layers, verdict and findings (and C(host) with several hosts).
      type: list
      elements: dict
    domains:
      description: The audited domains and their notes.
      type: list
      elements: dict
exit_code:
  description: vmtrim's exit code (0 no disk blocks, 1 a disk blocks, 3 a host failed).
  returned: always
  type: int
blocked_domains:
  description: Domains with a disk that blocks discard.
  returned: when vmtrim ran
  type: list
  elements: str
fixable_domains:
  description:
    - Domains with a disk blocked in a layer their definition decides (QEMU device or block
      node), which M(vmtrim.kvm.vmtrim_fix) can change. The guest and host layers it cannot.
  returned: when vmtrim ran
  type: list
  elements: str
failed_domains:
  description: Always empty for an audit (kept for symmetry with the other modules).
  returned: when vmtrim ran
  type: list
  elements: str
failed_hosts:
  description: URIs of hosts that could not be reached or dropped the connection.
  returned: when vmtrim ran
  type: list
  elements: str
command:
  description: The vmtrim command line this task ran.
  returned: always
  type: list
  elements: str
stderr:
  description: What vmtrim wrote on stderr (notes, errors).
  returned: always
  type: str
"""

from ansible_collections.vmtrim.kvm.plugins.module_utils.runner import (
    CONNECTION_OPTIONS,
    connection_args,
    finish,
    label,
    selection_args,
    start,
)

# The layers that libvirt XML decides, so vmtrim fix can change them.
CONFIG_LAYERS = {"device", "block_node"}


def blocked(doc):
    return sorted({label(d) for d in doc.get("disks") or [] if d.get("verdict") == "block"})


def fixable(doc):
    return sorted(
        {
            label(d)
            for d in doc.get("disks") or []
            for layer in d.get("layers") or []
            if layer.get("layer") in CONFIG_LAYERS and layer.get("verdict") == "block"
        }
    )


def main():
    module = start(
        dict(
            CONNECTION_OPTIONS,
            domains={"type": "list", "elements": "str", "default": []},
            timeout={"type": "float", "default": 10.0},
            probe={"type": "bool", "default": True},
        )
    )
    if module is None:
        return
    params = module.params
    argv = ["audit", *connection_args(params), *selection_args(params), "--json"]
    argv += ["--timeout", str(params["timeout"])] + ([] if params["probe"] else ["--no-probe"])
    finish(
        module,
        argv,
        changed=lambda doc: False,
        failed=lambda doc: [],
        blocked=blocked,
        summary=lambda doc: {"fixable_domains": fixable(doc)},
    )


if __name__ == "__main__":
    main()

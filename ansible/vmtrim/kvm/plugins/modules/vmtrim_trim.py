#!/usr/bin/python
# -*- coding: utf-8 -*-
# GNU General Public License v2.0 or later (see COPYING or https://www.gnu.org/licenses/gpl-2.0.txt)
"""Ansible module: vmtrim trim on the managed host."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: vmtrim_trim
short_description: Trim guests through their agent and measure what the host got back
version_added: "0.1.0"
description:
  - Runs C(vmtrim trim -c URI --json) on the managed host, through the vmtrim library, and
    returns its C(vmtrim.trim/1) document unchanged in RV(document).
  - The guest's trimmed figures are upper bounds; C(reclaimed_bytes) is the host's own
    measurement before and after (C(du), or libvirt's allocation for remote hosts).
  - C(changed) is true only when the host got space back (reclaimed bytes > 0).
  - In check mode nothing is trimmed (vmtrim trim has no dry run); the task runs
    C(vmtrim audit) on the same domains instead and returns that document.
extends_documentation_fragment:
  - vmtrim.kvm.common
  - vmtrim.kvm.hosts
options:
  domains:
    description: Domain names, UUIDs or IDs. Empty means every running domain (C(--all)).
    type: list
    elements: str
    default: []
  minimum:
    description: Skip free ranges smaller than this many bytes.
    type: int
    default: 0
  mountpoint:
    description: Trim only this guest mountpoint (fstrim through guest-exec).
    type: str
  parallel:
    description: Domains trimmed at once, per host.
    type: int
    default: 1
  timeout:
    description: Seconds after which a domain's whole trim is abandoned (it is then skipped).
    type: float
    default: 60.0
  history:
    description: Record the trim in vmtrim's history database.
    type: bool
    default: true
  db:
    description: The history database (default C(/var/lib/vmtrim/history.db)).
    type: path
  fail_on:
    description:
      - V(never) returns every domain's outcome without failing the task.
      - V(failed) fails the task when a domain failed (its agent answered with an error) or a host failed; a skipped domain (not running, no agent) does not.
      - V(blocked) also fails it when a domain's trim had no effect (a layer drops discards).
attributes:
  check_mode:
    support: partial
    description: Nothing is trimmed; an audit of the same domains is returned instead.
"""

EXAMPLES = r"""
- name: Trim every running guest of this host
  vmtrim.kvm.vmtrim_trim:
  register: trim

- name: Say what came back
  ansible.builtin.debug:
    msg: "{{ trim.document.domains | map(attribute='reclaimed_bytes') | sum }} bytes"

- name: Trim two guests, failing the task if one of them could not be trimmed
  vmtrim.kvm.vmtrim_trim:
    domains: [web1, db1]
    timeout: 120
    fail_on: failed
"""

RETURN = r"""
document:
  description: The C(vmtrim.trim/1) document (in check mode the C(vmtrim.audit/1) one).
  returned: when vmtrim ran
  type: dict
  contains:
    schema:
      description: C(vmtrim.trim/1).
      type: str
    domains:
      description: One entry per domain, with C(status), C(reason), C(disks) and C(reclaimed_bytes).
      type: list
      elements: dict
    hosts:
      description: With several hosts, one entry per host with C(status) and C(reason).
      type: list
      elements: dict
      returned: with several hosts
reclaimed_bytes:
  description: What the hosts got back, all domains together.
  returned: when vmtrim ran
  type: int
exit_code:
  description: vmtrim's exit code (0 every domain trimmed, 1 one was not, 3 a host failed).
  returned: always
  type: int
failed_domains:
  description: Domains that failed (C(status) failed).
  returned: when vmtrim ran
  type: list
  elements: str
blocked_domains:
  description: Domains whose trim had no effect because a layer drops discards.
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
  description: What vmtrim wrote on stderr.
  returned: always
  type: str
"""

from ansible_collections.vmtrim.kvm.plugins.module_utils.runner import (
    BLOCKED_STATUSES,
    CONNECTION_OPTIONS,
    FAILED_STATUSES,
    connection_args,
    finish,
    reclaimed,
    selection_args,
    start,
    statuses,
)


def main():
    module = start(
        dict(
            CONNECTION_OPTIONS,
            domains={"type": "list", "elements": "str", "default": []},
            minimum={"type": "int", "default": 0},
            mountpoint={"type": "str"},
            parallel={"type": "int", "default": 1},
            timeout={"type": "float", "default": 60.0},
            history={"type": "bool", "default": True},
            db={"type": "path"},
        )
    )
    if module is None:
        return
    params = module.params
    where = [*connection_args(params), *selection_args(params)]
    if module.check_mode:  # trim has no dry run: say what the audit finds instead
        finish(
            module,
            ["audit", *where, "--json"],
            changed=lambda doc: False,
            failed=lambda doc: [],
            blocked=lambda doc: [],
            extra={"reclaimed_bytes": 0, "msg": "check mode: nothing trimmed; the audit"},
        )
        return
    argv = ["trim", *where, "--json", "--minimum", str(params["minimum"])]
    argv += ["--parallel", str(params["parallel"]), "--timeout", str(params["timeout"])]
    argv += ["--mountpoint", params["mountpoint"]] if params["mountpoint"] else []
    argv += [] if params["history"] else ["--no-history"]
    argv += ["--db", params["db"]] if params["db"] else []
    finish(
        module,
        argv,
        changed=lambda doc: reclaimed(doc, "reclaimed_bytes") > 0,
        failed=lambda doc: statuses(doc, FAILED_STATUSES),
        blocked=lambda doc: statuses(doc, BLOCKED_STATUSES),
        summary=lambda doc: {"reclaimed_bytes": reclaimed(doc, "reclaimed_bytes")},
    )


if __name__ == "__main__":
    main()

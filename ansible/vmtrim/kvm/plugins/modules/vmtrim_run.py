#!/usr/bin/python
# -*- coding: utf-8 -*-
# GNU General Public License v2.0 or later (see COPYING or https://www.gnu.org/licenses/gpl-2.0.txt)
"""Ansible module: vmtrim run (the policy) on the managed host."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: vmtrim_run
short_description: Trim every domain the vmtrim policy selects, and record it
version_added: "0.1.0"
description:
  - Runs C(vmtrim run --json) on the managed host, through the vmtrim library, and returns
    its C(vmtrim.run/1) document unchanged in RV(document).
  - The policy (C(/etc/vmtrim/policy.toml) by default) selects the domains, the window,
    the concurrency and the excludes; every trim is recorded in the history database.
  - C(changed) is true only when a domain got space back (reclaimed > 0).
  - In check mode vmtrim runs with C(--dry-run) (survey and plan only).
extends_documentation_fragment:
  - vmtrim.kvm.common
options:
  policy:
    description: The policy file on the managed host.
    type: path
  db:
    description: The history database.
    type: path
  lock:
    description: The run lock file.
    type: path
  fail_on:
    description:
      - V(never) returns every domain's outcome without failing the task.
      - V(failed) fails the task when a domain failed (a skipped one, e.g. not running, does not).
      - V(blocked) also fails it when a domain is blocked by its configuration.
attributes:
  check_mode:
    support: full
    description: C(--dry-run); nothing is trimmed or recorded.
"""

EXAMPLES = r"""
- name: Run the policy
  vmtrim.kvm.vmtrim_run:
    policy: /etc/vmtrim/policy.toml
  register: run

- name: Plan only
  vmtrim.kvm.vmtrim_run:
  check_mode: true
"""

RETURN = r"""
document:
  description: The C(vmtrim.run/1) document, as C(vmtrim run --json) prints it.
  returned: when vmtrim ran
  type: dict
  contains:
    domains:
      description: One entry per domain with C(status), C(reason), C(reclaimed) and C(disks).
      type: list
      elements: dict
reclaimed_bytes:
  description: What the host got back, all domains together.
  returned: when vmtrim ran
  type: int
exit_code:
  description: vmtrim's exit code.
  returned: always
  type: int
failed_domains:
  description: Domains that failed (C(status) failed).
  returned: when vmtrim ran
  type: list
  elements: str
blocked_domains:
  description: Domains blocked by their configuration.
  returned: when vmtrim ran
  type: list
  elements: str
failed_hosts:
  description: Always empty for run (the policy's host).
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
    FAILED_STATUSES,
    finish,
    reclaimed,
    start,
    statuses,
)


def main():
    module = start(
        {
            "policy": {"type": "path"},
            "db": {"type": "path"},
            "lock": {"type": "path"},
        }
    )
    if module is None:
        return
    params = module.params
    argv = ["run", "--json"] + (["--dry-run"] if module.check_mode else [])
    for option in ("policy", "db", "lock"):
        argv += ["--" + option, params[option]] if params[option] else []
    finish(
        module,
        argv,
        changed=lambda doc: reclaimed(doc, "reclaimed") > 0,
        failed=lambda doc: statuses(doc, FAILED_STATUSES),
        blocked=lambda doc: statuses(doc, BLOCKED_STATUSES),
        summary=lambda doc: {"reclaimed_bytes": reclaimed(doc, "reclaimed")},
    )


if __name__ == "__main__":
    main()

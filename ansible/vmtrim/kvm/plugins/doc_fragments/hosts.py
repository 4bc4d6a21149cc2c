# -*- coding: utf-8 -*-
# GNU General Public License v2.0 or later (see COPYING or https://www.gnu.org/licenses/gpl-2.0.txt)
"""The libvirt host options that vmtrim_audit and vmtrim_trim share."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    DOCUMENTATION = r"""
options:
  connect:
    description:
      - libvirt URIs. Several (or O(hosts_file)) are worked on at once, each failure kept to
        its own host (C(host) on every result, C(hosts) with each host's status and reason).
      - Empty means C($LIBVIRT_DEFAULT_URI), else libvirt's default (C(qemu:///system) as root).
    type: list
    elements: str
    default: []
    aliases: [uri]
  hosts_file:
    description: A file on the managed host with one libvirt URI per line (C(#) comments).
    type: path
  hosts_parallel:
    description: With several hosts, how many are worked on at once.
    type: int
    default: 8
  connect_timeout:
    description:
      - With several hosts, seconds after which a host that does not answer (or stops
        answering, by libvirt's keepalive) has failed.
    type: float
    default: 15.0
"""

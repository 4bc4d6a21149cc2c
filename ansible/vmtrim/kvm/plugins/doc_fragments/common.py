# -*- coding: utf-8 -*-
# GNU General Public License v2.0 or later (see COPYING or https://www.gnu.org/licenses/gpl-2.0.txt)
"""What every vmtrim.kvm module shares: fail_on's type and choices, requirements, author.

Each module still describes fail_on itself (ansible-doc merges the module's description
over this fragment's type, choices and default).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    DOCUMENTATION = r"""
options:
  fail_on:
    type: str
    choices: [never, failed, blocked]
    default: never
requirements:
  - vmtrim with its libvirt extra, for the Python interpreter Ansible uses on the managed host
author:
  - vmtrim developers
"""

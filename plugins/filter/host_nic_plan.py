# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: host_nic_plan
short_description: What the kvm_host role does to the rail NICs it is given (kvm_host_nics)
version_added: 0.2.0
description:
  - Checks C(kvm_host_nics) against the NICs C(gpuvirt.kvm.gpu_topology) found (its C(nics)
    return) and works out what to bind to vfio-pci, which SR-IOV VFs to create, and the lines of
    C(/etc/gpuvirt/sriov.conf). Nothing on the host changes.
  - A NIC the host uses (its default route, a bond, a bridge), a NIC without SR-IOV asked for
    VFs, more VFs than C(sriov_totalvfs), VFs the host had before that the entry would change,
    and VFs or functions a VM holds are refused, each with a message naming the entry.
positional: _input
options:
  _input:
    description: The entries, each C(nic) (PCI address, interface or RDMA device), C(vfs) and C(vf_settings).
    type: list
    elements: dict
    required: true
  nics:
    description: gpu_topology's C(nics).
    type: list
    elements: dict
    required: true
  recorded:
    description: The C(nics) of the role's record from an earlier run.
    type: dict
    default: {}
  option:
    description: The option name used in messages.
    type: str
    default: kvm_host_nics
author:
  - gpuvirt.kvm contributors (@gpuvirt)
"""

EXAMPLES = r"""
- name: Work out the NICs
  ansible.builtin.set_fact:
    plan: "{{ kvm_host_nics | gpuvirt.kvm.host_nic_plan(topology.nics) }}"
"""

RETURN = r"""
_value:
  description:
    - C(problems) (one message per bad entry; the rest means nothing unless it is empty),
      C(nics) (each NIC's C(bdf), C(link_layer), C(netdev), C(vfs), C(numvfs_now), C(vf_bdfs)
      and C(bind)), C(bind) (every function to bind to vfio-pci), C(vfs) (the VFs among them),
      C(conf) (the text of C(/etc/gpuvirt/sriov.conf)), C(record) (the record's C(nics)) and
      C(dropped) (C(BDF=N) for NICs an earlier run set up that are no longer listed - they get
      their N VFs from before back).
  type: dict
"""

from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_nics import host_nic_plan


class FilterModule:
    def filters(self):
        return {"host_nic_plan": host_nic_plan}

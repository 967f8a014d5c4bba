# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: vm_line
short_description: One readable line for a VM returned by kvm_vm or kvm_layout
version_added: 0.1.0
description:
  - Formats the RV(gpuvirt.kvm.kvm_vm#module:vm) dictionary as one line for reports and
    allocation maps - name, state, GPUs (with their NVSwitches and rail NICs), vCPUs and the
    host CPUs they run on, memory, NUMA nodes.
positional: _input
options:
  _input:
    description:
      - A C(vm) dictionary from M(gpuvirt.kvm.kvm_vm), or the C(vm) of one of
        RV(gpuvirt.kvm.kvm_layout#module:vms).
    type: dict
    required: true
author:
  - gpuvirt.kvm contributors (@gpuvirt)
"""

EXAMPLES = r"""
- name: Print the layout
  ansible.builtin.debug:
    msg: "{{ layout.vms | map(attribute='vm') | map('gpuvirt.kvm.vm_line') | list }}"
"""

RETURN = r"""
_value:
  description:
    - The line, for example
      C(train-a running GPUs 0-7 (8) 46 vCPU(s\) on 1-23,49-71 (dedicated\) 729 GiB node 0).
  type: str
"""

from ansible.errors import AnsibleFilterError

from ansible_collections.gpuvirt.kvm.plugins.module_utils._ranges import format_ranges


def _ranges(values):
    return format_ranges(values)


def vm_line(vm):
    """One line describing a VM result."""
    if not isinstance(vm, dict) or "name" not in vm:
        raise AnsibleFilterError("vm_line: expected a vm dict from kvm_vm or kvm_layout, got %r"
                                 % (vm,))
    if vm.get("state") == "absent" or "vcpus" not in vm:
        return "%-14s %s" % (vm["name"], vm.get("state", "?"))
    gpus = vm.get("gpu_indexes") or []
    spec = vm.get("spec") or {}
    gpu_text = "GPUs %s (%d)" % (_ranges(gpus), len(gpus)) if gpus else "no GPU"
    switches = len(vm.get("nvswitches") or [])
    if switches:
        gpu_text += " + %d NVSwitch" % switches
    nics = len(vm.get("nics") or [])
    if nics:
        gpu_text += " + %d rail NIC%s" % (nics, "s" if nics > 1 else "")
    memory = vm.get("memory_mb", 0)
    mem_text = "%d GiB" % (memory // 1024) if memory >= 4096 else "%d MiB" % memory
    return "%-14s %-8s %-28s %d vCPU(s) on %s (%s)  %s  node %s" % (
        vm["name"], vm.get("state", "?"), gpu_text, vm["vcpus"],
        _ranges(vm.get("cpus") or []) or "-", spec.get("cpu_policy", "?"), mem_text,
        ",".join(str(n) for n in vm.get("numa_nodes") or []) or "-")


class FilterModule:
    def filters(self):
        return {"vm_line": vm_line}

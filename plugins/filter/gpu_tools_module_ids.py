# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: gpu_tools_module_ids
short_description: Each GPU's module ID from NVIDIA gpu-admin-tools, with no driver loaded
version_added: 0.2.0
description:
  - Reads what C(nvidia_gpu_tools.py --devices gpus --query-module-name) (NVIDIA/gpu-admin-tools)
    prints, its log on standard error included, and returns each GPU's PCI address with its
    module ID (the tool's C(SXM_n); Fabric Manager's C(physicalId)).
  - The tool reads the module from the GPU itself, so it works while the GPUs are on vfio-pci,
    where C(nvidia-smi) cannot see them. It knows H100/H200 and B200 SXM GPUs.
  - The P(gpuvirt.kvm.kvm_host#role) role runs it for the GPUs that C(nvidia-smi -q) could not
    name when O(kvm_host_gpu_admin_tools) is set.
positional: _input
options:
  _input:
    description:
      - The tool's output, standard output and standard error together, as one text or as a
        list of lines (C(stdout_lines + stderr_lines)).
    type: raw
    required: true
author:
  - gpuvirt.kvm contributors (@gpuvirt)
"""

EXAMPLES = r"""
- name: Ask gpu-admin-tools for the GPUs' module IDs
  ansible.builtin.command: python3 /opt/gpu-admin-tools/nvidia_gpu_tools.py --devices gpus --query-module-name
  register: query
  changed_when: false

- name: Show them
  ansible.builtin.debug:
    msg: "{{ (query.stdout_lines + query.stderr_lines) | gpuvirt.kvm.gpu_tools_module_ids }}"
"""

RETURN = r"""
_value:
  description: PCI address (C(0000:18:00.0)) -> module ID, for every GPU whose module the tool named.
  type: dict
"""

from ansible.errors import AnsibleFilterError

from ansible_collections.gpuvirt.kvm.plugins.module_utils._nvidia_smi import (
    NvidiaSmiQueryError,
    parse_gpu_tools_module_names,
)


def gpu_tools_module_ids(text):
    """{bdf: module ID} from nvidia_gpu_tools.py --query-module-name (a text, or its lines)."""
    if isinstance(text, (list, tuple)) and all(isinstance(line, str) for line in text):
        text = "\n".join(text)
    try:
        return parse_gpu_tools_module_names(text)
    except NvidiaSmiQueryError as exc:
        raise AnsibleFilterError(str(exc)) from None


class FilterModule:
    def filters(self):
        return {"gpu_tools_module_ids": gpu_tools_module_ids}

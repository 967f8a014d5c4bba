# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: nvidia_smi_module_ids
short_description: Each GPU's module ID (Fabric Manager's name for it) from nvidia-smi -q
version_added: 0.1.0
description:
  - Reads the text of C(nvidia-smi -q), taken while the NVIDIA driver owns the GPUs, and returns
    each GPU's PCI address with its module ID (C(Platform Info) / C(Module Id), the
    C(physicalId) that Fabric Manager's partitions list on HGX H100 and later).
  - The M(gpuvirt.kvm.kvm_host) role uses it to write C(fabric.module_ids) into the host record
    before it binds the GPUs of a shared-NVSwitch host to vfio-pci.
positional: _input
options:
  _input:
    description: The text of C(nvidia-smi -q).
    type: str
    required: true
author:
  - gpuvirt.kvm contributors (@gpuvirt)
"""

EXAMPLES = r"""
- name: Learn the module IDs while the driver still owns the GPUs
  ansible.builtin.command: nvidia-smi -q
  register: query
  changed_when: false

- name: Show them
  ansible.builtin.debug:
    msg: "{{ query.stdout | gpuvirt.kvm.nvidia_smi_module_ids }}"
"""

RETURN = r"""
_value:
  description:
    - PCI address (C(0000:18:00.0)) -> module ID, for every GPU the text lists; V(null) where
      nvidia-smi prints no module ID or N/A (a GPU that is not on an HGX board).
  type: dict
"""

from ansible.errors import AnsibleFilterError

from ansible_collections.gpuvirt.kvm.plugins.module_utils._nvidia_smi import (
    NvidiaSmiQueryError,
    parse_module_ids,
)


def nvidia_smi_module_ids(text):
    """{bdf: module ID or None} from the text of nvidia-smi -q."""
    try:
        return parse_module_ids(text)
    except NvidiaSmiQueryError as exc:
        raise AnsibleFilterError(str(exc)) from None


class FilterModule:
    def filters(self):
        return {"nvidia_smi_module_ids": nvidia_smi_module_ids}

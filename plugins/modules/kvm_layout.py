#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: kvm_layout
short_description: Converge a host's whole GPU-VM layout in one run
version_added: 0.1.0
description:
  - Declares every GPU VM of a host at once (each entry takes the options of
    M(gpuvirt.kvm.kvm_vm)), places them jointly, largest first, so that a mixed day of tenants
    fits where one-by-one placement could fragment the GPUs, and converges them.
  - Files and definitions are made under the host-wide allocation lock, one VM after another;
    VMs are then started and stopped in parallel (O(workers) at a time), so a 16-VM host does
    not take 16 times one VM. VMs that stop or are removed go first, then VMs that start, so a
    VM given the GPUs of a VM removed in the same run (a night layout replacing a day one) never
    starts while the old one still holds them.
  - With O(exclusive=true), VMs that this collection created and that are not listed are
    stopped (ACPI, then powered off after the C(timeout) of O(defaults) when its C(force) is
    true) and removed; their data disks are kept. Domains the collection did not create are never
    touched.
  - When O(defaults) sets C(owner_tag), O(exclusive) considers only the VMs carrying that tag, so
    several layouts (teams, tenants, a demo) can share a host without removing each other's VMs.
  - The layout is applied whole or not at all. When any entry cannot be placed or converged as
    asked (no room for its GPUs, a bad image, a network that does not exist, a disk that would
    shrink, ...), every entry is decided before anything is done, and nothing is changed. No
    overlay is made, no domain defined, started, stopped or removed, the O(exclusive) removals
    included. The task fails naming each entry that cannot be applied and why; RV(applied) is
    empty and RV(not_applied) lists every entry.
  - With O(partial=true) the entries that can be applied are, the others are reported with
    their error, and the task fails at the end naming them (RV(applied) and RV(not_applied)
    say which is which).
  - A failure while the changes are carried out (a VM that does not start, say) is undone for
    that VM only; the VMs already converged stay so, and the task fails naming the VM.
author:
  - gpuvirt.kvm contributors (@gpuvirt)
extends_documentation_fragment:
  - gpuvirt.kvm.host
  - gpuvirt.kvm.host.LIBVIRT
  - gpuvirt.kvm.lock
  - gpuvirt.kvm.bytecode
attributes:
  check_mode:
    support: full
    description: Places every VM and returns the plan, the actions and the diff; changes nothing.
  diff_mode:
    support: full
    description: One semantic before/after per VM, keyed by VM name.
  idempotent:
    support: full
    description: A second run with the same layout reports no change.
options:
  vms:
    description:
      - The VMs, each a dict of M(gpuvirt.kvm.kvm_vm) options (C(name) required; C(gpus),
        C(gpu_index), C(gpu_model), C(nics), C(nic_mode), C(nics_allow_fewer), C(image), C(vcpus),
        C(memory), C(os_disk_size), C(data_disk_size),
        C(networks), C(cloud_init), C(cpu_policy), C(hugepages), C(cpu_mode),
        C(cpu_disable_features), C(domain_type), C(firmware), C(state), C(force), C(timeout),
        C(remove_data), C(recreate), C(owner_tag)).
      - Names must be unique.
      - Each entry (with O(defaults) merged in) is type-checked and converted as
        M(gpuvirt.kvm.kvm_vm) checks its own options, so V("2") is 2 and V("false") is false;
        an error names the entry (C(vms[3])) and the option. Options an entry leaves out keep
        what an existing VM has, as in M(gpuvirt.kvm.kvm_vm).
    type: list
    elements: dict
    required: true
  defaults:
    description: Options applied to every entry of O(vms) that does not set them itself.
    type: dict
    default: {}
  exclusive:
    description:
      - Remove the VMs this collection created that O(vms) does not list (only those tagged with
        the C(owner_tag) of O(defaults), when it sets one).
    type: bool
    default: false
  store:
    description: The image store of M(gpuvirt.kvm.kvm_image).
    type: path
    default: /var/lib/gpuvirt/images
  disk_dir:
    description: Where the VMs' overlays, data disks and seed ISOs are created.
    type: path
    default: /var/lib/gpuvirt/disks
  workers:
    description: How many VMs are started or stopped at the same time.
    type: int
    default: 16
  partial:
    description:
      - Apply the entries that can be applied when some cannot, instead of changing nothing.
      - The task still fails when an entry is not applied.
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: The day layout of a DGX-2, nothing else managed by gpuvirt left on it
  gpuvirt.kvm.kvm_layout:
    exclusive: true
    defaults:
      image: dgx-os
      force: true
      timeout: 300
    vms:
      - {name: train-a, gpus: 8}
      - {name: train-b, gpus: 4}
      - {name: dev-c, gpus: 2}
      - {name: dev-d, gpus: 1}
      - {name: dev-e, gpus: 1, data_disk_size: 200GiB}

- name: Whatever of the night layout fits tonight, even if not all of it does
  gpuvirt.kvm.kvm_layout:
    partial: true
    vms:
      - {name: hpc-a, gpus: 16, image: dgx-os}
      - {name: hpc-spare, gpus: 8, image: dgx-os}
  register: night
  ignore_errors: true

- name: Say which entries were left out
  ansible.builtin.debug:
    msg: "not applied: {{ night.not_applied | join(', ') }}"
"""

RETURN = r"""
vms:
  description: One entry per VM of O(vms), then one per VM removed by O(exclusive), each with the
    keys M(gpuvirt.kvm.kvm_vm) returns (C(vm), C(actions), C(changed), C(reboot_required),
    C(kept_data_disks)) and C(error) when that VM failed.
  returned: always
  type: list
  elements: dict
actions:
  description: Every action, prefixed with its VM's name.
  returned: always
  type: list
  elements: str
  sample: ["train-a: define train-a", "train-a: start train-a"]
removed:
  description: VMs removed because O(exclusive=true) and they were not listed (none when the
    layout was refused whole).
  returned: always
  type: list
  elements: str
applied:
  description:
    - The entries of RV(vms) (and O(exclusive) removals) that were applied, by name; an entry
      that needed no change counts as applied.
    - Empty when the layout was refused whole (O(partial=false) and an entry could not be
      applied).
  returned: always
  type: list
  elements: str
  sample: ["train-a", "train-b"]
not_applied:
  description: The entries that were not applied, by name; each has its C(error) in RV(vms),
    or none when it was held back because another entry could not be applied.
  returned: always
  type: list
  elements: str
  sample: []
"""

from ansible.module_utils.basic import AnsibleModule

# _bytecode first: it compiles the module_utils imported after it once per run (see there).
from ansible_collections.gpuvirt.kvm.plugins.module_utils import _bytecode  # noqa: F401 pylint: disable=unused-import
from ansible_collections.gpuvirt.kvm.plugins.module_utils._argspec import (
    host_argspec,
    libvirt_argspec,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_context import DEFAULT_DISK_DIR
from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_store import DEFAULT_STORE
from ansible_collections.gpuvirt.kvm.plugins.module_utils._lock import lock_argspec
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_apply import (
    converge_module,
    layout_outcome,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_request import (
    VmError,
    layout_requests,
)


def main():
    argument_spec = dict(
        vms=dict(type="list", elements="dict", required=True),
        defaults=dict(type="dict", default={}),
        exclusive=dict(type="bool", default=False),
        store=dict(type="path", default=DEFAULT_STORE),
        disk_dir=dict(type="path", default=DEFAULT_DISK_DIR),
        workers=dict(type="int", default=16),
        partial=dict(type="bool", default=False),
    )
    argument_spec.update(host_argspec())
    argument_spec.update(libvirt_argspec())
    argument_spec.update(lock_argspec())
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    p = module.params
    if p["workers"] < 1:
        module.fail_json(msg="workers: %d; give 1 or more" % p["workers"])
    try:
        requests, exclusive = layout_requests(p, secrets=module.no_log_values)
    except VmError as exc:
        module.fail_json(msg=str(exc), changed=False)
    results = converge_module(module, requests, "kvm_layout", workers=p["workers"],
                              exclusive=exclusive, whole=not p["partial"])
    outcome, failure = layout_outcome(results, {r.name for r in requests})
    if failure is not None:
        module.fail_json(msg=failure, **outcome)
    module.exit_json(**outcome)


if __name__ == "__main__":
    main()

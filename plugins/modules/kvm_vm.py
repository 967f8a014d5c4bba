#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: kvm_vm
short_description: Create, start, stop and remove one GPU VM placed on the host's real topology
version_added: 0.1.0
description:
  - Declares one VM, as C(nvidia-vm create/delete) did on DGX-2, but idempotently. The GPUs,
    NVSwitches, vCPUs and memory come from the host's topology (see M(gpuvirt.kvm.gpu_topology))
    and the VM keeps them across runs.
  - The OS disk is a qcow2 overlay on an image from the store of M(gpuvirt.kvm.kvm_image), so
    creating it takes the same time for any image size. A data disk, when asked for, is a
    separate file that survives O(state=absent) unless O(remove_data=true).
  - Allocation happens under a host-wide lock, from reading what other domains hold to defining
    this one, so concurrent runs on one host never hand out a device twice.
  - Creating is transactional (overlay, seed ISO, define, start); a failure undoes every step
    and reports the cause.
  - The allocation lives in the domain's XML (its hostdevs, cputune and a C(<metadata>) element
    of the collection); there is no other state.
  - Options left out keep what an existing VM has (sticky) - its GPUs, vCPUs, memory, CPU
    policy, hugepages, NICs, CPU mode and features, domain type, firmware, disks, seed and owner
    tag - so O(name) with O(state=stopped) just stops it. The defaults documented below apply
    when the VM is created.
  - Disks grow when O(os_disk_size) or O(data_disk_size) asks for more (with C(qemu-img resize)
    while the VM is off, through QEMU while it runs, without a reboot); asking for less is an
    error, as disks are never shrunk.
  - Only files the collection made for the VM are ever removed (recorded in its metadata and
    named C(<name>-os.qcow2), C(<name>-seed.iso), C(<name>-data.qcow2)). A disk or ISO attached
    by hand is not part of the VM as declared, so the next run detaches it from the definition
    (a change, with RV(reboot_required) on a running VM); its file is left alone.
  - Every VM has a serial console (C(virsh console NAME)) and a channel for the QEMU guest agent
    (C(org.qemu.guest_agent.0)), through which M(gpuvirt.kvm.kvm_vm_message) reaches the
    guest's users. A VM made by a version without the channel is redefined once to add it (the
    diff shows C(guest_agent); a running VM gets it at its next start).
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
    description: Check mode places the VM and returns the whole plan (RV(vm), RV(actions)) and
      the diff, and changes nothing.
  diff_mode:
    support: full
    description: The diff is semantic (placement, pinning, memory, disks, devices), not XML.
  idempotent:
    support: full
    description: A second run with the same options reports no change.
options:
  name:
    description:
      - The domain name. Letters, digits, C(.), C(_) and C(-); 1 to 64 characters, starting with
        a letter or digit.
    type: str
    required: true
  state:
    description:
      - V(present) defines the VM (placing it if new) and leaves its power state alone.
      - V(running) defines it if needed and starts it.
      - V(stopped) defines it if needed and shuts it down with ACPI, waiting up to O(timeout);
        with O(force=true) it is then powered off.
      - V(absent) stops it (as V(stopped)), undefines it and removes its OS disk overlay and
        seed ISO. The data disk stays unless O(remove_data=true).
    type: str
    choices: [present, running, stopped, absent]
    default: running
  gpus:
    description:
      - How many GPUs. V(0) makes a CPU-only VM. Allowed counts come from the platform
        (1, 2, 4, 8, 16 on DGX-2).
      - Changing the count of an existing VM re-places it; on a running VM that needs
        O(recreate=true).
      - When not set, V(0) for a new VM; an existing VM keeps its GPUs.
    type: int
  gpu_index:
    description:
      - Exact placement, as nvidia-vm's C(--gpu-index) took it - the lowest GPU index of the block. It must
        start a partition of O(gpus) GPUs on this platform, and be free.
      - Moving a running VM to another block needs O(recreate=true), as its QEMU holds the old
        GPUs until it stops. When not set, an existing VM keeps its block.
    type: int
  gpu_model:
    description:
      - Which GPU model the VM gets, on a host with GPUs of several models (a PCIe server of
        L40S and L4 cards, say). A model name as M(gpuvirt.kvm.gpu_topology) reports it in
        RV(gpuvirt.kvm.gpu_topology#module:gpus[].model) (V(L40S), V(H100-NVL), any case), or a
        PCI ID such as V(10de:26b9) (also for a model the collection does not name).
      - V(any) lets the VM's GPUs be of different models.
      - When not set, a new VM gets GPUs of one model, whichever fits best; an existing VM keeps
        its GPUs. A model other than the one an existing VM has re-places it (for a running VM,
        with O(recreate=true)).
      - The models of a DGX or HGX platform are all alike.
    type: str
    version_added: 0.2.0
  nics:
    description:
      - Rail NICs passed through with the GPUs (docs/networking.md) - V(auto) for every rail NIC
        under the VM's GPUs' PCIe switches, or a number for that many of them.
      - Each NIC goes into the guest under the same emulated PCIe switch as the GPUs it serves,
        so NCCL in the guest sees them C(PIX) apart, as on the host.
      - V(0), or not set - a new VM gets none; an existing VM keeps the rail NICs it holds while
        it keeps its GPUs. A VM re-placed on other GPUs (a new O(gpus) count, O(gpu_index) or
        O(gpu_model)) gets no rails unless O(nics) asks again. Changing a running VM's rails
        needs O(recreate=true), as for its GPUs.
    type: raw
    version_added: 0.2.0
  nic_mode:
    description:
      - V(auto) - the whole NIC where the VM gets every GPU it serves and the NIC has no VFs,
        else a VF of it. V(whole) - whole NICs only. V(vf) - VFs only.
    type: str
    choices: [auto, whole, vf]
    version_added: 0.2.0
  nics_allow_fewer:
    description:
      - Take the rail NICs that are free instead of failing when fewer than O(nics) are.
    type: bool
    version_added: 0.2.0
  fabric_manager_vm:
    description:
      - This VM is the host's Fabric Manager service VM (C(docs/fabric.md)) - it gets every
        NVSwitch of a shared-NVSwitch platform and the platform's fabric devices
        (RV(gpuvirt.kvm.gpu_topology#module:fabric_devices), HGX H100's Switchtec management
        endpoint), and no GPUs or rail NICs. Its image (the NVIDIA driver and Fabric Manager of
        the host's version) comes from the user, like any guest image.
      - Refused on other platforms, with GPUs or rail NICs asked, and while another VM holds a
        switch.
      - The P(gpuvirt.kvm.kvm_host#role) role converts a host for it with
        C(kvm_host_fabric_manager.service_vm) naming this VM.
    type: bool
    version_added: 0.2.0
  image:
    description:
      - The base image of the OS disk, from the store at O(store) - a name (resolved through its
        default alias) or C(name-version). Required when the VM is created with an OS disk.
      - On an existing VM, its image's name alone keeps the version it is on. Another version
        (C(name-version)) or another image moves the VM to a new OS overlay on it, keeping its
        name, MACs, GPUs and data disk; a running VM moves only with O(recreate). The old
        overlay is removed once the VM has started on the new one, and a failed move rolls back
        to it (docs/vms.md).
    type: str
  store:
    description: The image store of M(gpuvirt.kvm.kvm_image).
    type: path
    default: /var/lib/gpuvirt/images
  disk_dir:
    description: Where the VM's overlay, data disk and seed ISO are created.
    type: path
    default: /var/lib/gpuvirt/disks
  vcpus:
    description: vCPUs. Default from the template for the GPU count (platform data, else the
      GPUs' share of their NUMA nodes); an existing VM keeps its own unless its GPU count changes.
    type: int
  memory:
    description: Memory in MiB, or a string with a unit such as V(64GiB). Default from the
      template; an existing VM keeps its own unless its GPU count changes.
    type: raw
  os_disk_size:
    description:
      - Virtual size of the OS disk overlay, in GiB or with a unit; at least the image's size.
        Default the image's own size.
      - A larger size on an existing VM grows the overlay; a smaller one is refused.
    type: raw
  data_disk_size:
    description:
      - Size of a separate data disk, in GiB or with a unit. None when not set.
      - A larger size grows the disk (also a data disk kept from an earlier O(state=absent),
        which is attached again); a smaller one is refused.
    type: raw
  networks:
    description:
      - NICs, each a libvirt network, a host bridge or QEMU user networking. Multiqueue virtio
        (queues = vCPUs, capped at 8).
      - When not set, one NIC on the libvirt network V(default) for a new VM; an existing VM
        keeps its NICs. V([]) makes a VM without NICs.
    type: list
    elements: dict
    suboptions:
      network: {description: A libvirt network (must exist)., type: str}
      bridge: {description: A host bridge (must exist)., type: str}
      user:
        description: QEMU user-mode networking (outbound NAT, no inbound; single queue). For
          labs and tests; give exactly one of O(networks[].network), O(networks[].bridge) or
          this.
        type: bool
      mac:
        description: The MAC. By default derived from the VM name and the NIC's position, so it
          is stable across re-creation.
        type: str
  cloud_init:
    description:
      - A NoCloud seed ISO for the guest (mode 0600 on the host). Its user-data is the user's
        own O(cloud_init.user_data) with the other options merged in (docs/vms.md).
      - Without O(cloud_init.user), the keys go to the image's default user (C(debian) on Debian
        cloud images, C(ubuntu) on Ubuntu's and DGX OS), the documented login of a GPU guest.
    type: dict
    suboptions:
      hostname: {description: Guest hostname (default the VM name)., type: str}
      user: {description: "A user to create, with passwordless sudo.", type: str}
      ssh_authorized_keys:
        description: Keys for that user, or for the image's default user without O(cloud_init.user).
        type: list
        elements: str
      password_hash: {description: Its password hash (crypt format)., type: str}
      user_data:
        description:
          - The user's own cloud-config, as a mapping or as text that starts with
            C(#cloud-config) (text needs PyYAML on the managed host).
          - Its keys win. The VM's hostname, O(cloud_init.user) and O(cloud_init.ssh_authorized_keys)
            fill in only what it does not set (a user of the same name in its C(users) is left as
            it is); C(packages), C(runcmd), C(write_files), C(mounts) and C(bootcmd) are joined,
            its entries first.
          - It is not hidden from logs; keep secrets in O(cloud_init.password_hash).
        type: raw
      packages: {description: Packages to install on first boot (cloud-init C(packages))., type: list, elements: str}
      runcmd:
        description: Commands to run on first boot (cloud-init C(runcmd)), each a string or an argv list.
        type: list
        elements: raw
      write_files:
        description: Files to write on first boot (cloud-init C(write_files)), each with an absolute C(path).
        type: list
        elements: dict
      mounts:
        description: fstab entries (cloud-init C(mounts)), each a list of 2 to 6 fields.
        type: list
        elements: list
      data_disk_mount:
        description:
          - Mount the VM's data disk here (such as V(/data)). At every boot, before the mounts,
            the disk is formatted ext4 with the label C(gpuvirt-data) only when C(blkid -p) finds
            no signature on it and its first MiB is zeros, so a data disk kept across a
            re-creation is never formatted.
          - Needs a data disk (O(data_disk_size)).
        type: str
      network_config:
        description:
          - cloud-init network configuration, version 1 or 2 (netplan-like), written as the
            seed's C(network-config); for several NICs and static addresses. Match NICs by their
            MACs (RV(vm.macs)), which stay the same across re-creation.
          - Without it the image's own default applies (DHCP on the first NIC on most images).
        type: dict
  cpu_policy:
    description: V(dedicated) pins vCPUs 1:1 to host CPUs no other VM holds; V(shared) lets them
      float over the node's unreserved CPUs. When not set, V(dedicated) for a new VM.
    type: str
    choices: [dedicated, shared]
  hugepages:
    description: Back memory with hugepages reserved on the VM's NUMA nodes. When not set,
      V(false) for a new VM.
    type: bool
  cpu_mode:
    description:
      - The guest CPU model mode. When not set, V(host-passthrough), or V(maximum) with
        O(domain_type=qemu) (TCG cannot pass the host CPU through).
    type: str
    choices: [host-passthrough, host-model, maximum]
  cpu_disable_features:
    description: CPU features to hide from the guest (for example V(arch-capabilities) on hosts
      whose KVM cannot virtualise that MSR). When not set, none for a new VM.
    type: list
    elements: str
  domain_type:
    description: V(kvm) on real hosts; V(qemu) runs the guest under TCG emulation. When not
      set, V(kvm) for a new VM.
    type: str
    choices: [kvm, qemu]
  firmware:
    description:
      - V(ovmf) boots with UEFI, V(bios) with SeaBIOS. When not set, V(ovmf) for a new VM with
        GPUs (multi-GPU guests with large BARs need it), V(bios) for a new VM without; an
        existing VM keeps its own.
      - A GPU VM gets OVMF's 64-bit PCI window size (C(opt/ovmf/X-PciMmio64Mb), through fw_cfg
        as a QEMU argument, since libvirt reserves that name) and, whatever the CPU mode, a
        guest physical address width (C(<maxphysaddr mode='emulate' bits='N'/>)) that covers
        its RAM and that window, never more than the host CPU's; a VM whose RAM and BARs need
        more bits than the host has is refused.
    type: str
    choices: [bios, ovmf]
  force:
    description: Power the VM off when an ACPI shutdown does not finish within O(timeout).
    type: bool
    default: false
  timeout:
    description: Seconds to wait for a state transition (ACPI shutdown).
    type: int
    default: 120
  remove_data:
    description: With O(state=absent), also delete the data disk. Only valid with V(absent).
    type: bool
    default: false
  recreate:
    description:
      - Allow a change of GPU count, O(gpu_index), O(gpu_model) or O(image) on a running VM (it
        is stopped, re-placed or moved, and started again).
      - With O(state=running) or V(present), a VM that holds a GPU in O(unhealthy_gpus) or one
        whose health failed, or an NVSwitch whose health failed (C(docs/health.md)), is
        re-placed on healthy devices where a block is free (a running VM is stopped and started
        again); else it keeps them.
      - A VM that holds a device whose health failed is not started (the error names the
        device), with or without O(recreate).
    type: bool
    default: false
  owner_tag:
    description: A free-form tag recorded in the VM's metadata (a tenant or team). When not
      set, an existing VM keeps its tag.
    type: str
"""

EXAMPLES = r"""
- name: A 4-GPU VM from the default dgx-os image, running
  gpuvirt.kvm.kvm_vm:
    name: train-a
    gpus: 4
    image: dgx-os
    data_disk_size: 500GiB
    cloud_init:
      user: ubuntu
      ssh_authorized_keys: ["{{ lookup('ansible.builtin.file', '~/.ssh/id_ed25519.pub') }}"]

- name: nvidia-vm style exact placement on GPUs 8-15
  gpuvirt.kvm.kvm_vm:
    name: train-b
    gpus: 8
    gpu_index: 8
    image: dgx-os-6.2

- name: Stop it, powering it off if the guest ignores ACPI for 5 minutes
  gpuvirt.kvm.kvm_vm:
    name: train-b
    state: stopped
    timeout: 300
    force: true

- name: Grow train-a's data disk to 1 TiB while it runs (its other settings stay as they are)
  gpuvirt.kvm.kvm_vm:
    name: train-a
    data_disk_size: 1TiB

- name: Remove it; its data disk stays (the result says where)
  gpuvirt.kvm.kvm_vm:
    name: train-a
    state: absent
    force: true
"""

RETURN = r"""
vm:
  description: The VM as it is after the run (as it would be, in check mode).
  returned: success
  type: dict
  contains:
    name:
      description: Domain name.
      type: str
      sample: train-a
    state:
      description: Power state (V(running), V(shutoff), and so on), or V(absent).
      type: str
      sample: running
    gpus:
      description: GPU PCI addresses.
      type: list
      elements: str
      sample: ["0000:34:00.0"]
    gpu_indexes:
      description: GPU indexes, in PCI bus order.
      type: list
      elements: int
      sample: [0]
    nvswitches:
      description: NVSwitch PCI addresses passed through with the GPUs.
      type: list
      elements: str
    nics:
      description: Rail NIC functions or VFs passed through with the GPUs (O(nics)).
      type: list
      elements: str
      version_added: 0.2.0
    fm_partition:
      description:
        - With O(fabric_manager) on a shared-NVSwitch platform, the Fabric Manager partition
          made of exactly the VM's GPUs (C(id)), and whether FM had it active when this run read
          its list (C(active)); V(null) for a VM without GPUs. The VM records it in its domain
          metadata, where the collection's libvirt hook finds it (C(docs/fabric.md)).
        - C(id) is V(null), with C(why), when the VM holds GPUs that make no partition FM lists
          (placed before O(fabric_manager) was set); O(recreate) re-places it on one.
      type: dict
      returned: when O(fabric_manager) is set on a shared-NVSwitch platform
      version_added: 0.2.0
      sample: {id: 3, active: false}
    cpus:
      description: Host CPUs of vCPU 0, 1 and so on (dedicated), or the floating set (shared).
      type: list
      elements: int
    emulator_cpus:
      description: Host CPUs of QEMU's emulator and I/O threads.
      type: list
      elements: int
    numa_nodes:
      description: Host NUMA nodes holding the VM's CPUs and memory.
      type: list
      elements: int
    vcpus:
      description: vCPU count.
      type: int
    memory_mb:
      description: Memory in MiB.
      type: int
    disks:
      description: Disks, each with role (V(os), V(data) or V(seed)), path, format and backing image.
      type: list
      elements: dict
    macs:
      description: MAC addresses of the NICs, in order.
      type: list
      elements: str
    spec:
      description: The whole semantic description compared between runs.
      type: dict
    xml:
      description: The domain XML this run defined or, in check mode, would define.
      type: str
actions:
  description: What was done (or would be, in check mode), in order.
  returned: always
  type: list
  elements: str
  sample: ["create OS disk overlay /var/lib/gpuvirt/disks/train-a-os.qcow2 on ...", "define train-a", "start train-a"]
reboot_required:
  description: The definition changed while the VM ran; the change applies at its next boot.
  returned: success
  type: bool
kept_data_disks:
  description: Data disks left in place by O(state=absent) (delete them with O(remove_data=true)).
  returned: success
  type: list
  elements: str
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
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_apply import converge_module
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_request import (
    VmError,
    request_from_params,
    vm_argspec,
)


def main():
    argument_spec = vm_argspec()
    argument_spec.update(
        store=dict(type="path", default=DEFAULT_STORE),
        disk_dir=dict(type="path", default=DEFAULT_DISK_DIR),
    )
    argument_spec.update(host_argspec())
    argument_spec.update(libvirt_argspec())
    argument_spec.update(lock_argspec())
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    try:
        request = request_from_params(module.params)
    except VmError as exc:
        module.fail_json(msg=str(exc))
    result = converge_module(module, [request], "kvm_vm %s" % request.name)[0]
    result.pop("applied")
    result.pop("held")
    if result.get("error"):
        module.fail_json(msg=result["error"], changed=result["changed"],
                         actions=result["actions"])
    module.exit_json(**result)


if __name__ == "__main__":
    main()

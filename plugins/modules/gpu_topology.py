#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: gpu_topology
short_description: Discover a GPU server's topology and plan GPU VMs on it
version_added: 0.1.0
description:
  - Reads the host's PCI devices, IOMMU groups, NUMA nodes and CPUs from sysfs, recognises
    GPUs and NVSwitches by PCI class and an allow-list of device IDs, and detects the platform
    (DGX-2, DGX/HGX A100, DGX/HGX H100/H200, or a generic PCIe server).
  - Reads which GPUs, NVSwitches and CPUs the defined libvirt domains (running or not) already
    hold, when libvirt at O(uri) can be reached.
  - Reports whether the host is ready for passthrough (IOMMU, kernel arguments, vfio-pci
    binding) and what to do where it is not.
  - Optionally plans a list of VM requests on the host without changing anything, the way
    M(gpuvirt.kvm.kvm_vm) would place them.
  - Reports the host's stack (RV(versions)) - the collection, kernel, libvirt, QEMU, OVMF, NVIDIA
    driver and Fabric Manager versions - as C(nvidia-vm version show) did.
  - Never changes the host.
author:
  - gpuvirt.kvm contributors (@gpuvirt)
extends_documentation_fragment:
  - gpuvirt.kvm.host
  - gpuvirt.kvm.host.LIBVIRT
  - gpuvirt.kvm.bytecode
attributes:
  check_mode:
    support: full
    description: The module never changes anything, so check mode runs it unchanged.
  diff_mode:
    support: none
    description: Nothing changes, so there is nothing to diff.
  idempotent:
    support: full
    description: Read-only; it always returns RV(ignore:changed=false).
options:
  plan:
    description:
      - VM requests to place on this host, jointly and largest first, as
        M(gpuvirt.kvm.kvm_layout) would. Nothing is created.
      - Each request is placed or gets an C(error) that says why; one failing request does not
        stop the others.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: The VM's name. Names must be unique within the plan.
        type: str
        required: true
      gpus:
        description:
          - How many GPUs. V(0) makes a CPU-only VM.
          - On a partitioned platform the allowed counts are its partition sizes (for example
            1, 2, 4, 8 and 16 on a DGX-2).
        type: int
        default: 0
      gpu_index:
        description:
          - Exact placement as C(nvidia-vm create --gpu-index) took it, the lowest GPU index
            (PCI bus order) of the block. It must start a partition of size O(plan[].gpus).
        type: int
      gpu_model:
        description:
          - The GPU model to place on (a name of RV(gpus[].model) or a PCI ID such as
            V(10de:26b9)), or V(any) to let one VM have GPUs of several models. By default a
            VM gets GPUs of one model. See M(gpuvirt.kvm.kvm_vm).
        type: str
        version_added: 0.2.0
      nics:
        description:
          - Rail NICs, as M(gpuvirt.kvm.kvm_vm)'s O(gpuvirt.kvm.kvm_vm#module:nics) takes them -
            V(auto), a number, or V(0).
        type: raw
        default: 0
        version_added: 0.2.0
      nic_mode:
        description: V(auto), V(whole) or V(vf), as M(gpuvirt.kvm.kvm_vm) takes it.
        type: str
        choices: [auto, whole, vf]
        default: auto
        version_added: 0.2.0
      nics_allow_fewer:
        description: Take fewer rail NICs than asked when fewer are free.
        type: bool
        default: false
        version_added: 0.2.0
      vcpus:
        description: vCPUs. By default the platform template for the GPU count, else the
          GPUs' share of their NUMA nodes' unreserved CPUs.
        type: int
      memory:
        description: Memory in MiB, or a string with a unit such as V(64GiB). By default the
          template size.
        type: raw
      cpu_policy:
        description:
          - V(dedicated) pins each vCPU to its own host CPU that no other VM holds, thread
            siblings together.
          - V(shared) lets the vCPUs float over the unreserved CPUs of the VM's NUMA nodes.
        type: str
        choices: [dedicated, shared]
        default: dedicated
      hugepages:
        description: Back the memory with hugepages reserved on the VM's NUMA nodes.
        type: bool
        default: false
notes:
  - GPUs are indexed in PCI bus order, as C(nvidia-smi) and C(nvidia-vm) index them.
  - Allocations live in libvirt's domain XML; there is no other state to drift.
"""

EXAMPLES = r"""
- name: Read this host's topology and readiness
  gpuvirt.kvm.gpu_topology:
  register: topo

- name: Fail early when the host is not ready for passthrough
  ansible.builtin.assert:
    that: topo.readiness.ready
    fail_msg: "{{ topo.readiness.actions }}"

- name: Plan a mixed day of tenants on a DGX-2 without creating anything
  gpuvirt.kvm.gpu_topology:
    platform: dgx2
    plan:
      - {name: train-a, gpus: 8}
      - {name: train-b, gpus: 4}
      - {name: dev-c, gpus: 2}
      - {name: dev-d, gpus: 1, memory: 64GiB}
      - {name: dev-e, gpus: 1, gpu_index: 15}
  register: day

- name: Show the allocation map
  ansible.builtin.debug:
    msg: "{{ day.allocation_map }}"

- name: Keep a GPU with a double-bit ECC error out of every plan
  gpuvirt.kvm.gpu_topology:
    unhealthy_gpus: ["0000:b7:00.0"]
    nvidia_smi_topo: "{{ lookup('ansible.builtin.file', 'topo-' ~ inventory_hostname ~ '.txt') }}"
"""

RETURN = r"""
platform:
  description: The platform whose rules apply, and how it was chosen.
  returned: success
  type: dict
  contains:
    name: {description: Platform name., type: str, sample: dgx2}
    description: {description: What it is., type: str, sample: "NVIDIA DGX-2 / HGX-2 (16 V100, 12 NVSwitch)"}
    reason: {description: Why this platform was chosen., type: str, sample: "16 GPUs 10de:1db8 and 12 NVSwitches 10de:1ac2 match dgx2"}
    fabric:
      description: How NVSwitches are shared, V(full_passthrough), V(shared_nvswitch) or V(none).
      type: str
      sample: full_passthrough
    allowed_sizes: {description: GPU counts a VM may have., type: list, elements: int, sample: [1, 2, 4, 8, 16]}
    module_ids:
      description:
        - GPU address -> Fabric Manager module ID, as the platform file gives it (C(module_ids));
          empty for the built-in platforms. The host record's map is not included.
      type: dict
      sample: {"0000:1b:00.0": 5}
      version_added: 0.2.0
    nvswitch_driver:
      description:
        - The host driver that owns the NVSwitches in V(shared_nvswitch) mode, from the platform
          file (C(nvswitch_driver)); V(nvidia) unless a file of stand-in switches names another.
      type: str
      sample: nvidia
      version_added: 0.2.0
gpus:
  description:
    - Every GPU found, in PCI bus order - every NVIDIA function of class 3D controller or VGA
      (its audio and USB functions are not GPUs), of a model the collection names or not.
    - The index is what O(plan[].gpu_index) and M(gpuvirt.kvm.kvm_vm)'s C(gpu_index) count.
  returned: success
  type: list
  elements: dict
  contains:
    index: {description: The GPU's index (PCI bus order among the platform's GPUs)., type: int}
    bdf: {description: Its PCI address., type: str}
    id:
      description: Its PCI vendor and device ID, as C(lspci -n) prints them.
      type: str
      sample: 10de:26b9
    model:
      description:
        - The model, as O(plan[].gpu_model) and M(gpuvirt.kvm.kvm_vm)'s C(gpu_model) take it, or
          V(unknown vvvv:dddd) for a model the collection does not name (it is a GPU all the same,
          and a warning says so).
      type: str
      sample: L40S
    physical_id:
      description:
        - Fabric Manager's ID of the GPU (the module ID on H100 and later). With
          O(fabric_manager), the one the host record or platform file gives, else the platform
          table's.
      type: int
    busy:
      description:
        - With O(fabric_manager), why no new VM may get the GPU now, whether or not a domain
          holds it, such as C(in active FM partition 3 (GPU modules 1, 3)). Else V(null).
      type: str
      version_added: 0.2.0
    rail_nics:
      description:
        - The offered rail NICs (RV(nics)) that serve this GPU, in PCI order; empty when none.
      type: list
      elements: str
      version_added: 0.2.0
    healthy:
      description:
        - False when the GPU is in O(unhealthy_gpus) or its C(health) is V(failed); such a GPU is
          never placed.
      type: bool
    missing:
      description:
        - True for a GPU (or NVSwitch) that the host record's slots name and that is gone from
          the bus - a degraded platform keeps its index (C(docs/health.md)).
      type: bool
      version_added: 0.2.0
    health:
      description:
        - The GPU's health as this host reads it from sysfs now (C(docs/health.md)) -
          C(state) (V(ok), V(degraded) or V(failed)) and C(signals), each with C(source)
          (V(pci), V(power), V(aer) or V(link); on a shared-NVSwitch host also V(sxid), an
          NVSwitch's SXid lines in the kernel log, and with O(fabric_manager)
          V(fabric-manager), the NVLink failures Fabric Manager reports), C(state) and
          C(reason).
        - V(failed) - gone from the bus, config space all ones, power state C(error), fatal
          AER errors, link down, a fatal SXid. V(degraded) - non-fatal AER errors, more
          correctable ones than O(aer_correctable_threshold), a link narrower or slower than it
          can train, a non-fatal SXid, NVLinks Fabric Manager reports as failed.
      type: dict
      version_added: 0.2.0
      sample: {state: degraded, signals: [{source: link, state: degraded,
               reason: "0000:34:00.0's link trained at x8 of x16"}]}
  sample:
    - {index: 0, bdf: "0000:34:00.0", id: "10de:1db8", model: Tesla V100-SXM3-32GB, numa_node: 0,
       iommu_group: 40, iommu_group_members: ["0000:34:00.0"], driver: vfio-pci,
       pcie_path: ["0000:2e:00.0", "0000:2f:00.0", "0000:30:00.0", "0000:31:00.0", "0000:32:00.0"],
       host_bridge: "pci0000:2e", allocated_to: train-a, healthy: true, busy: null,
       mmio64_mb: 32768, physical_id: 1}
fabric:
  description:
    - Fabric Manager's partitions as C(fmpm -l) listed them, in this host's terms.
  returned: when O(fabric_manager) is set on a shared-NVSwitch platform
  type: dict
  version_added: 0.2.0
  contains:
    address: {description: FM's address., type: str, sample: 127.0.0.1}
    partitions:
      description: Each partition FM lists whose GPUs are all on this host.
      type: list
      elements: dict
      sample:
        - {id: 3, active: true, modules: [1, 3], gpu_indexes: [4, 5],
           gpus: ["0000:9d:00.0", "0000:c3:00.0"], nvlinks_per_gpu: 18, placeable: true,
           why_not: null}
    foreign_partitions:
      description: IDs of partitions that name a GPU module this host does not have (left out).
      type: list
      elements: int
    failed_elsewhere:
      description: NVLink-failed GPUs FM names that are not this host's GPUs.
      type: list
      elements: str
fabric_devices:
  description:
    - The functions a Fabric Manager service VM gets besides the NVSwitches - the platform's
      C(extra_passthrough_ids) found on this host, bridges left out (HGX H100's Switchtec
      management endpoint, 11f8:4128 class 0580). Each has the keys of RV(nvswitches) but
      C(index), and C(why), the platform's reason.
  returned: success
  type: list
  elements: dict
  version_added: 0.2.0
nics:
  description:
    - Every NIC physical function of a model the collection offers (ConnectX-4 to ConnectX-8,
      BlueField's ConnectX functions; PCI class Ethernet or InfiniBand), PCI bus order, with its
      SR-IOV VFs. The networking guide (docs/networking.md) says how rails are found.
  returned: success
  type: list
  elements: dict
  version_added: 0.2.0
  contains:
    bdf: {description: Its PCI address., type: str}
    model: {description: The model (pci.ids name)., type: str, sample: ConnectX-7}
    link_layer:
      description: V(InfiniBand) or V(Ethernet), as its RDMA port, its interface or its class says.
      type: str
    netdevs: {description: Its network interfaces., type: list, elements: str}
    rdma_devices: {description: Its RDMA devices., type: list, elements: str, sample: [mlx5_0]}
    sriov:
      description:
        - V(null) without SR-IOV; else C(totalvfs), C(numvfs), C(offset) and C(stride) (where
          VF n sits - routing ID of the PF + offset + n * stride) and C(vfs) (each VF's C(bdf),
          C(id), C(iommu_group), C(driver) and C(allocated_to)).
      type: dict
    rail_gpus:
      description:
        - The GPUs this NIC serves - the nearest ones when it shares a PCIe switch with them
          (C(PIX) or C(PXB)), shared out in PCI order among NICs that are equally near. Empty for
          a NIC beside no GPU.
      type: list
      elements: str
    rail_link:
      description: C(PIX) or C(PXB) to RV(nics[].rail_gpus); V(null) for no rail.
      type: str
    host_use:
      description:
        - Why the host keeps this NIC (a route through one of its interfaces, or an interface
          enslaved to a bond or a bridge), or V(null). A NIC the host uses is never offered.
      type: str
    offered: {description: Whether VMs may get it (a rail the host does not use)., type: bool}
    allocated_to:
      description: The domain that holds the function, or V(null).
      type: str
  sample:
    - {bdf: "0000:35:00.0", id: "15b3:1017", model: ConnectX-5, numa_node: 0, iommu_group: 41,
       iommu_group_members: ["0000:35:00.0"], driver: mlx5_core,
       pcie_path: ["0000:2e:00.0", "0000:2f:00.0", "0000:30:00.0", "0000:32:00.0", "0000:33:04.0"],
       host_bridge: "pci0000:2e", link_layer: InfiniBand, netdevs: [ibp53s0],
       rdma_devices: [mlx5_0],
       sriov: {totalvfs: 8, numvfs: 2, offset: 1, stride: 1, vfs: [{bdf: "0000:35:00.1", id: "15b3:1018", iommu_group: 42,
               driver: null, allocated_to: null}]},
       rail_gpus: ["0000:34:00.0", "0000:36:00.0"], rail_link: PIX, host_use: null, offered: true,
       allocated_to: null}
nvswitches:
  description:
    - Every NVSwitch found, in PCI bus order, with the same keys as RV(gpus) (C(health) and
      C(healthy) too - no VM is given a block that needs a switch whose health failed).
  returned: success
  type: list
  elements: dict
numa_nodes:
  description: NUMA nodes with their CPUs, memory and hugepages.
  returned: success
  type: list
  elements: dict
  sample:
    - {id: 0, cpus: "0-23,48-71", reserved_cpus: "0,48", memory_mb: 773784, memory_free_mb: 770000,
       hugepages: {"2048": {total: 0, free: 0}, "1048576": {total: 0, free: 0}}}
free_blocks:
  description: Free healthy GPUs as the largest placeable blocks, by size.
  returned: success
  type: dict
  sample: {"8": 1, "4": 1}
free_blocks_after_plan:
  description: RV(free_blocks) as it would be once every placed request of O(plan) holds its
    devices.
  returned: when O(plan) is given
  type: dict
  sample: {"4": 1}
allocations:
  description: What the defined libvirt domains hold (empty when libvirt was not reached).
  returned: success
  type: list
  elements: dict
  sample:
    - {name: train-a, active: true, managed: true, gpus: ["0000:34:00.0"], nvswitches: [], nics: [], extra_nics: [], other_hostdevs: [],
       cpus: "2-3,50-51", numa_nodes: [0], memory_mb: 65536, cpu_policy: dedicated, owner_tag: null,
       fm_partition: null}
  contains:
    fm_partition:
      description:
        - The Fabric Manager partition the domain's definition records for the libvirt hook
          (M(gpuvirt.kvm.kvm_vm) records one when it places GPUs with O(fabric_manager) set),
          else V(null). With O(fabric_manager), a running domain whose partition FM does not
          have active gets a warning (no NVLink).
      type: int
      version_added: 0.2.0
    nics:
      description: The NIC functions and VFs of RV(nics) the domain holds (also in C(other_hostdevs)).
      type: list
      elements: str
      version_added: 0.2.0
    extra_nics:
      description:
        - Those of RV(allocations[].nics) that placement did not give the domain (its metadata
          does not record them - attached by hand, or in a GPU's IOMMU group). They count as
          taken; a new placement of the VM leaves them where they are.
      type: list
      elements: str
      version_added: 0.2.0
placement_state:
  description:
    - What the P(gpuvirt.kvm.fleet_plan#filter) filter needs besides RV(platform), RV(gpus),
      RV(nvswitches), RV(numa_nodes) and RV(allocations) to rebuild this host's placement state
      on the controller exactly as this module built it here. Pass the whole registered result to
      the filter; this part is not meant to be read by hand.
  returned: success
  type: dict
  version_added: 0.2.0
  contains:
    format:
      description: Version of this layout (the filter refuses others; 2 added RV(placement_state.nics)).
      type: int
      sample: 2
    platform:
      description:
        - V(null) for a built-in platform (RV(platform.name) names it); the platform's data in the
          platform file format when it came from a file, so that the file on this host is not
          needed on the controller.
      type: dict
    cpu_siblings:
      description: Thread sibling groups of more than one CPU (cores), as CPU lists.
      type: list
      elements: str
      sample: ["0,48", "1,49"]
    reserved_memory_mb:
      description: Memory per NUMA node kept from VMs (O(reserved_memory_mb) or its default).
      type: dict
      sample: {"0": 38689, "1": 38689}
    nvlinks:
      description: NVLinks per GPU index pair from O(nvidia_smi_topo), as [a, b, count].
      type: list
      elements: list
      sample: [[0, 1, 6]]
    nics:
      description:
        - Every rail NIC of RV(nics) as placement reads it - its rail GPUs and link, why the host
          keeps it, its SR-IOV VFs and those no VM can have (the host uses them, or they share
          an IOMMU group with other endpoints), so that the planner chooses rails as the host
          would.
      type: list
      elements: dict
      version_added: 0.2.0
    gpu_group_nics:
      description:
        - GPU address -> the NIC functions in its IOMMU group (a board without ACS between
          them), which a VM gets with the GPU; empty on boards with ACS.
      type: dict
      version_added: 0.2.0
versions:
  description:
    - The host's stack, as C(nvidia-vm version show) printed it. Each value is a version string,
      or V(null) where the part is not there or cannot be read.
    - The package versions come from C(dpkg-query), else C(rpm), of the host the module runs on.
  returned: success
  type: dict
  version_added: 0.2.0
  contains:
    collection: {description: This collection's version., type: str, sample: 0.1.0}
    kernel:
      description: The running kernel, as C(uname -r) prints it (from O(proc_root)).
      type: str
      sample: 5.15.0-1042-nvidia
    libvirt: {description: The libvirt daemon's version at O(uri)., type: str, sample: 9.0.0}
    qemu: {description: The QEMU version libvirt at O(uri) drives., type: str, sample: 7.2.12}
    ovmf:
      description: The installed OVMF package (C(ovmf) on Debian and Ubuntu, C(edk2-ovmf) on
        RHEL).
      type: str
      sample: 2022.11-6+deb12u2
    nvidia_driver:
      description: The NVIDIA driver, the loaded module's version (C(/sys/module/nvidia/version)
        under O(sysfs_root)) while it is loaded, else the installed driver package's version.
      type: str
      sample: 570.133.20
    nvidia_driver_loaded: {description: Whether the nvidia module is loaded., type: bool}
    fabric_manager:
      description: The installed Fabric Manager package (C(nvidia-fabricmanager-BRANCH) or
        C(nvidia-fabric-manager)).
      type: str
      sample: 570.133.20-1
libvirt:
  description: Whether allocations could be read from libvirt, and if not, why.
  returned: success
  type: dict
  sample: {uri: "qemu:///system", reachable: false, error: "cannot connect to libvirt ..."}
readiness:
  description: Whether the host can pass its GPUs through, and what to do where it cannot.
  returned: success
  type: dict
  contains:
    ready: {description: Everything below is in order., type: bool}
    iommu_enabled: {description: The kernel made IOMMU groups., type: bool}
    kernel_args: {description: Wanted kernel arguments and whether each is present., type: dict}
    not_on_vfio:
      description: GPUs and NVSwitches bound to another driver (or none), with that driver.
      type: list
      elements: dict
    shared_groups:
      description: IOMMU groups that hold a GPU or NVSwitch together with other endpoint
        devices, which would be passed through with it.
      type: list
      elements: dict
    actions: {description: "What to do, one line each.", type: list, elements: str}
    gpudirect_rdma:
      description:
        - Per rail NIC of RV(nics) (informational; V(ready) does not count it), what GPUDirect
          RDMA between it and its GPUs needs once both are passed through, read from PCI config
          space past 256 bytes (run as root; else C(unknown)).
        - C(ats) maps the NIC and each GPU to C(enabled), C(present) (the capability, not
          enabled now), C(absent) or C(unknown).
        - C(ports) lists the switch ports between them with their ACS control bits (C(RR CR DT))
          and C(redirects_p2p) (Request Redirect without Direct Translated P2P sends every
          peer-to-peer request up to the root complex).
        - C(ready) and C(why), one line per thing to change (docs/networking.md).
      type: list
      elements: dict
      version_added: 0.2.0
      sample:
        - {nic: "0000:18:00.0", gpus: ["0000:1b:00.0"],
           ats: {"0000:18:00.0": enabled, "0000:1b:00.0": enabled},
           ports: [{bdf: "0000:17:00.0", acs: RR CR DT, redirects_p2p: false}],
           ready: true, why: []}
plan:
  description: One entry per O(plan) request, in the order given.
  returned: success
  type: list
  elements: dict
  sample:
    - {name: train-a, gpus: ["0000:34:00.0"], gpu_indexes: [0], nvswitches: [], numa_nodes: [0],
       cpus: [2, 50, 3, 51], emulator_cpus: [0, 48], vcpus: 4, memory_mb: 65536}
    - {name: too-big, error: "request 'too-big' (16 GPUs): no free 16-GPU block: ..."}
  contains:
    fm_partition:
      description: On a shared-NVSwitch platform, the Fabric Manager partition made of exactly
        the entry's GPUs (the one to activate), else V(null).
      type: int
    nics:
      description:
        - The rail NIC functions or VFs the entry would get (O(plan[].nics)).
      type: list
      elements: str
      version_added: 0.2.0
allocation_map:
  description: The allocations and the plan as readable lines, GPU by GPU. A GPU or NVSwitch
    held by a domain reads C(NAME (running)) or C(NAME (defined)) (defined, not running), one
    that a request of O(plan) would take C(NAME (planned)), else C(free).
    With O(fabric_manager), a line per active Fabric Manager partition
    (C(FM partition 3  GPU 4-5 -> active, NAME (running))) and per partition that cannot be
    placed, with why.
    A line per NIC of RV(nics), with the GPUs it is the rail of and its holder, or C(host) and
    why the host keeps it (C(NIC 0000:35:00.0 mlx5_0 node 0  rail of GPU 0-1 (PIX) -> free)),
    and a line per VF a domain holds.
  returned: success
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

# _bytecode first: it compiles the module_utils imported after it once per run (see there).
from ansible_collections.gpuvirt.kvm.plugins.module_utils import _bytecode  # noqa: F401 pylint: disable=unused-import
from ansible_collections.gpuvirt.kvm.plugins.module_utils._argspec import (
    host_argspec,
    libvirt_argspec,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._deb_packages import installed_versions
from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import DomainXmlError
from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import read_domains
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_context import (
    HostContextError,
    host_context,
    resolve_uri,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_facts import build
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_stack import (
    DPKG_NAMES,
    RPM_NAMES,
    all_names,
    host_stack,
    package_versions,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
    LibvirtGateway,
    LibvirtGatewayError,
    has_libvirt,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import PlacementError
from ansible_collections.gpuvirt.kvm.plugins.module_utils._qemu_img import ImagesError
from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_stack_files
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_request import (
    VmError,
    plan_entry_argspec,
    plan_requests,
)


def _read_domains(module, uri):
    """(every defined domain, libvirt's status, libvirt's and QEMU's versions); no domains and
    no versions, with a warning, when libvirt is out of reach."""
    status = {"uri": uri, "reachable": False, "error": None}
    if not has_libvirt():
        status["error"] = missing_required_lib("libvirt-python")
        module.warn("allocations not read: %s" % status["error"])
        return [], status, (None, None)
    try:
        with LibvirtGateway(uri) as gateway:
            domains = list(read_domains(gateway.list_domains()).values())
            versions = gateway.versions()
    except DomainXmlError as exc:  # a domain that cannot be read may hold any GPU: no plan
        module.fail_json(msg="uri: %s" % exc)
    except LibvirtGatewayError as exc:
        status["error"] = str(exc)
        module.warn("allocations not read (every GPU is shown free): %s" % exc)
        return [], status, (None, None)
    status["reachable"] = True
    return domains, status, versions


def main():
    argument_spec = dict(
        plan=dict(type="list", elements="dict", default=[], options=plan_entry_argspec()),
    )
    argument_spec.update(host_argspec())
    argument_spec.update(libvirt_argspec())
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    p = module.params

    try:
        requests = plan_requests(p["plan"])
        ctx = host_context(p, bridges=False)
    except (VmError, HostContextError) as exc:
        module.fail_json(msg=str(exc))

    if ctx.fabric_error:
        module.fail_json(msg=ctx.fabric_error)
    if ctx.health_record_error and requests:
        module.fail_json(msg="plan: %s" % ctx.health_record_error)
    domains, libvirt_status, libvirt_versions = _read_domains(module, resolve_uri(p["uri"]))
    try:
        result = build(
            ctx.topology, ctx.platform, ctx.platform_reason, domains, requests,
            reserved_cpus=ctx.reserved_cpus, reserved_memory_mb=ctx.reserved_memory_mb,
            unhealthy_gpus=ctx.unhealthy_gpus, nvlinks=ctx.nvlinks, busy_gpus=ctx.busy_gpus,
            fabric=ctx.fabric, health=ctx.health,
        )
    except PlacementError as exc:  # a host-wide setting (reserved_cpus, unhealthy_gpus) is bad
        module.fail_json(msg=str(exc))
    for warning in ctx.warnings + result.pop("warnings"):
        module.warn(warning)
    kernel, loaded_driver = read_stack_files(p["sysfs_root"], p["proc_root"])
    try:
        manager, installed = installed_versions(all_names(DPKG_NAMES), all_names(RPM_NAMES))
    except ImagesError as exc:  # the report goes on without the package versions
        module.warn("versions: cannot ask the package manager: %s" % exc)
        manager, installed = None, {}
    versions = host_stack(kernel, loaded_driver, libvirt_versions,
                          package_versions(manager, installed))
    module.exit_json(changed=False, libvirt=libvirt_status, versions=versions, **result)


if __name__ == "__main__":
    main()

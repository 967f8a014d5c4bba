# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment:
    # Options shared by every module that reads the host's topology and places VMs on it.
    DOCUMENTATION = r"""
options:
  sysfs_root:
    description:
      - Where sysfs is mounted. Topology (PCI devices, IOMMU groups, NUMA nodes, CPUs) is read
        from here.
      - Point it at a tree laid out like C(/sys) to plan against another host's topology, for
        example one of the fixture hosts that C(tests/fixtures/sysfs_builder.py) writes.
      - On a shared-NVSwitch platform the kernel log is read from C(dev/kmsg) beside it
        (C(/dev/kmsg) for C(/sys)) for the NVSwitches' SXid errors (C(docs/health.md)); a log
        that cannot be read is a warning.
    type: path
    default: /sys
  proc_root:
    description:
      - Where procfs is mounted. The kernel command line is read from C(cmdline) below it.
    type: path
    default: /proc
  platform:
    description:
      - The platform whose partition rules, NVSwitch rules and template sizes apply.
      - V(auto) detects it from the GPUs and NVSwitches found (their PCI IDs and counts), and
        falls back to V(generic).
      - A name (V(dgx2), V(dgx-a100), V(dgx-h100), V(hgx-b200), V(generic)), or the path of a
        YAML or JSON file that describes a platform with the same fields (see the platforms
        guide in C(docs/platforms.md)).
    type: str
    default: auto
  nvidia_smi_topo:
    description:
      - The text that C(nvidia-smi topo -m) printed on this host while its GPUs were on the
        NVIDIA driver. NVLink counts from it refine placement on hosts without a partition
        table (V(generic)). Malformed text is an error.
    type: str
  unhealthy_gpus:
    description:
      - PCI addresses (C(0000:34:00.0)) of GPUs that failed a health check (double-bit ECC,
        NVLink training error, unexpected XID). They are never placed, and VMs that already
        hold them are reported.
      - GPUs whose health the host itself reports as failed (see
        O(aer_correctable_threshold) and C(docs/health.md)) are added to these.
    type: list
    elements: str
    default: []
  aer_correctable_threshold:
    description:
      - Every run reads each GPU's and NVSwitch's health from sysfs, as the host sees it while
        they sit on vfio-pci - a function gone from the bus or whose config space reads as all
        ones, a power state of C(error), fatal AER errors and a link that is down make it
        V(failed), and a failed GPU is never placed; non-fatal AER errors, a link trained
        narrower or slower than it can, and more correctable AER errors since boot than this
        number make it V(degraded), which is reported only.
      - A number of errors, 0 or more.
    type: int
    default: 100
  health_record:
    description:
      - The host's health record (written by M(gpuvirt.kvm.gpu_health) and by the
        C(gpuvirt-health) command that M(gpuvirt.kvm.kvm_host) installs). A device an admin
        marked failed there is treated as failed, and the signals an admin cleared there are
        not counted, until they change (C(docs/health.md)).
      - No file is no record. A file that is not a health record is an error, and it is left
        as it is.
    type: path
    default: /var/lib/gpuvirt/health.json
  reserved_cpus:
    description:
      - Host CPUs kept for the host itself and for QEMU's emulator threads, in kernel list
        syntax (C(0,1,48,49) or C(0-1,48-49)). Guests never get them.
      - By default the first core of every NUMA node, with its hyper-thread siblings.
      - An empty string reserves none.
    type: str
  reserved_memory_mb:
    description:
      - MiB of every NUMA node kept for the host. Guests are placed in what is left.
      - By default the larger of 2048 MiB and 5% of the node.
    type: int
  fabric_manager:
    description:
      - On a shared-NVSwitch platform (V(dgx-a100), V(dgx-h100), V(hgx-b200)), the NVIDIA
        Fabric Manager to read partitions from, through C(fmpm) (NVIDIA/Fabric-Manager-Client).
      - When set, the GPU blocks a VM may get are the partitions that C(fmpm -l) lists now (the
        platform's table is not used), GPUs of an active partition are not free, and partitions
        that FM reports with degraded or failed NVLinks are not placed. Every GPU needs its
        module ID, from a platform file's C(module_ids), else from the C(pciBusId) FM gives
        its GPUs (DGX-2, A100; empty on H100 and later), else from O(host_record); without a
        complete map no VM gets new GPUs. See C(docs/fabric.md).
      - When not set on such a platform, the built-in table is used with module IDs assumed in
        PCI order, VMs record no partition, and a warning says that their partitions are then
        never activated.
      - It only reads. M(gpuvirt.kvm.kvm_vm) and M(gpuvirt.kvm.kvm_layout) record each VM's
        partition in its domain metadata, and the collection's libvirt hook activates it when
        the VM starts, which the P(gpuvirt.kvm.kvm_host#role) role installs in
        V(shared_nvswitch) mode together with these settings (C(/etc/gpuvirt/fabric.json),
        which the P(gpuvirt.kvm.gpu_vms#role) role reads by default).
      - When FM cannot be reached or a GPU has no module ID, VMs that keep the GPUs they hold,
        VMs without GPUs and removals still go ahead; a VM that needs GPUs placed fails, and
        M(gpuvirt.kvm.gpu_topology) fails.
    type: dict
    suboptions:
      address:
        description:
          - FM's address (C(fmpm --hostname)); FM in a service VM is reached this way.
          - Not set, fmpm's own default, C(127.0.0.1) (FM on this host).
        type: str
      fmpm:
        description:
          - The C(fmpm) program, a name on E(PATH) or a path.
        type: str
        default: fmpm
      starting_wait:
        description:
          - Seconds to keep asking while FM answers that it is still starting (NOT_CONFIGURED).
        type: int
        default: 120
      service_vm:
        description:
          - The domain that runs FM (FM in a service VM, C(kvm_host_fabric_manager.service_vm)).
          - FM there sees the GPUs at the service VM's own PCI addresses, so the C(pciBusId) it
            gives is never used for the module map; the map comes from a platform file's
            C(module_ids) or from O(host_record).
        type: str
  host_record:
    description:
      - The record the P(gpuvirt.kvm.kvm_host#role) role keeps of the host. With
        O(fabric_manager), its C(fabric) section gives each GPU's Fabric Manager module ID
        (C(module_ids), GPU address -> module ID, as read while the NVIDIA driver still owned the
        GPUs), which the role learns at conversion. It rewrites its record, so do not edit the
        record by hand; give a map in a platform file's C(module_ids) instead.
      - A missing file is no error; a platform file's C(module_ids) then has to name every GPU.
      - Its C(slots) (every GPU's and NVSwitch's address at the first conversion) keep a known
        platform with a device gone from the bus that platform, degraded, when detection
        (O(platform=auto)) alone would call it C(generic) (C(docs/health.md)).
    type: path
    default: /etc/gpuvirt/kvm_host.json
"""

    LIBVIRT = r"""
options:
  uri:
    description:
      - The libvirt connection URI.
      - If not set, the environment variable E(LIBVIRT_DEFAULT_URI) is used, then
        V(qemu:///system).
    type: str
requirements:
  - libvirt-python (C(python3-libvirt) on Debian and Ubuntu) on the managed host
"""

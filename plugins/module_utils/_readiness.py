# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Is a host ready to pass its GPUs through, and what to do where it is not. Private."""

from __future__ import annotations

from ansible_collections.gpuvirt.kvm.plugins.module_utils._topology import PCI_CLASS_BRIDGE_PCI

VFIO_DRIVER = "vfio-pci"

# Functions that may share a GPU's IOMMU group without harm: bridges, and the GPU's own
# audio/USB/serial functions on the same slot (consumer and workstation cards have them).
_HARMLESS_CLASSES = (PCI_CLASS_BRIDGE_PCI,)


def wanted_kernel_args(cpu_vendor):
    """Kernel arguments passthrough needs on this CPU vendor, in the order to add them."""
    if cpu_vendor == "AuthenticAMD":
        return ["amd_iommu=on", "iommu=pt"]
    if cpu_vendor == "GenuineIntel":
        return ["intel_iommu=on", "iommu=pt"]
    return ["intel_iommu=on|amd_iommu=on", "iommu=pt"]


def _has_arg(args, wanted):
    for alternative in wanted.split("|"):
        key, _sep, value = alternative.partition("=")
        if key in args and (args[key] or "").split(",")[0] == value:
            return True
    return False


def assess(topology, gpus, nvswitches):
    """Readiness of the host for passing through the given GPU and NVSwitch devices."""
    args = topology.cmdline_args
    kernel_args = {w: _has_arg(args, w) for w in wanted_kernel_args(topology.cpu_vendor)}
    actions = []
    missing = [w for w, ok in kernel_args.items() if not ok]
    if missing:
        actions.append(
            "add the kernel arguments %s and reboot (the gpuvirt.kvm.kvm_host role does both; "
            "kvm_host_allow_reboot: true lets it reboot)" % " ".join(missing)
        )
    if not topology.iommu_enabled:
        actions.append(
            "the kernel made no IOMMU groups: enable VT-d / AMD-Vi in the firmware, keep the "
            "IOMMU kernel arguments, and reboot"
        )
    not_on_vfio = []
    shared_groups = []
    passthrough = {d.bdf for d in list(gpus) + list(nvswitches)}
    seen_groups = set()
    for kind, devices in (("gpu", gpus), ("nvswitch", nvswitches)):
        for dev in devices:
            if dev.missing:  # gone from its slot: nothing to bind (_health reports it)
                continue
            if dev.driver != VFIO_DRIVER:
                not_on_vfio.append({"bdf": dev.bdf, "kind": kind, "driver": dev.driver})
            if dev.iommu_group is None or dev.iommu_group in seen_groups:
                continue
            seen_groups.add(dev.iommu_group)
            others = []
            for member in dev.iommu_group_members:
                if member in passthrough:
                    continue
                info = topology.pci.get(member)
                if info is None or info.pci_class in _HARMLESS_CLASSES:
                    continue
                if info.bdf.rsplit(".", 1)[0] == dev.bdf.rsplit(".", 1)[0]:
                    continue  # another function of the same card
                others.append(member)
            if others:
                shared_groups.append({"iommu_group": dev.iommu_group, "device": dev.bdf,
                                      "also_holds": others})
    if not_on_vfio:
        drivers = sorted({d["driver"] or "no driver" for d in not_on_vfio})
        actions.append(
            "bind %d GPU/NVSwitch function(s) to vfio-pci (now on %s) and keep nouveau and "
            "nvidia off them: the gpuvirt.kvm.kvm_host role does it persistently"
            % (len(not_on_vfio), ", ".join(drivers))
        )
    for group in shared_groups:
        actions.append(
            "IOMMU group %d holds %s together with %s: the whole group would be passed through; "
            "move the card to another slot or enable ACS on the switch above it"
            % (group["iommu_group"], group["device"], ", ".join(group["also_holds"]))
        )
    ready = not actions
    return {
        "ready": ready,
        "iommu_enabled": topology.iommu_enabled,
        "iommu_groups": topology.iommu_groups,
        "kernel_args": kernel_args,
        "not_on_vfio": not_on_vfio,
        "shared_groups": shared_groups,
        "actions": actions,
    }

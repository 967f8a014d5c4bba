# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""gpu_topology's host facts: discovery + what domains hold + placement -> the result. Private.

Pure apart from what it is handed: the module reads the host (``_host_context``) and the
defined domains (``_holdings``), and this file turns those into the returned facts, the
allocation map, and ``placement_state`` (what the fleet planner needs to rebuild the host).
"""

from __future__ import annotations

from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import holdings
from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import (
    classify as classify_nics,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import (
    gpu_rails,
    gpudirect_rdma,
    nic_functions,
    platform_warnings,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement import HostState
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import PlacementError
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
    FABRIC_SHARED_NVSWITCH,
    GPU_IDS,
    GPU_VENDORS,
    NVSWITCH_IDS,
    platform_fabric_devices,
    platform_gpus,
    platform_nvswitches,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._ranges import format_ranges
from ansible_collections.gpuvirt.kvm.plugins.module_utils._readiness import assess


def _pci_entry(dev, model, holders, **first):
    """The keys every reported PCI function has (GPUs, NVSwitches, NICs)."""
    return dict(first, **{
        "bdf": dev.bdf,
        "id": "%04x:%04x" % dev.id_pair,
        "model": model,
        "numa_node": dev.numa_node,
        "iommu_group": dev.iommu_group,
        "iommu_group_members": list(dev.iommu_group_members),
        "driver": dev.driver,
        "pcie_path": list(dev.bridges),
        "host_bridge": dev.host_bridge,
        "allocated_to": holders.get(dev.bdf),
    })


def _device_entries(devices, names, holders, unhealthy, platform=None, busy=None, health=None):
    entries = []
    for index, dev in enumerate(devices):
        # A model the table does not name is reported with its ID ("unknown 10de:2bff").
        entry = _pci_entry(dev, names.get(dev.id_pair) or "unknown %04x:%04x" % dev.id_pair,
                           holders, index=index)
        if health is not None and dev.bdf in health:
            entry["health"] = health[dev.bdf].to_dict()
        entry["missing"] = dev.missing
        if unhealthy is not None:
            entry["healthy"] = dev.bdf not in unhealthy
            entry["busy"] = (busy or {}).get(dev.bdf)
            entry["mmio64_mb"] = dev.mmio64_size // 2 ** 20
            if platform is not None and index < len(platform.physical_ids):
                entry["physical_id"] = platform.physical_ids[index]
        entries.append(entry)
    return entries


def _nic_entries(topology, nics, holders):
    """gpu_topology's nics[]: each allow-listed NIC function, its rail and its VFs."""
    entries = []
    for nic in nics:
        dev = topology.pci[nic.bdf]
        net = topology.nics.get(nic.bdf)
        vfs = []
        for vf_bdf in (net.vfs if net else ()):
            vf = topology.pci.get(vf_bdf)
            vfs.append({
                "bdf": vf_bdf,
                "id": "%04x:%04x" % vf.id_pair if vf else None,
                "iommu_group": vf.iommu_group if vf else None,
                "driver": vf.driver if vf else None,
                "allocated_to": holders.get(vf_bdf),
            })
        entry = _pci_entry(dev, nic.model, holders)
        entry.update({
            "link_layer": net.link_layer if net else None,
            "netdevs": list(net.netdevs) if net else [],
            "rdma_devices": list(net.rdma) if net else [],
            "sriov": None if net is None or net.sriov_totalvfs is None else {
                "totalvfs": net.sriov_totalvfs, "numvfs": net.sriov_numvfs,
                "offset": net.sriov_offset, "stride": net.sriov_stride, "vfs": vfs},
            "rail_gpus": list(nic.rail_gpus),
            "rail_link": nic.rail_link,
            "host_use": nic.host_use,
            "offered": nic.offered,
        })
        entries.append(entry)
    return entries


def placement_entry(request, outcome):
    """One RV(plan) entry: where a request landed, or its error."""
    if isinstance(outcome, PlacementError):
        return {"name": request.name, "gpus_requested": request.gpus, "error": str(outcome)}
    return {
        "name": outcome.name,
        "gpus": list(outcome.gpus),
        "gpu_indexes": list(outcome.gpu_indexes),
        "nvswitches": list(outcome.nvswitches),
        "numa_nodes": list(outcome.numa_nodes),
        "cpus": list(outcome.cpus),
        "cpuset": format_ranges(outcome.cpus),
        "emulator_cpus": list(outcome.emulator_cpus),
        "vcpus": outcome.vcpus,
        "memory_mb": outcome.memory_mb,
        "memory_by_node": {str(k): v for k, v in outcome.memory_by_node.items()},
        "cpu_policy": outcome.cpu_policy,
        "hugepage_kb": outcome.hugepage_kb,
        "fm_partition": outcome.fm_partition,
        "nics": list(outcome.nics),
    }


def build(topology, platform, platform_reason, domains, requests, reserved_cpus=None,
          reserved_memory_mb=None, unhealthy_gpus=(), nvlinks=None, busy_gpus=None,
          fabric=None, health=None):
    """The whole gpu_topology result. Raises PlacementError for bad host-wide settings."""
    gpus = platform_gpus(topology, platform)
    switches = platform_nvswitches(topology, platform)
    unhealthy = set(unhealthy_gpus)
    nics = classify_nics(topology, gpus, platform)
    rail_functions = nic_functions(topology, platform)
    allocations = holdings(domains, [g.bdf for g in gpus], [s.bdf for s in switches],
                           rail_functions)
    failed_switches = [s.bdf for s in switches if health and s.bdf in health
                       and health[s.bdf].failed]
    state = HostState(topology, platform, allocations, reserved_cpus=reserved_cpus,
                      reserved_memory_mb=reserved_memory_mb, unhealthy_gpus=sorted(unhealthy),
                      nvlinks=nvlinks, busy_gpus=busy_gpus, nics=nics,
                      failed_switches=failed_switches)
    before = {"gpus": state.holders(), "free_blocks": state.free_blocks()}
    holders = dict(before["gpus"])
    for dom in allocations:
        for bdf in dom.nvswitches:
            holders[bdf] = dom.name
    outcomes = state.plan(requests) if requests else []
    reserved = set(state.model.reserved)
    for dom in allocations:
        for bdf in tuple(dom.nics) + tuple(dom.extra_nics):
            holders[bdf] = dom.name
    rails_of = gpu_rails(nics)
    extra_nics = {h.name: h.extra_nics for h in allocations}
    result = {
        "platform": {
            "name": platform.name,
            "description": platform.description,
            "reason": platform_reason,
            "fabric": platform.fabric,
            "allowed_sizes": list(platform.allowed_sizes),
            "module_ids": dict(sorted(platform.module_ids.items())),
            "nvswitch_driver": platform.nvswitch_driver,
        },
        "gpus": _device_entries(gpus, GPU_IDS, holders, unhealthy, platform, busy_gpus,
                                health),
        "nvswitches": [dict(e, healthy=e["bdf"] not in failed_switches) for e in
                       _device_entries(switches, NVSWITCH_IDS, holders, None, health=health)],
        "nics": _nic_entries(topology, nics, holders),
        # What a Fabric Manager service VM gets besides the switches (FM in a service VM).
        "fabric_devices": [
            _pci_entry(dev, "%04x:%04x" % dev.id_pair, holders,
                       why=platform.extra_passthrough_ids[dev.id_pair])
            for dev in platform_fabric_devices(topology, platform)],
        "numa_nodes": [
            {
                "id": node.id,
                "cpus": format_ranges(node.cpus),
                "reserved_cpus": format_ranges([c for c in node.cpus if c in reserved]),
                "memory_mb": node.memory_mb,
                "memory_free_mb": node.memory_free_mb,
                "hugepages": {str(size): dict(v) for size, v in node.hugepages.items()},
                "gpus": [g.bdf for g in gpus if g.numa_node == node.id],
            }
            for node in topology.numa_nodes
        ],
        "free_blocks": {str(k): v for k, v in sorted(before["free_blocks"].items(),
                                                     reverse=True)},
        "allocations": [
            {
                "name": dom.name,
                "active": dom.active,
                "managed": dom.managed,
                "gpus": [a for a in dom.hostdevs if a in {g.bdf for g in gpus}],
                "nvswitches": [a for a in dom.hostdevs if a in {s.bdf for s in switches}],
                "nics": [a for a in dom.hostdevs if a in rail_functions],
                "extra_nics": list(extra_nics.get(dom.name, ())),
                "other_hostdevs": [a for a in dom.hostdevs
                                   if a not in {g.bdf for g in gpus} | {s.bdf for s in switches}],
                "cpus": format_ranges(dom.pinned_cpus or dom.cpuset),
                "numa_nodes": list(dom.numa_nodes),
                "memory_mb": dom.memory_kib // 1024,
                "cpu_policy": dom.cpu_policy,
                "owner_tag": (dom.metadata or {}).get("owner_tag"),
                "fm_partition": (dom.metadata or {}).get("fm_partition"),
            }
            for dom in domains
        ],
        "readiness": dict(assess(topology, gpus, switches),
                          gpudirect_rdma=gpudirect_rdma(topology, nics)),
        "placement_state": placement_state(state),
        "plan": [placement_entry(req, out) for req, out in outcomes],
        "warnings": list(state.warnings) + [
            "GPU %s (%04x:%04x) is an NVIDIA GPU of a model this collection does not name; it is "
            "placed as a PCIe GPU of its own model (ask for it with gpu_model: %04x:%04x)" % (
                (g.bdf,) + g.id_pair + g.id_pair)
            for g in gpus if g.id_pair not in GPU_IDS and g.vendor in GPU_VENDORS],
    }
    for gpu in result["gpus"]:
        gpu["rail_nics"] = rails_of.get(gpu["bdf"], [])
    result["warnings"].extend(platform_warnings(topology, gpus, nics, platform))
    if fabric is not None:
        result["warnings"].extend(_fabric_warnings(fabric, domains))
    if fabric is not None:
        result["fabric"] = fabric
    if requests:
        result["free_blocks_after_plan"] = {
            str(k): v for k, v in sorted(state.free_blocks().items(), reverse=True)}
    result["allocation_map"] = allocation_map(result)
    return result


def _fabric_warnings(fabric, domains):
    """Running tenants whose partition FM does not have active (no NVLink), e.g. after an FM
    restart that nobody answered with the list of active partitions."""
    active = {row["id"] for row in fabric["partitions"] if row["active"]}
    return [
        "%s is running, but its Fabric Manager partition %s is not active, so its GPUs have no "
        "NVLink: after a Fabric Manager restart declare the running tenants' partitions again "
        "(fmpm --set-activated-list), or restart the VM" % (dom.name, dom.metadata["fm_partition"])
        for dom in domains
        if dom.active and (dom.metadata or {}).get("fm_partition") is not None
        and dom.metadata["fm_partition"] not in active]


# 2: rail NICs (``nics``, ``gpu_group_nics``) added; the fleet planner refuses facts of format 1,
# which would show every host without rails.
PLACEMENT_STATE_FORMAT = 2


def placement_state(state):
    """What a controller needs besides gpus, nvswitches, numa_nodes and allocations to rebuild
    this host's HostState exactly (the fleet_plan filter): the platform's data when it did not
    come built in (a file on this host), thread siblings, the resolved memory reserve per node,
    the NVLink counts, and the rail NICs as placement reads them (their GPUs, VFs and which of
    those no VM can have: _nics.Nic.to_dict)."""
    m = state.model
    platform = m.platform
    cores = set()
    for cpu in m.topology.cpus.values():
        if len(cpu.siblings) > 1:
            cores.add(tuple(sorted(cpu.siblings)))
    return {
        "format": PLACEMENT_STATE_FORMAT,
        "platform": None if platform.source == "built-in" else platform.to_dict(),
        "cpu_siblings": [format_ranges(core) for core in sorted(cores)],
        "reserved_memory_mb": {str(n): mb for n, mb in sorted(m.reserve_mb.items())},
        "nvlinks": [[a, b, count] for (a, b), count in sorted(m.nvlinks.items()) if count],
        # Only rails count to placement (a NIC beside no GPU is never chosen).
        "nics": [nic.to_dict() for nic in m.nics if nic.rail_gpus],
        # NIC functions in a GPU's IOMMU group (boards without ACS): they go with the GPU.
        "gpu_group_nics": {gpu: list(mates) for gpu, mates in sorted(m.gpu_group_nics.items())},
    }


def allocation_map(result):
    """Readable lines: who holds each GPU and NVSwitch, which CPUs, and what is left free."""
    owner = {}
    for alloc in result["allocations"]:
        for bdf in alloc["gpus"] + alloc["nvswitches"] + alloc.get("nics", []):
            owner[bdf] = "%s (%s)" % (alloc["name"],
                                      "running" if alloc.get("active") else "defined")
    for entry in result["plan"]:
        for bdf in entry.get("gpus", []) + entry.get("nvswitches", []) + entry.get("nics", []):
            owner[bdf] = "%s (planned)" % entry["name"]
    lines = ["platform %s: %s" % (result["platform"]["name"], result["platform"]["reason"])]
    for gpu in result["gpus"]:
        health = _health_words(gpu, " UNHEALTHY" if not gpu.get("healthy", True) else "")
        held = owner.get(gpu["bdf"]) or ("busy: %s" % gpu["busy"] if gpu.get("busy")
                                         else "missing" if gpu.get("missing") else "free")
        lines.append("GPU%-2d %s node %-2s -> %s%s" % (
            gpu["index"], gpu["bdf"], gpu["numa_node"], held, health))
    # Shared NVSwitch: the switches are the host's, for Fabric Manager; never a VM's to take.
    kept = ("host, for Fabric Manager (%s)" % result["platform"].get("nvswitch_driver", "nvidia")
            if result["platform"].get("fabric") == FABRIC_SHARED_NVSWITCH else "free")
    for sw in result["nvswitches"]:
        lines.append("NVSwitch%-2d %s node %-2s -> %s%s" % (
            sw["index"], sw["bdf"], sw["numa_node"], owner.get(sw["bdf"], kept),
            _health_words(sw, "")))
    index_of = {gpu["bdf"]: gpu["index"] for gpu in result["gpus"]}
    for nic in result.get("nics", []):
        lines.append("NIC %s %s node %-2s %s -> %s" % (
            nic["bdf"], ",".join(nic["rdma_devices"] or nic["netdevs"]) or nic["model"],
            nic["numa_node"],
            "rail of %s (%s)" % (_indexes([index_of[g] for g in nic["rail_gpus"]]),
                                 nic["rail_link"]) if nic["rail_gpus"] else "no GPU beside it",
            "host: %s" % nic["host_use"] if nic["host_use"]
            else owner.get(nic["bdf"]) or ("free" if nic["offered"] else "not offered")))
        for vf in (nic["sriov"] or {}).get("vfs", []):
            if vf["bdf"] in owner:
                lines.append("  VF %s -> %s" % (vf["bdf"], owner[vf["bdf"]]))
    for part in (result.get("fabric") or {}).get("partitions", []):
        if part["active"] or not part["placeable"]:
            holders = sorted(set(owner.get(b, "no VM") for b in part["gpus"]))
            lines.append("FM partition %-2d %s -> %s" % (
                part["id"], _indexes(part["gpu_indexes"]),
                "active, %s" % ", ".join(holders) if part["active"]
                else "not placeable: %s" % part["why_not"]))
    for entry in result["plan"]:
        if "error" in entry:
            lines.append("%s: NOT PLACED: %s" % (entry["name"], entry["error"]))
        else:
            lines.append("%s: %d GPU(s) %s, %d vCPUs on host CPUs %s (%s), emulator %s, "
                         "%d MiB on node(s) %s" % (
                             entry["name"], len(entry["gpus"]),
                             _indexes(entry["gpu_indexes"]) or "-", entry["vcpus"],
                             entry["cpuset"], entry["cpu_policy"],
                             format_ranges(entry["emulator_cpus"]) or "-", entry["memory_mb"],
                             ",".join(str(n) for n in entry["numa_nodes"])))
    free = result.get("free_blocks_after_plan", result["free_blocks"])
    lines.append("free blocks: %s" % (", ".join(
        "%d x %s" % (n, size) for size, n in free.items() if n) or "none"))
    return lines


def _health_words(entry, manual):
    """" FAILED: why" / " degraded: why" for a device whose health says so (_health), else
    ``manual`` (" UNHEALTHY" for a GPU the unhealthy_gpus option names)."""
    health = entry.get("health") or {}
    state = health.get("state")
    if state == "degraded" and manual:  # never placed all the same: that comes first
        return manual
    if state in ("failed", "degraded"):
        worst = [s["reason"] for s in health["signals"] if s["state"] == state]
        return " %s: %s" % ("FAILED" if state == "failed" else "degraded", "; ".join(worst))
    return manual


def _indexes(indexes):
    return "GPU " + format_ranges(indexes) if indexes else ""

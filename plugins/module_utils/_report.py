# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""gpu_topology's backend: discovery + allocations + placement -> a result. Private.

Pure apart from what it is handed: the module reads sysfs through _topology and libvirt
through _libvirt, and this file turns those into the returned facts.
"""

from __future__ import annotations

from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement import (
    POLICY_DEDICATED,
    POLICY_SHARED,
    Allocation,
    HostState,
    PlacementError,
    Request,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
    GPU_IDS,
    NVSWITCH_IDS,
    platform_gpus,
    platform_nvswitches,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._readiness import assess
from ansible_collections.gpuvirt.kvm.plugins.module_utils._topology import format_cpulist
from ansible_collections.gpuvirt.kvm.plugins.module_utils._units import parse_size_mb


class RequestError(ValueError):
    """A plan entry is malformed (not a placement failure: the whole call fails)."""


def requests_from_options(entries, option="plan"):
    """Turn the module's plan entries into Requests, validating what the argspec cannot."""
    requests = []
    seen = {}
    for n, entry in enumerate(entries):
        where = "%s[%d]" % (option, n)
        name = entry.get("name")
        if not name or not str(name).strip():
            raise RequestError("%s.name is empty; give every VM a name" % where)
        if name in seen:
            raise RequestError("%s: the name %r is used by %s[%d] too; names must be unique"
                               % (where, name, option, seen[name]))
        seen[name] = n
        gpus = entry.get("gpus") or 0
        if gpus < 0:
            raise RequestError("%s.gpus is %d; give 0 (CPU-only) or more" % (where, gpus))
        gpu_index = entry.get("gpu_index")
        if gpu_index is not None and gpus == 0:
            raise RequestError(
                "%s.gpu_index is set but %s.gpus is 0; give gpus too (gpu_index is the first "
                "GPU of a gpus-sized block)" % (where, where))
        if gpu_index is not None and gpu_index < 0:
            raise RequestError("%s.gpu_index is %d; GPU indexes start at 0" % (where, gpu_index))
        memory = entry.get("memory")
        memory_mb = None
        if memory is not None:
            try:
                memory_mb = parse_size_mb(memory, "%s.memory" % where)
            except ValueError as exc:
                raise RequestError(str(exc)) from exc
        vcpus = entry.get("vcpus")
        if vcpus is not None and vcpus < 1:
            raise RequestError("%s.vcpus is %d; give 1 or more" % (where, vcpus))
        requests.append(Request(
            name=name, gpus=gpus, gpu_index=gpu_index, vcpus=vcpus, memory_mb=memory_mb,
            cpu_policy=entry.get("cpu_policy") or POLICY_DEDICATED,
            hugepages=bool(entry.get("hugepages")),
        ))
    return requests


def allocations_from_domains(domains, gpu_bdfs, switch_bdfs):
    """What each defined domain holds, in placement's terms (unmanaged domains count too)."""
    gpu_set, switch_set = set(gpu_bdfs), set(switch_bdfs)
    result = []
    for dom in domains:
        gpus = tuple(b for b in dom.hostdevs if b in gpu_set)
        switches = tuple(b for b in dom.hostdevs if b in switch_set)
        pinned = bool(dom.pinned_cpus)
        memory_mb = dom.memory_kib // 1024
        nodes = tuple(dom.numa_nodes)
        by_node = {}
        if nodes:
            # libvirt's strict nodeset does not say how memory splits; count it evenly.
            share, extra = divmod(memory_mb, len(nodes))
            by_node = {n: share + (1 if k < extra else 0) for k, n in enumerate(nodes)}
        result.append(Allocation(
            name=dom.name, gpus=gpus, nvswitches=switches,
            cpus=dom.pinned_cpus if pinned else dom.cpuset, numa_nodes=nodes,
            memory_mb=memory_mb if nodes else 0, memory_by_node=by_node,
            cpu_policy=POLICY_DEDICATED if pinned else POLICY_SHARED,
        ))
    return result


def _device_entries(devices, names, holders, unhealthy, platform=None):
    entries = []
    for index, dev in enumerate(devices):
        entry = {
            "index": index,
            "bdf": dev.bdf,
            "id": "%04x:%04x" % dev.id_pair,
            "model": names.get(dev.id_pair, "unknown"),
            "numa_node": dev.numa_node,
            "iommu_group": dev.iommu_group,
            "iommu_group_members": list(dev.iommu_group_members),
            "driver": dev.driver,
            "pcie_path": list(dev.bridges),
            "host_bridge": dev.host_bridge,
            "allocated_to": holders.get(dev.bdf),
        }
        if unhealthy is not None:
            entry["healthy"] = dev.bdf not in unhealthy
            entry["mmio64_mb"] = dev.mmio64_size // 2 ** 20
            if platform is not None and index < len(platform.physical_ids):
                entry["physical_id"] = platform.physical_ids[index]
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
        "cpuset": format_cpulist(outcome.cpus),
        "emulator_cpus": list(outcome.emulator_cpus),
        "vcpus": outcome.vcpus,
        "memory_mb": outcome.memory_mb,
        "memory_by_node": {str(k): v for k, v in outcome.memory_by_node.items()},
        "cpu_policy": outcome.cpu_policy,
        "hugepage_kb": outcome.hugepage_kb,
        "fm_partition": outcome.fm_partition,
    }


def build(topology, platform, platform_reason, domains, requests, reserved_cpus=None,
          reserved_memory_mb=None, unhealthy_gpus=(), nvlinks=None):
    """The whole gpu_topology result. Raises PlacementError for bad host-wide settings."""
    gpus = platform_gpus(topology, platform)
    switches = platform_nvswitches(topology, platform)
    unhealthy = set(unhealthy_gpus)
    allocations = allocations_from_domains(domains, [g.bdf for g in gpus],
                                           [s.bdf for s in switches])
    state = HostState(topology, platform, allocations=allocations, reserved_cpus=reserved_cpus,
                      reserved_memory_mb=reserved_memory_mb, unhealthy_gpus=sorted(unhealthy),
                      nvlinks=nvlinks)
    before = {"gpus": state.holders(), "free_blocks": state.free_blocks()}
    holders = dict(before["gpus"])
    for dom in allocations:
        for bdf in dom.nvswitches:
            holders[bdf] = dom.name
    outcomes = state.plan(requests) if requests else []
    reserved = set(state.model.reserved)
    result = {
        "platform": {
            "name": platform.name,
            "description": platform.description,
            "reason": platform_reason,
            "fabric": platform.fabric,
            "allowed_sizes": list(platform.allowed_sizes),
        },
        "gpus": _device_entries(gpus, GPU_IDS, holders, unhealthy, platform),
        "nvswitches": _device_entries(switches, NVSWITCH_IDS, holders, None),
        "numa_nodes": [
            {
                "id": node.id,
                "cpus": format_cpulist(node.cpus),
                "reserved_cpus": format_cpulist([c for c in node.cpus if c in reserved]),
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
                "other_hostdevs": [a for a in dom.hostdevs
                                   if a not in {g.bdf for g in gpus} | {s.bdf for s in switches}],
                "cpus": format_cpulist(dom.pinned_cpus or dom.cpuset),
                "numa_nodes": list(dom.numa_nodes),
                "memory_mb": dom.memory_kib // 1024,
                "cpu_policy": POLICY_DEDICATED if dom.pinned_cpus else POLICY_SHARED,
                "owner_tag": (dom.metadata or {}).get("owner_tag"),
            }
            for dom in domains
        ],
        "readiness": assess(topology, gpus, switches),
        "placement_state": placement_state(state),
        "plan": [placement_entry(req, out) for req, out in outcomes],
        "warnings": list(state.warnings),
    }
    if requests:
        result["free_blocks_after_plan"] = {
            str(k): v for k, v in sorted(state.free_blocks().items(), reverse=True)}
    result["allocation_map"] = allocation_map(result)
    return result


PLACEMENT_STATE_FORMAT = 1


def placement_state(state):
    """What a controller needs besides gpus, nvswitches, numa_nodes and allocations to rebuild
    this host's HostState exactly (the fleet_plan filter): the platform's data when it did not
    come built in (a file on this host), thread siblings, the resolved memory reserve per node
    and the NVLink counts."""
    m = state.model
    platform = m.platform
    cores = set()
    for cpu in m.topology.cpus.values():
        if len(cpu.siblings) > 1:
            cores.add(tuple(sorted(cpu.siblings)))
    return {
        "format": PLACEMENT_STATE_FORMAT,
        "platform": None if platform.source == "built-in" else platform.to_dict(),
        "cpu_siblings": [format_cpulist(core) for core in sorted(cores)],
        "reserved_memory_mb": {str(n): mb for n, mb in sorted(m.reserve_mb.items())},
        "nvlinks": [[a, b, count] for (a, b), count in sorted(m.nvlinks.items()) if count],
    }


def allocation_map(result):
    """Readable lines: who holds each GPU and NVSwitch, which CPUs, and what is left free."""
    owner = {}
    for alloc in result["allocations"]:
        for bdf in alloc["gpus"] + alloc["nvswitches"]:
            owner[bdf] = "%s (%s)" % (alloc["name"],
                                      "running" if alloc.get("active") else "defined")
    for entry in result["plan"]:
        for bdf in entry.get("gpus", []) + entry.get("nvswitches", []):
            owner[bdf] = "%s (planned)" % entry["name"]
    lines = ["platform %s: %s" % (result["platform"]["name"], result["platform"]["reason"])]
    for gpu in result["gpus"]:
        health = "" if gpu.get("healthy", True) else " UNHEALTHY"
        lines.append("GPU%-2d %s node %-2s -> %s%s" % (
            gpu["index"], gpu["bdf"], gpu["numa_node"], owner.get(gpu["bdf"], "free"), health))
    for sw in result["nvswitches"]:
        lines.append("NVSwitch%-2d %s node %-2s -> %s" % (
            sw["index"], sw["bdf"], sw["numa_node"], owner.get(sw["bdf"], "free")))
    for entry in result["plan"]:
        if "error" in entry:
            lines.append("%s: NOT PLACED: %s" % (entry["name"], entry["error"]))
        else:
            lines.append("%s: %d GPU(s) %s, %d vCPUs on host CPUs %s (%s), emulator %s, "
                         "%d MiB on node(s) %s" % (
                             entry["name"], len(entry["gpus"]),
                             _indexes(entry["gpu_indexes"]) or "-", entry["vcpus"],
                             entry["cpuset"], entry["cpu_policy"],
                             format_cpulist(entry["emulator_cpus"]) or "-", entry["memory_mb"],
                             ",".join(str(n) for n in entry["numa_nodes"])))
    free = result.get("free_blocks_after_plan", result["free_blocks"])
    lines.append("free blocks: %s" % (", ".join(
        "%d x %s" % (n, size) for size, n in free.items() if n) or "none"))
    return lines


def _indexes(indexes):
    return "GPU " + format_cpulist(indexes) if indexes else ""

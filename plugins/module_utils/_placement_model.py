# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Placement's vocabulary and the part of a host that does not change while VMs come and go.
Private, pure.

Requests, placements and holdings (what a defined VM holds); a host's placeable GPU blocks as
bit masks, its free-block vector, the CPUs and memory left after the host's reserve, the pair
scores of a generic host's GPUs, and the default VM size per GPU count (templates).
``_placement.HostState`` records who holds what on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import classify as classify_nics
from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import nic_functions
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
    platform_gpus,
    platform_nvswitches,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._ranges import format_ranges, parse_ranges
from ansible_collections.gpuvirt.kvm.plugins.module_utils._topology import (
    LINK_NODE,
    LINK_PHB,
    LINK_PIX,
    LINK_PXB,
    LINK_SYS,
)

POLICY_DEDICATED = "dedicated"
POLICY_SHARED = "shared"
CPU_POLICIES = (POLICY_DEDICATED, POLICY_SHARED)

RESERVED_MEMORY_MIN_MB = 2048
RESERVED_MEMORY_FRACTION = 0.05

# go-gpuallocator's pair points per PCIe link class, plus NVLINK_POINTS per NVLink.
LINK_POINTS = {LINK_SYS: 10, LINK_NODE: 20, LINK_PHB: 30, LINK_PXB: 40, LINK_PIX: 50}
NVLINK_POINTS = 100

# Above this many candidate sets a generic host switches from exhaustive search to greedy
# growth from every free GPU (C(16, 4) = 1820 stays exhaustive; C(16, 8) does not).
EXHAUSTIVE_LIMIT = 2000
_VECTOR_CACHE_LIMIT = 200000


class PlacementError(Exception):
    """A request cannot be placed; the message says what was short and how to change it."""


@dataclass(frozen=True)
class Holding:
    """What a defined VM holds, in placement's terms (read back from its domain, or from
    gpu_topology's facts)."""

    name: str
    gpus: tuple = ()  # BDFs
    nvswitches: tuple = ()  # BDFs
    cpus: tuple = ()  # pinned host CPUs (dedicated) or the floating set (shared)
    numa_nodes: tuple = ()
    memory_mb: int = 0
    memory_by_node: dict = field(default_factory=dict)
    cpu_policy: str = POLICY_DEDICATED
    vcpus: int | None = None  # None: len(cpus)
    hugepage_kb: int = 0  # 0: normal memory
    nics: tuple = ()  # rail NIC functions and VFs placement gave it (BDFs)
    # Rail functions it holds that placement did not give it (attached by hand, or members of a
    # GPU's IOMMU group): taken, never handed out, but no rail of the VM's.
    extra_nics: tuple = ()


@dataclass(frozen=True)
class Request:
    """What a VM asks for (nvidia-vm's --gpu-count, --gpu-index and size overrides)."""

    name: str
    gpus: int = 0
    gpu_index: int | None = None
    vcpus: int | None = None
    memory_mb: int | None = None
    cpu_policy: str = POLICY_DEDICATED
    hugepages: object = False  # False, True (largest page size with room) or a page size in kB
    host: str | None = None  # fleet planning only: place on this host
    # None: GPUs of one model (any); "any": models may mix; else a model name or PCI ID.
    gpu_model: str | None = None
    # Rail NICs (_nics.choose_nics): 0 none, "auto" the rails under the VM's GPUs, or a count;
    # nic_mode "auto" / "whole" / "vf"; nics_allow_fewer: take what is free instead of failing.
    nics: object = 0
    nic_mode: str = "auto"
    nics_allow_fewer: bool = False
    # The Fabric Manager service VM of a shared-NVSwitch host: every NVSwitch and the platform's
    # fabric devices (_platforms.platform_fabric_devices), no GPUs.
    fabric_service: bool = False
    # A VM that holds a GPU that is unhealthy (or an NVSwitch that failed) is re-placed on
    # healthy devices instead of keeping them (kvm_vm's recreate).
    replace_failed: bool = False


@dataclass(frozen=True)
class Template:
    vcpus: int
    memory_mb: int
    os_disk_gb: int


@dataclass(frozen=True)
class Placement:
    """Where a request landed."""

    name: str
    gpus: tuple  # BDFs
    gpu_indexes: tuple
    nvswitches: tuple  # BDFs
    nvswitch_indexes: tuple
    numa_nodes: tuple
    cpus: tuple  # dedicated: host CPU of vCPU 0, 1, ...; shared: the floating set
    cpus_by_node: dict  # node -> CPUs of that node, in vCPU order (dedicated)
    emulator_cpus: tuple
    memory_mb: int
    memory_by_node: dict
    vcpus: int
    cpu_policy: str
    hugepage_kb: int = 0
    fm_partition: int | None = None  # shared-NVSwitch platforms: FM partition to activate
    nics: tuple = ()  # rail NIC functions or VFs (BDFs), nearest GPU first
    fabric_devices: tuple = ()  # a Fabric Manager service VM's functions besides the switches

    @property
    def gpu_index(self):
        """nvidia-vm's --gpu-index for this placement (lowest index), None without GPUs."""
        return self.gpu_indexes[0] if self.gpu_indexes else None

    def holding(self):
        """The Holding this placement becomes once its domain is defined."""
        return Holding(
            name=self.name, gpus=self.gpus, nvswitches=self.nvswitches, cpus=self.cpus,
            numa_nodes=self.numa_nodes, memory_mb=self.memory_mb,
            memory_by_node=dict(self.memory_by_node), cpu_policy=self.cpu_policy,
            vcpus=self.vcpus, hugepage_kb=self.hugepage_kb, nics=self.nics,
        )


def duplicate_refusals(requests):
    """[PlacementError or None] per request: an error for each repeat of an earlier name."""
    results, seen = [], {}
    for k, req in enumerate(requests):
        if req.name in seen:
            results.append(PlacementError(
                "request %r appears twice (first at position %d); give each VM one entry"
                % (req.name, seen[req.name])))
        else:
            seen[req.name] = k
            results.append(None)
    return results


def format_indexes(indexes):
    """'GPU 3' / 'GPUs 0-3' / 'GPUs 0,2' for messages."""
    indexes = sorted(indexes)
    if len(indexes) == 1:
        return "GPU %d" % indexes[0]
    return "GPUs %s" % format_ranges(indexes)


def _format_blocks(counts):
    if not counts:
        return "none"
    return ", ".join("%d x %d" % (n, size) for size, n in counts.items())


def split_proportionally(total, weights):
    """Split an integer in proportion to weights (largest remainder, ties to the first)."""
    wsum = sum(weights)
    if wsum <= 0:
        return [total] + [0] * (len(weights) - 1)
    shares = [total * w // wsum for w in weights]
    rest = total - sum(shares)
    order = sorted(range(len(weights)), key=lambda k: (-(total * weights[k] % wsum), k))
    for k in order[:rest]:
        shares[k] += 1
    return shares


class _Block(object):
    """A placeable GPU set with its NVSwitches and a bit mask over both."""

    __slots__ = ("indexes", "switches", "mask", "gpu_mask", "nodes", "size")

    def __init__(self, indexes, switches, gpu_count, gpu_node):
        self.indexes = tuple(indexes)
        self.switches = tuple(switches)
        self.size = len(self.indexes)
        self.gpu_mask = 0
        for i in self.indexes:
            self.gpu_mask |= 1 << i
        self.mask = self.gpu_mask
        for s in self.switches:
            self.mask |= 1 << (gpu_count + s)
        self.nodes = tuple(sorted(set(gpu_node[i] for i in self.indexes)))


class _HostModel(object):
    """What does not change while VMs come and go (shared by HostState copies)."""

    def __init__(self, topology, platform, reserved_cpus, reserved_memory_mb, nvlinks,
                 nics=None, gpu_group_nics=None):
        self.topology = topology
        self.platform = platform
        gpus = platform_gpus(topology, platform)
        switches = platform_nvswitches(topology, platform)
        self.gpu_bdfs = tuple(d.bdf for d in gpus)
        self.gpu_model = tuple(d.id_pair for d in gpus)  # (vendor, device) per GPU index
        self.single_model = len(set(self.gpu_model)) <= 1
        self.switch_bdfs = tuple(d.bdf for d in switches)
        self.gpu_count = len(gpus)
        self.switch_count = len(switches)
        self.gpu_index = {b: i for i, b in enumerate(self.gpu_bdfs)}
        self.switch_index = {b: i for i, b in enumerate(self.switch_bdfs)}
        # Rail NICs: read from the topology, or given (the fleet planner's, from the facts'
        # placement_state: a topology rebuilt from facts has no NICs of its own).
        self.nics = tuple(classify_nics(topology, gpus, platform) if nics is None else nics)
        # The VFs of rails (what placement_state carries, so the planner reads the same).
        self.nic_vfs = frozenset(vf for nic in self.nics if nic.rail_gpus for vf in nic.vfs)
        # NIC functions in a GPU's IOMMU group (a board without ACS): vfio gives them to the
        # VM that gets the GPU, so they go with it, and a GPU whose group holds a NIC function
        # another VM has is not free. {GPU BDF: (NIC functions)}; given by the fleet planner.
        if gpu_group_nics is None:
            functions = nic_functions(topology, platform)
            gpu_group_nics = {}
            for dev in gpus:
                mates = tuple(sorted(m for m in dev.iommu_group_members
                                     if m != dev.bdf and m in functions))
                if mates:
                    gpu_group_nics[dev.bdf] = mates
        self.gpu_group_nics = dict(gpu_group_nics)
        self.node_ids = tuple(sorted(n.id for n in topology.numa_nodes))
        fallback = self.node_ids[0] if self.node_ids else 0
        # numa_node -1 (firmware silent, common in single-root boxes): count it on the first
        # node, so a VM still gets local-enough CPUs rather than none.
        self.gpu_node = tuple(d.numa_node if d.numa_node in self.node_ids else fallback
                              for d in gpus)
        self._reserve_cpus(topology, reserved_cpus)
        self._reserve_memory(topology, reserved_memory_mb)
        self.threads_per_core = max(
            [len(c.siblings) for c in topology.cpus.values()] or [1])
        self.blocks_by_size = {}
        for size, blocks in platform.partitions.items():
            self.blocks_by_size[size] = [
                _Block(b, platform.nvswitches_for(b), self.gpu_count, self.gpu_node)
                for b in blocks if b and b[-1] < self.gpu_count
            ]
        self.sizes_desc = tuple(sorted(self.blocks_by_size, reverse=True))
        self.all_blocks = [b for s in self.sizes_desc for b in self.blocks_by_size[s]]
        self.partitioned = platform.partitioned
        self.vector_cache = {}
        self.nvlinks = {}
        for (a, b), count in (nvlinks or {}).items():
            self.nvlinks[(min(a, b), max(a, b))] = int(count)
        self.pair_score = None
        if not self.partitioned:
            self.pair_score = [[0] * self.gpu_count for _dummy in range(self.gpu_count)]
            for a in range(self.gpu_count):
                for b in range(a + 1, self.gpu_count):
                    link = topology.link(self.gpu_bdfs[a], self.gpu_bdfs[b])
                    score = LINK_POINTS.get(link, 0) + NVLINK_POINTS * self.nvlinks.get((a, b), 0)
                    self.pair_score[a][b] = self.pair_score[b][a] = score
        self.template_cache = {}

    def _reserve_cpus(self, topology, reserved_cpus):
        if reserved_cpus is None:
            # The first core of every node, thread siblings included: room for the host and
            # the VMs' emulator threads next to the vCPUs they serve.
            reserved = set()
            for node in topology.numa_nodes:
                if node.cpus:
                    first = min(node.cpus)
                    reserved.update(topology.cpus[first].siblings if first in topology.cpus
                                    else (first,))
        else:
            if isinstance(reserved_cpus, str):
                try:
                    reserved = set(parse_ranges(reserved_cpus))
                except ValueError as exc:
                    raise PlacementError(
                        "reserved_cpus: %r is not a CPU list; write it like 0,48 or 0-1,48-49"
                        % reserved_cpus) from exc
            else:
                try:
                    reserved = set(int(c) for c in reserved_cpus)
                except (TypeError, ValueError) as exc:
                    raise PlacementError("reserved_cpus: %r is not a list of CPU ids"
                                         % (reserved_cpus,)) from exc
            unknown = sorted(reserved - set(topology.cpus))
            if unknown:
                raise PlacementError(
                    "reserved_cpus: CPU(s) %s do not exist on this host (CPUs %s); fix "
                    "reserved_cpus" % (format_ranges(unknown), format_ranges(topology.cpus)))
        self.reserved = frozenset(reserved)
        self.node_cpus = {}
        self.node_cores = {}
        self.node_reserved = {}
        for node in topology.numa_nodes:
            cpus = tuple(sorted(node.cpus))
            self.node_cpus[node.id] = tuple(c for c in cpus if c not in self.reserved)
            self.node_reserved[node.id] = tuple(c for c in cpus if c in self.reserved)
            seen = set()
            cores = []
            for cpu in cpus:
                if cpu in seen or cpu not in topology.cpus:
                    continue
                sib = tuple(s for s in topology.cpus[cpu].siblings if s in node.cpus) or (cpu,)
                seen.update(sib)
                free = tuple(s for s in sib if s not in self.reserved)
                if free:
                    cores.append((free, len(sib)))
            self.node_cores[node.id] = cores

    def _reserve_memory(self, topology, reserved_memory_mb):
        self.reserve_mb = {}
        self.huge_total = {}
        self.mem_capacity = {}
        for node in topology.numa_nodes:
            if reserved_memory_mb is None:
                reserve = max(RESERVED_MEMORY_MIN_MB,
                              int(node.memory_mb * RESERVED_MEMORY_FRACTION))
            elif isinstance(reserved_memory_mb, dict):
                value = reserved_memory_mb.get(node.id, reserved_memory_mb.get(str(node.id)))
                reserve = (max(RESERVED_MEMORY_MIN_MB,
                               int(node.memory_mb * RESERVED_MEMORY_FRACTION))
                           if value is None else value)
            else:
                reserve = reserved_memory_mb
            try:
                reserve = int(reserve)
            except (TypeError, ValueError) as exc:
                raise PlacementError("reserved_memory_mb: %r is not a number of MB (give one "
                                     "number, or a mapping NUMA node -> MB)" % (reserve,)) from exc
            if reserve < 0:
                raise PlacementError("reserved_memory_mb: %d is negative" % reserve)
            pools = {int(size): int(info.get("total", 0))
                     for size, info in (node.hugepages or {}).items()}
            self.huge_total[node.id] = {s: n for s, n in pools.items() if n > 0}
            pool_mb = sum(s * n for s, n in pools.items()) // 1024
            self.reserve_mb[node.id] = reserve
            # Hugepage pools count in MemTotal but cannot back normal guest memory.
            self.mem_capacity[node.id] = max(0, node.memory_mb - reserve - pool_mb)

    def vector(self, free_mask):
        """Free-block counts, largest size first, of a maximal buddy-style decomposition."""
        vec = self.vector_cache.get(free_mask)
        if vec is None:
            taken = 0
            counts = []
            for size in self.sizes_desc:
                count = 0
                for block in self.blocks_by_size[size]:
                    if block.mask & free_mask == block.mask and not block.mask & taken:
                        count += 1
                        taken |= block.mask
                counts.append(count)
            vec = tuple(counts)
            if len(self.vector_cache) > _VECTOR_CACHE_LIMIT:
                self.vector_cache.clear()
            self.vector_cache[free_mask] = vec
        return vec

    def template(self, gpus):
        """Default vcpus / memory_mb / os_disk_gb for a GPU count on this host."""
        m = self
        cached = m.template_cache.get(gpus)
        if cached is not None:
            return cached
        override = m.platform.template_override(gpus)
        share = self._gpu_share()
        count = gpus if gpus else 1
        vcpus = override.get("vcpus")
        memory = override.get("memory_mb")
        if vcpus is None and share is not None:
            cores, threads, mem = share
            vcpus = int(count * cores) * m.threads_per_core or max(1, int(count * threads))
        if memory is None and share is not None:
            memory = int(count * share[2]) // 1024 * 1024 or int(count * share[2])
        tpl = None
        if vcpus is not None and memory is not None:
            tpl = Template(vcpus=vcpus, memory_mb=memory,
                           os_disk_gb=override.get("os_disk_gb", m.platform.os_disk_gb))
        m.template_cache[gpus] = tpl
        return tpl

    def templates(self):
        """{GPU count: Template} for every size this host can place (generic: 1..GPUs)."""
        sizes = self.platform.allowed_sizes or tuple(range(1, self.gpu_count + 1))
        return {n: self.template(n) for n in sizes}

    def _gpu_share(self):
        """(cores, CPUs, memory MB) per GPU: the smallest share over nodes that hold GPUs.

        The smallest share makes every template fit on every GPU node even when the host is
        full of same-size VMs; whole cores so that sibling threads stay together.
        """
        m = self
        per_node = {}
        for node in m.gpu_node:
            per_node[node] = per_node.get(node, 0) + 1
        if not per_node:
            return None
        shares = []
        for node, count in per_node.items():
            cores = sum(1 for free, full in m.node_cores.get(node, ()) if len(free) == full)
            shares.append((cores / count, len(m.node_cpus.get(node, ())) / count,
                           m.mem_capacity.get(node, 0) / count))
        return tuple(min(s[k] for s in shares) for k in range(3))


def _comb(n, k):
    if k < 0 or k > n:
        return 0
    k = min(k, n - k)
    result = 1
    for i in range(k):
        result = result * (n - i) // (i + 1)
    return result

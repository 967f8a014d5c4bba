# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Which GPUs, NVSwitches, CPUs, NUMA nodes and memory a VM gets. Private to this collection.

Pure: no I/O, no libvirt. The caller reads the host (``_topology``), the existing allocations
(from libvirt domain XML) and the platform (``_platforms``) and hands them in.

Indexes: a GPU's index is its position in PCI bus order among the platform's GPUs (what
``nvidia-smi`` and ``nvidia-vm --gpu-index`` count); NVLink matrices use the same indexes.

Rules, in the order they decide:

1. GPUs. On a partitioned platform a VM gets one of the platform's partitions of its size; on
   a generic host any set of free GPUs. Unhealthy GPUs are never handed out.
2. Among free candidates: keep the largest blocks free (compare the free-block vector that
   would remain, largest size first), then NUMA locality (fewest nodes), then lowest index.
   Generic hosts score sets go-gpuallocator style instead (pair points by PCIe link class,
   +100 per NVLink, summed over pairs; then the score left to the remaining free GPUs), over all
   sets while there are at most EXHAUSTIVE_LIMIT of them, else over sets grown greedily from
   each free GPU.
   A candidate whose nodes lack the CPUs or memory the request needs is skipped.
3. CPUs. ``dedicated``: vCPUs pinned 1:1 to CPUs no other VM holds, never reserved ones, whole
   cores first with thread siblings kept together, split across the GPUs' nodes in proportion
   to their GPUs. ``shared``: the nodes' unreserved CPUs as a floating set, consumed by nobody.
   Emulator threads go to the reserved CPUs of the VM's nodes.
4. Memory fits per node: total - reserve - hugepage pool - memory held by other VMs. The default
   reserve per node is max(2048 MB, 5 % of the node) for the host kernel and QEMU overhead.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field, replace

from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
    FABRIC_SHARED_NVSWITCH,
    platform_gpus,
    platform_nvswitches,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._topology import (
    LINK_NODE,
    LINK_PHB,
    LINK_PIX,
    LINK_PXB,
    LINK_SYS,
    format_cpulist,
    parse_cpulist,
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
class Allocation:
    """What a defined VM holds, as read back from its libvirt domain."""

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

    @property
    def gpu_index(self):
        """nvidia-vm's --gpu-index for this placement (lowest index), None without GPUs."""
        return self.gpu_indexes[0] if self.gpu_indexes else None

    def allocation(self):
        """The Allocation this placement becomes once its domain is defined."""
        return Allocation(
            name=self.name, gpus=self.gpus, nvswitches=self.nvswitches, cpus=self.cpus,
            numa_nodes=self.numa_nodes, memory_mb=self.memory_mb,
            memory_by_node=dict(self.memory_by_node), cpu_policy=self.cpu_policy,
            vcpus=self.vcpus, hugepage_kb=self.hugepage_kb,
        )


def format_indexes(indexes):
    """'GPU 3' / 'GPUs 0-3' / 'GPUs 0,2' for messages."""
    indexes = sorted(indexes)
    if len(indexes) == 1:
        return "GPU %d" % indexes[0]
    return "GPUs %s" % format_cpulist(indexes)


def _format_blocks(counts):
    if not counts:
        return "none"
    return ", ".join("%d x %d" % (n, size) for size, n in counts.items())


def _split(total, weights):
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

    def __init__(self, topology, platform, reserved_cpus, reserved_memory_mb, nvlinks):
        self.topology = topology
        self.platform = platform
        gpus = platform_gpus(topology, platform)
        switches = platform_nvswitches(topology, platform)
        self.gpu_bdfs = tuple(d.bdf for d in gpus)
        self.switch_bdfs = tuple(d.bdf for d in switches)
        self.gpu_count = len(gpus)
        self.switch_count = len(switches)
        self.gpu_index = {b: i for i, b in enumerate(self.gpu_bdfs)}
        self.switch_index = {b: i for i, b in enumerate(self.switch_bdfs)}
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
                    reserved = set(parse_cpulist(reserved_cpus))
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
                    "reserved_cpus" % (format_cpulist(unknown), format_cpulist(topology.cpus)))
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


class HostState(object):
    """One host's devices, CPUs and memory, and which VM holds what."""

    def __init__(self, topology, platform, allocations=(), reserved_cpus=None,
                 reserved_memory_mb=None, unhealthy_gpus=(), nvlinks=None):
        self.model = _HostModel(topology, platform, reserved_cpus, reserved_memory_mb, nvlinks)
        self.warnings = []
        self._reset()
        self.unhealthy = frozenset()
        self._set_unhealthy(unhealthy_gpus)
        for alloc in allocations:
            self._record(alloc, warn=True)

    def _reset(self):
        m = self.model
        self.gpu_holder = [None] * m.gpu_count
        self.switch_holder = [None] * m.switch_count
        self.cpu_holder = {}
        self.node_free = {n: len(c) for n, c in m.node_cpus.items()}
        self.mem_used = {n: 0 for n in m.node_ids}
        self.huge_used = {n: {} for n in m.node_ids}
        self.allocations = {}
        self.free_mask = (1 << (m.gpu_count + m.switch_count)) - 1
        self.free_gpus = m.gpu_count

    def _set_unhealthy(self, bdfs):
        bad = set()
        for bdf in bdfs:
            norm = _normalise_bdf(bdf)
            if norm in self.model.gpu_index:
                bad.add(self.model.gpu_index[norm])
            else:
                self.warnings.append(
                    "unhealthy_gpus: %s is not a GPU on this host; ignored" % bdf)
        self.unhealthy = frozenset(bad)
        for i in bad:
            if self.free_mask & (1 << i):
                self.free_mask &= ~(1 << i)
                self.free_gpus -= 1

    def copy(self):
        """An independent state sharing the static host model (cheap; used for fleets)."""
        new = object.__new__(HostState)
        new.model = self.model
        new.warnings = list(self.warnings)
        new.unhealthy = self.unhealthy
        new.gpu_holder = list(self.gpu_holder)
        new.switch_holder = list(self.switch_holder)
        new.cpu_holder = dict(self.cpu_holder)
        new.node_free = dict(self.node_free)
        new.mem_used = dict(self.mem_used)
        new.huge_used = {n: dict(v) for n, v in self.huge_used.items()}
        new.allocations = dict(self.allocations)
        new.free_mask = self.free_mask
        new.free_gpus = self.free_gpus
        return new

    def derive(self, allocations=(), unhealthy_gpus=()):
        """A state of another host built like this one: the same (shared) host model, other
        allocations and unhealthy GPUs. What HostState() would make, without rebuilding the
        model (fleets of one hardware model share it, and its caches)."""
        new = object.__new__(HostState)
        new.model = self.model
        new.warnings = []
        new._reset()
        new.unhealthy = frozenset()
        new._set_unhealthy(unhealthy_gpus)
        for alloc in allocations:
            new._record(alloc, warn=True)
        return new

    def restore(self, alloc):
        """Record an allocation again when all it held is still free (a failed resize); bool."""
        if not self._is_free_for(alloc):
            return False
        self._record(alloc)
        return True

    # --- bookkeeping -------------------------------------------------------------------------

    @property
    def platform(self):
        return self.model.platform

    def _record(self, alloc, warn=False):
        m = self.model
        for bdf in alloc.gpus:
            i = m.gpu_index.get(_normalise_bdf(bdf))
            if i is None:
                if warn:
                    self.warnings.append("%s holds GPU %s, which this host does not have"
                                         % (alloc.name, bdf))
                continue
            if self.gpu_holder[i] is not None and warn:
                self.warnings.append("%s and %s both hold GPU %d (%s)" % (
                    self.gpu_holder[i], alloc.name, i, bdf))
                continue
            self.gpu_holder[i] = alloc.name
            if self.free_mask & (1 << i):
                self.free_mask &= ~(1 << i)
                self.free_gpus -= 1
        for bdf in alloc.nvswitches:
            s = m.switch_index.get(_normalise_bdf(bdf))
            if s is None:
                if warn:
                    self.warnings.append("%s holds NVSwitch %s, which this host does not have"
                                         % (alloc.name, bdf))
                continue
            if self.switch_holder[s] is not None and warn:
                self.warnings.append("%s and %s both hold NVSwitch %s" % (
                    self.switch_holder[s], alloc.name, bdf))
                continue
            self.switch_holder[s] = alloc.name
            self.free_mask &= ~(1 << (m.gpu_count + s))
        if alloc.cpu_policy == POLICY_DEDICATED:
            for cpu in alloc.cpus:
                if cpu in self.cpu_holder:
                    if warn:
                        self.warnings.append("%s and %s both pin CPU %d" % (
                            self.cpu_holder[cpu], alloc.name, cpu))
                    continue
                self.cpu_holder[cpu] = alloc.name
                node = m.topology.cpus[cpu].node if cpu in m.topology.cpus else None
                if node in self.node_free and cpu not in m.reserved:
                    self.node_free[node] -= 1
        for node, mb in self._memory_of(alloc).items():
            if node not in self.mem_used:
                continue
            if alloc.hugepage_kb:
                pages = -(-mb * 1024 // alloc.hugepage_kb)
                used = self.huge_used[node]
                used[alloc.hugepage_kb] = used.get(alloc.hugepage_kb, 0) + pages
            else:
                self.mem_used[node] += mb
        self.allocations[alloc.name] = alloc

    def _memory_of(self, alloc):
        if alloc.memory_by_node:
            return {int(k): int(v) for k, v in alloc.memory_by_node.items()}
        if not alloc.memory_mb:
            return {}
        nodes = list(alloc.numa_nodes) or sorted(set(
            self.model.topology.cpus[c].node for c in alloc.cpus
            if c in self.model.topology.cpus)) or list(self.model.node_ids[:1])
        return dict(zip(nodes, _split(alloc.memory_mb, [1] * len(nodes))))

    def release(self, name):
        """Forget a VM's allocation (its domain was undefined). Returns it, or None."""
        alloc = self.allocations.pop(name, None)
        if alloc is None:
            return None
        m = self.model
        for i, holder in enumerate(self.gpu_holder):
            if holder == name:
                self.gpu_holder[i] = None
                if i not in self.unhealthy:
                    self.free_mask |= 1 << i
                    self.free_gpus += 1
        for s, holder in enumerate(self.switch_holder):
            if holder == name:
                self.switch_holder[s] = None
                self.free_mask |= 1 << (m.gpu_count + s)
        if alloc.cpu_policy == POLICY_DEDICATED:
            for cpu in alloc.cpus:
                if self.cpu_holder.get(cpu) == name:
                    del self.cpu_holder[cpu]
                    node = m.topology.cpus[cpu].node if cpu in m.topology.cpus else None
                    if node in self.node_free and cpu not in m.reserved:
                        self.node_free[node] += 1
        for node, mb in self._memory_of(alloc).items():
            if node not in self.mem_used:
                continue
            if alloc.hugepage_kb:
                pages = -(-mb * 1024 // alloc.hugepage_kb)
                used = self.huge_used[node]
                used[alloc.hugepage_kb] = max(0, used.get(alloc.hugepage_kb, 0) - pages)
            else:
                self.mem_used[node] = max(0, self.mem_used[node] - mb)
        return alloc

    # --- queries -----------------------------------------------------------------------------

    @property
    def gpu_bdfs(self):
        """GPU BDFs in index order (PCI bus order)."""
        return self.model.gpu_bdfs

    @property
    def nvswitch_bdfs(self):
        return self.model.switch_bdfs

    def summary(self):
        """Plain data for module results: platform, GPUs with holder and health, free blocks."""
        m = self.model
        return {
            "platform": m.platform.name,
            "gpus": [{"index": i, "bdf": bdf, "numa_node": m.gpu_node[i],
                      "holder": self.gpu_holder[i], "healthy": i not in self.unhealthy}
                     for i, bdf in enumerate(m.gpu_bdfs)],
            "nvswitches": [{"index": j, "bdf": bdf, "holder": self.switch_holder[j]}
                           for j, bdf in enumerate(m.switch_bdfs)],
            "free_blocks": self.free_blocks(),
            "reserved_cpus": format_cpulist(m.reserved),
            "warnings": list(self.warnings),
        }

    def holders(self):
        """GPU BDF -> name of the VM that holds it."""
        return {self.model.gpu_bdfs[i]: h for i, h in enumerate(self.gpu_holder) if h}

    def free_gpu_indexes(self):
        return [i for i in range(self.model.gpu_count) if self.free_mask >> i & 1]

    def free_vector(self):
        """Free-block counts aligned with model.sizes_desc (generic: (free GPUs,))."""
        if self.model.partitioned:
            return self.model.vector(self.free_mask)
        return (self.free_gpus,)

    def free_blocks(self):
        """{size: count}, largest first: free healthy GPUs as a maximal set of blocks."""
        m = self.model
        if m.partitioned:
            return {s: c for s, c in zip(m.sizes_desc, m.vector(self.free_mask)) if c}
        return {s: self.free_gpus // s for s in range(m.gpu_count, 0, -1)
                if self.free_gpus // s}

    def can_fit_gpus(self, n):
        """True when some free GPU set of n GPUs exists (CPUs and memory not checked)."""
        if n == 0:
            return True
        m = self.model
        if m.partitioned:
            free = self.free_mask
            return any(b.mask & free == b.mask for b in m.blocks_by_size.get(n, ()))
        return self.free_gpus >= n

    def template(self, gpus):
        """Default vcpus / memory_mb / os_disk_gb for a GPU count on this host."""
        m = self.model
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
        sizes = self.platform.allowed_sizes or tuple(range(1, self.model.gpu_count + 1))
        return {n: self.template(n) for n in sizes}

    def _gpu_share(self):
        """(cores, CPUs, memory MB) per GPU: the smallest share over nodes that hold GPUs.

        The smallest share makes every template fit on every GPU node even when the host is
        full of same-size VMs; whole cores so that sibling threads stay together.
        """
        m = self.model
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

    # --- placing -----------------------------------------------------------------------------

    def place(self, request):
        """Choose and record GPUs, NVSwitches, CPUs and memory for a request."""
        return self._place(request, _choose_best)

    def _place(self, request, chooser):
        _validate(request)
        old = self.allocations.get(request.name)
        if old is not None:
            held = tuple(sorted(self.model.gpu_index[_normalise_bdf(b)] for b in old.gpus
                                if _normalise_bdf(b) in self.model.gpu_index))
            if len(held) == len(old.gpus) == request.gpus and (
                    request.gpu_index is None or (held and held[0] == request.gpu_index)):
                if _same_size(old, request):
                    return self._placement_from(old)
                # Same GPUs (sticky), new CPU/memory shape: re-place only CPUs and memory.
                self.release(request.name)
                switches = tuple(sorted(self.model.switch_index[_normalise_bdf(b)]
                                        for b in old.nvswitches
                                        if _normalise_bdf(b) in self.model.switch_index))
                fixed = _Block(held, switches, self.model.gpu_count, self.model.gpu_node)
                try:
                    if not held:
                        return self._commit(request, self._fit_cpu_only(request))
                    return self._commit(request, self._fit(request, [fixed], fixed_gpus=True))
                except PlacementError:
                    self._record(old)
                    raise
            self.release(request.name)
            try:
                return self._place_new(request, chooser)
            except PlacementError as exc:
                self._record(old)
                raise PlacementError("%s; %s keeps its current %d GPU(s)" % (
                    exc, request.name, len(old.gpus))) from exc
        return self._place_new(request, chooser)

    def _place_new(self, request, chooser):
        n = request.gpus
        if n == 0:
            return self._commit(request, self._fit_cpu_only(request))
        candidates = self._gpu_candidates(request)
        ranked = chooser(self, request, candidates)
        return self._commit(request, self._fit(request, ranked))

    def _prefix(self, request):
        return "request %r (%d GPU%s)" % (request.name, request.gpus,
                                          "" if request.gpus == 1 else "s")

    def _holders_text(self, indexes=None):
        groups = {}
        for i in range(self.model.gpu_count) if indexes is None else indexes:
            holder = self.gpu_holder[i]
            if holder is not None:
                groups.setdefault("held by %s" % holder, []).append(i)
            elif i in self.unhealthy:
                groups.setdefault("unhealthy", []).append(i)
        parts = sorted(groups.items(), key=lambda kv: min(kv[1]))
        return ", ".join("%s %s" % (format_indexes(ix), why) for why, ix in parts)

    def _switch_holders_text(self, switches):
        parts = []
        for s in switches:
            if self.switch_holder[s] is not None:
                parts.append("NVSwitch %d (%s) held by %s" % (
                    s, self.model.switch_bdfs[s], self.switch_holder[s]))
        return ", ".join(parts)

    def _gpu_candidates(self, request):
        """Free GPU blocks the request may take, or PlacementError saying why there are none."""
        m = self.model
        n = request.gpus
        prefix = self._prefix(request)
        if n > m.gpu_count:
            raise PlacementError("%s: this host has %d GPU%s (%s platform); set gpus to %d or "
                                 "fewer" % (prefix, m.gpu_count, "" if m.gpu_count == 1 else "s",
                                            m.platform.name, m.gpu_count))
        if m.partitioned:
            if n not in m.blocks_by_size:
                raise PlacementError(
                    "%s: %s places only %s-GPU VMs; set gpus to one of %s" % (
                        prefix, m.platform.name, "/".join(map(str, m.sizes_desc[::-1])),
                        ", ".join(map(str, m.sizes_desc[::-1]))))
            blocks = m.blocks_by_size[n]
            if request.gpu_index is not None:
                blocks = [self._aligned_block(request, blocks)]
        elif m.platform.sizes and n not in m.platform.sizes:
            raise PlacementError("%s: platform %s allows only %s GPUs per VM; set gpus to one of "
                                 "those" % (prefix, m.platform.name,
                                            ", ".join(map(str, m.platform.sizes))))
        elif request.gpu_index is not None:
            i = request.gpu_index
            if i < 0 or i + n > m.gpu_count:
                raise PlacementError(
                    "%s: gpu_index %d is out of range: %d GPUs from index %d need GPUs %d-%d, "
                    "this host has GPUs 0-%d" % (prefix, i, n, i, i, i + n - 1, m.gpu_count - 1))
            blocks = [_Block(range(i, i + n), (), m.gpu_count, m.gpu_node)]
        else:
            return self._generic_candidates(request)
        free = self.free_mask
        usable = [b for b in blocks if b.mask & free == b.mask]
        if usable:
            return usable
        if request.gpu_index is not None:
            b = blocks[0]
            why = ", ".join(x for x in (self._holders_text(b.indexes),
                                        self._switch_holders_text(b.switches)) if x)
            raise PlacementError("%s: gpu_index %d (%s) is not free: %s; choose another "
                                 "gpu_index or leave it out to let placement choose" % (
                                     prefix, request.gpu_index, format_indexes(b.indexes), why))
        held = self._holders_text()
        raise PlacementError("%s: no free %d-GPU block: %s; free blocks: %s" % (
            prefix, n, held or "no GPU is held", _format_blocks(self.free_blocks())))

    def _aligned_block(self, request, blocks):
        m = self.model
        i = request.gpu_index
        prefix = self._prefix(request)
        if i < 0 or i >= m.gpu_count:
            raise PlacementError("%s: gpu_index %d is out of range: this host has GPUs 0-%d" % (
                prefix, i, m.gpu_count - 1))
        for b in blocks:
            if b.indexes[0] == i:
                return b
        starts = ", ".join(str(b.indexes[0]) for b in blocks)
        raise PlacementError(
            "%s: gpu_index %d is misaligned: on %s a %d-GPU VM starts at gpu_index %s" % (
                prefix, i, m.platform.name, request.gpus, starts))

    def _generic_candidates(self, request):
        m = self.model
        n = request.gpus
        free = self.free_gpu_indexes()
        if len(free) < n:
            raise PlacementError("%s: %d GPU%s free, %d needed: %s; free blocks: %s" % (
                self._prefix(request), len(free), "" if len(free) == 1 else "s", n,
                self._holders_text() or "no GPU is held", _format_blocks(self.free_blocks())))
        score = m.pair_score

        def set_score(ix):
            return sum(score[a][b] for a, b in itertools.combinations(ix, 2))

        if _comb(len(free), n) <= EXHAUSTIVE_LIMIT:
            sets = list(itertools.combinations(free, n))
        else:
            # Greedy growth from every free GPU: add the GPU that raises the set score most.
            found = set()
            for seed in free:
                chosen = [seed]
                while len(chosen) < n:
                    best = max((g for g in free if g not in chosen),
                               key=lambda g: (sum(score[g][c] for c in chosen), -g))
                    chosen.append(best)
                found.add(tuple(sorted(chosen)))
            sets = sorted(found)
        # Remaining-score tiebreak approximates go-gpuallocator's "best split of all free GPUs":
        # among equally good sets keep the better-connected GPUs together for later requests.
        total_free = set_score(free)
        row = {g: sum(score[g][h] for h in free if h != g) for g in free}
        scored = []
        for ix in sets:
            inside = set_score(ix)
            remaining = total_free - sum(row[g] for g in ix) + inside
            block = _Block(ix, (), m.gpu_count, m.gpu_node)
            scored.append((-inside, -remaining, len(block.nodes), ix, block))
        scored.sort(key=lambda t: t[:4])
        return [t[4] for t in scored]

    def _split_nodes(self, request, block):
        """vCPUs and memory per node of a block, in proportion to its GPUs there."""
        m = self.model
        nodes = block.nodes
        weights = [sum(1 for i in block.indexes if m.gpu_node[i] == node) for node in nodes]
        vcpus, memory = self._sizes(request)
        return nodes, _split(vcpus, weights), _split(memory, weights)

    def _sizes(self, request):
        vcpus, memory = request.vcpus, request.memory_mb
        if vcpus is None or memory is None:
            tpl = self.template(request.gpus)
            if tpl is None:
                raise PlacementError(
                    "%s: set vcpus and memory: this host has no GPUs to size a default "
                    "template from and the platform defines no template for %d GPUs" % (
                        self._prefix(request), request.gpus))
            vcpus = tpl.vcpus if vcpus is None else vcpus
            memory = tpl.memory_mb if memory is None else memory
        return vcpus, memory

    def _fit(self, request, ranked, fixed_gpus=False):
        """The first ranked block whose nodes have the CPUs and memory; else why not."""
        first_error = None
        for block in ranked:
            nodes, vcpus, memory = self._split_nodes(request, block)
            short = self._shortage(request, nodes, vcpus, memory)
            if short is None:
                return block, nodes, vcpus, memory
            if first_error is None:
                first_error = short
                first_block = block
        if fixed_gpus or len(ranked) == 1:
            where = format_indexes(first_block.indexes)
        else:
            where = "every free %d-GPU block is short; first choice %s" % (
                request.gpus, format_indexes(first_block.indexes))
        raise PlacementError("%s: %s (%s); lower vcpus/memory, release a VM, or change "
                             "reserved_cpus/reserved_memory_mb" % (
                                 self._prefix(request), first_error, where))

    def _fit_cpu_only(self, request):
        m = self.model
        vcpus, memory = self._sizes(request)
        order = sorted(m.node_ids, key=lambda n: (
            -self.node_free.get(n, 0), -(m.mem_capacity[n] - self.mem_used[n]), n))
        first_error = None
        for node in order:
            short = self._shortage(request, (node,), [vcpus], [memory])
            if short is None:
                return None, (node,), [vcpus], [memory]
            first_error = first_error or short
        raise PlacementError("%s: %s; lower vcpus/memory or release a VM" % (
            self._prefix(request), first_error or "this host has no NUMA node"))

    def _shortage(self, request, nodes, vcpus, memory):
        """None when the nodes hold the CPUs and memory, else what was short (text)."""
        m = self.model
        if request.cpu_policy == POLICY_DEDICATED:
            for node, need in zip(nodes, vcpus):
                have = self.node_free.get(node, 0)
                if need > have:
                    return "needs %d vCPUs on NUMA node %d, %d free: %s" % (
                        need, node, have, self._cpu_use_text(node))
        else:
            for node, need in zip(nodes, vcpus):
                have = len(m.node_cpus.get(node, ()))
                if not have:
                    return "NUMA node %d has no unreserved CPU for shared vCPUs" % node
                if need > have:
                    # Overcommit is across VMs; one VM's vCPUs outnumbering the CPUs they float
                    # over only makes its own vCPUs preempt each other.
                    return "needs %d shared vCPUs on NUMA node %d, which has %d unreserved " \
                           "CPUs" % (need, node, have)
        page = self._page_size(request, nodes, memory)
        if page < 0:
            return ("hugepages requested but NUMA node(s) %s have no hugepage pool; reserve "
                    "hugepages on the host or set hugepages: false"
                    % ",".join(map(str, nodes)))
        for node, need in zip(nodes, memory):
            if page:
                pages = -(-need * 1024 // page)
                free = m.huge_total[node].get(page, 0) - self.huge_used[node].get(page, 0)
                if pages > free:
                    return "needs %d hugepages of %d kB on NUMA node %d, %d free of %d" % (
                        pages, page, node, free, m.huge_total[node].get(page, 0))
            else:
                free = m.mem_capacity[node] - self.mem_used[node]
                if need > free:
                    return "needs %d MB on NUMA node %d, %d MB free: %s" % (
                        need, node, free, self._mem_use_text(node))
        return None

    def _page_size(self, request, nodes, memory):
        """Hugepage size (kB) for a request; 0 for normal memory."""
        want = request.hugepages
        if want is False or want is None or want == 0:
            return 0
        m = self.model
        if want is True:
            sizes = set()
            for node in nodes:
                sizes.update(m.huge_total[node])
            # The largest page size with room on every node (1 GiB pages before 2 MiB ones).
            for size in sorted(sizes, reverse=True):
                if all(m.huge_total[node].get(size, 0) - self.huge_used[node].get(size, 0)
                       >= -(-need * 1024 // size) for node, need in zip(nodes, memory)):
                    return size
            return max(sizes) if sizes else -1
        return int(want)

    def _cpu_use_text(self, node):
        m = self.model
        by_vm = {}
        for cpu in m.node_cpus.get(node, ()):
            holder = self.cpu_holder.get(cpu)
            if holder is not None:
                by_vm[holder] = by_vm.get(holder, 0) + 1
        parts = ["%d held by %s" % (n, vm) for vm, n in sorted(by_vm.items())]
        parts.append("%d reserved" % len(m.node_reserved.get(node, ())))
        return ", ".join(parts)

    def _mem_use_text(self, node):
        by_vm = {}
        for alloc in self.allocations.values():
            if alloc.hugepage_kb:
                continue
            mb = self._memory_of(alloc).get(node, 0)
            if mb:
                by_vm[alloc.name] = mb
        parts = ["%d MB held by %s" % (mb, vm) for vm, mb in sorted(by_vm.items())]
        parts.append("%d MB reserved" % self.model.reserve_mb[node])
        return ", ".join(parts)

    def _commit(self, request, fit):
        block, nodes, vcpus, memory = fit
        m = self.model
        hugepage = self._page_size(request, nodes, memory)
        cpus_by_node = {}
        if request.cpu_policy == POLICY_DEDICATED:
            cpus = []
            for node, need in zip(nodes, vcpus):
                picked = self._pick_cpus(node, need)
                cpus_by_node[node] = tuple(picked)
                cpus.extend(picked)
            cpus = tuple(cpus)
        else:
            cpus = tuple(sorted(c for node in nodes for c in m.node_cpus.get(node, ())))
        emulator = tuple(sorted(c for node in nodes for c in m.node_reserved.get(node, ())))
        indexes = block.indexes if block is not None else ()
        switches = block.switches if block is not None else ()
        placement = Placement(
            name=request.name,
            gpus=tuple(m.gpu_bdfs[i] for i in indexes),
            gpu_indexes=tuple(indexes),
            nvswitches=tuple(m.switch_bdfs[s] for s in switches),
            nvswitch_indexes=tuple(switches),
            numa_nodes=tuple(nodes),
            cpus=cpus,
            cpus_by_node=cpus_by_node,
            emulator_cpus=emulator,
            memory_mb=sum(memory),
            memory_by_node=dict(zip(nodes, memory)),
            vcpus=sum(vcpus),
            cpu_policy=request.cpu_policy,
            hugepage_kb=hugepage,
            fm_partition=(m.platform.fm_partition_for(indexes)
                          if indexes and m.platform.fabric == FABRIC_SHARED_NVSWITCH else None),
        )
        self._record(placement.allocation())
        return placement

    def _pick_cpus(self, node, need):
        """Free CPUs of a node: whole free cores first (siblings adjacent), then partial ones."""
        if need <= 0:
            return []
        holder = self.cpu_holder
        whole, partial = [], []
        for free, full in self.model.node_cores.get(node, ()):
            avail = [c for c in free if c not in holder]
            if not avail:
                continue
            (whole if len(avail) == full else partial).append(avail)
        picked = []
        spare = []
        for avail in whole:
            if need - len(picked) >= len(avail):
                picked.extend(avail)
            else:
                spare.append(avail)
            if len(picked) == need:
                return picked
        # Fewer vCPUs left than a core has threads: use already broken cores before breaking
        # a whole one, so whole cores stay available to the next VM.
        for avail in partial + spare:
            take = min(need - len(picked), len(avail))
            picked.extend(avail[:take])
            if len(picked) == need:
                return picked
        raise PlacementError("internal: NUMA node %d ran out of CPUs during pinning" % node)

    def _placement_from(self, alloc):
        m = self.model
        indexes = tuple(sorted(m.gpu_index[_normalise_bdf(b)] for b in alloc.gpus
                               if _normalise_bdf(b) in m.gpu_index))
        switches = tuple(sorted(m.switch_index[_normalise_bdf(b)] for b in alloc.nvswitches
                                if _normalise_bdf(b) in m.switch_index))
        memory = self._memory_of(alloc)
        nodes = tuple(alloc.numa_nodes) or tuple(sorted(memory))
        by_node = {}
        if alloc.cpu_policy == POLICY_DEDICATED:
            for cpu in alloc.cpus:
                node = m.topology.cpus[cpu].node if cpu in m.topology.cpus else None
                by_node.setdefault(node, []).append(cpu)
        return Placement(
            name=alloc.name, gpus=tuple(alloc.gpus), gpu_indexes=indexes,
            nvswitches=tuple(alloc.nvswitches), nvswitch_indexes=switches, numa_nodes=nodes,
            cpus=tuple(alloc.cpus), cpus_by_node={k: tuple(v) for k, v in by_node.items()},
            emulator_cpus=tuple(sorted(c for n in nodes for c in m.node_reserved.get(n, ()))),
            memory_mb=alloc.memory_mb or sum(memory.values()), memory_by_node=memory,
            vcpus=alloc.vcpus if alloc.vcpus is not None else len(alloc.cpus),
            cpu_policy=alloc.cpu_policy, hugepage_kb=alloc.hugepage_kb,
            fm_partition=(m.platform.fm_partition_for(indexes)
                          if indexes and m.platform.fabric == FABRIC_SHARED_NVSWITCH else None),
        )

    def plan(self, requests):
        """Place and record requests jointly, largest first; [(request, Placement or error)]."""
        requests = list(requests)
        results = [None] * len(requests)
        seen = {}
        for k, req in enumerate(requests):
            if req.name in seen:
                results[k] = PlacementError(
                    "request %r appears twice (first at position %d); give each VM one entry"
                    % (req.name, seen[req.name]))
            else:
                seen[req.name] = k
        todo = [k for k in range(len(requests)) if results[k] is None]
        # Free what changed VMs hold now, so others (and they themselves) can use it; a VM that
        # cannot be re-placed gets its old allocation back below if that is still free.
        changed = {}
        for k in todo:
            old = self.allocations.get(requests[k].name)
            if old is not None and len(old.gpus) != requests[k].gpus:
                changed[k] = self.release(old.name)
        sticky = [k for k in todo if requests[k].name in self.allocations]
        rest = sorted((k for k in todo if k not in sticky), key=lambda k: -requests[k].gpus)
        for k in sticky + rest:
            try:
                results[k] = self.place(requests[k])
            except PlacementError as exc:
                results[k] = exc
        for k, old in changed.items():
            if isinstance(results[k], PlacementError) and self._is_free_for(old):
                self._record(old)
                results[k] = PlacementError("%s; %s keeps its current %d GPU(s)" % (
                    results[k], old.name, len(old.gpus)))
        return list(zip(requests, results))

    def _is_free_for(self, alloc):
        m = self.model
        for bdf in alloc.gpus:
            i = m.gpu_index.get(_normalise_bdf(bdf))
            if i is not None and self.gpu_holder[i] is not None:
                return False
        for bdf in alloc.nvswitches:
            s = m.switch_index.get(_normalise_bdf(bdf))
            if s is not None and self.switch_holder[s] is not None:
                return False
        if alloc.cpu_policy == POLICY_DEDICATED and any(c in self.cpu_holder for c in alloc.cpus):
            return False
        return True


def _choose_best(state, request, candidates):
    """Rank free blocks: largest blocks kept free, then fewest NUMA nodes, then lowest index."""
    m = state.model
    if not m.partitioned or len(candidates) == 1:
        return candidates  # generic candidates arrive ranked by topology score
    free = state.free_mask
    vector = m.vector
    # Measured against first fit on 300 held-out simulated days per mix on one DGX-2
    # (bench/placement.py --study; numbers in bench/README.md). No other rule we tried did better
    # than this one. Breaking ties by the busiest enclosing block was no better, and worse on
    # small-heavy mixes. Counting only 8/16-GPU blocks loses fewer days but gains less. A rule
    # that knows every departure time gains about 0.5 % more and still loses as many days. With
    # default templates, CPUs and memory never refuse a request whose GPUs fit, so no
    # CPU/memory tie-break is needed for that.
    return sorted(candidates, key=lambda b: (
        tuple(-c for c in vector(free & ~b.mask)), len(b.nodes), b.indexes))


def _choose_first(state, request, candidates):
    """nvidia-vm by hand: the lowest-index free block of the size."""
    m = state.model
    if not m.partitioned and request.gpu_index is None:
        # Generic candidates may be a greedy subset; the lowest free GPUs are always a choice.
        lowest = _Block(state.free_gpu_indexes()[:request.gpus], (), m.gpu_count, m.gpu_node)
        return [lowest] + sorted(candidates, key=lambda b: b.indexes)
    return sorted(candidates, key=lambda b: b.indexes)


def first_fit(state, request):
    """Place like an nvidia-vm user by hand: the lowest-index free aligned block (baseline)."""
    return state._place(request, _choose_first)


def _validate(request):
    if not isinstance(request.name, str) or not request.name:
        raise PlacementError("name: a VM needs a non-empty name, got %r" % (request.name,))
    prefix = "request %r" % request.name
    for key in ("gpus", "gpu_index", "vcpus", "memory_mb"):
        value = getattr(request, key)
        if value is None and key != "gpus":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise PlacementError("%s: %s must be an integer, got %r" % (prefix, key, value))
        minimum = 1 if key in ("vcpus", "memory_mb") else 0
        if value < minimum:
            raise PlacementError("%s: %s must be >= %d, got %d" % (prefix, key, minimum, value))
    if request.gpu_index is not None and request.gpus == 0:
        raise PlacementError("%s: gpu_index needs gpus >= 1" % prefix)
    if request.cpu_policy not in CPU_POLICIES:
        raise PlacementError("%s: cpu_policy must be one of %s, got %r" % (
            prefix, ", ".join(CPU_POLICIES), request.cpu_policy))
    hp = request.hugepages
    if not (hp is None or isinstance(hp, bool) or (isinstance(hp, int) and hp > 0)):
        raise PlacementError("%s: hugepages must be true, false or a page size in kB (2048, "
                             "1048576), got %r" % (prefix, hp))


def _same_size(alloc, request):
    vcpus = alloc.vcpus if alloc.vcpus is not None else len(alloc.cpus)
    want_hp = request.hugepages
    hp_same = (bool(alloc.hugepage_kb) == bool(want_hp)) and (
        not isinstance(want_hp, int) or isinstance(want_hp, bool) or want_hp == alloc.hugepage_kb)
    return ((request.vcpus is None or request.vcpus == vcpus)
            and (request.memory_mb is None or request.memory_mb == alloc.memory_mb)
            and request.cpu_policy == alloc.cpu_policy and hp_same)


def _normalise_bdf(bdf):
    bdf = str(bdf).strip().lower()
    return bdf if bdf.count(":") == 2 else "0000:" + bdf


def _comb(n, k):
    if k < 0 or k > n:
        return 0
    k = min(k, n - k)
    result = 1
    for i in range(k):
        result = result * (n - i) // (i + 1)
    return result


# --- fleet ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FleetAssignment:
    request: Request
    host: str
    placement: Placement


@dataclass
class FleetPlan:
    assignments: list  # FleetAssignment, in request order
    unplaced: list  # (Request, reason), in request order


class _Index(object):
    """Buckets of hosts by free-block shape, over all hosts or over one allowed subset."""

    __slots__ = ("members", "buckets", "order")

    def __init__(self, members):
        self.members = members  # frozenset of host numbers, None: every host
        self.buckets = {}  # key -> sorted host numbers
        self.order = []  # sorted keys of non-empty buckets

    def add(self, h, key):
        bucket = self.buckets.get(key)
        if bucket is None:
            self.buckets[key] = [h]
            bisect.insort(self.order, key)
        else:
            bisect.insort(bucket, h)

    def remove(self, h, key):
        bucket = self.buckets[key]
        del bucket[bisect.bisect_left(bucket, h)]
        if not bucket:
            del self.buckets[key]
            del self.order[bisect.bisect_left(self.order, key)]

    def size(self):
        return sum(len(b) for b in self.buckets.values())


class Fleet(object):
    """Many hosts, indexed by free-block shape so a request never rescans every host.

    Hosts with the same (platform, free-block vector, free GPUs) form one bucket; buckets are
    kept sorted by free GPUs, so best fit ("fewest free GPUs left that still fit") walks
    buckets from the fullest and stops at the first free-GPU count where something fits.

    A request may be limited to some hosts (``allowed``: host names). Each distinct allowed set
    gets its own bucket index over the same host states, kept current as hosts fill, so a
    limited request walks only its hosts and is placed exactly as if the others did not exist.
    """

    def __init__(self, hosts):
        self.names = []
        self.states = []
        self.index = {}
        self.vm_host = {}
        for name, state in hosts:
            if name in self.index:
                raise PlacementError("hosts: %r is listed twice" % name)
            self.index[name] = len(self.names)
            self.names.append(name)
            self.states.append(state)
            for vm in state.allocations:
                self.vm_host[vm] = name
        self.key_of = []
        self._all = _Index(None)
        self._subsets = {}  # allowed host names (as given) -> _Index
        self.buckets = self._all.buckets
        self.order = self._all.order
        for h, state in enumerate(self.states):
            key = self._key(state)
            self.key_of.append(key)
            self._all.add(h, key)

    @staticmethod
    def _key(state):
        return (state.free_gpus, id(state.model.platform), state.free_vector())

    def _refresh(self, h):
        key = self._key(self.states[h])
        old = self.key_of[h]
        if key != old:
            self.key_of[h] = key
            self._all.remove(h, old)
            self._all.add(h, key)
            for idx in self._subsets.values():
                if h in idx.members:
                    idx.remove(h, old)
                    idx.add(h, key)

    def _index_for(self, allowed):
        """The bucket index of an allowed set of host names (None: every host)."""
        if allowed is None:
            return self._all
        idx = self._subsets.get(allowed) if isinstance(allowed, (frozenset, tuple)) else None
        if idx is None:
            members = frozenset(self.index[n] for n in allowed if n in self.index)
            idx = _Index(members)
            for h in sorted(members):
                idx.add(h, self.key_of[h])
            if isinstance(allowed, (frozenset, tuple)):
                self._subsets[allowed] = idx
        return idx

    def place(self, request, strategy="best", allowed=None):
        """Place one request on the best host; returns (host name, Placement).

        ``allowed``: host names the request may use (None: any). Pass the same frozenset for
        requests that share a constraint: its index is then built once and kept current.
        """
        idx = self._index_for(allowed)
        if request.host is not None or request.name in self.vm_host:
            return self._place_named(request, strategy, idx)
        if idx.members is not None and not idx.members:
            raise PlacementError("request %r (%d GPU%s): no host is allowed for it" % (
                request.name, request.gpus, "" if request.gpus == 1 else "s"))
        if strategy == "first_fit":
            return self._first_fit(request, idx)
        n = request.gpus
        errors = []
        k = 0
        order = idx.order
        buckets = idx.buckets
        while k < len(order):
            free = order[k][0]
            group = []
            while k < len(order) and order[k][0] == free:
                key = order[k]
                rep = self.states[buckets[key][0]]
                if free >= n and rep.can_fit_gpus(n):
                    group.append(key)
                k += 1
            if not group:
                continue
            ranked = sorted(group, key=lambda key: (self._after(buckets[key][0], n),
                                                    buckets[key][0]))
            for key in ranked:
                for h in list(buckets.get(key, ())):
                    try:
                        placement = self.states[h].place(request)
                    except PlacementError as exc:
                        # GPUs fit, CPUs or memory did not: try the next equivalent host.
                        if len(errors) < 3:
                            errors.append("%s: %s" % (self.names[h], exc))
                        continue
                    return self._done(h, request, placement)
        raise PlacementError(self._why_not(request, errors, idx))

    def _after(self, h, n):
        """Sort key: the free-block vector left after placing n on host h (best first)."""
        state = self.states[h]
        m = state.model
        if not m.partitioned or n == 0:
            return ()
        free = state.free_mask
        best = None
        for b in m.blocks_by_size.get(n, ()):
            if b.mask & free == b.mask:
                vec = tuple(-c for c in m.vector(free & ~b.mask))
                if best is None or vec < best:
                    best = vec
        return best or ()

    def _first_fit(self, request, idx):
        n = request.gpus
        errors = []
        candidates = []
        for key in idx.order:
            if key[0] >= n:
                candidates.extend(idx.buckets[key])
        for h in sorted(candidates):
            state = self.states[h]
            if not state.can_fit_gpus(n):
                continue
            try:
                placement = first_fit(state, request)
            except PlacementError as exc:
                if len(errors) < 3:
                    errors.append("%s: %s" % (self.names[h], exc))
                continue
            return self._done(h, request, placement)
        raise PlacementError(self._why_not(request, errors, idx))

    def _why_not(self, request, errors, idx):
        largest = {}
        for key in idx.order:
            free = key[0]
            largest[free] = largest.get(free, 0) + len(idx.buckets[key])
        most = max(largest) if largest else 0
        if idx.members is None:
            hosts = "no host of %d" % len(self.names)
        else:
            hosts = "no allowed host (%d of %d)" % (len(idx.members), len(self.names))
        text = "request %r (%d GPU%s): %s has a free %d-GPU block (most free GPUs on one " \
               "host: %d)" % (request.name, request.gpus, "" if request.gpus == 1 else "s",
                              hosts, request.gpus, most)
        if errors:
            text += "; hosts with free GPUs but short CPUs/memory: " + "; ".join(errors)
        return text

    def _place_named(self, request, strategy, idx=None):
        host = request.host or self.vm_host.get(request.name)
        current = self.vm_host.get(request.name)
        if current is not None and request.host is not None and request.host != current:
            raise PlacementError("request %r names host %r, but the VM is already defined on %r;"
                                 " remove it there first or drop host" % (
                                     request.name, request.host, current))
        if host not in self.index:
            raise PlacementError("request %r names host %r, which is not in the fleet" % (
                request.name, host))
        h = self.index[host]
        if idx is not None and idx.members is not None and h not in idx.members:
            if current is not None:
                raise PlacementError(
                    "request %r: the VM is already defined on %r, which is not among the hosts "
                    "allowed for it; remove it there first or widen its constraint" % (
                        request.name, host))
            raise PlacementError("request %r names host %r, which is not among the hosts "
                                 "allowed for it" % (request.name, host))
        state = self.states[h]
        placement = first_fit(state, request) if strategy == "first_fit" else state.place(request)
        return self._done(h, request, placement)

    def _done(self, h, request, placement):
        self.vm_host[request.name] = self.names[h]
        self._refresh(h)
        return self.names[h], placement

    def release(self, vm):
        """Forget a VM wherever it is; returns its host name or None."""
        host = self.vm_host.pop(vm, None)
        if host is None:
            return None
        h = self.index[host]
        self.states[h].release(vm)
        self._refresh(h)
        return host

    def plan(self, requests, strategy="best", allowed=None):
        """Place requests jointly; FleetPlan with results in request order.

        The order is HostState.plan's, so each host's share lands as kvm_layout places it
        there: a defined VM whose GPU count changes gives its GPUs back first and stays on its
        host (it keeps the old ones when the new count does not fit); defined VMs go first, then
        the rest largest first (stable). ``allowed``: per request (same order), None or the
        host names it may use (see place()).
        """
        requests = list(requests)
        allowed = list(allowed) if allowed is not None else [None] * len(requests)
        if len(allowed) != len(requests):
            raise PlacementError("allowed: %d entries for %d requests" % (
                len(allowed), len(requests)))
        results = [None] * len(requests)
        effective = list(requests)
        seen = {}
        for k, req in enumerate(requests):
            if req.name in seen:
                results[k] = PlacementError(
                    "request %r appears twice (first at position %d); give each VM one entry"
                    % (req.name, seen[req.name]))
            else:
                seen[req.name] = k
        changed = {}
        for k, req in enumerate(requests):
            current = self.vm_host.get(req.name)
            if results[k] is not None or current is None:
                continue
            if req.host is not None and req.host != current:
                results[k] = PlacementError(
                    "request %r names host %r, but the VM is already defined on %r; remove it "
                    "there first or drop host" % (req.name, req.host, current))
                continue
            if allowed[k] is not None and current not in allowed[k]:
                results[k] = PlacementError(
                    "request %r: the VM is already defined on %r, which is not among the hosts "
                    "allowed for it; remove it there first or widen its constraint" % (
                        req.name, current))
                continue
            old = self.states[self.index[current]].allocations.get(req.name)
            if old is not None and len(old.gpus) != req.gpus:
                self.release(req.name)
                changed[k] = (current, old)
                effective[k] = replace(req, host=current)
        todo = [k for k in range(len(requests)) if results[k] is None]
        sticky = [k for k in todo if requests[k].name in self.vm_host]
        rest = sorted((k for k in todo if requests[k].name not in self.vm_host),
                      key=lambda k: -requests[k].gpus)
        for k in sticky + rest:
            try:
                results[k] = self.place(effective[k], strategy, allowed[k])
            except PlacementError as exc:
                results[k] = exc
        for k, (host, old) in changed.items():
            h = self.index[host]
            if isinstance(results[k], PlacementError) and self.states[h].restore(old):
                self.vm_host[old.name] = host
                self._refresh(h)
                results[k] = PlacementError("%s; %s keeps its current %d GPU(s) on %s" % (
                    results[k], old.name, len(old.gpus), host))
        plan = FleetPlan(assignments=[], unplaced=[])
        for req, res in zip(requests, results):
            if isinstance(res, PlacementError):
                plan.unplaced.append((req, str(res)))
            else:
                plan.assignments.append(FleetAssignment(req, res[0], res[1]))
        return plan


def plan_fleet(hosts, requests, strategy="best", allowed=None):
    """Place requests over [(host name, HostState)] (recorded in those states); see Fleet.plan."""
    return Fleet(hosts).plan(requests, strategy, allowed)

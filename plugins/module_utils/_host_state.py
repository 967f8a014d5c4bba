# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Who holds what on one host: GPUs, NVSwitches, pinned CPUs, memory and hugepages per node.
Private, pure.

:class:`HostLedger` records and releases holdings over the static host model
(``_placement_model``) and answers what is free: the free-block vector, free GPUs, whether a block
fits. ``_placement.HostState`` adds the rules that choose.
"""

from __future__ import annotations

from ansible_collections.gpuvirt.kvm.plugins.module_utils._bdf import normalize_bdf
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import (
    POLICY_DEDICATED,
    _HostModel,
    format_indexes,
    split_proportionally,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._ranges import format_ranges


class HostLedger(object):
    """One host's devices, CPUs and memory, and which VM holds what (placing is
    ``_placement.HostState``'s)."""

    def __init__(self, topology, platform, allocations=(), reserved_cpus=None,
                 reserved_memory_mb=None, unhealthy_gpus=(), nvlinks=None, busy_gpus=None,
                 nics=None, gpu_group_nics=None, failed_switches=()):
        self.model = _HostModel(topology, platform, reserved_cpus, reserved_memory_mb, nvlinks,
                                nics, gpu_group_nics)
        self._start(allocations, unhealthy_gpus, busy_gpus, failed_switches)

    def _start(self, allocations, unhealthy_gpus, busy_gpus=None, failed_switches=()):
        """Nothing held, then these unhealthy and busy GPUs, failed NVSwitches and holdings
        (warning about conflicts). ``busy_gpus``: {address: why} for GPUs that no VM may get now
        whoever holds them (on a shared-NVSwitch host, those of an active Fabric Manager
        partition). ``failed_switches``: NVSwitch addresses whose health failed (_health); no
        block that needs one is placed."""
        self.warnings = []
        self._reset()
        self.unhealthy = frozenset()
        self._set_unhealthy(unhealthy_gpus)
        self.failed_switches = frozenset()
        self._set_failed_switches(failed_switches)
        self.busy = {}
        self._set_busy(busy_gpus or {})
        for alloc in allocations:
            self._record(alloc, warn=True)

    def _reset(self):
        m = self.model
        self.gpu_holder = [None] * m.gpu_count
        self.switch_holder = [None] * m.switch_count
        self.cpu_holder = {}
        self.nic_holder = {}  # rail NIC function or VF (BDF) -> VM
        self.node_free = {n: len(c) for n, c in m.node_cpus.items()}
        self.mem_used = {n: 0 for n in m.node_ids}
        self.huge_used = {n: {} for n in m.node_ids}
        self.allocations = {}
        self.free_mask = (1 << (m.gpu_count + m.switch_count)) - 1
        self.free_gpus = m.gpu_count

    def _set_unhealthy(self, bdfs):
        bad = set()
        for bdf in bdfs:
            norm = normalize_bdf(bdf)
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

    def _set_failed_switches(self, bdfs):
        m = self.model
        bad = {m.switch_index[normalize_bdf(b)] for b in bdfs if normalize_bdf(b) in m.switch_index}
        self.failed_switches = frozenset(bad)
        for s in bad:
            self.free_mask &= ~(1 << (m.gpu_count + s))

    def _set_busy(self, reasons):
        for bdf, why in reasons.items():
            i = self.model.gpu_index.get(normalize_bdf(bdf))
            if i is None:
                continue
            self.busy[i] = why
            if self.free_mask & (1 << i):
                self.free_mask &= ~(1 << i)
                self.free_gpus -= 1

    def _unusable(self, i):
        return i in self.unhealthy or i in self.busy

    def copy(self):
        """An independent state sharing the static host model (cheap; used for fleets)."""
        new = object.__new__(type(self))
        new.model = self.model
        new.warnings = list(self.warnings)
        new.unhealthy = self.unhealthy
        new.failed_switches = self.failed_switches
        new.busy = self.busy
        new.gpu_holder = list(self.gpu_holder)
        new.switch_holder = list(self.switch_holder)
        new.cpu_holder = dict(self.cpu_holder)
        new.nic_holder = dict(self.nic_holder)
        new.node_free = dict(self.node_free)
        new.mem_used = dict(self.mem_used)
        new.huge_used = {n: dict(v) for n, v in self.huge_used.items()}
        new.allocations = dict(self.allocations)
        new.free_mask = self.free_mask
        new.free_gpus = self.free_gpus
        return new

    def derive(self, allocations=(), unhealthy_gpus=(), busy_gpus=None, failed_switches=()):
        """A state of another host built like this one: the same (shared) host model, other
        allocations, unhealthy GPUs and failed switches. What HostState() would make, without
        rebuilding the model (fleets of one hardware model share it, and its caches)."""
        new = object.__new__(type(self))
        new.model = self.model
        new._start(allocations, unhealthy_gpus, busy_gpus, failed_switches)
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
        for i in self._held(alloc, alloc.gpus, "GPU", m.gpu_index, self.gpu_holder, warn):
            self.gpu_holder[i] = alloc.name
            if self.free_mask & (1 << i):
                self.free_mask &= ~(1 << i)
                self.free_gpus -= 1
        for s in self._held(alloc, alloc.nvswitches, "NVSwitch", m.switch_index,
                            self.switch_holder, warn):
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
        for bdf in tuple(alloc.nics) + tuple(alloc.extra_nics):
            bdf = normalize_bdf(bdf)
            if self.nic_holder.get(bdf) not in (None, alloc.name):
                if warn:
                    self.warnings.append("%s and %s both hold NIC %s" % (
                        self.nic_holder[bdf], alloc.name, bdf))
                continue
            self.nic_holder[bdf] = alloc.name
        self._count_memory(alloc, 1)
        self.allocations[alloc.name] = alloc

    def _held(self, alloc, bdfs, kind, index, holder, warn):
        """The indexes of the devices ``alloc`` holds that this host has and nobody else holds
        (with warnings for the others when ``warn``)."""
        for bdf in bdfs:
            i = index.get(normalize_bdf(bdf))
            if i is None:
                if warn:
                    self.warnings.append("%s holds %s %s, which this host does not have"
                                         % (alloc.name, kind, bdf))
                continue
            if holder[i] is not None and warn:
                self.warnings.append("%s and %s both hold %s %s" % (
                    holder[i], alloc.name, kind, "%d (%s)" % (i, bdf) if kind == "GPU" else bdf))
                continue
            yield i

    def _count_memory(self, alloc, sign):
        """Add (sign 1) or give back (sign -1) the memory, or hugepages, a holding uses on each
        of its nodes."""
        for node, mb in self._memory_of(alloc).items():
            if node not in self.mem_used:
                continue
            if alloc.hugepage_kb:
                pages = -(-mb * 1024 // alloc.hugepage_kb)
                used = self.huge_used[node]
                used[alloc.hugepage_kb] = max(0, used.get(alloc.hugepage_kb, 0) + sign * pages)
            else:
                self.mem_used[node] = max(0, self.mem_used[node] + sign * mb)

    def _memory_of(self, alloc):
        if alloc.memory_by_node:
            return {int(k): int(v) for k, v in alloc.memory_by_node.items()}
        if not alloc.memory_mb:
            return {}
        nodes = list(alloc.numa_nodes) or sorted(set(
            self.model.topology.cpus[c].node for c in alloc.cpus
            if c in self.model.topology.cpus)) or list(self.model.node_ids[:1])
        return dict(zip(nodes, split_proportionally(alloc.memory_mb, [1] * len(nodes))))

    def release(self, name):
        """Forget a VM's allocation (its domain was undefined). Returns it, or None."""
        alloc = self.allocations.pop(name, None)
        if alloc is None:
            return None
        m = self.model
        for i, holder in enumerate(self.gpu_holder):
            if holder == name:
                self.gpu_holder[i] = None
                if not self._unusable(i):
                    self.free_mask |= 1 << i
                    self.free_gpus += 1
        for s, holder in enumerate(self.switch_holder):
            if holder == name:
                self.switch_holder[s] = None
                if s not in self.failed_switches:
                    self.free_mask |= 1 << (m.gpu_count + s)
        if alloc.cpu_policy == POLICY_DEDICATED:
            for cpu in alloc.cpus:
                if self.cpu_holder.get(cpu) == name:
                    del self.cpu_holder[cpu]
                    node = m.topology.cpus[cpu].node if cpu in m.topology.cpus else None
                    if node in self.node_free and cpu not in m.reserved:
                        self.node_free[node] += 1
        for bdf in [b for b, holder in self.nic_holder.items() if holder == name]:
            del self.nic_holder[bdf]
        self._count_memory(alloc, -1)
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
                      "holder": self.gpu_holder[i], "healthy": i not in self.unhealthy,
                      "busy": self.busy.get(i)}
                     for i, bdf in enumerate(m.gpu_bdfs)],
            "nvswitches": [{"index": j, "bdf": bdf, "holder": self.switch_holder[j]}
                           for j, bdf in enumerate(m.switch_bdfs)],
            "free_blocks": self.free_blocks(),
            "reserved_cpus": format_ranges(m.reserved),
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

    def free_by_model(self):
        """Free healthy GPUs per model ((vendor, device) -> count): a VM gets GPUs of one model
        unless it asks for a mix (gpu_model: any)."""
        counts = {}
        for i in self.free_gpu_indexes():
            model = self.model.gpu_model[i]
            counts[model] = counts.get(model, 0) + 1
        return counts

    def free_blocks(self):
        """{size: count}, largest first: free healthy GPUs as a maximal set of blocks (on a
        generic host, of one model each)."""
        m = self.model
        if m.partitioned:
            return {s: c for s, c in zip(m.sizes_desc, m.vector(self.free_mask)) if c}
        groups = list(self.free_by_model().values())
        blocks = {s: sum(g // s for g in groups) for s in range(m.gpu_count, 0, -1)}
        return {s: c for s, c in blocks.items() if c}

    def can_fit_gpus(self, n, gpu_model=None):
        """True when some free GPU set of n GPUs exists, of one model unless ``gpu_model`` is
        "any" (CPUs, memory and which model gpu_model names are not checked)."""
        if n == 0:
            return True
        m = self.model
        if m.partitioned:
            free = self.free_mask
            return any(b.mask & free == b.mask for b in m.blocks_by_size.get(n, ()))
        if self.free_gpus < n or m.single_model or str(gpu_model).lower() == "any":
            return self.free_gpus >= n
        return max(self.free_by_model().values()) >= n

    def template(self, gpus):
        """Default vcpus / memory_mb / os_disk_gb for a GPU count on this host."""
        return self.model.template(gpus)

    def templates(self):
        """{GPU count: Template} for every size this host can place (generic: 1..GPUs)."""
        return self.model.templates()

    # --- who holds what, in words -------------------------------------------------------------

    def _holders_text(self, indexes=None):
        groups = {}
        for i in range(self.model.gpu_count) if indexes is None else indexes:
            holder = self.gpu_holder[i]
            if holder is not None:
                groups.setdefault("held by %s" % holder, []).append(i)
            elif i in self.unhealthy:
                groups.setdefault("unhealthy", []).append(i)
            elif i in self.busy:
                groups.setdefault(self.busy[i], []).append(i)
        parts = sorted(groups.items(), key=lambda kv: min(kv[1]))
        return ", ".join("%s %s" % (format_indexes(ix), why) for why, ix in parts)

    def _switch_holders_text(self, switches):
        parts = []
        for s in switches:
            if self.switch_holder[s] is not None:
                parts.append("NVSwitch %d (%s) held by %s" % (
                    s, self.model.switch_bdfs[s], self.switch_holder[s]))
            elif s in self.failed_switches:
                parts.append("NVSwitch %d (%s) failed its health check" % (
                    s, self.model.switch_bdfs[s]))
        return ", ".join(parts)

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

    def _is_free_for(self, alloc):
        m = self.model
        for bdf in alloc.gpus:
            i = m.gpu_index.get(normalize_bdf(bdf))
            if i is not None and self.gpu_holder[i] is not None:
                return False
        for bdf in alloc.nvswitches:
            s = m.switch_index.get(normalize_bdf(bdf))
            if s is not None and self.switch_holder[s] is not None:
                return False
        if alloc.cpu_policy == POLICY_DEDICATED and any(c in self.cpu_holder for c in alloc.cpus):
            return False
        return not any(normalize_bdf(b) in self.nic_holder
                       for b in tuple(alloc.nics) + tuple(alloc.extra_nics))

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

import itertools
from dataclasses import replace

from ansible_collections.gpuvirt.kvm.plugins.module_utils._bdf import normalize_bdf
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_state import HostLedger
from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import (
    NIC_MODES,
    NICS_AUTO,
    NicChoiceError,
    choose_nics,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import (
    CPU_POLICIES,
    EXHAUSTIVE_LIMIT,
    POLICY_DEDICATED,
    Placement,
    PlacementError,
    _Block,
    _comb,
    _format_blocks,
    duplicate_refusals,
    format_indexes,
    split_proportionally,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
    FABRIC_SHARED_NVSWITCH,
    gpu_model_ids,
    gpu_model_name,
    platform_fabric_devices,
)


class HostState(HostLedger):
    """A host's ledger (HostLedger) and the rules that choose what a new VM gets."""

    def place(self, request):
        """Choose and record GPUs, NVSwitches, CPUs and memory for a request."""
        return self._place(request, _choose_best)

    def _place(self, request, chooser):
        _validate(request)
        old = self.allocations.get(request.name)
        if old is not None:
            held = tuple(sorted(self.model.gpu_index[normalize_bdf(b)] for b in old.gpus
                                if normalize_bdf(b) in self.model.gpu_index))
            if request.replace_failed and not request.fabric_service and (
                    any(i in self.unhealthy for i in held)
                    or any(self.model.switch_index.get(normalize_bdf(b)) in self.failed_switches
                           for b in old.nvswitches)):
                # recreate: off an unhealthy GPU or a failed switch, where a healthy block is
                # free; else it keeps what it holds (and _vm_plan does not start it).
                self.release(request.name)
                try:
                    return self._place_new(request, chooser)
                except PlacementError:
                    self._record(old)
            if len(held) == len(old.gpus) == request.gpus and (
                    request.gpu_index is None or (held and held[0] == request.gpu_index)) and (
                    self._models_of(request) is None
                    or all(self.model.gpu_model[i] in self._models_of(request) for i in held)):
                if _same_size(old, request) and (
                        not request.fabric_service
                        or len(old.nvswitches) == self.model.switch_count):
                    if _nics_answer(old, request, self.model.nic_vfs):
                        return self._fabric_of(request, self._placement_from(old))
                    return self._renic(old, request)
                # Same GPUs (sticky), new CPU/memory shape: re-place only CPUs and memory.
                self.release(request.name)
                switches = tuple(sorted(self.model.switch_index[normalize_bdf(b)]
                                        for b in old.nvswitches
                                        if normalize_bdf(b) in self.model.switch_index))
                fixed = _Block(held, switches, self.model.gpu_count, self.model.gpu_node)
                try:
                    if not held:
                        return self._commit(request, self._fit_cpu_only(request), old)
                    return self._commit(request, self._fit(request, [fixed], fixed_gpus=True),
                                        old)
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
        if request.fabric_service:
            self._check_fabric_service(request)
        if n == 0:
            return self._commit(request, self._fit_cpu_only(request))
        candidates = self._gpu_candidates(request)
        ranked = chooser(self, request, candidates)
        return self._commit(request, self._fit(request, ranked))

    def _fabric_of(self, request, placement):
        """A service VM's placement with its fabric devices (the ledger holds its switches)."""
        if not request.fabric_service:
            return placement
        m = self.model
        return replace(placement, fabric_devices=tuple(
            d.bdf for d in platform_fabric_devices(m.topology, m.platform)))

    def _check_fabric_service(self, request):
        """A Fabric Manager service VM needs a shared-NVSwitch platform, its switches in the
        host's PCI tree, and every one of them free."""
        m = self.model
        prefix = "%s: fabric_manager_vm" % self._prefix(request)
        if m.platform.fabric != FABRIC_SHARED_NVSWITCH:
            raise PlacementError(
                "%s: platform %s does not share its NVSwitches through Fabric Manager (fabric "
                "%s); a service VM is for shared-NVSwitch boards (HGX A100, H100, H200)" % (
                    prefix, m.platform.name, m.platform.fabric))
        if not m.switch_count:
            raise PlacementError(
                "%s: platform %s has no NVSwitch in this host's PCI tree to give it (HGX B200's "
                "switches are reached through its CX7 bridge functions, which this collection "
                "does not give a service VM yet)" % (prefix, m.platform.name))
        held = ["%s (%s)" % (m.switch_bdfs[s], holder) for s, holder in
                enumerate(self.switch_holder) if holder not in (None, request.name)]
        if held:
            raise PlacementError("%s: it gets every NVSwitch, and VMs hold %s; remove them "
                                 "first" % (prefix, ", ".join(held)))

    def _prefix(self, request):
        return "request %r (%d GPU%s)" % (request.name, request.gpus,
                                          "" if request.gpus == 1 else "s")

    def _models_of(self, request):
        """The GPU models a request may get: a set of (vendor, device), or None for any one
        model ("one model" is a rule on the block, see _one_model)."""
        if request.gpu_model is None or str(request.gpu_model).lower() == "any":
            return None
        try:
            return gpu_model_ids(request.gpu_model)
        except ValueError as exc:
            raise PlacementError("%s: gpu_model: %s" % (self._prefix(request), exc)) from exc

    def _model_ok(self, request, indexes):
        """Whether GPUs of these indexes may go to the request together (their models)."""
        if request.gpu_model is None and self.model.single_model:
            return True
        models = set(self.model.gpu_model[i] for i in indexes)
        wanted = self._models_of(request)
        if wanted is not None:
            return models <= wanted
        return len(models) <= 1 or str(request.gpu_model).lower() == "any"

    def _models_text(self, indexes):
        counts = {}
        for i in indexes:
            name = gpu_model_name(self.model.gpu_model[i])
            counts[name] = counts.get(name, 0) + 1
        return ", ".join("%d x %s" % (n, name) for name, n in sorted(counts.items()))

    def _gpu_candidates(self, request):
        """Free GPU blocks the request may take, or PlacementError saying why there are none."""
        blocks = self._all_gpu_candidates(request)
        usable = [b for b in blocks if self._model_ok(request, b.indexes)]
        if usable:
            return usable
        free = self.free_gpu_indexes()
        if request.gpu_index is not None:
            why = "gpu_index %d (%s) holds %s" % (
                request.gpu_index, format_indexes(blocks[0].indexes),
                self._models_text(blocks[0].indexes))
        else:
            why = "no free %d-GPU block is of %s (free: %s)" % (
                request.gpus, "one GPU model" if self._models_of(request) is None
                else "gpu_model %s" % request.gpu_model, self._models_text(free) or "none")
        raise PlacementError(
            "%s: %s; a VM gets GPUs of one model: set gpu_model to one of them, or to any to mix "
            "models in one VM" % (self._prefix(request), why))

    def _all_gpu_candidates(self, request):
        """Free GPU blocks of the request's size (models aside), or PlacementError saying why
        there are none."""
        m = self.model
        n = request.gpus
        prefix = self._prefix(request)
        if n > m.gpu_count:
            raise PlacementError("%s: this host has %d GPU%s (%s platform); set gpus to %d or "
                                 "fewer" % (prefix, m.gpu_count, "" if m.gpu_count == 1 else "s",
                                            m.platform.name, m.gpu_count))
        if m.partitioned:
            if n not in m.blocks_by_size and self._unavailable(n):
                raise PlacementError("%s: no %d-GPU block can be placed now: %s" % (
                    prefix, n, self._unavailable(n)))
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
        out = self._unavailable(n)
        failed = self._switch_holders_text(sorted(
            s for s in self.failed_switches if any(s in b.switches for b in blocks)))
        raise PlacementError("%s: no free %d-GPU block: %s%s%s; free blocks: %s" % (
            prefix, n, held or "no GPU is held", "; " + failed if failed else "",
            "; not placeable now: " + out if out else "", _format_blocks(self.free_blocks())))

    def _unavailable(self, n, start=None):
        """The platform's n-GPU blocks that cannot be placed now, and why, in words."""
        return "; ".join(
            "%s: %s" % (format_indexes(block), why)
            for block, why in sorted(self.model.platform.unavailable.items())
            if len(block) == n and (start is None or block[0] == start))

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
        out = self._unavailable(request.gpus, i)
        if out:
            raise PlacementError("%s: gpu_index %d cannot be placed now: %s" % (prefix, i, out))
        starts = ", ".join(str(b.indexes[0]) for b in blocks)
        raise PlacementError(
            "%s: gpu_index %d is misaligned: on %s a %d-GPU VM starts at gpu_index %s" % (
                prefix, i, m.platform.name, request.gpus, starts))

    def _generic_candidates(self, request):
        m = self.model
        n = request.gpus
        free = self.free_gpu_indexes()
        if len(free) >= n and str(request.gpu_model).lower() != "any":
            # Sets are drawn within one model (or the models asked for), scored as one list.
            groups = {}
            wanted = self._models_of(request)
            for i in free:
                if wanted is None or m.gpu_model[i] in wanted:
                    groups.setdefault(m.gpu_model[i], []).append(i)
            groups = [g for g in groups.values() if len(g) >= n]
            if len(groups) != 1 or len(groups[0]) != len(free):
                if not groups:
                    return []  # _gpu_candidates says which models are free
                ranked = []
                for group in groups:
                    ranked.extend(self._scored_sets(group, n))
                ranked.sort(key=lambda t: t[:4])
                return [t[4] for t in ranked]
        if len(free) < n:
            raise PlacementError("%s: %d GPU%s free, %d needed: %s; free blocks: %s" % (
                self._prefix(request), len(free), "" if len(free) == 1 else "s", n,
                self._holders_text() or "no GPU is held", _format_blocks(self.free_blocks())))
        scored = self._scored_sets(free, n)
        scored.sort(key=lambda t: t[:4])
        return [t[4] for t in scored]

    def _scored_sets(self, free, n):
        """[(sort key..., _Block)] for n-GPU sets of the free GPUs given (go-gpuallocator)."""
        m = self.model
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
        return scored

    def _split_nodes(self, request, block):
        """vCPUs and memory per node of a block, in proportion to its GPUs there."""
        m = self.model
        nodes = block.nodes
        weights = [sum(1 for i in block.indexes if m.gpu_node[i] == node) for node in nodes]
        vcpus, memory = self._sizes(request)
        return nodes, split_proportionally(vcpus, weights), split_proportionally(memory, weights)

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
        """The first ranked block whose nodes have the CPUs and memory and whose GPUs' rails
        can give the request's nics; else why not (the first block's reason)."""
        first_error = rails_error = first_block = None
        for block in ranked:
            nodes, vcpus, memory = self._split_nodes(request, block)
            short = self._shortage(request, nodes, vcpus, memory)
            if short is None:
                rails = self._group_short(request, block) or self._rails_short(request, block)
                if rails is None:
                    return block, nodes, vcpus, memory
                rails_error = rails_error or rails
            elif first_error is None:
                first_error = short
                first_block = block
        # A block with the CPUs and memory failed on its NICs: that is what to change.
        if rails_error is not None:
            raise PlacementError("%s: %s" % (self._prefix(request), rails_error))
        if fixed_gpus or len(ranked) == 1:
            where = format_indexes(first_block.indexes)
        else:
            where = "every free %d-GPU block is short; first choice %s" % (
                request.gpus, format_indexes(first_block.indexes))
        raise PlacementError("%s: %s (%s); lower vcpus/memory, release a VM, or change "
                             "reserved_cpus/reserved_memory_mb" % (
                                 self._prefix(request), first_error, where))

    def _group_short(self, request, block):
        """None unless one of the block's GPUs shares its IOMMU group with a NIC function that
        another VM holds (vfio would hand this VM that function too), else why."""
        if block is None:
            return None
        for i in block.indexes:
            gpu = self.model.gpu_bdfs[i]
            for nic in self.model.gpu_group_nics.get(gpu, ()):
                holder = self.nic_holder.get(nic)
                if holder not in (None, request.name):
                    return ("GPU %s shares its IOMMU group with NIC function %s, which %s holds; "
                            "a group goes to one VM whole: free it, or give the host ACS so "
                            "that they get groups of their own" % (gpu, nic, holder))
        return None

    def _rails_short(self, request, block):
        """None when the block's GPUs have the rails the request asks for, else why not."""
        if not request.nics or block is None or not block.indexes:
            return None
        held = {b: h for b, h in self.nic_holder.items() if h != request.name}
        try:
            choose_nics(self.model.nics, tuple(self.model.gpu_bdfs[i] for i in block.indexes),
                        held, count=request.nics, mode=request.nic_mode,
                        allow_fewer=request.nics_allow_fewer)
        except NicChoiceError as exc:
            return str(exc)
        return None

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

    def _renic(self, old, request):
        """The same GPUs, CPUs and memory, the rails chosen again (what it holds kept where it
        still answers); the old holding stays when they cannot be had."""
        nics = self._choose_nics(request, tuple(old.gpus), old)
        self.release(old.name)
        new = replace(old, nics=nics)
        self._record(new)
        return self._placement_from(new)

    def _commit(self, request, fit, old=None):
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
        if request.fabric_service:
            switches = tuple(range(m.switch_count))
        nics = self._choose_nics(request, tuple(m.gpu_bdfs[i] for i in indexes), old)
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
            nics=nics,
        )
        placement = self._fabric_of(request, placement)
        holding = placement.holding()
        # What the VM holds besides its rails: its domain's (attached by hand), and the NIC
        # functions in its GPUs' IOMMU groups, which vfio gives it with them.
        extra = set(old.extra_nics if old is not None else ())
        for gpu in placement.gpus:
            extra.update(m.gpu_group_nics.get(gpu, ()))
        extra -= set(nics)
        if extra:
            holding = replace(holding, extra_nics=tuple(sorted(extra)))
        self._record(holding)
        return placement

    def _choose_nics(self, request, gpus, old=None):
        """The rail NICs (functions or VFs) for a VM that gets ``gpus``. With nics: 0 the engine
        leaves a VM's NICs alone: it keeps what its domain holds (attached by hand, say)."""
        if not request.nics:
            return tuple(old.nics) if old is not None else ()
        if not gpus:
            raise PlacementError("%s: nics needs GPUs, whose rails they are; ask nics: 0"
                                 % self._prefix(request))
        held = {b: h for b, h in self.nic_holder.items() if h != request.name}
        try:
            chosen = choose_nics(self.model.nics, gpus, held,
                                 count=request.nics, mode=request.nic_mode,
                                 allow_fewer=request.nics_allow_fewer,
                                 prefer=old.nics if old is not None else ())
        except NicChoiceError as exc:
            raise PlacementError("%s: %s" % (self._prefix(request), exc)) from exc
        return tuple(c.bdf for c in chosen)

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
        indexes = tuple(sorted(m.gpu_index[normalize_bdf(b)] for b in alloc.gpus
                               if normalize_bdf(b) in m.gpu_index))
        switches = tuple(sorted(m.switch_index[normalize_bdf(b)] for b in alloc.nvswitches
                                if normalize_bdf(b) in m.switch_index))
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
            nics=tuple(alloc.nics),
        )

    def plan(self, requests):
        """Place and record requests jointly, largest first; [(request, Placement or error)]."""
        requests = list(requests)
        results = duplicate_refusals(requests)
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
    if request.gpu_model is not None and not isinstance(request.gpu_model, str):
        raise PlacementError("%s: gpu_model must be a string, got %r" % (prefix,
                                                                         request.gpu_model))
    nics = request.nics
    if not (nics == NICS_AUTO or (isinstance(nics, int) and not isinstance(nics, bool)
                                  and nics >= 0)):
        raise PlacementError("%s: nics must be auto, 0 or a number of rail NICs, got %r" % (
            prefix, nics))
    if request.fabric_service and (request.gpus or request.nics):
        raise PlacementError("%s: fabric_manager_vm gets the NVSwitches and no GPUs or rail NICs; "
                             "ask gpus: 0 and nics: 0" % prefix)
    if request.nic_mode not in NIC_MODES:
        raise PlacementError("%s: nic_mode must be one of %s, got %r" % (
            prefix, ", ".join(NIC_MODES), request.nic_mode))
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


def _nics_answer(alloc, request, vfs=frozenset()):
    """Whether the rails a VM holds answer its nics: 0 leaves them alone; auto is answered by
    any it holds; a count by that many (or some, with nics_allow_fewer). nic_mode whole is not
    answered by a VF (``vfs``: the host's rail VFs), nor vf by a whole function."""
    if not request.nics:
        return True
    if request.nic_mode == "whole" and any(b in vfs for b in alloc.nics):
        return False
    if request.nic_mode == "vf" and any(b not in vfs for b in alloc.nics):
        return False
    if request.nics == NICS_AUTO or request.nics_allow_fewer:
        return bool(alloc.nics)
    return len(alloc.nics) == request.nics

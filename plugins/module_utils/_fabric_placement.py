# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Placement on a shared-NVSwitch host, from Fabric Manager's live list. Private, pure.

On a host whose NVSwitches Fabric Manager (FM) keeps, a multi-GPU VM has NVLink only when FM
activates a partition made of exactly its GPUs. So the GPU blocks such a VM may get are FM's
partitions as ``fmpm -l`` lists them now, not a table (B200's pairs differ from H100's, and a
site may load its own). This module turns that list into what placement reads:

- **module IDs.** FM names a GPU by its module ID (``physicalId``), which does not follow PCI
  order (fabric.md section 5). The map GPU address -> module ID is learned, never assumed: a
  platform file's ``module_ids``, else the host record's ``fabric.module_ids`` (which
  ``kvm_host`` is to write at conversion; it does not yet). A GPU
  without one stops GPU placement with a message saying how to give it (:func:`module_map`).
- **live partitions.** Each partition FM lists becomes a block of GPU indexes (the index is the
  GPU's place in PCI order, as ``nvidia-vm --gpu-index`` counts). The platform's own table is
  not used: the live list wins (:meth:`FabricView.platform`).
- **busy GPUs.** The GPUs of an active partition are not free until it is deactivated, whoever
  activated it: a partition that overlaps an active one cannot be activated (FM answers
  IN_USE). Which domain holds them is the ledger's business; this says which partition.
- **degraded partitions.** A partition is unplaceable when FM lists it as unsupported, when one
  of its GPUs has fewer NVLinks than it should, when FM reports one of its GPUs' NVLinks as
  failed, or, for a multi-GPU partition, when FM reports a switch's NVLinks as failed (every
  GPU of a board links to every switch). Single-GPU partitions use no NVLink and stay.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ansible_collections.gpuvirt.kvm.plugins.module_utils._bdf import normalize_bdf
from ansible_collections.gpuvirt.kvm.plugins.module_utils._fabric_model import (
    FmPartitionList,
    NvlinkFailures,
    describe_modules,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._health import (
    HEALTH_DEGRADED,
    SOURCE_FABRIC_MANAGER,
    Signal,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
    FmPartition,
    partitions_from_fm,
)


class FabricPlacementError(Exception):
    """The host's fabric cannot be placed on: a GPU without a module ID, a bad map."""


MAP_HOWTO = (
    "FM names GPUs by module ID, which does not follow PCI order. Give every GPU's module ID "
    "(GPU address -> module ID, as 'nvidia-smi -q' prints \"Module ID\" while the NVIDIA driver "
    "still owns the GPU) as module_ids in a platform file (the platform option; docs/fabric.md)"
    ", or in the fabric.module_ids section of the file the host_record option names")


def module_map(gpu_bdfs, sources):
    """Module IDs in GPU index order.

    ``gpu_bdfs``: the platform's GPUs in index (PCI) order. ``sources``: ``(label, {address:
    module ID})`` in precedence order (a platform file before the host record). Raises
    FabricPlacementError naming every GPU without a module ID, or a module ID given twice."""
    merged, origin = {}, {}
    for label, mapping in sources:
        if mapping is not None and not isinstance(mapping, dict):
            raise FabricPlacementError(
                "%s: module_ids must map GPU addresses to module IDs ({\"0000:1b:00.0\": 5, "
                "...}), got %s" % (label, type(mapping).__name__))
        for bdf, module in (mapping or {}).items():
            key = normalize_bdf(bdf)
            if key in merged:
                continue
            if isinstance(module, bool) or not isinstance(module, int) or module < 0:
                raise FabricPlacementError("%s: module ID of %s must be a number >= 0, got %r" % (
                    label, bdf, module))
            merged[key], origin[key] = module, label
    missing = [(i, bdf) for i, bdf in enumerate(gpu_bdfs) if normalize_bdf(bdf) not in merged]
    if missing:
        raise FabricPlacementError(
            "shared_nvswitch: no module ID for GPU%s %s; this host places no GPU VM until every "
            "GPU has one. %s" % (
                "" if len(missing) == 1 else "s",
                ", ".join("%d (%s)" % m for m in missing), MAP_HOWTO))
    ids = tuple(merged[normalize_bdf(b)] for b in gpu_bdfs)
    seen = {}
    for i, module in enumerate(ids):
        if module in seen:
            j = seen[module]
            raise FabricPlacementError(
                "shared_nvswitch: GPUs %d (%s, from %s) and %d (%s, from %s) both have module ID "
                "%d; each GPU has its own module ID. Fix the map" % (
                    j, gpu_bdfs[j], origin[normalize_bdf(gpu_bdfs[j])], i, gpu_bdfs[i],
                    origin[normalize_bdf(gpu_bdfs[i])], module))
        seen[module] = i
    return ids


@dataclass(frozen=True)
class FabricView:
    """FM's partitions as this host's GPU indexes, with what is busy and what is degraded."""

    listing: FmPartitionList
    module_ids: tuple  # GPU index -> module ID
    busy: dict = field(default_factory=dict)  # GPU index -> ID of the active partition
    unplaceable: dict = field(default_factory=dict)  # partition ID -> why
    foreign: tuple = ()  # IDs of partitions naming a module this host does not have
    failed_elsewhere: tuple = ()  # failed devices FM names that are not this host's GPUs

    def indexes(self, partition):
        """The GPU indexes of an FmPartition (sorted)."""
        index_of = {m: i for i, m in enumerate(self.module_ids)}
        return tuple(sorted(index_of[m] for m in partition.modules))

    def partition_for(self, indexes):
        """The ID of the partition FM lists whose GPUs are exactly these indexes, or None."""
        modules = sorted(self.module_ids[i] for i in indexes)
        found = self.listing.exactly(modules)
        return None if found is None or found.id in self.foreign else found.id

    def platform(self, base):
        """``base`` with FM's live partitions in place of its table: the placeable ones as
        blocks, the degraded ones in ``unavailable`` with their reasons."""
        live = {}
        for p in self.listing.partitions:
            if p.id in self.foreign:
                continue
            links = max((g.max_nvlinks for g in p.gpus), default=0)
            live[p.id] = FmPartition(p.id, p.modules, links)
        placeable = {pid: part for pid, part in live.items() if pid not in self.unplaceable}
        unavailable = {}
        for pid, why in sorted(self.unplaceable.items()):
            if pid in live:
                block = self.indexes(self.listing.get(pid))
                unavailable.setdefault(block, "FM partition %d: %s" % (pid, why))
        # Not "built-in" any more: a host's facts carry it to the fleet planner as data.
        return replace(base, fm_partitions=live, physical_ids=tuple(self.module_ids),
                       partitions=partitions_from_fm(placeable, self.module_ids),
                       partition_nvswitches={}, unavailable=unavailable,
                       source="%s, partitions from Fabric Manager" % base.source)

    def busy_gpus(self, gpu_bdfs):
        """{GPU address: why it is busy} for the GPUs of active partitions."""
        result = {}
        for i, pid in sorted(self.busy.items()):
            p = self.listing.get(pid)
            result[gpu_bdfs[i]] = "in active FM partition %d (GPU modules %s)" % (
                pid, describe_modules(p.modules))
        return result

    def report(self, gpu_bdfs):
        """Plain data for module results: each partition FM lists, in this host's terms."""
        rows = []
        for p in self.listing.partitions:
            if p.id in self.foreign:
                continue
            ix = self.indexes(p)
            rows.append({
                "id": p.id, "active": p.active, "modules": list(p.modules),
                "gpu_indexes": list(ix), "gpus": [gpu_bdfs[i] for i in ix],
                "nvlinks_per_gpu": max((g.max_nvlinks for g in p.gpus), default=0),
                "placeable": p.id not in self.unplaceable,
                "why_not": self.unplaceable.get(p.id),
            })
        return {"partitions": rows, "foreign_partitions": list(self.foreign),
                "failed_elsewhere": list(self.failed_elsewhere)}


def fabric_view(listing, module_ids, gpu_bdfs, failures=None, unsupported=None,
                by_address=True):
    """The FabricView of ``fmpm -l`` (an FmPartitionList) on a host whose GPUs (``gpu_bdfs``, in
    index order) have these ``module_ids``; ``failures`` (NvlinkFailures) and ``unsupported``
    ({partition ID: module IDs}) are what ``--get-nvlink-failed-devices`` and
    ``--list-unsupported-partitions`` say. ``by_address`` False: FM runs in a service VM and
    its ``pciBusId`` are that VM's addresses, so a failed GPU cannot be told by address (it is
    reported among ``failed_elsewhere``, marked so)."""
    failures = failures or NvlinkFailures()
    unsupported = unsupported or {}
    on_host = set(module_ids)
    index_of_bdf = {normalize_bdf(b): i for i, b in enumerate(gpu_bdfs)}
    foreign = tuple(p.id for p in listing.partitions if not set(p.modules) <= on_host)
    listed = set(m for p in listing.partitions for m in p.modules)
    unknown = [(i, m) for i, m in enumerate(module_ids) if m not in listed]
    if unknown or (listing.partitions and len(foreign) == len(listing.partitions)):
        raise FabricPlacementError(
            "shared_nvswitch: the module IDs do not match Fabric Manager's partitions: %s; FM "
            "lists GPU modules %s. The map is wrong (module IDs are FM's physicalId, as "
            "'nvidia-smi -q' prints \"Module ID\"): fix it" % (
                ", ".join("GPU %d (%s) has module ID %d, which no partition names" % (
                    i, gpu_bdfs[i], m) for i, m in unknown)
                or "no partition is made of this host's GPUs",
                ", ".join(str(m) for m in sorted(listed)) or "none"))

    failed_modules, elsewhere = {}, []
    for dev in failures.gpus:
        i = index_of_bdf.get(_bdf_or_none(dev.pci_bus_id)) if by_address else None
        if i is None:
            elsewhere.append("GPU %s%s" % (dev.pci_bus_id or dev.uuid or "?", "" if by_address
                                           else " (an address in the Fabric Manager VM)"))
        else:
            failed_modules[module_ids[i]] = dev
    failed_switches = ["NVSwitch %s" % (d.pci_bus_id or d.uuid or "?") for d in failures.switches]

    busy, unplaceable = {}, {}
    for p in listing.partitions:
        if p.id in foreign:
            continue
        if p.active:
            for m in p.modules:
                busy.setdefault(module_ids.index(m), p.id)
        multi = len(p.gpus) > 1
        why = []
        if p.id in unsupported:
            why.append("FM lists it as unsupported (degraded NVLinks)")
        degraded = [g.module for g in p.gpus if g.degraded]
        if degraded:
            why.append("FM reports fewer NVLinks than the GPUs have on GPU modules %s" %
                       describe_modules(degraded))
        failed = [m for m in p.modules if m in failed_modules]
        if multi and failed:
            why.append("FM reports failed NVLinks on GPU modules %s" % describe_modules(failed))
        if multi and failed_switches:
            why.append("FM reports failed NVLinks on %s" % ", ".join(failed_switches))
        if why:
            unplaceable[p.id] = "; ".join(why)
    return FabricView(listing=listing, module_ids=tuple(module_ids), busy=busy,
                      unplaceable=unplaceable, foreign=foreign,
                      failed_elsewhere=tuple(elsewhere))


def nvlink_signals(failures, device_bdfs, address, by_address=True):
    """{address: (Signal, ...)}: a ``degraded`` signal (source ``fabric-manager``) for each of
    this host's GPUs and NVSwitches (``device_bdfs``) that ``fmpm --get-nvlink-failed-devices``
    (``failures``, NvlinkFailures) names, with FM's words for it: its failed ports and UUID.

    Degraded, not failed: an NVLink failure keeps a GPU out of multi-GPU partitions, and that
    is :func:`fabric_view`'s to do (it takes every multi-GPU partition with the GPU, or every
    one for a switch, out of placement); the GPU still runs a one-GPU VM, which a failed state
    would forbid, and a failed NVSwitch would keep a Fabric Manager service VM that holds it
    from starting. The signal reports it beside the device. Devices FM names by no address
    of this host (an empty ``pciBusId``, FM in a service VM: ``by_address`` False) get none:
    ``fabric_view`` lists them in ``failed_elsewhere``."""
    mine = {normalize_bdf(b) for b in device_bdfs}
    found = {}
    for dev in tuple(failures.gpus) + tuple(failures.switches):
        try:
            bdf = _bdf_or_none(dev.pci_bus_id) if by_address else None
        except ValueError:
            bdf = None
        if bdf is None or bdf not in mine:
            continue
        ports = ", ".join(str(p) for p in dev.ports)
        found.setdefault(bdf, []).append(Signal(SOURCE_FABRIC_MANAGER, HEALTH_DEGRADED, (
            "Fabric Manager at %s reports failed NVLinks on %s %s%s%s: %s" % (
                address, "GPU" if dev.kind == "gpu" else "NVSwitch", bdf,
                " (%s)" % dev.uuid if dev.uuid else "",
                ", port%s %s" % ("" if len(dev.ports) == 1 else "s", ports) if ports else "",
                "it joins no multi-GPU partition" if dev.kind == "gpu"
                else "no multi-GPU partition is placed"))))
    return {b: tuple(signals) for b, signals in found.items()}


def fm_bus_ids(listing):
    """``{address: module ID}`` from the ``pciBusId`` FM gives its GPUs (DGX-2 and A100; empty
    on H100 and later, where the map must come from elsewhere). A GPU FM names with two
    addresses, or an address it gives two modules, is left out."""
    seen = {}
    for part in listing.partitions:
        for gpu in part.gpus:
            try:
                bdf = _bdf_or_none(gpu.pci_bus_id)
            except ValueError:
                continue
            if bdf is not None:
                seen.setdefault(bdf, set()).add(gpu.module)
    by_module = {}
    for bdf, modules in seen.items():
        if len(modules) == 1:
            by_module.setdefault(next(iter(modules)), []).append(bdf)
    return {bdfs[0]: module for module, bdfs in by_module.items() if len(bdfs) == 1}


def _bdf_or_none(text):
    """A host address of FM's ``pciBusId`` (NVML spells the domain with 8 digits:
    ``00000000:1B:00.0``), or None."""
    if not text:
        return None
    domain, sep, rest = str(text).strip().partition(":")
    if sep and len(domain) > 4 and set(domain[:-4]) <= {"0"}:
        text = domain[-4:] + ":" + rest
    return normalize_bdf(text)

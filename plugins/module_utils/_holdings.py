# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What defined domains hold, read from their XML: the one place allocations come from. Private.

libvirt is the source of truth (a device is taken while any defined domain names it). The
gateway (``_libvirt``) hands out each domain's XML text; this module reads it once with the XML
model (``_domain``) into a :class:`DefinedDomain`, and from those builds placement's
:class:`~_placement.Holding` values (``kvm_vm``, ``kvm_layout``, ``gpu_topology``), the fleet
planner's holdings (from ``gpu_topology``'s facts), and the disk paths each domain uses
(``kvm_image`` never removes an image a domain's chain reads).

Pure: what is read from libvirt comes in as text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ansible_collections.gpuvirt.kvm.plugins.module_utils._bdf import normalize_bdf
from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import Domain, DomainXmlError
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import (
    POLICY_DEDICATED,
    POLICY_SHARED,
    Holding,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._ranges import parse_ranges

# The scalar fields of the collection's metadata, as the flat `metadata` mapping reports them.
_METADATA_FIELDS = ("owner", "created_by", "template", "cpu_policy", "seed_digest", "image",
                    "image_version", "owner_tag", "fm_partition")


@dataclass(frozen=True)
class DefinedDomain:
    """One defined domain, running or not, and what it holds (read from its inactive XML)."""

    name: str
    uuid: str | None
    active: bool
    hostdevs: tuple = ()  # PCI BDFs of every <hostdev type='pci'>, sorted
    pinned_cpus: tuple = ()  # host CPUs its vCPUs are pinned to (dedicated)
    cpuset: tuple = ()  # host CPUs its vCPUs float over (shared), if not pinned
    numa_nodes: tuple = ()
    memory_kib: int = 0
    managed: bool = False  # carries the collection's metadata
    metadata: dict = field(default_factory=dict)
    domain: Domain | None = field(default=None, compare=False, repr=False)  # the parsed XML
    xml: str = field(default="", compare=False, repr=False)  # as libvirt gave it

    @property
    def cpu_policy(self):
        return POLICY_DEDICATED if self.pinned_cpus else POLICY_SHARED


def read_domain(xml, active=False):
    """A DefinedDomain from a domain's (inactive) XML text."""
    dom = Domain.from_xml(xml)
    tune = dom.cputune
    pinned = sorted(set(c for pin in (tune.vcpupins if tune else ()) for c in pin.cpuset))
    cpuset = ()
    if not pinned and dom.vcpu is not None and dom.vcpu.cpuset:
        cpuset = tuple(dom.vcpu.cpuset)
    numa = dom.numatune
    meta = dom.gpuvirt
    metadata = {}
    if meta is not None:
        metadata = {k: getattr(meta, k) for k in _METADATA_FIELDS if getattr(meta, k) is not None}
        # Lists as the XML writes them: comma-separated.
        for key in ("gpus", "nvswitches", "nics", "numa_nodes"):
            if getattr(meta, key):
                metadata[key] = ",".join(str(v) for v in getattr(meta, key))
    return DefinedDomain(
        name=dom.name or "", uuid=dom.uuid, active=bool(active),
        hostdevs=tuple(sorted(set(h.bdf for h in dom.hostdevs))), pinned_cpus=tuple(pinned),
        cpuset=cpuset, numa_nodes=tuple(numa.nodeset or ()) if numa is not None else (),
        memory_kib=dom.memory_kib or 0, managed=meta is not None, metadata=metadata,
        domain=dom, xml=xml)


def read_domains(listing):
    """{name: DefinedDomain} from the gateway's list_domains() (name, active, xml, ...)."""
    result = {}
    for entry in listing:
        try:
            result[entry.name] = read_domain(entry.xml, entry.active)
        except DomainXmlError as exc:
            raise DomainXmlError("cannot read what domain %s holds from its XML: %s" % (
                entry.name, exc)) from exc
    return result


def even_split(memory_mb, nodes):
    """{node: MiB}: memory spread evenly over the nodes (libvirt's strict nodeset does not say
    how a VM's memory splits; the remainder goes to the first nodes)."""
    if not nodes:
        return {}
    share, extra = divmod(memory_mb, len(nodes))
    return {n: share + (1 if k < extra else 0) for k, n in enumerate(nodes)}


def holdings(domains, gpu_bdfs, switch_bdfs, nic_bdfs=()):
    """[Holding]: what each defined domain holds, in placement's terms (unmanaged ones too).
    ``nic_bdfs``: the host's rail NIC functions and their VFs."""
    gpu_set, switch_set, nic_set = set(gpu_bdfs), set(switch_bdfs), set(nic_bdfs)
    result = []
    for dom in domains:
        memory_mb = dom.memory_kib // 1024
        nodes = tuple(dom.numa_nodes)
        # The rails placement gave it (its metadata says which); any other rail function it
        # holds (attached by hand, or in a GPU's IOMMU group) only counts as taken.
        recorded = set(normalize_bdf(b) for b in str(
            (dom.metadata or {}).get("nics") or "").split(",") if b)
        held_nics = [b for b in dom.hostdevs if b in nic_set]
        result.append(Holding(
            name=dom.name, gpus=tuple(b for b in dom.hostdevs if b in gpu_set),
            nvswitches=tuple(b for b in dom.hostdevs if b in switch_set),
            cpus=dom.pinned_cpus or dom.cpuset, numa_nodes=nodes,
            memory_mb=memory_mb if nodes else 0, memory_by_node=even_split(memory_mb, nodes),
            cpu_policy=dom.cpu_policy, nics=tuple(b for b in held_nics if b in recorded),
            extra_nics=tuple(b for b in held_nics if b not in recorded)))
    return result


def holding_from_facts(entry):
    """gpu_topology's allocations[] entry -> the Holding the host built from that domain."""
    nodes = tuple(int(n) for n in entry.get("numa_nodes") or ())
    memory_mb = int(entry.get("memory_mb") or 0)
    extra = tuple(str(b) for b in entry.get("extra_nics") or ())
    return Holding(
        name=str(entry["name"]), gpus=tuple(str(b) for b in entry.get("gpus") or ()),
        nvswitches=tuple(str(b) for b in entry.get("nvswitches") or ()),
        cpus=parse_ranges(str(entry.get("cpus") or "")), numa_nodes=nodes,
        memory_mb=memory_mb if nodes else 0, memory_by_node=even_split(memory_mb, nodes),
        cpu_policy=str(entry.get("cpu_policy") or POLICY_DEDICATED),
        nics=tuple(str(b) for b in entry.get("nics") or () if str(b) not in extra),
        extra_nics=extra)


def disk_files(domain, volume_path=None):
    """File and block paths of a domain's disks and of the backingStore chains in its XML.

    ``volume_path(pool, volume)`` turns a storage-pool volume into its path (None: skipped);
    network disks (rbd, iscsi, nbd) have no local file and are left out.
    """
    paths = []

    def path_of(item):
        if item.volume is not None:
            return volume_path(*item.volume) if volume_path is not None else None
        if item.type in (None, "file", "block"):
            return item.source
        return None

    for disk in domain.disks:
        item = disk
        # libvirt nests the chain: <disk><source/><backingStore><source/><backingStore>..
        while item is not None:
            path = path_of(item)
            if path and path not in paths:
                paths.append(path)
            item = item.backing
    return tuple(paths)


def disk_chains(listing, volume_path=None):
    """{domain name: disk paths with their backing chains} from the gateway's
    list_domains(live=True): inactive domains name what their XML names, running ones also
    the chain libvirt probed at start (live XML). The whole chain of an inactive domain's
    disks is followed with qemu-img by the caller (``_qemu_img.disk_usage``)."""
    result = {}
    for entry in listing:
        paths = []
        for xml in (entry.xml, entry.live_xml):
            if not xml:
                continue
            try:
                domain = Domain.from_xml(xml)
            except DomainXmlError as exc:
                raise DomainXmlError("cannot read the disks of domain %s from its XML: %s" % (
                    entry.name, exc)) from exc
            for path in disk_files(domain, volume_path):
                if path not in paths:
                    paths.append(path)
        result[entry.name] = tuple(paths)
    return result

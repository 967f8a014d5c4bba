# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What a GPU VM is: placement -> VmSpec, and a domain read back into one. Private, pure.

:class:`VmSpec` is the semantic description of a VM that modules compare and report; it is
built from a placement (:func:`make_spec`) or read back from a domain
(:meth:`VmSpec.from_domain`), so ``kvm_vm`` compares spec with spec, never raw XML.
``_domain_builder.build_domain`` turns a spec into the tuned libvirt domain.

Pure: no I/O. The caller hands in the host topology (``_topology``) and the placement.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from ansible_collections.gpuvirt.kvm.plugins.module_utils._bdf import normalize_bdf
from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import (
    GUEST_AGENT_CHANNEL,
    Cpu,
    CpuTune,
    GpuvirtMetadata,
    Os,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import (
    POLICY_DEDICATED,
    POLICY_SHARED,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
    GPU_CLASSES,
    GPU_VENDORS,
    NVSWITCH_CLASSES,
    NVSWITCH_IDS,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._units import MIB

DOMAIN_TYPES = ("kvm", "qemu")  # qemu: TCG, for hosts without usable hardware virtualisation
CPU_MODES = ("host-passthrough", "host-model", "maximum")
FIRMWARES = ("bios", "ovmf")
DISK_ROLES = ("os", "data", "seed")
DISK_FORMATS = ("qcow2", "raw")
NETWORK_TYPES = ("network", "bridge", "user")
MACHINES = ("q35",)

# Multiqueue caps. Each queue gets its own MSI-X vector and, on the host, its own vhost/I/O
# work; guests map queues to vCPUs, and past these counts throughput stops growing while
# interrupts and host threads keep growing (virtio-net's usual guidance is queues = vCPUs up
# to 8; QEMU itself sizes virtio-blk at one queue per vCPU and _domain_builder stops at 16).
NET_QUEUES_MAX = 8


# Classes never passed through even when they share an IOMMU group: host and PCI-to-PCI
# bridges stay with the host (VFIO accepts a group whose bridges are not bound to vfio-pci).
_BRIDGE_CLASSES = (0x0600, 0x0604, 0x0609)

_FEATURE_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_MAC_RE = re.compile(r"^[0-9a-f]{12}$")


class SpecError(ValueError):
    """A VM cannot be described as asked; the message names the option and the fix."""


@dataclass(frozen=True)
class DiskSpec:
    """One disk of a VM: the OS overlay, a data disk, or the cloud-init seed ISO."""

    role: str  # os | data | seed
    path: str
    format: str = "qcow2"
    size_gb: int | None = None  # what was asked (domain XML carries no size: kept in metadata)
    backing: str | None = None  # the base image an OS overlay reads from
    backing_format: str | None = None
    # Read back from a domain: whether the gpuvirt metadata records this disk (False: attached
    # by someone else, its role only guessed). Not part of what a VM is: not compared.
    recorded: bool = field(default=True, compare=False)

    def to_dict(self):
        return {"role": self.role, "path": self.path, "format": self.format,
                "size_gb": self.size_gb, "backing": self.backing,
                "backing_format": self.backing_format}


@dataclass(frozen=True)
class NetworkSpec:
    """One NIC: a libvirt network, a host bridge, or QEMU user networking."""

    type: str  # network | bridge | user
    source: str | None = None  # network or bridge name
    mac: str | None = None  # None: derived from the VM name by make_spec
    queues: int | None = None  # None: sized by make_spec

    def to_dict(self):
        return {"type": self.type, "source": self.source, "mac": self.mac,
                "queues": self.queues}


@dataclass(frozen=True)
class VmSpec:
    """What a VM is, in terms a user and a diff understand (comparable with ==)."""

    name: str
    domain_type: str = "kvm"
    vcpus: int = 1
    memory_mb: int = 0
    cpu_policy: str = POLICY_DEDICATED
    cpus: tuple = ()  # dedicated: host CPU of vCPU 0, 1, ...; shared: the floating set
    emulator_cpus: tuple = ()
    numa_nodes: tuple = ()
    memory_by_node: dict = field(default_factory=dict)  # host node -> MiB
    hugepage_kb: int = 0  # 0: normal memory
    gpus: tuple = ()  # BDFs
    nvswitches: tuple = ()  # BDFs
    nics: tuple = ()  # rail NIC functions or VFs (BDFs)
    extra_hostdevs: tuple = ()  # other members of their IOMMU groups (BDFs)
    mmio64_mb: int = 0  # guest 64-bit PCI MMIO window; 0: QEMU's default
    disks: tuple = ()  # DiskSpec
    networks: tuple = ()  # NetworkSpec
    cpu_mode: str = "host-passthrough"
    cpu_disable_features: tuple = ()
    machine: str = "q35"
    firmware: str = "bios"
    template: str | None = None
    image: str | None = None
    image_version: str | None = None
    owner_tag: str | None = None
    seed_digest: str | None = None  # cloud-init seed content hash (a change rewrites the ISO)
    fm_partition: int | None = None  # shared NVSwitch: the partition the libvirt hook activates
    guest_agent: bool = True  # a virtio-serial channel for the QEMU guest agent

    @property
    def hostdevs(self):
        """Every host PCI function the VM takes."""
        return (tuple(self.gpus) + tuple(self.nvswitches) + tuple(self.nics)
                + tuple(self.extra_hostdevs))

    def to_dict(self):
        """Plain data (JSON-safe) for module results and diffs."""
        return {
            "name": self.name,
            "domain_type": self.domain_type,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "cpu_policy": self.cpu_policy,
            "cpus": list(self.cpus),
            "emulator_cpus": list(self.emulator_cpus),
            "numa_nodes": list(self.numa_nodes),
            "memory_by_node": {str(k): v for k, v in sorted(self.memory_by_node.items())},
            "hugepage_kb": self.hugepage_kb,
            "gpus": list(self.gpus),
            "nvswitches": list(self.nvswitches),
            "nics": list(self.nics),
            "extra_hostdevs": list(self.extra_hostdevs),
            "mmio64_mb": self.mmio64_mb,
            "disks": [d.to_dict() for d in self.disks],
            "networks": [n.to_dict() for n in self.networks],
            "cpu_mode": self.cpu_mode,
            "cpu_disable_features": list(self.cpu_disable_features),
            "machine": self.machine,
            "firmware": self.firmware,
            "template": self.template,
            "image": self.image,
            "image_version": self.image_version,
            "guest_agent": self.guest_agent,
            "owner_tag": self.owner_tag,
            "seed_digest": self.seed_digest,
            "fm_partition": self.fm_partition,
        }

    @classmethod
    def from_domain(cls, domain):
        """Read a domain (ours, as libvirt returns it) back into a spec."""
        return _spec_from_domain(domain)


def spec_diff(before, after):
    """{field: {"before": x, "after": y}} for every field that differs (to_dict values)."""
    a = before.to_dict() if before is not None else {}
    b = after.to_dict() if after is not None else {}
    return {k: {"before": a.get(k), "after": b.get(k)}
            for k in list(b) + [k for k in a if k not in b] if a.get(k) != b.get(k)}


# --- MACs ----------------------------------------------------------------------------------------

def derive_mac(name, index=0):
    """A stable MAC for NIC `index` of VM `name`: QEMU's 52:54:00 prefix + 3 hashed bytes."""
    digest = hashlib.sha256(("%s/%d" % (name, index)).encode("utf-8")).hexdigest()
    return "52:54:00:%s:%s:%s" % (digest[0:2], digest[2:4], digest[4:6])


def normalize_mac(text, option="mac"):
    """Lower-case colon form of a unicast MAC (accepts ':', '-', '.' separators)."""
    raw = re.sub(r"[:.\-]", "", str(text).strip().lower())
    if not _MAC_RE.match(raw):
        raise SpecError("%s: %r is not a MAC address; write it like 52:54:00:12:34:56"
                        % (option, text))
    if int(raw[0:2], 16) & 1:
        raise SpecError("%s: %r is a multicast address; a NIC needs a unicast MAC (the "
                        "first byte must be even)" % (option, text))
    return ":".join(raw[i:i + 2] for i in range(0, 12, 2))


# --- placement -> spec ---------------------------------------------------------------------------

def mmio64_window_mb(devices):
    """Guest 64-bit MMIO window (MiB) for passed-through devices; 0 without 64-bit BARs.

    The sum of the 64-bit prefetchable BARs times 2, rounded up to a power of two: BARs are
    aligned to their own size and the firmware gives each root port a window aligned to its
    largest BAR, so the bare sum can fall short. Without a window this large the guest
    firmware leaves a 32 GiB (V100) or 128 GiB (A100/H100) BAR unassigned and the GPU driver
    fails to start in the guest (QEMU's and OVMF's default windows are far smaller).
    """
    total = sum(d.mmio64_size for d in devices)
    if total <= 0:
        return 0
    size = 1 << (2 * total - 1).bit_length()
    return max(1, size // MIB)


# QEMU gives an emulated CPU 40 physical address bits; a GPU VM never gets fewer.
GUEST_MIN_PHYS_BITS = 40
# q35 keeps at most 2 GiB of RAM below 4 GiB once a guest has 2.75 GiB or more (the rest of
# that space is for 32-bit PCI and the firmware); everything else lies above 4 GiB.
_Q35_LOW_RAM = 2 * 1024 * MIB
_FOUR_GIB = 4 * 1024 * MIB


def guest_phys_bits(memory_mb, mmio64_mb):
    """Physical address bits a q35 guest needs for its RAM and its 64-bit PCI window.

    RAM above 4 GiB ends at 4 GiB + (RAM - 2 GiB); the firmware puts the 64-bit window above
    it, aligned to the window's own size (OVMF does with ``X-PciMmio64Mb``). One bit more
    leaves room for firmware that sizes the window from the address width instead (OVMF's
    dynamic window). A guest CPU with fewer bits cannot reach the BARs at the top: the public
    failure "the more guest RAM, the fewer GPUs probe"."""
    return max(GUEST_MIN_PHYS_BITS, _address_bits(memory_mb, mmio64_mb) + 1)


def _address_bits(memory_mb, mmio64_mb):
    """Bits that reach the end of RAM and of the 64-bit window aligned above it."""
    ram_top = _FOUR_GIB + max(0, memory_mb * MIB - _Q35_LOW_RAM)
    top = ram_top
    window = mmio64_mb * MIB
    if window:
        top = -(-ram_top // window) * window + window
    return (top - 1).bit_length()


def _is_gpu(dev):
    return dev.vendor in GPU_VENDORS and dev.pci_class in GPU_CLASSES


def _is_nvswitch(dev):
    return dev.id_pair in NVSWITCH_IDS and dev.pci_class in NVSWITCH_CLASSES


def group_members(bdfs, topology, option="gpus"):
    """The other non-bridge members of the devices' IOMMU groups, sorted.

    VFIO hands a guest whole groups: every endpoint in a group must go with the device. A
    member that is another GPU or NVSwitch would give this VM a device placement gave
    someone else, so that is an error.
    """
    wanted = set(bdfs)
    extra = set()
    for bdf in bdfs:
        dev = topology.pci.get(bdf)
        if dev is None:
            raise SpecError("%s: %s is not a PCI device of this host; place the VM against "
                            "this host's topology" % (option, bdf))
        for member in dev.iommu_group_members:
            if member in wanted or member == bdf:
                continue
            other = topology.pci.get(member)
            if other is None or other.pci_class in _BRIDGE_CLASSES:
                continue
            if _is_gpu(other) or _is_nvswitch(other):
                raise SpecError(
                    "%s: %s shares IOMMU group %s with %s %s, which this VM does not get; a "
                    "group goes to one VM whole: place them together, or give the host ACS "
                    "so that they get groups of their own" % (
                        option, bdf, dev.iommu_group, "GPU" if _is_gpu(other) else "NVSwitch",
                        member))
            extra.add(member)
    return tuple(sorted(extra))


def make_spec(placement, topology, disks=(), networks=(), domain_type="kvm", cpu_mode=None,
              cpu_disable_features=(), machine="q35", firmware="bios", template=None,
              image=None, image_version=None, owner_tag=None, seed_digest=None,
              fm_partition=None):
    """The spec of a VM placed on this host (placement from _placement, sizes already in it)."""
    if domain_type not in DOMAIN_TYPES:
        raise SpecError("domain_type: %r is not one of %s; use kvm (hardware virtualisation) or "
                        "qemu (TCG emulation)" % (domain_type, ", ".join(DOMAIN_TYPES)))
    if cpu_mode is None:
        # TCG cannot pass the host CPU through; 'maximum' is QEMU's richest emulated CPU.
        cpu_mode = "maximum" if domain_type == "qemu" else "host-passthrough"
    if cpu_mode not in CPU_MODES:
        raise SpecError("cpu_mode: %r is not one of %s" % (cpu_mode, ", ".join(CPU_MODES)))
    if domain_type == "qemu" and cpu_mode == "host-passthrough":
        raise SpecError("cpu_mode: host-passthrough needs domain_type kvm; with domain_type "
                        "qemu (TCG) use maximum or host-model")
    features = []
    for n, name in enumerate(cpu_disable_features or ()):
        if not isinstance(name, str) or not _FEATURE_RE.match(name):
            raise SpecError("cpu_disable_features[%d]: %r is not a CPU feature name (libvirt "
                            "names such as arch-capabilities, x2apic)" % (n, name))
        if name not in features:
            features.append(name)
    if machine not in MACHINES:
        raise SpecError("machine: %r is not supported; GPU VMs use q35 (PCIe)" % (machine,))
    if firmware not in FIRMWARES:
        raise SpecError("firmware: %r is not one of %s" % (firmware, ", ".join(FIRMWARES)))
    _check_hugepages(placement)
    name = placement.name
    disk_specs = _check_disks(disks)
    net_specs = _check_networks(name, networks, placement.vcpus)
    nics = tuple(getattr(placement, "nics", ()) or ())
    # A Fabric Manager service VM's functions besides the switches go as extra hostdevs.
    fabric = tuple(getattr(placement, "fabric_devices", ()) or ())
    passthrough = tuple(placement.gpus) + tuple(placement.nvswitches) + nics
    members = group_members(passthrough + fabric, topology) if passthrough + fabric else ()
    extra = fabric + tuple(m for m in members if m not in fabric)
    devices = [topology.pci[b] for b in passthrough + extra]
    mmio64_mb = mmio64_window_mb(devices) if placement.gpus else 0
    _check_phys_bits(placement, mmio64_mb, topology, domain_type)
    return VmSpec(
        name=name, domain_type=domain_type, vcpus=placement.vcpus,
        memory_mb=placement.memory_mb, cpu_policy=placement.cpu_policy,
        cpus=tuple(placement.cpus), emulator_cpus=tuple(placement.emulator_cpus),
        numa_nodes=tuple(placement.numa_nodes),
        memory_by_node={int(k): int(v) for k, v in placement.memory_by_node.items()},
        hugepage_kb=placement.hugepage_kb or 0, gpus=tuple(placement.gpus),
        nvswitches=tuple(placement.nvswitches), nics=nics, extra_hostdevs=extra,
        mmio64_mb=mmio64_mb,
        disks=disk_specs, networks=net_specs, cpu_mode=cpu_mode,
        cpu_disable_features=tuple(features), machine=machine, firmware=firmware,
        template=None if template is None else str(template), image=image,
        image_version=image_version, owner_tag=owner_tag, seed_digest=seed_digest,
        fm_partition=fm_partition if placement.gpus else None,
    )


def _check_phys_bits(placement, mmio64_mb, topology, domain_type):
    """A KVM guest cannot address more than its host: refuse RAM plus BARs beyond that."""
    host_bits = getattr(topology, "phys_bits", None)
    if not mmio64_mb or not host_bits or domain_type != "kvm":
        return
    need = _address_bits(placement.memory_mb, mmio64_mb)
    if need > host_bits:
        raise SpecError(
            "memory: %d MiB of RAM and a %d GiB window for the GPUs' BARs need %d physical "
            "address bits, and this host's CPU has %d (/proc/cpuinfo address sizes): the guest "
            "could not reach its GPUs. Give the VM less memory, or fewer GPUs"
            % (placement.memory_mb, mmio64_mb // 1024, need, host_bits))


def _check_hugepages(placement):
    page_mb = (placement.hugepage_kb or 0) // 1024
    if not page_mb:
        return
    # QEMU backs each guest NUMA cell (or the whole memory) with one hugetlbfs file, whose
    # size must be a whole number of pages.
    parts = placement.memory_by_node or {None: placement.memory_mb}
    for node, mb in sorted(parts.items(), key=lambda kv: str(kv[0])):
        if mb % page_mb:
            where = "" if node is None or len(parts) == 1 else " (%d MiB of it on NUMA node %s)" % (
                mb, node)
            raise SpecError(
                "memory: %d MiB%s is not a whole number of %d MiB hugepages; give memory as a "
                "multiple of %d MiB%s, or set hugepages: false" % (
                    placement.memory_mb, where, page_mb, page_mb * max(1, len(parts)),
                    " (it is split over %d NUMA nodes)" % len(parts) if len(parts) > 1 else ""))


def _check_disks(disks):
    result = []
    roles = {}
    for n, disk in enumerate(disks or ()):
        where = "disks[%d]" % n
        if disk.role not in DISK_ROLES:
            raise SpecError("%s.role: %r is not one of %s"
                            % (where, disk.role, ", ".join(DISK_ROLES)))
        if disk.role in ("os", "seed") and disk.role in roles:
            raise SpecError("%s: a VM has one %s disk, %s is one already" % (
                where, disk.role, roles[disk.role]))
        roles.setdefault(disk.role, where)
        if not disk.path or not str(disk.path).startswith("/"):
            raise SpecError("%s.path: %r is not an absolute path" % (where, disk.path))
        fmt = "raw" if disk.role == "seed" else disk.format
        if fmt not in DISK_FORMATS:
            raise SpecError("%s.format: %r is not one of %s"
                            % (where, disk.format, ", ".join(DISK_FORMATS)))
        if disk.backing is not None and fmt != "qcow2":
            raise SpecError("%s: a disk with a backing image must be qcow2, not %s" % (
                where, fmt))
        backing_format = disk.backing_format
        if disk.backing is not None and backing_format is None:
            backing_format = "qcow2"
        result.append(DiskSpec(role=disk.role, path=disk.path, format=fmt,
                               size_gb=disk.size_gb, backing=disk.backing,
                               backing_format=backing_format))
    return tuple(result)


def _check_networks(name, networks, vcpus):
    result = []
    for n, net in enumerate(networks or ()):
        where = "networks[%d]" % n
        if net.type not in NETWORK_TYPES:
            raise SpecError("%s.type: %r is not one of %s"
                            % (where, net.type, ", ".join(NETWORK_TYPES)))
        if net.type in ("network", "bridge") and not net.source:
            raise SpecError("%s: type %s needs the %s name in source" % (
                where, net.type, "libvirt network" if net.type == "network" else "host bridge"))
        if net.type == "user" and net.source:
            raise SpecError("%s: type user takes no source (got %r)" % (where, net.source))
        mac = derive_mac(name, n) if net.mac is None else normalize_mac(net.mac, where + ".mac")
        queues = net.queues
        if queues is None:
            # QEMU's user-mode stack has one queue: libvirt refuses multiqueue for type user.
            # One queue is the default, and libvirt drops queues='1' from what it stores: asking
            # for it would make every run see a difference (a redefine each time).
            sized = min(vcpus, NET_QUEUES_MAX)
            queues = None if net.type == "user" or sized <= 1 else sized
        result.append(NetworkSpec(type=net.type, source=net.source, mac=mac, queues=queues))
    seen = {}
    for n, net in enumerate(result):
        if net.mac in seen:
            raise SpecError("networks[%d].mac: %s is used by networks[%d] too" % (
                n, net.mac, seen[net.mac]))
        seen[net.mac] = n
    return tuple(result)


# --- domain -> spec ------------------------------------------------------------------------------

def _machine_family(machine):
    """libvirt expands 'q35' to a versioned type ('pc-q35-7.2'); compare the family."""
    if machine is None:
        return None
    if machine == "q35" or machine.startswith("pc-q35"):
        return "q35"
    if machine == "pc" or machine.startswith("pc-i440fx") or re.match(r"^pc-\d", machine):
        return "pc"
    return machine


def _spec_from_domain(dom):
    alloc = dom.gpuvirt or GpuvirtMetadata(owner=None)
    tune = dom.cputune or CpuTune()
    pins = sorted(tune.vcpupins, key=lambda p: p.vcpu)
    if pins:
        policy = POLICY_DEDICATED
        cpus = tuple(c for p in pins for c in p.cpuset)
    else:
        policy = POLICY_SHARED  # whatever the metadata says: no pins means floating vCPUs
        cpus = tuple(dom.vcpu.cpuset or ()) if dom.vcpu is not None else ()
    numa = dom.numatune
    nodes = tuple(numa.nodeset or ()) if numa is not None else ()
    memory_mb = (dom.memory_kib or 0) // 1024
    cells = dom.cpu.cells if dom.cpu is not None else []
    by_node = {}
    if cells:
        cell_node = {m.cellid: m.nodeset[0] for m in (numa.memnodes if numa else ())
                     if len(m.nodeset) == 1}
        for k, cell in enumerate(cells):
            node = cell_node.get(cell.id, nodes[k] if k < len(nodes) else cell.id)
            by_node[node] = by_node.get(node, 0) + cell.memory_kib // 1024
    elif len(nodes) == 1:
        by_node = {nodes[0]: memory_mb}
    hugepage_kb = 0
    backing = dom.memory_backing
    if backing is not None and backing.hugepages is not None:
        # <hugepages/> without a page means the host's default size: 2 MiB on x86.
        hugepage_kb = backing.hugepages[0].size_kib if backing.hugepages else 2048
    held = [h.bdf for h in dom.hostdevs]
    gpus = tuple(b for b in (normalize_bdf(g) for g in alloc.gpus) if b in held)
    switches = tuple(b for b in (normalize_bdf(s) for s in alloc.nvswitches) if b in held)
    nics = tuple(b for b in (normalize_bdf(n) for n in alloc.nics) if b in held)
    extra = tuple(sorted(b for b in held if b not in gpus and b not in switches
                         and b not in nics))
    root = dom.controller("pci", 0)
    mmio64_mb = (root.pcihole64_kib or 0) // 1024 if root is not None else 0
    os_ = dom.os or Os()
    firmware = "ovmf" if (os_.loader_type == "pflash" or os_.firmware == "efi") else "bios"
    cpu = dom.cpu or Cpu()
    return VmSpec(
        name=dom.name, domain_type=dom.type, vcpus=dom.vcpu.count if dom.vcpu else 0,
        memory_mb=memory_mb, cpu_policy=policy, cpus=cpus,
        emulator_cpus=tuple(tune.emulatorpin or ()), numa_nodes=nodes, memory_by_node=by_node,
        hugepage_kb=hugepage_kb, gpus=gpus, nvswitches=switches, nics=nics,
        extra_hostdevs=extra,
        mmio64_mb=mmio64_mb, disks=_disk_specs(dom, alloc), networks=tuple(
            NetworkSpec(type=i.type, source=i.source, mac=i.mac, queues=i.queues)
            for i in dom.interfaces),
        cpu_mode=cpu.mode, cpu_disable_features=tuple(
            f.name for f in cpu.features if f.policy == "disable"),
        machine=_machine_family(os_.machine), firmware=firmware, template=alloc.template,
        image=alloc.image, image_version=alloc.image_version, owner_tag=alloc.owner_tag,
        seed_digest=alloc.seed_digest, fm_partition=alloc.fm_partition,
        guest_agent=any(c.target_name == GUEST_AGENT_CHANNEL for c in dom.channels),
    )


def _disk_specs(dom, alloc):
    recorded = {d.target: d for d in alloc.disks}
    result = []
    for disk in dom.disks:
        if disk.type not in ("file", "block") or disk.device not in ("disk", "cdrom"):
            continue
        meta = recorded.get(disk.target_dev)
        if meta is not None:
            role = meta.role
        elif disk.device == "cdrom":
            role = "seed"
        else:
            role = "os" if disk.backing is not None and disk.backing.source else "data"
        backing = disk.backing if disk.backing is not None and disk.backing.source else None
        result.append(DiskSpec(
            role=role, path=disk.source, format=disk.driver_type or "raw",
            size_gb=meta.size_gb if meta is not None else None,
            backing=backing.source if backing else None,
            backing_format=backing.format if backing else None, recorded=meta is not None))
    return tuple(result)

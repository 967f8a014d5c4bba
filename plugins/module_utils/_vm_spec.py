# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What a GPU VM looks like: placement -> VmSpec -> libvirt domain (the policy). Private.

:class:`VmSpec` is the semantic description of a VM that modules compare and report; it is
built from a placement (:func:`make_spec`) or read back from a domain
(:meth:`VmSpec.from_domain`), so ``kvm_vm`` compares spec with spec, never raw XML.
:func:`build_domain` turns a spec into a :class:`_domain.Domain`, applying the tuning that makes
a passthrough VM near-native (docs/hardware.md section 6): 1:1 vCPU pinning, emulator and I/O
threads on host-reserved CPUs, memory strict to the GPUs' nodes (hugepages when reserved),
guest NUMA cells and one PCIe expander bus per host node for multi-node VMs, whole IOMMU
groups passed through, a 64-bit MMIO window sized from the BARs, and multiqueue virtio.

Pure: no I/O. The caller hands in the host topology (``_topology``) and the placement.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import (
    Address,
    Allocation,
    AllocationDisk,
    BackingStore,
    CharDevice,
    Clock,
    Controller,
    Cpu,
    CpuFeature,
    CpuTune,
    Disk,
    Domain,
    Features,
    HostdevPci,
    HugePage,
    Interface,
    IOThreadPin,
    MemBalloon,
    MemNode,
    MemoryBacking,
    NumaCell,
    NumaTune,
    Os,
    Rng,
    Timer,
    Vcpu,
    VcpuPin,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
    GPU_CLASSES,
    GPU_IDS,
    NVSWITCH_CLASSES,
    NVSWITCH_IDS,
)

COLLECTION = "gpuvirt.kvm"
COLLECTION_VERSION = "0.1.0"  # galaxy.yml's version (a unit test keeps them equal)

POLICY_DEDICATED = "dedicated"
POLICY_SHARED = "shared"

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
# to 8; QEMU itself sizes virtio-blk at one queue per vCPU and we stop at 16).
NET_QUEUES_MAX = 8
BLK_QUEUES_MAX = 16

DEFAULT_OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"  # Debian/Ubuntu ovmf package paths
DEFAULT_OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
DEFAULT_NVRAM_DIR = "/var/lib/libvirt/qemu/nvram"  # libvirt's own default for per-VM NVRAM

# Guest bus numbers of the PCIe expander buses (one per guest NUMA cell). Buses below the first
# one stay for the root ports libvirt adds on pcie-root (virtio disks, NICs); each expander
# needs one bus for itself plus one per root port below it.
EXPANDER_BUS_FIRST = 0x80
EXPANDER_BUS_SPACING = 0x20
_MAX_BUS = 0xFF

# Classes never passed through even when they share an IOMMU group: host and PCI-to-PCI
# bridges stay with the host (VFIO accepts a group whose bridges are not bound to vfio-pci).
_BRIDGE_CLASSES = (0x0600, 0x0604, 0x0609)

_MIB = 2 ** 20
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

    @property
    def hostdevs(self):
        """Every host PCI function the VM takes."""
        return tuple(self.gpus) + tuple(self.nvswitches) + tuple(self.extra_hostdevs)

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
            "owner_tag": self.owner_tag,
            "seed_digest": self.seed_digest,
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
    return max(1, size // _MIB)


def _is_gpu(dev):
    return dev.id_pair in GPU_IDS and dev.pci_class in GPU_CLASSES


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
              image=None, image_version=None, owner_tag=None, seed_digest=None):
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
    passthrough = tuple(placement.gpus) + tuple(placement.nvswitches)
    extra = group_members(passthrough, topology) if passthrough else ()
    devices = [topology.pci[b] for b in passthrough + extra]
    return VmSpec(
        name=name, domain_type=domain_type, vcpus=placement.vcpus,
        memory_mb=placement.memory_mb, cpu_policy=placement.cpu_policy,
        cpus=tuple(placement.cpus), emulator_cpus=tuple(placement.emulator_cpus),
        numa_nodes=tuple(placement.numa_nodes),
        memory_by_node={int(k): int(v) for k, v in placement.memory_by_node.items()},
        hugepage_kb=placement.hugepage_kb or 0, gpus=tuple(placement.gpus),
        nvswitches=tuple(placement.nvswitches), extra_hostdevs=extra,
        mmio64_mb=mmio64_window_mb(devices) if placement.gpus else 0,
        disks=disk_specs, networks=net_specs, cpu_mode=cpu_mode,
        cpu_disable_features=tuple(features), machine=machine, firmware=firmware,
        template=None if template is None else str(template), image=image,
        image_version=image_version, owner_tag=owner_tag, seed_digest=seed_digest,
    )


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


# --- spec -> domain ------------------------------------------------------------------------------

def _split(total, weights):
    """Split an integer in proportion to weights (largest remainder, ties to the first)."""
    wsum = sum(weights)
    if wsum <= 0:
        return [total] + [0] * (len(weights) - 1)
    shares = [total * w // wsum for w in weights]
    order = sorted(range(len(weights)), key=lambda k: (-(total * weights[k] % wsum), k))
    for k in order[:total - sum(shares)]:
        shares[k] += 1
    return shares


def _device_node(bdf, spec, topology):
    dev = topology.pci.get(bdf)
    if dev is not None and dev.numa_node in spec.numa_nodes:
        return dev.numa_node
    # numa_node -1 (the firmware does not say): the VM's first node, as placement counts it.
    return spec.numa_nodes[0] if spec.numa_nodes else None


def _passthrough_ports(spec, topology):
    """[(host node, [bdf, ...])]: the hostdevs each guest root port gets, in order.

    A GPU or NVSwitch is followed by the other members of its IOMMU group; functions of one
    host slot (a GPU and its audio function) share a port and keep their function numbers.
    """
    primaries = list(spec.gpus) + list(spec.nvswitches)
    follows = {}
    for bdf in primaries:
        dev = topology.pci.get(bdf)
        for member in (dev.iommu_group_members if dev is not None else ()):
            follows.setdefault(member, bdf)
    ordered = []
    for bdf in primaries:
        ordered.append((bdf, bdf))
        ordered.extend((m, bdf) for m in spec.extra_hostdevs if follows.get(m) == bdf)
    ordered.extend((m, m) for m in spec.extra_hostdevs if m not in follows)
    ports = []
    slot_port = {}
    for bdf, primary in ordered:
        slot = bdf.rsplit(".", 1)[0]
        if slot in slot_port:
            ports[slot_port[slot]][1].append(bdf)
        else:
            slot_port[slot] = len(ports)
            ports.append((_device_node(primary, spec, topology), [bdf]))
    return ports


def _hostdevs_on(port_index, bdfs):
    functions = sorted(bdfs, key=lambda b: int(b.rsplit(".", 1)[1]))
    numbers = [int(b.rsplit(".", 1)[1]) for b in functions]
    if 0 not in numbers:
        numbers = list(range(len(functions)))  # a guest only scans a slot with function 0
    result = []
    for bdf, fn in zip(functions, numbers):
        address = Address(type="pci", domain=0, bus=port_index, slot=0, function=fn,
                          multifunction=True if fn == 0 and len(functions) > 1 else None)
        result.append(HostdevPci(source=Address.pci(bdf, with_type=False), managed=True,
                                 address=address))
    return result


def _expander_bus_numbers(count, need):
    """Guest bus numbers for `count` expander buses that each need `need` buses."""
    first, spacing = EXPANDER_BUS_FIRST, EXPANDER_BUS_SPACING
    if first + spacing * (count - 1) + need - 1 > _MAX_BUS:
        spacing = max(need, (_MAX_BUS + 1 - first) // count)
        if first + spacing * (count - 1) + need - 1 > _MAX_BUS:
            raise SpecError("the VM needs %d PCIe expander buses with %d buses each; a guest "
                            "has 256 buses: pass through fewer devices" % (count, need))
    return [first + spacing * k for k in range(count)]


def _pci_layout(spec, topology, cells):
    """Controllers and hostdevs: root ports on pcie-root, or under one expander bus per node."""
    root = Controller(type="pci", index=0, model="pcie-root",
                      pcihole64_kib=spec.mmio64_mb * 1024 if spec.mmio64_mb else None)
    controllers = [root]
    hostdevs = []
    ports = _passthrough_ports(spec, topology)
    if len(cells) <= 1:
        for k, (_node, bdfs) in enumerate(ports):
            index = k + 1
            controllers.append(Controller(type="pci", index=index, model="pcie-root-port"))
            hostdevs.extend(_hostdevs_on(index, bdfs))
        return controllers, hostdevs
    # One expander bus per guest cell that has devices, its <node> the cell: the guest then
    # sees each GPU on the NUMA node of its vCPUs and memory, as on the host (NCCL reads the
    # PCI/NUMA layout; a flat layout makes every GPU pair look like "PHB").
    cell_of = {node: k for k, node in enumerate(spec.numa_nodes)}
    by_cell = {}
    for node, bdfs in ports:
        by_cell.setdefault(cell_of.get(node, 0), []).append(bdfs)
    used = sorted(by_cell)
    bus_numbers = _expander_bus_numbers(len(used), 1 + max(len(by_cell[c]) for c in used))
    expander_index = {}
    for k, cell in enumerate(used):
        expander_index[cell] = k + 1
        controllers.append(Controller(type="pci", index=k + 1, model="pcie-expander-bus",
                                      model_name="pxb-pcie", target_bus_nr=bus_numbers[k],
                                      target_node=cell))
    index = len(used) + 1
    for cell in used:
        for slot, bdfs in enumerate(by_cell[cell]):
            controllers.append(Controller(
                type="pci", index=index, model="pcie-root-port",
                address=Address(type="pci", domain=0, bus=expander_index[cell], slot=slot,
                                function=0)))
            hostdevs.extend(_hostdevs_on(index, bdfs))
            index += 1
    return controllers, hostdevs


def _cells(spec, topology):
    """Guest NUMA cells for a multi-node VM: [(host node, vCPU ids, MiB)]; [] for one node."""
    nodes = list(spec.numa_nodes)
    if len(nodes) <= 1:
        return []
    total = sum(spec.memory_by_node.get(n, 0) for n in nodes)
    if sorted(spec.memory_by_node) != sorted(nodes) or total != spec.memory_mb:
        raise SpecError("memory_by_node %r does not split memory %d MiB over numa_nodes %s" % (
            spec.memory_by_node, spec.memory_mb, nodes))
    vcpus = {n: [] for n in nodes}
    if spec.cpu_policy == POLICY_DEDICATED and len(spec.cpus) == spec.vcpus:
        for i, cpu in enumerate(spec.cpus):
            info = topology.cpus.get(cpu)
            node = info.node if info is not None and info.node in vcpus else nodes[0]
            vcpus[node].append(i)
    else:
        # Shared vCPUs float; give each cell vCPUs in proportion to its memory (which
        # placement split in proportion to the node's GPUs).
        start = 0
        for node, count in zip(nodes, _split(spec.vcpus, [spec.memory_by_node[n]
                                                          for n in nodes])):
            vcpus[node] = list(range(start, start + count))
            start += count
    return [(n, tuple(vcpus[n]), spec.memory_by_node[n]) for n in nodes]


def _guest_topology(spec, topology, cells):
    """(sockets, cores, threads): host thread siblings stay siblings in the guest."""
    groups = [c[1] for c in cells] if cells else [tuple(range(spec.vcpus))]
    threads = 1
    if spec.cpu_policy == POLICY_DEDICATED and len(spec.cpus) == spec.vcpus:
        sizes = set(len(topology.cpus[c].siblings) for c in spec.cpus if c in topology.cpus)
        t = sizes.pop() if len(sizes) == 1 else 1
        if t > 1 and all(len(g) % t == 0 for g in groups):
            ok = True
            for g in groups:
                for k in range(0, len(g), t):
                    host = [spec.cpus[i] for i in g[k:k + t]]
                    if sorted(host) != sorted(topology.cpus[host[0]].siblings):
                        ok = False
            threads = t if ok else 1
    sockets = 1
    if cells and len(set(len(g) for g in groups)) == 1 and len(groups[0]) % threads == 0:
        sockets = len(cells)  # one guest socket per cell, as the host's sockets/nodes
    return sockets, spec.vcpus // (sockets * threads), threads


def build_domain(spec, topology, uuid=None, ovmf_code=DEFAULT_OVMF_CODE,
                 ovmf_vars=DEFAULT_OVMF_VARS, nvram_dir=DEFAULT_NVRAM_DIR,
                 created_by="%s %s" % (COLLECTION, COLLECTION_VERSION)):
    """The libvirt domain for a spec on this host (uuid: keep an existing domain's)."""
    cells = _cells(spec, topology)
    dedicated = spec.cpu_policy == POLICY_DEDICATED
    virtio_disks = [d for d in spec.disks if d.role != "seed"]
    dom = Domain(type=spec.domain_type, name=spec.name, uuid=uuid)
    dom.metadata = [Allocation(
        owner=COLLECTION, created_by=created_by, template=spec.template,
        cpu_policy=spec.cpu_policy, image=spec.image, image_version=spec.image_version,
        owner_tag=spec.owner_tag, seed_digest=spec.seed_digest, gpus=tuple(spec.gpus),
        nvswitches=tuple(spec.nvswitches),
        numa_nodes=tuple(spec.numa_nodes),
        disks=[AllocationDisk(target=t, role=d.role, size_gb=d.size_gb)
               for t, d in _disk_targets(spec.disks)])]
    dom.memory_kib = spec.memory_mb * 1024
    dom.current_memory_kib = spec.memory_mb * 1024
    if spec.hugepage_kb:
        dom.memory_backing = MemoryBacking(hugepages=[HugePage(
            size_kib=spec.hugepage_kb,
            nodeset=tuple(range(len(cells))) if cells else None)])
    dom.vcpu = Vcpu(count=spec.vcpus, placement="static",
                    cpuset=None if dedicated else tuple(spec.cpus) or None)
    dom.iothreads = len(virtio_disks) or None
    tune = CpuTune()
    if dedicated:
        tune.vcpupins = [VcpuPin(vcpu=i, cpuset=(cpu,)) for i, cpu in enumerate(spec.cpus)]
    if spec.emulator_cpus:
        # QEMU's main loop and the disks' I/O threads run on the host-reserved CPUs of the
        # VM's nodes, never on the vCPUs' cores.
        tune.emulatorpin = tuple(spec.emulator_cpus)
        tune.iothreadpins = [IOThreadPin(iothread=k + 1, cpuset=tuple(spec.emulator_cpus))
                             for k in range(len(virtio_disks))]
    dom.cputune = tune if (tune.vcpupins or tune.emulatorpin) else None
    if spec.numa_nodes:
        dom.numatune = NumaTune(mode="strict", nodeset=tuple(spec.numa_nodes), memnodes=[
            MemNode(cellid=k, mode="strict", nodeset=(node,))
            for k, (node, _v, _m) in enumerate(cells)])
    dom.os = _os(spec, ovmf_code, ovmf_vars, nvram_dir)
    dom.features = Features(acpi=True, apic=True)
    dom.cpu = _cpu(spec, topology, cells)
    dom.clock = Clock(offset="utc", timers=[
        Timer(name="rtc", tickpolicy="catchup"), Timer(name="pit", tickpolicy="delay"),
        Timer(name="hpet", present=False)])
    dom.on_poweroff, dom.on_reboot, dom.on_crash = "destroy", "restart", "destroy"
    controllers, hostdevs = _pci_layout(spec, topology, cells)
    devices = _disks(spec)
    devices.extend(controllers)
    # libvirt would otherwise add a USB controller, taking a PCIe slot for nothing.
    devices.append(Controller(type="usb", index=0, model="none"))
    for net in spec.networks:
        devices.append(Interface(type=net.type, source=net.source, mac=net.mac, model="virtio",
                                 queues=net.queues))
    devices.extend(hostdevs)
    devices.append(CharDevice(kind="serial", type="pty"))
    devices.append(CharDevice(kind="console", type="pty", target_type="serial"))
    # Ballooning cannot reclaim memory that VFIO has pinned for DMA, and a pinned VM's memory
    # is reserved for it anyway.
    devices.append(MemBalloon(model="none"))
    devices.append(Rng(model="virtio", backend_model="random", backend="/dev/urandom"))
    dom.devices = devices
    return dom


def _disk_targets(disks):
    """[(target dev, DiskSpec)]: virtio disks vda, vdb, ... in order; the seed ISO sda."""
    result = []
    virtio = 0
    for disk in disks:
        if disk.role == "seed":
            result.append(("sda", disk))
        else:
            result.append(("vd" + chr(ord("a") + virtio), disk))
            virtio += 1
    return result


def _disks(spec):
    queues = max(1, min(spec.vcpus, BLK_QUEUES_MAX))
    devices = []
    iothread = 0
    for target, disk in _disk_targets(spec.disks):
        if disk.role == "seed":
            devices.append(Disk(type="file", device="cdrom", driver_name="qemu",
                                driver_type="raw", source=disk.path, target_dev=target,
                                target_bus="sata", readonly=True))
            continue
        iothread += 1
        backing = None
        if disk.backing:
            # Written out so that the domain XML records the base image (kvm_image refuses to
            # remove images a domain's chain uses) and libvirt does not have to probe it.
            backing = BackingStore(type="file", format=disk.backing_format or "qcow2",
                                   source=disk.backing)
        devices.append(Disk(
            type="file", device="disk", driver_name="qemu", driver_type=disk.format,
            cache="none", io="native", discard="unmap", queues=queues, iothread=iothread,
            source=disk.path, backing=backing, target_dev=target, target_bus="virtio",
            boot_order=1 if disk.role == "os" else None))
    return devices


def _os(spec, ovmf_code, ovmf_vars, nvram_dir):
    has_boot_disk = any(d.role == "os" for d in spec.disks)
    os_ = Os(type="hvm", arch="x86_64", machine=spec.machine,
             # libvirt forbids <os><boot> next to per-device boot order (on the OS disk).
             boot=[] if has_boot_disk else ["hd"])
    if spec.firmware == "ovmf":
        os_.loader = ovmf_code
        os_.loader_readonly = True
        os_.loader_type = "pflash"
        os_.nvram = "%s/%s_VARS.fd" % (nvram_dir.rstrip("/"), spec.name)
        os_.nvram_template = ovmf_vars
    return os_


def _cpu(spec, topology, cells):
    sockets, cores, threads = _guest_topology(spec, topology, cells)
    cpu = Cpu(mode=spec.cpu_mode, sockets=sockets, cores=cores, threads=threads)
    if spec.cpu_mode in ("host-passthrough", "maximum"):
        # Nothing to check against a named model; a VM with host devices never migrates,
        # and migratable='off' lets it see host-only features such as invtsc.
        cpu.check = "none"
        cpu.migratable = False
    cpu.features = [CpuFeature(policy="disable", name=n) for n in spec.cpu_disable_features]
    cpu.cells = [NumaCell(id=k, cpus=vcpus, memory_kib=mb * 1024)
                 for k, (_node, vcpus, mb) in enumerate(cells)]
    return cpu


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


def _norm_bdf(bdf):
    try:
        return Address.pci(bdf).bdf
    except ValueError:
        return bdf


def _spec_from_domain(dom):
    alloc = dom.allocation or Allocation(owner=None)
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
    gpus = tuple(b for b in (_norm_bdf(g) for g in alloc.gpus) if b in held)
    switches = tuple(b for b in (_norm_bdf(s) for s in alloc.nvswitches) if b in held)
    extra = tuple(sorted(b for b in held if b not in gpus and b not in switches))
    root = dom.controller("pci", 0)
    mmio64_mb = (root.pcihole64_kib or 0) // 1024 if root is not None else 0
    os_ = dom.os or Os()
    firmware = "ovmf" if (os_.loader_type == "pflash" or os_.firmware == "efi") else "bios"
    cpu = dom.cpu or Cpu()
    return VmSpec(
        name=dom.name, domain_type=dom.type, vcpus=dom.vcpu.count if dom.vcpu else 0,
        memory_mb=memory_mb, cpu_policy=policy, cpus=cpus,
        emulator_cpus=tuple(tune.emulatorpin or ()), numa_nodes=nodes, memory_by_node=by_node,
        hugepage_kb=hugepage_kb, gpus=gpus, nvswitches=switches, extra_hostdevs=extra,
        mmio64_mb=mmio64_mb, disks=_disk_specs(dom, alloc), networks=tuple(
            NetworkSpec(type=i.type, source=i.source, mac=i.mac, queues=i.queues)
            for i in dom.interfaces),
        cpu_mode=cpu.mode, cpu_disable_features=tuple(
            f.name for f in cpu.features if f.policy == "disable"),
        machine=_machine_family(os_.machine), firmware=firmware, template=alloc.template,
        image=alloc.image, image_version=alloc.image_version, owner_tag=alloc.owner_tag,
        seed_digest=alloc.seed_digest,
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

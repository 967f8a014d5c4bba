# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""A host's topology as data: PCI devices and their paths, CPUs, NUMA nodes. Private, pure.

``_sysfs`` reads it from ``/sys`` and ``/proc``; the fleet planner rebuilds it from a host's
facts. :meth:`HostTopology.link` classifies the PCIe distance between two devices the way
``nvidia-smi topo -m`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

PCI_CLASS_BRIDGE_PCI = 0x0604

# Bits of the flags column of a PCI device's "resource" file (include/linux/ioport.h).
IORESOURCE_IO = 0x00000100
IORESOURCE_MEM = 0x00000200
IORESOURCE_PREFETCH = 0x00002000
IORESOURCE_MEM_64 = 0x00100000


class TopologyError(Exception):
    """The sysfs or procfs tree cannot be read as a Linux host's."""


@dataclass(frozen=True)
class Bar:
    """One PCI base address register as the kernel reports it in ``resource``."""

    index: int
    start: int
    size: int
    flags: int

    @property
    def is_mem64(self):
        return bool(self.flags & IORESOURCE_MEM_64)

    @property
    def prefetchable(self):
        return bool(self.flags & IORESOURCE_PREFETCH)

    @property
    def is_io(self):
        return bool(self.flags & IORESOURCE_IO)


@dataclass(frozen=True)
class PciDevice:
    """A PCI function and where it sits in the PCIe tree."""

    bdf: str
    vendor: int
    device: int
    class_code: int  # 24 bits: base class, sub class, programming interface
    driver: str | None
    numa_node: int  # -1 when the firmware does not say
    iommu_group: int | None
    iommu_group_members: tuple = ()  # every BDF in the group, this one included, sorted
    path: tuple = ()  # BDFs from the first bridge below the host bridge down to this device
    host_bridge: str = ""  # "pci0000:00"
    bars: tuple = ()
    # A GPU or NVSwitch that was in this slot when the host was converted and is gone now
    # (with_missing): it keeps its index, is never placed, and nothing is read from sysfs for it.
    missing: bool = False

    @property
    def pci_class(self):
        """Base and sub class (16 bits), e.g. 0x0302 for a 3D controller."""
        return self.class_code >> 8

    @property
    def is_bridge(self):
        return self.pci_class == PCI_CLASS_BRIDGE_PCI

    @property
    def bridges(self):
        """The bridges above this device, the root port first."""
        return self.path[:-1]

    @property
    def root_port(self):
        return self.path[0] if len(self.path) > 1 else None

    @property
    def id_pair(self):
        return (self.vendor, self.device)

    @property
    def mmio64_size(self):
        """Bytes of 64-bit prefetchable memory BARs (what sizes a guest's 64-bit MMIO window)."""
        return sum(b.size for b in self.bars if b.is_mem64 and b.prefetchable)

    @property
    def mmio_size(self):
        return sum(b.size for b in self.bars if not b.is_io)


PCI_BASE_CLASS_NETWORK = 0x02


@dataclass(frozen=True)
class NetFunction:
    """What the kernel says of a network function beside its PCI identity: its interfaces, its
    RDMA device, its SR-IOV state (drivers/pci/iov.c) and its place among bonds and bridges."""

    bdf: str
    netdevs: tuple = ()  # interface names (net/*), port order
    masters: tuple = ()  # the bond or bridge each netdev is enslaved to, or None (net/X/master)
    uppers: tuple = ()  # per netdev, the devices stacked on it (net/X/upper_*: VLANs, macvlans)
    rdma: tuple = ()  # RDMA device names (infiniband/*): mlx5_0
    link_layer: str | None = None  # "InfiniBand" or "Ethernet" (RDMA port, netdev type or class)
    sriov_totalvfs: int | None = None  # None: no SR-IOV capability
    sriov_numvfs: int = 0
    sriov_offset: int = 0  # VF n sits at routing ID PF + offset + n * stride (PCIe SR-IOV 3.3.9)
    sriov_stride: int = 0
    vfs: tuple = ()  # the VFs' BDFs, virtfn0 first
    physfn: str | None = None  # a VF's PF


# include/uapi/linux/pci_regs.h
PCI_EXT_CAP_ID_ACS = 0x000D
PCI_EXT_CAP_ID_ATS = 0x000F
PCI_ACS_RR = 0x0004  # P2P Request Redirect
PCI_ACS_CR = 0x0008  # P2P Completion Redirect
PCI_ACS_DT = 0x0040  # P2P Direct Translated
PCI_ATS_CTRL_ENABLE = 0x8000


@dataclass(frozen=True)
class ExtCaps:
    """What a function's extended capabilities say of ACS and ATS. ``readable`` is False when
    config space ended at 256 bytes (it is 4096 for PCIe, but only root reads past 64)."""

    readable: bool
    acs_ctrl: int | None = None  # the ACS Control register; None: no ACS capability
    ats_ctrl: int | None = None  # the ATS Control register; None: no ATS capability


def parse_ext_caps(config):
    """ExtCaps from a PCI ``config`` file's bytes (the extended capability list at 0x100)."""
    if len(config) < 0x108:
        return ExtCaps(readable=False)
    acs = ats = None
    offset, seen = 0x100, set()
    while offset and offset not in seen and offset + 8 <= len(config):
        seen.add(offset)
        header = int.from_bytes(config[offset:offset + 4], "little")
        if header in (0, 0xFFFFFFFF):
            break
        cap_id = header & 0xFFFF
        ctrl = int.from_bytes(config[offset + 6:offset + 8], "little")
        if cap_id == PCI_EXT_CAP_ID_ACS:
            acs = ctrl
        elif cap_id == PCI_EXT_CAP_ID_ATS:
            ats = ctrl
        offset = (header >> 20) & 0xFFC  # PCI_EXT_CAP_NEXT
        if offset and offset < 0x100:
            break
    return ExtCaps(readable=True, acs_ctrl=acs, ats_ctrl=ats)


@dataclass(frozen=True)
class Cpu:
    id: int
    socket: int
    core: int
    node: int
    siblings: tuple  # thread siblings, this CPU included, sorted


@dataclass(frozen=True)
class NumaNode:
    id: int
    cpus: tuple
    memory_total_kb: int
    memory_free_kb: int
    hugepages: dict = field(default_factory=dict)  # page size in kB -> {"total": n, "free": n}

    @property
    def memory_mb(self):
        return self.memory_total_kb // 1024

    @property
    def memory_free_mb(self):
        return self.memory_free_kb // 1024


# PCIe distance classes between two devices, with nvidia-smi topo -m's names. Smaller is closer.
LINK_PIX = "PIX"  # at most one PCIe switch between them
LINK_PXB = "PXB"  # several PCIe bridges, no host bridge
LINK_PHB = "PHB"  # through one PCIe host bridge
LINK_NODE = "NODE"  # between host bridges of one NUMA node
LINK_SYS = "SYS"  # between NUMA nodes (across sockets, or NPS/SNC quadrants of one socket)
LINK_ORDER = (LINK_PIX, LINK_PXB, LINK_PHB, LINK_NODE, LINK_SYS)


@dataclass
class HostTopology:
    """Everything discovery found, with the roots it was read from."""

    pci: dict  # bdf -> PciDevice
    cpus: dict  # id -> Cpu
    numa_nodes: tuple  # NumaNode, by id
    cmdline: str
    iommu_groups: int  # how many IOMMU groups the kernel made (0: IOMMU off)
    sysfs_root: str = "/sys"
    proc_root: str = "/proc"
    cpu_vendor: str = ""  # vendor_id from /proc/cpuinfo: GenuineIntel, AuthenticAMD, or ""
    # "address sizes : 46 bits physical" from /proc/cpuinfo: how far the host (and so a KVM
    # guest) can address memory and BARs; None when the kernel does not say.
    phys_bits: int | None = None
    nics: dict = field(default_factory=dict)  # bdf -> NetFunction, every network-class function
    # bdf -> ExtCaps of bridges, GPUs and network functions (config space past 256 bytes)
    ext_caps: dict = field(default_factory=dict)
    # interface -> what the host routes through it ("default route", "route 10.0.0.0/24",
    # "IPv6 default route"), from /proc/net/route and /proc/net/ipv6_route
    host_routes: dict = field(default_factory=dict)

    @property
    def iommu_enabled(self):
        return self.iommu_groups > 0

    @property
    def cmdline_args(self):
        """Kernel arguments as a dict; flags without '=' map to None."""
        args = {}
        for token in self.cmdline.split():
            if token == "--":
                break
            key, sep, value = token.partition("=")
            args[key] = value if sep else None
        return args

    def node_of_cpu(self, cpu):
        return self.cpus[cpu].node

    def node(self, node_id):
        for node in self.numa_nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)

    def devices_matching(self, id_pairs, classes=None, vendors=()):
        """PCI functions whose (vendor, device) is in id_pairs, or whose vendor is in vendors,
        and whose class is in classes; BDF order."""
        wanted = set(id_pairs)
        found = [
            d for d in self.pci.values()
            if (d.id_pair in wanted or d.vendor in vendors)
            and (classes is None or d.pci_class in classes)
        ]
        return sorted(found, key=lambda d: d.bdf)

    def socket_of_node(self, node_id):
        for cpu in self.cpus.values():
            if cpu.node == node_id:
                return cpu.socket
        return None

    def link(self, bdf_a, bdf_b):
        """The PCIe distance class between two devices (LINK_* above)."""
        a, b = self.pci[bdf_a], self.pci[bdf_b]
        if a.host_bridge == b.host_bridge:
            common = 0
            for x, y in zip(a.path[:-1], b.path[:-1]):
                if x != y:
                    break
                common += 1
            if common:
                # Bridges each side crosses below the shared one; a switch's downstream port counts
                # as part of the switch, so one bridge per side is still "one switch".
                below_a = len(a.path) - 1 - common
                below_b = len(b.path) - 1 - common
                return LINK_PIX if max(below_a, below_b) <= 1 else LINK_PXB
            return LINK_PHB
        node_a, node_b = a.numa_node, b.numa_node
        if node_a < 0 or node_b < 0 or node_a == node_b:
            return LINK_NODE
        # Like nvidia-smi/NVML: two NUMA nodes are SYS apart even on one socket (a DGX A100 in
        # NPS4 shows SYS between GPU0 on node 3 and GPU2 on node 1).
        return LINK_SYS


def parse_resource(text):
    """Parse a PCI ``resource`` file: BARs 0-5 with their size (unused ones left out)."""
    bars = []
    for index, line in enumerate(text.splitlines()[:6]):
        fields = line.split()
        if len(fields) != 3:
            continue
        start, end, flags = (int(f, 16) for f in fields)
        if end <= start and start == 0:
            continue
        bars.append(Bar(index=index, start=start, size=end - start + 1, flags=flags))
    return tuple(bars)


# A 64-bit prefetchable memory BAR, as the kernel flags one in ``resource``.
_MEM64_PREF = IORESOURCE_MEM | IORESOURCE_PREFETCH | IORESOURCE_MEM_64
# The class a stand-in gets when its slot does not say (a 3D controller; a bridge, other).
_MISSING_CLASS = {"gpus": 0x030200, "nvswitches": 0x068000}


def with_missing(topology, slots):
    """The topology with a stand-in for each recorded slot whose device is gone.

    ``slots``: ``{"gpus": {address: {"id": "10de:1db8", "numa_node": 0, "path": [...],
    "host_bridge": "pci0000:2e"}}, "nvswitches": {...}}``, what the host record kept of each
    GPU and NVSwitch at conversion (``class`` optional). A stand-in has ``missing`` set, no
    driver, no IOMMU group and no BARs."""
    pci = dict(topology.pci)
    wanted = [(bdf, slot, kind) for kind in _MISSING_CLASS
              for bdf, slot in sorted((slots.get(kind) or {}).items())]
    for bdf, slot, kind in wanted:
        if bdf in pci:
            continue
        vendor, device = (int(x, 16) for x in slot["id"].split(":"))
        klass = int(slot["class"], 16) if slot.get("class") else _MISSING_CLASS[kind]
        pci[bdf] = PciDevice(
            bdf=bdf, vendor=vendor, device=device, class_code=klass,
            driver=None, numa_node=int(slot.get("numa_node", -1)), iommu_group=None,
            path=tuple(slot.get("path") or (bdf,)), host_bridge=slot.get("host_bridge", ""),
            # the 64-bit window it had, so a VM that still holds it keeps its definition
            bars=((Bar(index=2, start=0, size=int(slot["mmio64_mb"]) << 20, flags=_MEM64_PREF),)
                  if slot.get("mmio64_mb") else ()),
            missing=True)
    return replace(topology, pci=dict(sorted(pci.items())))

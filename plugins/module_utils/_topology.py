# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Host topology discovery from sysfs and procfs. Private to this collection.

This is the only module that reads ``/sys`` and ``/proc``. Every path is taken relative to a
root so that tests point it at a fixture tree laid out exactly as the kernel lays it out.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

PCI_CLASS_BRIDGE_PCI = 0x0604

# Bits of the flags column of a PCI device's "resource" file (include/linux/ioport.h).
IORESOURCE_IO = 0x00000100
IORESOURCE_MEM = 0x00000200
IORESOURCE_PREFETCH = 0x00002000
IORESOURCE_MEM_64 = 0x00100000

_BDF_RE = re.compile(r"^[0-9a-f]{4,}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_ROOT_BUS_RE = re.compile(r"^pci[0-9a-f]{4,}:[0-9a-f]{2}$")


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

    def devices_matching(self, id_pairs, classes=None):
        """PCI functions whose (vendor, device) is in id_pairs (and class in classes), BDF order."""
        wanted = set(id_pairs)
        found = [
            d for d in self.pci.values()
            if d.id_pair in wanted and (classes is None or d.pci_class in classes)
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


def _read(path, default=None):
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return handle.read().strip()
    except (OSError, UnicodeDecodeError):
        if default is not None:
            return default
        raise


def parse_cpulist(text):
    """Expand a kernel CPU list ("0-3,8,10-11") into a sorted tuple of ints."""
    cpus = set()
    text = text.strip()
    if not text:
        return ()
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.update(range(int(lo), int(hi) + 1))
        else:
            cpus.add(int(part))
    return tuple(sorted(cpus))


def format_cpulist(cpus):
    """Compress CPU ids into kernel/libvirt list syntax ("0-3,8")."""
    cpus = sorted(set(cpus))
    parts = []
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else "%d-%d" % (cpus[i], cpus[j]))
        i = j + 1
    return ",".join(parts)


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


def _int(text, base=10, default=None):
    try:
        return int(text, base)
    except (TypeError, ValueError):
        return default


class SysfsReader:
    """Reads a host's topology from a sysfs root and a procfs root."""

    def __init__(self, sysfs_root="/sys", proc_root="/proc"):
        self.sysfs_root = sysfs_root
        self.proc_root = proc_root

    def _sys(self, *parts):
        return os.path.join(self.sysfs_root, *parts)

    def check_roots(self):
        pci_dir = self._sys("bus", "pci", "devices")
        cpu_dir = self._sys("devices", "system", "cpu")
        if not os.path.isdir(self.sysfs_root):
            raise TopologyError(
                "sysfs_root %r is not a readable directory; point sysfs_root at a sysfs tree "
                "(the default /sys) or at a fixture laid out like it" % self.sysfs_root
            )
        missing = [p for p in (pci_dir, cpu_dir) if not os.path.isdir(p)]
        if missing:
            raise TopologyError(
                "sysfs_root %r does not look like sysfs: %s is missing; point sysfs_root at a "
                "sysfs tree (the default /sys)" % (self.sysfs_root, ", ".join(
                    os.path.relpath(p, self.sysfs_root) for p in missing))
            )
        if not os.path.isfile(os.path.join(self.proc_root, "cmdline")):
            raise TopologyError(
                "proc_root %r has no readable 'cmdline'; point proc_root at procfs (the "
                "default /proc) or at a fixture that has a cmdline file" % self.proc_root
            )

    def read(self):
        """Read the whole host. Raises TopologyError when the roots are not sysfs/procfs."""
        self.check_roots()
        try:
            cpus = self.read_cpus()
            nodes = self.read_numa_nodes(cpus)
            pci = self.read_pci()
            groups = self._count_iommu_groups()
            cmdline = _read(os.path.join(self.proc_root, "cmdline"))
            cpuinfo = _read(os.path.join(self.proc_root, "cpuinfo"), default="")
        except OSError as exc:
            raise TopologyError(
                "cannot read host topology under %r: %s" % (self.sysfs_root, exc)) from exc
        return HostTopology(
            pci=pci, cpus=cpus, numa_nodes=nodes, cmdline=cmdline, iommu_groups=groups,
            sysfs_root=self.sysfs_root, proc_root=self.proc_root,
            cpu_vendor=_cpu_vendor(cpuinfo),
        )

    # --- CPUs and NUMA ---------------------------------------------------------------------

    def read_cpus(self):
        base = self._sys("devices", "system", "cpu")
        online = _read(os.path.join(base, "online"), default="")
        if online:
            ids = parse_cpulist(online)
        else:
            ids = tuple(sorted(
                int(n[3:]) for n in os.listdir(base) if re.match(r"^cpu\d+$", n)
            ))
        node_of = self._cpu_nodes()
        cpus = {}
        for cpu in ids:
            topo = os.path.join(base, "cpu%d" % cpu, "topology")
            socket = _int(_read(os.path.join(topo, "physical_package_id"), default="0"), default=0)
            core = _int(_read(os.path.join(topo, "core_id"), default=str(cpu)), default=cpu)
            siblings = parse_cpulist(
                _read(os.path.join(topo, "thread_siblings_list"), default=str(cpu))
            )
            siblings = tuple(s for s in siblings if s in ids) or (cpu,)
            cpus[cpu] = Cpu(id=cpu, socket=socket, core=core, node=node_of.get(cpu, 0),
                            siblings=siblings)
        return cpus

    def _node_dirs(self):
        base = self._sys("devices", "system", "node")
        if not os.path.isdir(base):
            return []
        return sorted(
            (int(n[4:]), os.path.join(base, n))
            for n in os.listdir(base) if re.match(r"^node\d+$", n)
        )

    def _cpu_nodes(self):
        node_of = {}
        for node_id, path in self._node_dirs():
            for cpu in parse_cpulist(_read(os.path.join(path, "cpulist"), default="")):
                node_of[cpu] = node_id
        return node_of

    def read_numa_nodes(self, cpus):
        nodes = []
        node_dirs = self._node_dirs()
        for node_id, path in node_dirs:
            meminfo = _read(os.path.join(path, "meminfo"), default="")
            total = _meminfo_kb(meminfo, "MemTotal")
            free = _meminfo_kb(meminfo, "MemFree")
            hugepages = {}
            hp_dir = os.path.join(path, "hugepages")
            if os.path.isdir(hp_dir):
                for name in sorted(os.listdir(hp_dir)):
                    m = re.match(r"^hugepages-(\d+)kB$", name)
                    if not m:
                        continue
                    pool = os.path.join(hp_dir, name)
                    hugepages[int(m.group(1))] = {
                        "total": _int(_read(os.path.join(pool, "nr_hugepages"), "0"), default=0),
                        "free": _int(_read(os.path.join(pool, "free_hugepages"), "0"), default=0),
                    }
            node_cpus = tuple(sorted(c for c, info in cpus.items() if info.node == node_id))
            nodes.append(NumaNode(id=node_id, cpus=node_cpus, memory_total_kb=total,
                                  memory_free_kb=free, hugepages=hugepages))
        if not nodes:
            # Kernels built without CONFIG_NUMA have no node directory: one node holds all.
            meminfo = _read(os.path.join(self.proc_root, "meminfo"), default="")
            nodes.append(NumaNode(id=0, cpus=tuple(sorted(cpus)),
                                  memory_total_kb=_meminfo_kb(meminfo, "MemTotal"),
                                  memory_free_kb=_meminfo_kb(meminfo, "MemFree")))
        return tuple(nodes)

    # --- PCI -------------------------------------------------------------------------------

    def read_pci(self):
        devices_dir = self._sys("bus", "pci", "devices")
        result = {}
        for bdf in sorted(os.listdir(devices_dir)):
            if not _BDF_RE.match(bdf):
                continue
            result[bdf] = self.read_pci_device(bdf)
        return result

    def read_pci_device(self, bdf):
        link = self._sys("bus", "pci", "devices", bdf)
        real = os.path.realpath(link)
        # The device directory sits under devices/pciDDDD:BB/<bridge>/<bridge>/.../<bdf>.
        parts = real.split(os.sep)
        host_bridge = ""
        path = []
        for part in parts:
            if _ROOT_BUS_RE.match(part):
                host_bridge = part
                path = []
            elif host_bridge and _BDF_RE.match(part):
                path.append(part)
        if not path or path[-1] != bdf:
            path = [bdf]
        vendor = _int(_read(os.path.join(real, "vendor"), "0x0"), 16, 0)
        device = _int(_read(os.path.join(real, "device"), "0x0"), 16, 0)
        class_code = _int(_read(os.path.join(real, "class"), "0x0"), 16, 0)
        numa_node = _int(_read(os.path.join(real, "numa_node"), "-1"), default=-1)
        driver = None
        driver_link = os.path.join(real, "driver")
        if os.path.islink(driver_link):
            driver = os.path.basename(os.readlink(driver_link))
        group = None
        members = ()
        group_link = os.path.join(real, "iommu_group")
        if os.path.islink(group_link):
            group_dir = os.path.realpath(group_link)
            group = _int(os.path.basename(group_dir))
            members_dir = os.path.join(group_dir, "devices")
            if os.path.isdir(members_dir):
                members = tuple(sorted(m for m in os.listdir(members_dir) if _BDF_RE.match(m)))
            if bdf not in members:
                members = tuple(sorted(members + (bdf,)))
        bars = parse_resource(_read(os.path.join(real, "resource"), ""))
        return PciDevice(
            bdf=bdf, vendor=vendor, device=device, class_code=class_code, driver=driver,
            numa_node=numa_node, iommu_group=group, iommu_group_members=members,
            path=tuple(path), host_bridge=host_bridge, bars=bars,
        )

    def _count_iommu_groups(self):
        groups_dir = self._sys("kernel", "iommu_groups")
        if not os.path.isdir(groups_dir):
            return 0
        return sum(1 for n in os.listdir(groups_dir) if n.isdigit())


def _cpu_vendor(cpuinfo):
    m = re.search(r"^vendor_id\s*:\s*(\S+)", cpuinfo, re.MULTILINE)
    return m.group(1) if m else ""


def _meminfo_kb(text, key):
    m = re.search(r"\b%s:\s+(\d+)\s*kB" % re.escape(key), text)
    return int(m.group(1)) if m else 0


def read_host(sysfs_root="/sys", proc_root="/proc"):
    """Discover the host's topology. Raises TopologyError with an actionable message."""
    return SysfsReader(sysfs_root, proc_root).read()


def read_bridges(sysfs_root="/sys"):
    """Names of the host's network bridges (interfaces with a ``bridge`` folder in sysfs)."""
    net = os.path.join(sysfs_root, "class", "net")
    try:
        names = os.listdir(net)
    except OSError:
        return ()
    return tuple(sorted(n for n in names if os.path.isdir(os.path.join(net, n, "bridge"))))

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The sysfs gateway: a host's topology read from sysfs and procfs. Private to this collection.

This is the only module that reads ``/sys`` and ``/proc``. Every path is taken relative to a
root so that tests point it at a fixture tree laid out exactly as the kernel lays it out; what
it reads becomes ``_topology``'s data.
"""

from __future__ import annotations

import os
import re

from ansible_collections.gpuvirt.kvm.plugins.module_utils._ranges import parse_ranges
from ansible_collections.gpuvirt.kvm.plugins.module_utils._topology import (
    PCI_BASE_CLASS_NETWORK,
    Cpu,
    ExtCaps,
    HostTopology,
    NetFunction,
    NumaNode,
    PciDevice,
    TopologyError,
    parse_ext_caps,
    parse_resource,
)

# PCI base classes whose extended capabilities matter for GPUDirect RDMA: displays (GPUs),
# network controllers and bridges (switch ports).
_EXT_CAP_CLASSES = (0x02, 0x03, 0x06)
_VIRTFN_RE = re.compile(r"^virtfn(\d+)$")
# include/uapi/linux/if_arp.h
ARPHRD_ETHER = 1
ARPHRD_INFINIBAND = 32
_BDF_RE = re.compile(r"^[0-9a-f]{4,}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_ROOT_BUS_RE = re.compile(r"^pci[0-9a-f]{4,}:[0-9a-f]{2}$")


def _read(path, default=None):
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return handle.read().strip()
    except (OSError, UnicodeDecodeError):
        if default is not None:
            return default
        raise


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
            # Network functions, and any SR-IOV function (a platform file may name a stand-in
            # NIC of another class, a lab's NVMe controller): its VFs belong under it.
            nics = {bdf: self.read_net_function(bdf) for bdf, dev in pci.items()
                    if dev.class_code >> 16 == PCI_BASE_CLASS_NETWORK or self._sriov_function(bdf)}
            routes = read_routes(self.proc_root)
            ext_caps = {bdf: self.read_ext_caps(bdf) for bdf, dev in pci.items()
                        if dev.class_code >> 16 in _EXT_CAP_CLASSES}
        except OSError as exc:
            raise TopologyError(
                "cannot read host topology under %r: %s" % (self.sysfs_root, exc)) from exc
        return HostTopology(
            pci=pci, cpus=cpus, numa_nodes=nodes, cmdline=cmdline, iommu_groups=groups,
            sysfs_root=self.sysfs_root, proc_root=self.proc_root,
            cpu_vendor=_cpu_vendor(cpuinfo), phys_bits=_phys_bits(cpuinfo),
            nics=nics, host_routes=routes, ext_caps=ext_caps,
        )

    # --- CPUs and NUMA ---------------------------------------------------------------------

    def read_cpus(self):
        base = self._sys("devices", "system", "cpu")
        online = _read(os.path.join(base, "online"), default="")
        if online:
            ids = parse_ranges(online)
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
            siblings = parse_ranges(
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
            for cpu in parse_ranges(_read(os.path.join(path, "cpulist"), default="")):
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

    def read_ext_caps(self, bdf):
        """ACS and ATS from the function's config space (ExtCaps; unreadable past 256 bytes
        unless read as root)."""
        try:
            with open(self._sys("bus", "pci", "devices", bdf, "config"), "rb") as handle:
                return parse_ext_caps(handle.read(4096))
        except OSError:
            return ExtCaps(readable=False)

    def _sriov_function(self, bdf):
        """Whether a function is an SR-IOV PF or VF (sriov_totalvfs, or a physfn link)."""
        dev = self._sys("bus", "pci", "devices", bdf)
        return (os.path.exists(os.path.join(dev, "sriov_totalvfs"))
                or os.path.islink(os.path.join(dev, "physfn")))

    def read_net_function(self, bdf):
        """A network function's interfaces, RDMA devices, link layer and SR-IOV state."""
        real = os.path.realpath(self._sys("bus", "pci", "devices", bdf))
        netdevs = _listdir(os.path.join(real, "net"))
        # Ports in dev_port order (a dual-port function's second port is dev_port 1).
        netdevs = sorted(netdevs, key=lambda n: (
            _int(_read(os.path.join(real, "net", n, "dev_port"), "0"), default=0), n))
        masters = []
        uppers = []
        types = set()
        for name in netdevs:
            uppers.append(tuple(sorted(
                entry[len("upper_"):] for entry in _listdir(os.path.join(real, "net", name))
                if entry.startswith("upper_"))))
            master = os.path.join(real, "net", name, "master")
            masters.append(os.path.basename(os.readlink(master)) if os.path.islink(master)
                           else None)
            types.add(_int(_read(os.path.join(real, "net", name, "type"), ""), default=None))
        rdma = _listdir(os.path.join(real, "infiniband"))
        layers = {_read(os.path.join(real, "infiniband", r, "ports", "1", "link_layer"), "")
                  for r in rdma} - {""}
        if layers:
            link_layer = sorted(layers)[0]
        elif types & {ARPHRD_INFINIBAND}:
            link_layer = "InfiniBand"
        elif types & {ARPHRD_ETHER}:
            link_layer = "Ethernet"
        else:
            class_code = _int(_read(os.path.join(real, "class"), "0x0"), 16, 0)
            link_layer = {0x0207: "InfiniBand", 0x0200: "Ethernet"}.get(class_code >> 8)
        vfs = []
        for name in os.listdir(real):
            m = _VIRTFN_RE.match(name)
            link = os.path.join(real, name)
            if m and os.path.islink(link):
                vfs.append((int(m.group(1)), os.path.basename(os.readlink(link))))
        physfn = os.path.join(real, "physfn")
        return NetFunction(
            bdf=bdf, netdevs=tuple(netdevs), masters=tuple(masters), uppers=tuple(uppers),
            rdma=tuple(rdma),
            link_layer=link_layer,
            sriov_totalvfs=_int(_read(os.path.join(real, "sriov_totalvfs"), ""), default=None),
            sriov_numvfs=_int(_read(os.path.join(real, "sriov_numvfs"), ""), default=0),
            sriov_offset=_int(_read(os.path.join(real, "sriov_offset"), ""), default=0),
            sriov_stride=_int(_read(os.path.join(real, "sriov_stride"), ""), default=0),
            vfs=tuple(vf for _n, vf in sorted(vfs)),
            physfn=os.path.basename(os.readlink(physfn)) if os.path.islink(physfn) else None,
        )

    def _count_iommu_groups(self):
        groups_dir = self._sys("kernel", "iommu_groups")
        if not os.path.isdir(groups_dir):
            return 0
        return sum(1 for n in os.listdir(groups_dir) if n.isdigit())


# What a function's health is judged from (_health): its link, its power state and its AER
# counters (drivers/pci/pci-sysfs.c, drivers/pci/pcie/aer.c). A file the kernel does not have
# (no PCIe capability, no AER, an older kernel) is left out.
HEALTH_FILES = ("current_link_speed", "max_link_speed", "current_link_width", "max_link_width",
                "power_state", "enable", "aer_dev_correctable", "aer_dev_nonfatal",
                "aer_dev_fatal")


def read_pci_health(sysfs_root, bdf):
    """The raw health files of a PCI function, ``{name: text}``, plus ``config_head`` (the first
    4 bytes of its config space, or None when unreadable) and ``port_max_link_speed`` /
    ``port_max_link_width`` (the bridge above it: a link trains no faster than both ends); None
    when the function is not on the bus."""
    path = os.path.join(sysfs_root, "bus", "pci", "devices", bdf)
    if not os.path.exists(path):
        return None
    files = {}
    for name in HEALTH_FILES:
        try:
            with open(os.path.join(path, name), "r", encoding="utf-8") as handle:
                files[name] = handle.read()
        except (OSError, UnicodeDecodeError):
            continue
    try:
        with open(os.path.join(path, "config"), "rb") as handle:
            files["config_head"] = handle.read(4)
    except OSError:
        files["config_head"] = None
    parent = os.path.dirname(os.path.realpath(path))
    if _BDF_RE.match(os.path.basename(parent)):
        for name in ("max_link_speed", "max_link_width"):
            try:
                with open(os.path.join(parent, name), "r", encoding="utf-8") as handle:
                    files["port_" + name] = handle.read()
            except (OSError, UnicodeDecodeError):
                continue
    return files


def read_pci_vendor(sysfs_root, bdf):
    """A PCI function's vendor ID (``0x10de`` for NVIDIA), or None when it cannot be read (not
    on the bus)."""
    return _int(_read(os.path.join(sysfs_root, "bus", "pci", "devices", bdf, "vendor"), ""), 16)


def _listdir(path):
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _ipv4(word):
    """/proc/net/route's %08X of a __be32, read back on a little-endian host."""
    value = int(word, 16)
    return ".".join(str(value >> shift & 0xFF) for shift in (0, 8, 16, 24))


def read_routes(proc_root="/proc"):
    """interface -> what the host routes through it, from /proc/net/route (net/ipv4/fib_trie.c)
    and /proc/net/ipv6_route (net/ipv6/route.c); the loopback is left out."""
    routes = {}
    text = _read(os.path.join(proc_root, "net", "route"), "")
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or fields[0] == "lo":
            continue
        try:
            dest = _ipv4(fields[1])
        except ValueError:
            continue
        prefix = bin(int(fields[7], 16)).count("1")
        what = "default route" if prefix == 0 and dest == "0.0.0.0" else "route %s/%d" % (
            dest, prefix)
        routes.setdefault(fields[0], []).append(what)
    text = _read(os.path.join(proc_root, "net", "ipv6_route"), "")
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 10 or fields[9] == "lo":
            continue
        if fields[0] == "0" * 32 and fields[1] == "00":
            routes.setdefault(fields[9], []).append("IPv6 default route")
    return {k: tuple(v) for k, v in routes.items()}


def _cpu_vendor(cpuinfo):
    m = re.search(r"^vendor_id\s*:\s*(\S+)", cpuinfo, re.MULTILINE)
    return m.group(1) if m else ""


def _phys_bits(cpuinfo):
    m = re.search(r"^address sizes\s*:\s*(\d+) bits physical", cpuinfo, re.MULTILINE)
    return int(m.group(1)) if m else None


def _meminfo_kb(text, key):
    m = re.search(r"\b%s:\s+(\d+)\s*kB" % re.escape(key), text)
    return int(m.group(1)) if m else 0


def read_host(sysfs_root="/sys", proc_root="/proc"):
    """Discover the host's topology. Raises TopologyError with an actionable message."""
    return SysfsReader(sysfs_root, proc_root).read()


def read_stack_files(sysfs_root="/sys", proc_root="/proc"):
    """(the kernel's release as `uname -r` prints it, the loaded nvidia module's version), each
    None when the file is not there (no nvidia module loaded)."""
    return (_read(os.path.join(proc_root, "sys", "kernel", "osrelease"), "") or None,
            _read(os.path.join(sysfs_root, "module", "nvidia", "version"), "") or None)


def read_bridges(sysfs_root="/sys"):
    """Names of the host's network bridges (interfaces with a ``bridge`` folder in sysfs)."""
    net = os.path.join(sysfs_root, "class", "net")
    try:
        names = os.listdir(net)
    except OSError:
        return ()
    return tuple(sorted(n for n in names if os.path.isdir(os.path.join(net, n, "bridge"))))

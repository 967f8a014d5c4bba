# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""HostTopology values for the placement and platform unit tests, built directly.

The sysfs fixture builder (tests/fixtures/sysfs_builder.py) covers discovery; placement only
needs the values discovery returns, so these tests build them here and stay independent of it.
Bus numbers, NUMA nodes and CPU numbering follow docs/hardware.md.
"""

from __future__ import annotations

from ansible_collections.gpuvirt.kvm.plugins.module_utils._topology import (
    Cpu,
    HostTopology,
    NumaNode,
    PciDevice,
)

NVIDIA = 0x10DE
GIB_KB = 1024 * 1024


def _bdf(bus, dev=0, fn=0):
    return "0000:%02x:%02x.%d" % (bus, dev, fn)


def _device(bus, device_id, class_code, node, host_bridge, bridges, vendor=NVIDIA):
    bdf = _bdf(bus)
    return PciDevice(bdf=bdf, vendor=vendor, device=device_id, class_code=class_code,
                     driver="vfio-pci", numa_node=node, iommu_group=bus,
                     iommu_group_members=(bdf,), path=tuple(bridges) + (bdf,),
                     host_bridge=host_bridge)


def gpu(bus, node, host_bridge, bridges, device_id):
    return _device(bus, device_id, 0x030200, node, host_bridge, bridges)


def nvswitch(bus, node, host_bridge, bridges, device_id):
    return _device(bus, device_id, 0x068000, node, host_bridge, bridges)


def cpus_and_nodes(sockets, cores, threads, nodes_per_socket=1, memory_gib_per_node=64,
                   hugepages=None):
    """Linux numbering: first threads of every core (socket by socket), then the siblings."""
    total_cores = sockets * cores
    per_node = cores // nodes_per_socket
    cpus = {}
    for t in range(threads):
        for core in range(total_cores):
            cid = t * total_cores + core
            socket = core // cores
            node = socket * nodes_per_socket + (core % cores) // per_node
            siblings = tuple(k * total_cores + core for k in range(threads))
            cpus[cid] = Cpu(id=cid, socket=socket, core=core % cores, node=node,
                            siblings=siblings)
    nodes = []
    for n in range(sockets * nodes_per_socket):
        kb = memory_gib_per_node * GIB_KB
        nodes.append(NumaNode(id=n, cpus=tuple(sorted(c for c, v in cpus.items() if v.node == n)),
                              memory_total_kb=kb, memory_free_kb=kb - GIB_KB,
                              hugepages=dict((hugepages or {}).get(n, {}))))
    return cpus, tuple(nodes)


def host(devices, cpus, nodes):
    return HostTopology(pci={d.bdf: d for d in devices}, cpus=cpus, numa_nodes=nodes,
                        cmdline="BOOT_IMAGE=/vmlinuz intel_iommu=on iommu=pt",
                        iommu_groups=len(devices))


DGX2_GPU_BUSES = (0x34, 0x36, 0x39, 0x3B, 0x57, 0x59, 0x5C, 0x5E,
                  0xB7, 0xB9, 0xBC, 0xBE, 0xE0, 0xE2, 0xE5, 0xE7)
DGX2_SWITCH_BUSES = (0x61, 0x62, 0x63, 0x65, 0x66, 0x67, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7)


def dgx2(hugepages=None):
    """DGX-2: quads share a PCIe tree (own host bridge), pairs share a level-2 switch."""
    devices = []
    for i, bus in enumerate(DGX2_GPU_BUSES):
        quad, pair = i // 4, i // 2
        tree = (0x30, 0x55, 0xB5, 0xDE)[quad]
        # Root port, level-1 downstream port, level-2 switch port: a pair shares all three,
        # a quad only the root port (PXB), quads sit under their own host bridge.
        side = (pair % 2) * 2
        bridges = (_bdf(tree - 4), _bdf(tree - 3 + side), _bdf(tree - 2 + side))
        devices.append(gpu(bus, i // 8, "pci0000:%02x" % (tree - 5), bridges, 0x1DB8))
    for j, bus in enumerate(DGX2_SWITCH_BUSES):
        tree = 0x4E if j < 6 else 0xAE
        devices.append(nvswitch(bus, j // 6, "pci0000:%02x" % tree,
                                (_bdf(tree + 1), _bdf(tree + 2)), 0x1AC2))
    cpus, nodes = cpus_and_nodes(2, 24, 2, memory_gib_per_node=768, hugepages=hugepages)
    return host(devices, cpus, nodes)


A100_GPU_BUSES = (0x07, 0x0F, 0x47, 0x4E, 0x87, 0x90, 0xB7, 0xBD)
A100_GPU_NODES = (3, 3, 1, 1, 7, 7, 5, 5)
A100_SWITCH_BUSES = (0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9)


def dgx_a100():
    """DGX A100: 2 x 64 cores x 2 threads, NPS4 (8 nodes), GPU pairs on nodes 3, 1, 7, 5."""
    devices = []
    for i, bus in enumerate(A100_GPU_BUSES):
        hb = "pci0000:%02x" % (bus & 0xF0)
        devices.append(gpu(bus, A100_GPU_NODES[i], hb, (_bdf(bus - 3), _bdf(bus - 2)), 0x20B2))
    for bus in A100_SWITCH_BUSES:
        devices.append(nvswitch(bus, 4, "pci0000:c0", (_bdf(0xC1), _bdf(0xC2)), 0x1AF1))
    cpus, nodes = cpus_and_nodes(2, 64, 2, nodes_per_socket=4, memory_gib_per_node=128)
    return host(devices, cpus, nodes)


H100_GPU_BUSES = (0x1B, 0x43, 0x52, 0x61, 0x9D, 0xC3, 0xD1, 0xDF)
H100_SWITCH_BUSES = (0x07, 0x08, 0x09, 0x0A)


def dgx_h100(device_id=0x2330, with_pmc=True):
    """DGX H100: 2 x 56 cores x 2 threads, GPUs 0-3 on node 0, 4-7 on node 1."""
    devices = []
    for i, bus in enumerate(H100_GPU_BUSES):
        hb = "pci0000:%02x" % (bus - 3)
        devices.append(gpu(bus, i // 4, hb, (_bdf(bus - 2), _bdf(bus - 1)), device_id))
    for bus in H100_SWITCH_BUSES:
        devices.append(nvswitch(bus, 0, "pci0000:00", (_bdf(0x05), _bdf(0x06)), 0x22A3))
    if with_pmc:
        devices.append(_device(0x0B, 0x4128, 0x058000, 0, "pci0000:00", (_bdf(0x05),),
                               vendor=0x11F8))
    cpus, nodes = cpus_and_nodes(2, 56, 2, memory_gib_per_node=1024)
    return host(devices, cpus, nodes)


def dgx_b200():
    """HGX B200 as the H100 layout with B200s (10de:2901, pci.ids): its NVSwitches sit on the
    NVLink tray, outside the host's PCI tree."""
    devices = []
    for i, bus in enumerate(H100_GPU_BUSES):
        hb = "pci0000:%02x" % (bus - 3)
        devices.append(gpu(bus, i // 4, hb, (_bdf(bus - 2), _bdf(bus - 1)), 0x2901))
    cpus, nodes = cpus_and_nodes(2, 56, 2, memory_gib_per_node=1024)
    return host(devices, cpus, nodes)


def pcie4():
    """A generic 2-socket PCIe box: GPUs 0,1 behind one switch on node 0, GPUs 2,3 on node 1."""
    devices = [
        gpu(0x18, 0, "pci0000:16", (_bdf(0x16), _bdf(0x17)), 0x2330),
        gpu(0x19, 0, "pci0000:16", (_bdf(0x16), _bdf(0x17)), 0x2330),
        gpu(0x98, 1, "pci0000:96", (_bdf(0x96), _bdf(0x97)), 0x2330),
        gpu(0x99, 1, "pci0000:96", (_bdf(0x96), _bdf(0x97)), 0x2330),
    ]
    cpus, nodes = cpus_and_nodes(2, 4, 2, memory_gib_per_node=64)
    return host(devices, cpus, nodes)


def cpu_only():
    """A GPU-less box with 2 CPUs (2 cores, no SMT) on one node."""
    cpus, nodes = cpus_and_nodes(1, 2, 1, memory_gib_per_node=8)
    return host([], cpus, nodes)


HOSTS = {"dgx2": dgx2, "dgx-a100": dgx_a100, "dgx-h100": dgx_h100, "pcie4": pcie4,
         "cpu-only": cpu_only}

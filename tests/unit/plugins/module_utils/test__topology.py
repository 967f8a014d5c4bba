# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Topology discovery read from kernel-shaped sysfs trees of the fixture hosts.

The expected values below come from the host descriptions' sources (docs/hardware.md sections
2-5, the captured H100 VM), not from the builder: a wrong tree or a wrong reader both fail here.
"""

import os

import pytest

import sysfs_builder
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
    GPU_CLASSES,
    GPU_IDS,
    NVSWITCH_CLASSES,
    NVSWITCH_IDS,
    host_gpus,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._ranges import format_ranges
from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_host
from ansible_collections.gpuvirt.kvm.plugins.module_utils._topology import (
    LINK_NODE,
    LINK_PHB,
    LINK_PIX,
    LINK_PXB,
    LINK_SYS,
    TopologyError,
)

GIB = 1 << 30
MIB = 1 << 20
GIB_KB = 1 << 20


def _bdfs(buses):
    return ["0000:%s:00.0" % b for b in buses.split()]


# One row per fixture host. gpus/nvswitches: BDFs in PCI order with their NUMA nodes.
HOSTS = {
    "dgx2": dict(
        functions=147,  # 131 + 2 VFs on each of the 8 rail ConnectX-5
        gpus=_bdfs("34 36 39 3b 57 59 5c 5e b7 b9 bc be e0 e2 e5 e7"),
        gpu_nodes=[0] * 8 + [1] * 8,
        gpu_ids=[0x1DB8] * 16,
        nvswitches=_bdfs("61 62 63 65 66 67 c1 c2 c3 c5 c6 c7"),
        nvswitch_nodes=[0] * 6 + [1] * 6,
        cpus=96,
        node_cpus=["0-23,48-71", "24-47,72-95"],
        node_sockets=[0, 1],
        siblings={0: (0, 48), 23: (23, 71), 24: (24, 72), 95: (47, 95)},
        memory_kb=[768 * GIB_KB] * 2,
        hugepages_1g=[0, 0],
        iommu_groups=145,  # each VF in a group of its own
        gpu_driver="vfio-pci",
        nvswitch_driver="vfio-pci",
        not_gpus=["0000:03:00.0", "0000:01:00.0", "0000:35:00.0", "0000:00:17.0"],
        cmdline={"intel_iommu": "on", "iommu": "pt"},
    ),
    "dgx2-fresh": dict(
        functions=147,
        gpus=_bdfs("34 36 39 3b 57 59 5c 5e b7 b9 bc be e0 e2 e5 e7"),
        gpu_nodes=[0] * 8 + [1] * 8,
        gpu_ids=[0x1DB8] * 16,
        nvswitches=_bdfs("61 62 63 65 66 67 c1 c2 c3 c5 c6 c7"),
        nvswitch_nodes=[0] * 6 + [1] * 6,
        cpus=96,
        node_cpus=["0-23,48-71", "24-47,72-95"],
        node_sockets=[0, 1],
        siblings={0: (0, 48), 47: (47, 95)},
        memory_kb=[768 * GIB_KB] * 2,
        hugepages_1g=[0, 0],
        iommu_groups=0,
        gpu_driver="nvidia",
        nvswitch_driver="nvidia-nvswitch",
        not_gpus=["0000:03:00.0", "0000:01:00.1", "0000:e1:00.0"],
        cmdline={"quiet": None, "intel_iommu": "absent", "iommu": "absent"},
    ),
    "dgx-a100": dict(
        functions=111,  # with the storage ConnectX-6 Dx (2 functions) and its root port
        gpus=_bdfs("07 0f 47 4e 87 90 b7 bd"),
        gpu_nodes=[3, 3, 1, 1, 7, 7, 5, 5],
        gpu_ids=[0x20B2] * 8,
        nvswitches=_bdfs("c4 c5 c6 c7 c8 c9"),
        nvswitch_nodes=[6] * 6,
        cpus=256,
        node_cpus=["0-15,128-143", "16-31,144-159", "32-47,160-175", "48-63,176-191",
                   "64-79,192-207", "80-95,208-223", "96-111,224-239", "112-127,240-255"],
        node_sockets=[0, 0, 0, 0, 1, 1, 1, 1],
        siblings={0: (0, 128), 48: (48, 176), 255: (127, 255)},
        memory_kb=[256 * GIB_KB] * 8,
        hugepages_1g=[0] * 8,
        iommu_groups=99,
        gpu_driver="nvidia",
        nvswitch_driver="nvidia-nvswitch",
        not_gpus=["0000:22:00.0", "0000:05:00.0", "0000:00:00.2"],
        cmdline={"amd_iommu": "on", "iommu": "pt"},
    ),
    "dgx-h100": dict(
        functions=101,
        gpus=_bdfs("1b 43 52 61 9d c3 d1 df"),
        gpu_nodes=[0, 0, 0, 0, 1, 1, 1, 1],
        gpu_ids=[0x2330] * 8,
        nvswitches=_bdfs("07 08 09 0a"),
        nvswitch_nodes=[0] * 4,
        cpus=224,
        node_cpus=["0-55,112-167", "56-111,168-223"],
        node_sockets=[0, 1],
        siblings={0: (0, 112), 56: (56, 168)},
        memory_kb=[1024 * GIB_KB] * 2,
        hugepages_1g=[0, 0],
        iommu_groups=99,
        gpu_driver="vfio-pci",
        nvswitch_driver="vfio-pci",
        not_gpus=["0000:03:00.0", "0000:18:00.0", "0000:05:00.1"],
        cmdline={"intel_iommu": "on", "iommu": "pt"},
    ),
    "hgx-b200": dict(  # dgx-h100's layout with B200s and no NVSwitch in the PCI tree
        functions=90,
        gpus=_bdfs("1b 43 52 61 9d c3 d1 df"),
        gpu_nodes=[0, 0, 0, 0, 1, 1, 1, 1],
        gpu_ids=[0x2901] * 8,
        nvswitches=[],
        nvswitch_nodes=[],
        cpus=224,
        node_cpus=["0-55,112-167", "56-111,168-223"],
        node_sockets=[0, 1],
        siblings={0: (0, 112), 56: (56, 168)},
        memory_kb=[1024 * GIB_KB] * 2,
        hugepages_1g=[0, 0],
        iommu_groups=88,
        gpu_driver="vfio-pci",
        nvswitch_driver=None,
        not_gpus=["0000:03:00.0", "0000:18:00.0"],
        cmdline={"intel_iommu": "on", "iommu": "pt"},
    ),
    "pcie-4gpu": dict(
        functions=22,
        gpus=_bdfs("03 04 05 41"),
        gpu_nodes=[0, 0, 0, 0],
        gpu_ids=[0x2330, 0x2330, 0x2335, 0x2335],
        nvswitches=[],
        nvswitch_nodes=[],
        cpus=64,
        node_cpus=["0-63"],
        node_sockets=[0],
        siblings={0: (0, 32), 63: (31, 63)},
        memory_kb=[512 * GIB_KB],
        hugepages_1g=[8],
        iommu_groups=18,
        gpu_driver="vfio-pci",
        nvswitch_driver=None,
        not_gpus=["0000:44:00.0", "0000:06:00.0", "0000:42:00.0"],
        cmdline={"amd_iommu": "on", "default_hugepagesz": "1G", "hugepages": "8"},
    ),
    "pcie-mixed": dict(
        functions=31,
        gpus=_bdfs("18 19 37 38 98 99 b8 b9"),
        gpu_nodes=[0, 0, 0, 0, 1, 1, 1, 1],
        # L40S, L40S, L4, RTX 6000 Ada (VGA class), L4, L4, H100 NVL, a model nobody names
        gpu_ids=[0x26B9, 0x26B9, 0x27B8, 0x26B1, 0x27B8, 0x27B8, 0x2321, 0x2BFF],
        nvswitches=[],
        nvswitch_nodes=[],
        cpus=128,
        node_cpus=["0-31,64-95", "32-63,96-127"],
        node_sockets=[0, 1],
        siblings={0: (0, 64), 127: (63, 127)},
        memory_kb=[256 * GIB_KB] * 2,
        hugepages_1g=[0, 0],
        # one group per function but the RTX's two functions and the BMC's bridge with its VGA
        iommu_groups=29,
        gpu_driver="vfio-pci",
        nvswitch_driver=None,
        not_gpus=["0000:02:00.0", "0000:38:00.1", "0000:39:00.0", "0000:ba:00.0"],
        cmdline={"intel_iommu": "on", "iommu": "pt"},
    ),
    "h100-cloud-vm": dict(
        functions=7,
        gpus=["0000:00:06.0"],
        gpu_nodes=[-1],
        gpu_ids=[0x2330],
        nvswitches=[],
        nvswitch_nodes=[],
        cpus=16,
        node_cpus=["0-15"],
        node_sockets=[0],
        siblings={0: (0,), 15: (15,)},
        memory_kb=[4550128],
        hugepages_1g=[0],
        iommu_groups=0,
        gpu_driver="nvidia",
        nvswitch_driver=None,
        not_gpus=["0000:00:03.0", "0000:00:00.0"],
        cmdline={"console": "ttyS0", "mitigations": "auto,no_guest_host,no_guest_guest",
                 "--firecracker-init": "absent"},
    ),
}


@pytest.fixture(scope="module")
def topology(host_tree):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = read_host(*host_tree(name))
        return cache[name]

    return get


def _gpus(topo):
    """What discovery counts as GPUs: every NVIDIA function of a GPU class."""
    return host_gpus(topo)


def _nvswitches(topo):
    return topo.devices_matching(NVSWITCH_IDS, NVSWITCH_CLASSES)


def test_every_fixture_host_has_a_row():
    assert sorted(HOSTS) == sysfs_builder.list_hosts()


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_pci_function_count(topology, name):
    assert len(topology(name).pci) == HOSTS[name]["functions"]


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_gpus_found_in_pci_order_with_their_nodes(topology, name):
    row = HOSTS[name]
    gpus = _gpus(topology(name))
    assert [g.bdf for g in gpus] == row["gpus"]
    assert [g.numa_node for g in gpus] == row["gpu_nodes"]
    assert [g.device for g in gpus] == row["gpu_ids"]
    assert all(g.vendor == 0x10DE and g.pci_class in GPU_CLASSES for g in gpus)


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_nvswitches_found_with_their_nodes(topology, name):
    row = HOSTS[name]
    switches = _nvswitches(topology(name))
    assert [s.bdf for s in switches] == row["nvswitches"]
    assert [s.numa_node for s in switches] == row["nvswitch_nodes"]
    assert all(s.class_code == 0x068000 for s in switches)


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_host_devices_are_not_gpus(topology, name):
    """The BMC's VGA, NICs, NVMe and chipset functions exist and are never GPU candidates."""
    topo = topology(name)
    found = {g.bdf for g in _gpus(topo)} | {s.bdf for s in _nvswitches(topo)}
    for bdf in HOSTS[name]["not_gpus"]:
        assert bdf in topo.pci, bdf
        assert bdf not in found, bdf


@pytest.mark.parametrize("name", ["dgx2", "dgx-a100", "dgx-h100", "pcie-4gpu"])
def test_aspeed_vga_is_vga_class_but_not_a_gpu(topology, name):
    topo = topology(name)
    vga = [d for d in topo.pci.values() if d.pci_class == 0x0300]
    assert [(d.vendor, d.device) for d in vga] == [(0x1A03, 0x2000)]
    assert vga[0].driver == "ast"
    assert vga[0].bdf not in {g.bdf for g in _gpus(topo)}


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_cpus_nodes_and_siblings(topology, name):
    row = HOSTS[name]
    topo = topology(name)
    assert len(topo.cpus) == row["cpus"]
    assert [n.id for n in topo.numa_nodes] == list(range(len(row["node_cpus"])))
    assert [format_ranges(n.cpus) for n in topo.numa_nodes] == row["node_cpus"]
    assert [topo.socket_of_node(n.id) for n in topo.numa_nodes] == row["node_sockets"]
    for cpu, siblings in row["siblings"].items():
        assert topo.cpus[cpu].siblings == siblings
        assert topo.node_of_cpu(cpu) == topo.node_of_cpu(siblings[-1])


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_memory_and_hugepages_per_node(topology, name):
    row = HOSTS[name]
    nodes = topology(name).numa_nodes
    assert [n.memory_total_kb for n in nodes] == row["memory_kb"]
    assert [n.hugepages[1048576]["total"] for n in nodes] == row["hugepages_1g"]
    assert [n.hugepages[2048]["total"] for n in nodes] == [0] * len(nodes)
    for node in nodes:
        reserved = sum(size * hp["total"] for size, hp in node.hugepages.items())
        assert 0 < node.memory_free_kb <= node.memory_total_kb - reserved


def test_reserved_hugepages_are_free_and_not_in_memfree(topology):
    node = topology("pcie-4gpu").node(0)
    assert node.hugepages[1048576] == {"total": 8, "free": 8}
    assert node.memory_free_kb <= (512 - 8) * GIB_KB


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_iommu_groups(topology, name):
    row = HOSTS[name]
    topo = topology(name)
    assert topo.iommu_groups == row["iommu_groups"]
    assert topo.iommu_enabled == (row["iommu_groups"] > 0)
    groups = {d.iommu_group for d in topo.pci.values() if d.iommu_group is not None}
    assert len(groups) == row["iommu_groups"]
    for dev in topo.pci.values():
        if topo.iommu_enabled and dev.iommu_group is not None:
            assert dev.bdf in dev.iommu_group_members
            others = [topo.pci[m] for m in dev.iommu_group_members]
            assert {o.iommu_group for o in others} == {dev.iommu_group}
        else:
            assert dev.iommu_group_members == ()


@pytest.mark.parametrize("name", ["dgx2", "dgx-h100", "pcie-4gpu"])
def test_each_gpu_and_bridge_has_its_own_group(topology, name):
    topo = topology(name)
    for dev in _gpus(topo) + _nvswitches(topo):
        assert dev.iommu_group_members == (dev.bdf,)
    for bridge in (d for d in topo.pci.values() if d.is_bridge and d.driver == "pcieport"):
        assert bridge.iommu_group_members == (bridge.bdf,)


def test_a100_nvswitches_share_one_group(topology):
    topo = topology("dgx-a100")
    switches = _nvswitches(topo)
    assert len({s.iommu_group for s in switches}) == 1
    assert switches[0].iommu_group_members == tuple(s.bdf for s in switches)
    assert len(switches[0].iommu_group_members) == 6
    # The AMD-Vi units themselves get no group.
    assert topo.pci["0000:00:00.2"].iommu_group is None


@pytest.mark.parametrize("name, members", [
    ("dgx2", ("0000:02:00.0", "0000:03:00.0")),           # BMC VGA behind its PCIe-to-PCI bridge
    ("dgx2", ("0000:01:00.0", "0000:01:00.1")),           # two NIC functions without ACS
    ("dgx-a100", ("0000:21:00.0", "0000:22:00.0")),
    ("pcie-4gpu", ("0000:06:00.0", "0000:06:00.1")),
])
def test_shared_host_device_groups(topology, name, members):
    topo = topology(name)
    for bdf in members:
        assert topo.pci[bdf].iommu_group_members == members


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_drivers(topology, name):
    row = HOSTS[name]
    topo = topology(name)
    assert {g.driver for g in _gpus(topo)} == {row["gpu_driver"]}
    switches = _nvswitches(topo)
    assert {s.driver for s in switches} == ({row["nvswitch_driver"]} if switches else set())
    for dev in topo.pci.values():
        if dev.pci_class == 0x0108:
            assert dev.driver == "nvme"
        if dev.vendor == 0x15B3:
            # VFs wait unbound: the fixtures' PFs say sriov_drivers_autoprobe = 0, as a host that
            # passes VFs through sets it
            vf = topo.nics[dev.bdf].physfn is not None
            assert dev.driver == (None if vf else "mlx5_core")
        if dev.is_bridge and dev.vendor != 0x1A03:
            assert dev.driver == "pcieport"


def test_h100_pmc_management_endpoint(topology):
    topo = topology("dgx-h100")
    pmc = topo.devices_matching([(0x11F8, 0x4128)], (0x0580,))
    assert [(d.bdf, d.driver, d.numa_node) for d in pmc] == [("0000:05:00.1", "vfio-pci", 0)]
    # The switch ports report the same ID as bridges; only the class tells them apart.
    ports = topo.devices_matching([(0x11F8, 0x4128)], (0x0604,))
    assert [d.bdf for d in ports] == ["0000:05:00.0"] + ["0000:06:0%d.0" % i for i in range(4)]


@pytest.mark.parametrize("name, bdf, path, host_bridge", [
    ("dgx2", "0000:34:00.0",
     ("0000:2e:00.0", "0000:2f:00.0", "0000:30:04.0", "0000:32:00.0", "0000:33:00.0",
      "0000:34:00.0"), "pci0000:2e"),
    ("dgx2", "0000:61:00.0",
     ("0000:4e:02.0", "0000:5f:00.0", "0000:60:00.0", "0000:61:00.0"), "pci0000:4e"),
    ("dgx2", "0000:03:00.0", ("0000:00:1c.5", "0000:02:00.0", "0000:03:00.0"), "pci0000:00"),
    ("dgx-a100", "0000:07:00.0",
     ("0000:00:01.1", "0000:01:00.0", "0000:02:00.0", "0000:03:00.0", "0000:04:02.0",
      "0000:07:00.0"), "pci0000:00"),
    ("dgx-h100", "0000:df:00.0",
     ("0000:d9:01.0", "0000:da:00.0", "0000:db:03.0", "0000:df:00.0"), "pci0000:d9"),
    ("pcie-4gpu", "0000:05:00.0", ("0000:00:03.1", "0000:05:00.0"), "pci0000:00"),
    ("h100-cloud-vm", "0000:00:06.0", ("0000:00:06.0",), "pci0000:00"),
])
def test_bridge_chains(topology, name, bdf, path, host_bridge):
    dev = topology(name).pci[bdf]
    assert dev.path == path
    assert dev.host_bridge == host_bridge
    assert dev.bridges == path[:-1]
    assert dev.root_port == (path[0] if len(path) > 1 else None)


@pytest.mark.parametrize("name, a, b, link", [
    # DGX-2: pairs share a level-2 switch, quads a level-1 switch, each tree its own root complex.
    ("dgx2", 0, 1, LINK_PIX),
    ("dgx2", 2, 3, LINK_PIX),
    ("dgx2", 0, 2, LINK_PXB),
    ("dgx2", 0, 4, LINK_NODE),
    ("dgx2", 4, 7, LINK_PXB),
    ("dgx2", 0, 8, LINK_SYS),
    ("dgx2", 15, 14, LINK_PIX),
    ("dgx2", 15, 12, LINK_PXB),
    # DGX A100: a pair under one two-level PEX88096; NPS4 nodes on one socket are SYS apart, as
    # nvidia-smi topo -m prints on a real one.
    ("dgx-a100", 0, 1, LINK_PXB),
    ("dgx-a100", 0, 2, LINK_SYS),
    ("dgx-a100", 0, 4, LINK_SYS),
    ("dgx-a100", 6, 7, LINK_PXB),
    # DGX H100: every GPU behind its own switch on its own root complex.
    ("dgx-h100", 0, 1, LINK_NODE),
    ("dgx-h100", 3, 4, LINK_SYS),
    ("pcie-4gpu", 0, 1, LINK_PIX),
    ("pcie-4gpu", 0, 2, LINK_PHB),
    ("pcie-4gpu", 2, 3, LINK_NODE),
])
def test_link_classes(topology, name, a, b, link):
    topo = topology(name)
    gpus = [g.bdf for g in _gpus(topo)]
    assert topo.link(gpus[a], gpus[b]) == link
    assert topo.link(gpus[b], gpus[a]) == link


@pytest.mark.parametrize("name, bdf, nic, link", [
    ("dgx2", "0000:34:00.0", "0000:35:00.0", LINK_PIX),
    ("dgx2", "0000:34:00.0", "0000:3a:00.0", LINK_PXB),
    ("dgx-a100", "0000:07:00.0", "0000:05:00.0", LINK_PIX),
    ("dgx-a100", "0000:0f:00.0", "0000:05:00.0", LINK_PXB),
    ("dgx-h100", "0000:1b:00.0", "0000:18:00.0", LINK_PIX),
])
def test_gpu_to_nic_links(topology, name, bdf, nic, link):
    assert topology(name).link(bdf, nic) == link


@pytest.mark.parametrize("name, bdf, bars, mmio64", [
    # (index, size, 64-bit, prefetchable) for each BAR the kernel lists.
    ("dgx2", "0000:34:00.0",
     [(0, 16 * MIB, False, False), (1, 32 * GIB, True, True), (3, 32 * MIB, True, True)],
     32 * GIB + 32 * MIB),
    ("dgx-a100", "0000:bd:00.0",
     [(0, 16 * MIB, False, False), (1, 128 * GIB, True, True), (3, 32 * MIB, True, True)],
     128 * GIB + 32 * MIB),
    ("dgx-h100", "0000:1b:00.0",
     [(0, 16 * MIB, True, True), (2, 128 * GIB, True, True), (4, 32 * MIB, True, True)],
     128 * GIB + 48 * MIB),
    ("pcie-4gpu", "0000:41:00.0",
     [(0, 16 * MIB, True, True), (2, 256 * GIB, True, True), (4, 32 * MIB, True, True)],
     256 * GIB + 48 * MIB),
    ("h100-cloud-vm", "0000:00:06.0",
     [(0, 16 * MIB, True, True), (2, 128 * GIB, True, True), (4, 32 * MIB, True, True)],
     128 * GIB + 48 * MIB),
    ("dgx2", "0000:61:00.0", [(0, 32 * MIB, False, False)], 0),
])
def test_bar_sizes(topology, name, bdf, bars, mmio64):
    dev = topology(name).pci[bdf]
    assert [(b.index, b.size, b.is_mem64, b.prefetchable) for b in dev.bars] == bars
    assert dev.mmio64_size == mmio64
    assert dev.mmio_size == sum(b[1] for b in bars)


def test_cloud_vm_bar_addresses_as_captured(topology):
    bars = topology("h100-cloud-vm").pci["0000:00:06.0"].bars
    assert [(b.start, b.flags) for b in bars] == [
        (0x102002000000, 0x14220C), (0x100000000000, 0x14220C), (0x102000000000, 0x14220C)]


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_cmdline_args(topology, name):
    args = topology(name).cmdline_args
    for key, value in HOSTS[name]["cmdline"].items():
        if value == "absent":
            assert key not in args
        else:
            assert args[key] == value


# --- custom descriptions: what the allow-list and class filter must keep out -----------------


def _tiny_host(devices):
    return {
        "name": "tiny",
        "cpu": {"sockets": 1, "cores_per_socket": 2, "threads_per_core": 1},
        "numa": {"memory_gib": 4},
        "kernel": {"cmdline": "ro"},
        "pci": [{"host_bridge": "0000:00", "node": 0, "devices": devices}],
    }


def test_every_nvidia_gpu_function_is_a_gpu_and_nothing_else_is(tmp_path):
    desc = _tiny_host([
        # A GPU that shows class 0300 (VGA), as some PCIe cards do (hardware.md s.2).
        {"bdf": "00:02.0", "model": "h100-sxm5-80gb", "class": 0x030000},
        # An NVIDIA 3D controller of another model (H100 PCIe, 10de:2331) ...
        {"bdf": "00:03.0", "model": "h100-sxm5-80gb", "device": 0x2331},
        # ... and one of a model the collection does not name: a GPU all the same.
        {"bdf": "00:06.0", "model": "h100-sxm5-80gb", "device": 0x2bff},
        # A GPU's ID with a class that is neither 0300 nor 0302.
        {"bdf": "00:04.0", "model": "h100-sxm5-80gb", "class": 0x068000},
        # A GPU's audio function (class 0403): not a GPU.
        {"bdf": "00:07.0", "model": "h100-sxm5-80gb", "device": 0x22ba, "class": 0x040300},
        "00:05.0 aspeed-vga",
    ])
    topo = read_host(*sysfs_builder.build(desc, str(tmp_path)))
    assert len(topo.pci) == 6
    assert [g.bdf for g in _gpus(topo)] == ["0000:00:02.0", "0000:00:03.0", "0000:00:06.0"]
    # The ID table names models; it no longer gates discovery.
    assert [g.bdf for g in topo.devices_matching(GPU_IDS, GPU_CLASSES)] == [
        "0000:00:02.0", "0000:00:03.0"]
    assert _nvswitches(topo) == []


# --- the real machine and bad roots ----------------------------------------------------------


def test_this_machines_sys_and_proc_read(tmp_path):
    if not os.path.isdir("/sys/bus/pci/devices"):
        pytest.skip("this machine has no /sys/bus/pci (a container without sysfs)")
    topo = read_host()
    assert len(topo.cpus) == os.sysconf("SC_NPROCESSORS_ONLN")
    assert topo.numa_nodes and all(n.memory_total_kb > 0 for n in topo.numa_nodes)
    # GPUs found must be exactly the NVIDIA functions of a GPU class, read straight from the files.
    expected = []
    for bdf in sorted(os.listdir("/sys/bus/pci/devices")):
        path = os.path.join("/sys/bus/pci/devices", bdf)
        with open(os.path.join(path, "vendor")) as v, open(os.path.join(path, "device")) as d, \
                open(os.path.join(path, "class")) as c:
            ids = (int(v.read(), 16), int(d.read(), 16))
            if ids[0] == 0x10DE and int(c.read(), 16) >> 8 in GPU_CLASSES:
                expected.append(bdf)
    assert [g.bdf for g in host_gpus(topo)] == expected
    assert len(topo.pci) == len(os.listdir("/sys/bus/pci/devices"))


def test_missing_sysfs_root_names_the_option(tmp_path):
    with pytest.raises(TopologyError) as err:
        read_host(str(tmp_path / "nothing-here"), "/proc")
    assert "sysfs_root" in str(err.value)
    assert "nothing-here" in str(err.value)


def test_directory_that_is_not_sysfs_names_the_option(tmp_path):
    (tmp_path / "devices").mkdir()
    with pytest.raises(TopologyError) as err:
        read_host(str(tmp_path), "/proc")
    message = str(err.value)
    assert "sysfs_root" in message and "does not look like sysfs" in message
    assert os.path.join("bus", "pci", "devices") in message


def test_proc_root_without_cmdline_names_the_option(host_tree, tmp_path):
    sysfs_root, _proc = host_tree("pcie-4gpu")
    with pytest.raises(TopologyError) as err:
        read_host(sysfs_root, str(tmp_path))
    assert "proc_root" in str(err.value) and "cmdline" in str(err.value)

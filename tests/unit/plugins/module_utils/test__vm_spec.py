# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Placement -> VmSpec -> domain XML on the fixture hosts, and on this machine's libvirt."""

import copy
import dataclasses
import json
import os
import re
import shutil
import subprocess
import uuid
import xml.etree.ElementTree as ET

import pytest

import sysfs_builder
from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import (
    Address,
    Domain,
    format_cpuset,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain_builder import (
    BLK_QUEUES_MAX,
    COLLECTION_VERSION,
    build_domain,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import read_domain
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement import HostState
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import (
    Request,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import PLATFORMS
from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_host
from ansible_collections.gpuvirt.kvm.plugins.module_utils._topology import Bar, PciDevice
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_spec import (
    NET_QUEUES_MAX,
    DiskSpec,
    NetworkSpec,
    SpecError,
    VmSpec,
    derive_mac,
    guest_phys_bits,
    make_spec,
    mmio64_window_mb,
    normalize_mac,
    spec_diff,
)

GIB_KIB = 1024 ** 2
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))
VALIDATOR = shutil.which("virt-xml-validate")


@pytest.fixture(scope="session")
def host(host_tree):
    """host(name) -> HostTopology of a fixture host (read once per session)."""
    read = {}

    def get(name):
        if name not in read:
            read[name] = read_host(*host_tree(name))
        return read[name]

    return get


def disks(name):
    return [
        DiskSpec(role="os", path="/var/lib/gpuvirt/disks/%s-os.qcow2" % name, size_gb=50,
                 backing="/var/lib/gpuvirt/images/dgx-os-6.2.qcow2"),
        DiskSpec(role="data", path="/var/lib/gpuvirt/disks/%s-data.qcow2" % name, size_gb=200),
        DiskSpec(role="seed", path="/var/lib/gpuvirt/disks/%s-seed.iso" % name),
    ]


def placed(topo, platform, request, **kw):
    placement = HostState(topo, PLATFORMS[platform]).place(request)
    spec = make_spec(placement, topo, disks=disks(request.name),
                     networks=[NetworkSpec(type="network", source="default")],
                     cpu_disable_features=["arch-capabilities"], image="dgx-os",
                     image_version="6.2", template="%s-%d" % (platform, request.gpus), **kw)
    return placement, spec


def validate(xml, tmp_path):
    if VALIDATOR is None:
        pytest.skip("virt-xml-validate is not installed (package libvirt-clients)")
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    proc = subprocess.run([VALIDATOR, str(path), "domain"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def guest_bus_cell(root, hostdev):
    """The guest NUMA cell of a hostdev's bus (None: on pcie-root, no expander)."""
    port_index = int(hostdev.find("address").get("bus"), 16)
    port = root.find("./devices/controller[@type='pci'][@index='%d']" % port_index)
    assert port.get("model") == "pcie-root-port"
    parent = port.find("address")
    if parent is None or int(parent.get("bus"), 16) == 0:
        return None
    expander = root.find("./devices/controller[@type='pci'][@index='%d']"
                         % int(parent.get("bus"), 16))
    assert expander.get("model") == "pcie-expander-bus"
    return int(expander.findtext("target/node"))


def check_common(placement, spec, topo, tmp_path):
    """What every generated GPU VM must satisfy; returns the parsed XML root."""
    dom = build_domain(spec, topo)
    xml = dom.to_xml()
    root = ET.fromstring(xml)
    # Pinning: vCPU i on the placement's CPU i, emulator and I/O threads on reserved CPUs.
    pins = {int(p.get("vcpu")): int(p.get("cpuset")) for p in root.findall("./cputune/vcpupin")}
    assert [pins[i] for i in range(placement.vcpus)] == list(placement.cpus)
    assert root.find("vcpu").get("cpuset") is None
    emulator = root.find("./cputune/emulatorpin").get("cpuset")
    assert emulator == format_cpuset(placement.emulator_cpus)
    assert not set(placement.emulator_cpus) & set(placement.cpus)
    assert root.findtext("iothreads") == "2"  # one per virtio disk (OS and data)
    assert [p.get("cpuset") for p in root.findall("./cputune/iothreadpin")] == [emulator] * 2
    # Memory strict to the placement's nodes.
    memory = root.find("./numatune/memory")
    assert memory.get("mode") == "strict"
    assert memory.get("nodeset") == format_cpuset(placement.numa_nodes)
    # Whole devices passed through, at the placement's BDFs, managed by libvirt.
    sources = [Address.from_element(h.find("./source/address")).bdf
               for h in root.findall("./devices/hostdev")]
    assert sorted(sources) == sorted(placement.gpus + placement.nvswitches)
    assert all(h.get("managed") == "yes" for h in root.findall("./devices/hostdev"))
    # Multiqueue.
    assert root.find("./devices/interface/driver").get("queues") == str(
        min(placement.vcpus, NET_QUEUES_MAX))
    for disk in root.findall("./devices/disk[@device='disk']"):
        assert disk.find("driver").get("queues") == str(min(placement.vcpus, BLK_QUEUES_MAX))
    # The libvirt gateway reads back what the spec holds (libvirt XML is the source of truth).
    alloc = read_domain(xml)
    assert alloc.hostdevs == tuple(sorted(spec.hostdevs))
    assert alloc.pinned_cpus == tuple(sorted(spec.cpus))
    assert alloc.numa_nodes == spec.numa_nodes
    assert alloc.memory_kib == spec.memory_mb * 1024
    assert alloc.managed and alloc.metadata["gpus"] == ",".join(spec.gpus)
    assert alloc.metadata.get("nvswitches", "") == ",".join(spec.nvswitches)
    # spec -> XML -> domain -> spec is the identity.
    assert VmSpec.from_domain(Domain.from_xml(xml)) == spec
    validate(xml, tmp_path)
    return root


# --- DGX-2 --------------------------------------------------------------------------------------

# A V100-SXM3-32GB has 32 GiB + 32 MiB of 64-bit prefetchable BARs (BAR1, BAR3; BAR0 is 32-bit):
# twice the sum, rounded up to a power of two.
DGX2_WINDOW_GIB = {1: 128, 2: 256, 4: 512, 8: 1024, 16: 2048}
DGX2_SWITCHES = {1: 0, 2: 1, 4: 3, 8: 6, 16: 12}


@pytest.mark.parametrize("gpus", [1, 2, 4, 8, 16])
def test_dgx2(host, tmp_path, gpus):
    topo = host("dgx2")
    placement, spec = placed(topo, "dgx2", Request("vm%d" % gpus, gpus=gpus))
    assert len(spec.nvswitches) == DGX2_SWITCHES[gpus]
    assert spec.extra_hostdevs == ()  # DGX-2 gives every GPU and NVSwitch its own group
    assert spec.mmio64_mb == DGX2_WINDOW_GIB[gpus] * 1024
    root = check_common(placement, spec, topo, tmp_path)
    assert int(root.findtext("./devices/controller[@model='pcie-root']/pcihole64")) == \
        DGX2_WINDOW_GIB[gpus] * GIB_KIB
    cells = root.findall("./cpu/numa/cell")
    expanders = root.findall("./devices/controller[@model='pcie-expander-bus']")
    if gpus < 16:
        # One node: no guest NUMA, root ports straight on pcie-root.
        assert cells == [] and expanders == [] and root.find("./numatune/memnode") is None
        for hostdev in root.findall("./devices/hostdev"):
            assert guest_bus_cell(root, hostdev) is None
        return
    # 16 GPUs span both sockets: two guest cells mirroring nodes 0 and 1.
    assert [c.get("id") for c in cells] == ["0", "1"]
    for k, cell in enumerate(cells):
        node = spec.numa_nodes[k]
        vcpus = [i for i, cpu in enumerate(placement.cpus) if topo.cpus[cpu].node == node]
        assert cell.get("cpus") == "%d-%d" % (vcpus[0], vcpus[-1])
        assert int(cell.get("memory")) == placement.memory_by_node[node] * 1024
    assert [(m.get("cellid"), m.get("nodeset")) for m in root.findall("./numatune/memnode")] \
        == [("0", "0"), ("1", "1")]
    topology = root.find("./cpu/topology")
    assert (topology.get("sockets"), topology.get("threads")) == ("2", "2")
    assert sorted(int(e.find("target").get("busNr")) for e in expanders) == [0x80, 0xA0]
    assert all(e.find("model").get("name") == "pxb-pcie" for e in expanders)
    # Every GPU and NVSwitch sits under the expander bus of its own host node's cell.
    for hostdev in root.findall("./devices/hostdev"):
        bdf = Address.from_element(hostdev.find("./source/address")).bdf
        assert guest_bus_cell(root, hostdev) == spec.numa_nodes.index(topo.pci[bdf].numa_node)


def test_dgx2_guest_addresses_are_one_device_per_root_port(host, tmp_path):
    topo = host("dgx2")
    _placement, spec = placed(topo, "dgx2", Request("vm", gpus=8))
    dom = build_domain(spec, topo)
    validate(dom.to_xml(), tmp_path)
    ports = [c.index for c in dom.controllers if c.model == "pcie-root-port"]
    assert sorted(h.address.bus for h in dom.hostdevs) == sorted(ports)
    assert all((h.address.slot, h.address.function) == (0, 0) for h in dom.hostdevs)
    assert [h.bdf for h in dom.hostdevs] == list(spec.gpus + spec.nvswitches)


# --- rail NICs: beside their GPUs in the guest --------------------------------------------------

def _parent(dom, index):
    """The controller a bus number (a controller index) belongs to."""
    return next(c for c in dom.controllers if c.type == "pci" and c.index == index)


def _switch_of(dom, bdf):
    """(upstream port index, downstream port index) above a hostdev; (None, port) without one."""
    hostdev = next(h for h in dom.hostdevs if h.bdf == bdf)
    port = _parent(dom, hostdev.address.bus)
    if port.model != "pcie-switch-downstream-port":
        return None, port.index
    return port.address.bus, port.index


@pytest.mark.parametrize("name, platform, gpus, nics, unit", [
    ("dgx2", "dgx2", 2, ("0000:35:00.1",), 3),  # a VF (the NIC has VFs) with both GPUs
    ("dgx2", "dgx2", 16, 8, 3),  # two cells: eight switches under two expander buses
    ("dgx-a100", "dgx-a100", 8, 8, 2),  # whole NICs, one per GPU, four cells
])
def test_a_rail_nic_shares_an_emulated_switch_with_its_gpus(host, tmp_path, name, platform,
                                                            gpus, nics, unit):
    topo = host(name)
    placement, spec = placed(topo, platform, Request("rails", gpus=gpus, nics="auto"))
    assert spec.nics == placement.nics
    if isinstance(nics, tuple):
        assert spec.nics == nics
    else:
        assert len(spec.nics) == nics
    dom = build_domain(spec, topo)
    xml = dom.to_xml()
    validate(xml, tmp_path)
    switches = {}
    for bdf in spec.gpus + spec.nics:
        upstream, _down = _switch_of(dom, bdf)
        assert upstream is not None, bdf
        switches.setdefault(upstream, []).append(bdf)
    # every switch holds one NIC and the GPUs it serves, each on a downstream port of its own
    assert len(switches) == len(spec.nics)
    for upstream, members in switches.items():
        assert len(members) == unit
        assert _parent(dom, upstream).model == "pcie-switch-upstream-port"
        assert _parent(dom, _parent(dom, upstream).address.bus).model == "pcie-root-port"
        nic = next(b for b in members if b in spec.nics)
        pf = topo.nics[nic].physfn or nic
        for gpu in (b for b in members if b in spec.gpus):
            assert topo.link(pf, gpu) == "PIX"
    # NVSwitches keep their root ports of their own
    for bdf in spec.nvswitches:
        assert _switch_of(dom, bdf)[0] is None
    # spec -> XML -> domain -> spec is the identity, the rails recorded in the metadata
    assert VmSpec.from_domain(Domain.from_xml(xml)) == spec
    assert read_domain(xml).metadata["nics"] == ",".join(spec.nics)


def test_vms_without_rails_keep_their_layout(host):
    topo = host("dgx2")
    _placement, spec = placed(topo, "dgx2", Request("plain", gpus=2))
    dom = build_domain(spec, topo)
    assert spec.nics == ()
    assert not [c for c in dom.controllers if c.model and "switch" in c.model]


# --- other platforms ------------------------------------------------------------------------------

def test_a100_multi_node(host, tmp_path):
    """NPS4 DGX A100: 8 GPUs on 4 NUMA nodes -> 4 guest cells, 4 expander buses."""
    topo = host("dgx-a100")
    placement, spec = placed(topo, "dgx-a100", Request("a100x8", gpus=8))
    assert spec.nvswitches == ()  # shared NVSwitch: the switches stay with the host
    assert len(spec.numa_nodes) == 4
    root = check_common(placement, spec, topo, tmp_path)
    cells = root.findall("./cpu/numa/cell")
    assert len(cells) == 4
    covered = sorted(i for c in cells for i in range(
        int(c.get("cpus").split("-")[0]), int(c.get("cpus").split("-")[-1]) + 1))
    assert covered == list(range(placement.vcpus))
    buses = [int(e.find("target").get("busNr"))
             for e in root.findall("./devices/controller[@model='pcie-expander-bus']")]
    assert buses == [0x80, 0xA0, 0xC0, 0xE0]
    for hostdev in root.findall("./devices/hostdev"):
        bdf = Address.from_element(hostdev.find("./source/address")).bdf
        assert guest_bus_cell(root, hostdev) == spec.numa_nodes.index(topo.pci[bdf].numa_node)
    # A100-80GB: 128 GiB + 32 MiB of 64-bit BARs each, x8 x2 -> 4 TiB.
    assert spec.mmio64_mb == 4 * 1024 * 1024


def test_a100_shared_policy_multi_node(host, tmp_path):
    topo = host("dgx-a100")
    state = HostState(topo, PLATFORMS["dgx-a100"])
    placement = state.place(Request("shared4", gpus=4, cpu_policy="shared"))
    spec = make_spec(placement, topo)
    dom = build_domain(spec, topo)
    xml = dom.to_xml()
    root = ET.fromstring(xml)
    assert root.find("./cputune/vcpupin") is None
    assert root.find("vcpu").get("cpuset") is not None
    alloc = read_domain(xml)
    assert alloc.pinned_cpus == () and alloc.cpuset == tuple(sorted(placement.cpus))
    cells = dom.cpu.cells
    assert len(cells) == len(placement.numa_nodes) == 2
    assert sum(len(c.cpus) for c in cells) == placement.vcpus
    assert VmSpec.from_domain(Domain.from_xml(xml)) == spec
    validate(xml, tmp_path)


@pytest.mark.parametrize("gpus, cells, window_tib", [(1, 0, 0.5), (4, 0, 2), (8, 2, 4)])
def test_h100(host, tmp_path, gpus, cells, window_tib):
    topo = host("dgx-h100")
    placement, spec = placed(topo, "dgx-h100", Request("h100x%d" % gpus, gpus=gpus))
    root = check_common(placement, spec, topo, tmp_path)
    assert len(root.findall("./cpu/numa/cell")) == cells
    # H100: 16 MiB + 128 GiB + 32 MiB of 64-bit prefetchable BARs per GPU.
    assert spec.mmio64_mb == int(window_tib * 1024 * 1024)
    # The Switchtec management endpoint (PMC-Sierra) never goes to a tenant.
    assert not any(topo.pci[b].vendor == 0x11F8 for b in spec.hostdevs)


def test_hugepages_on_the_pcie_host(host, tmp_path):
    topo = host("pcie-4gpu")
    placement, spec = placed(topo, "generic", Request("huge", gpus=2, vcpus=8, memory_mb=4096,
                                                      hugepages=True))
    assert spec.hugepage_kb == 1048576
    root = check_common(placement, spec, topo, tmp_path)
    page = root.find("./memoryBacking/hugepages/page")
    assert (page.get("size"), page.get("unit"), page.get("nodeset")) == ("1048576", "KiB", None)


@pytest.fixture(scope="module")
def dgx2_hugepages(tmp_path_factory):
    """The dgx2 fixture host with 64 x 1 GiB hugepages reserved on each node."""
    desc = copy.deepcopy(sysfs_builder.load_host("dgx2"))
    desc["numa"]["hugepages"] = {1048576: 64}
    return read_host(*sysfs_builder.build(desc, str(tmp_path_factory.mktemp("dgx2-huge"))))


def test_hugepages_multi_node(dgx2_hugepages, tmp_path):
    topo = dgx2_hugepages
    placement, spec = placed(topo, "dgx2", Request("huge16", gpus=16, vcpus=32,
                                                   memory_mb=64 * 1024, hugepages=True))
    assert spec.hugepage_kb == 1048576 and spec.memory_by_node == {0: 32768, 1: 32768}
    root = check_common(placement, spec, topo, tmp_path)
    page = root.find("./memoryBacking/hugepages/page")
    assert (page.get("size"), page.get("nodeset")) == ("1048576", "0-1")  # both guest cells
    assert [c.get("memory") for c in root.findall("./cpu/numa/cell")] == [
        str(32 * GIB_KIB)] * 2


def test_hugepages_need_whole_pages_per_cell(dgx2_hugepages):
    topo = dgx2_hugepages
    placement = HostState(topo, PLATFORMS["dgx2"]).place(
        Request("odd", gpus=16, vcpus=32, memory_mb=63 * 1024, hugepages=True))
    with pytest.raises(SpecError, match=r"memory: 64512 MiB \(32256 MiB of it on NUMA node 0\) "
                                        r"is not a whole number of 1024 MiB hugepages; give "
                                        r"memory as a multiple of 2048 MiB"):
        make_spec(placement, topo)


def test_cpu_only_vm(host, tmp_path):
    topo = host("dgx2")
    placement = HostState(topo, PLATFORMS["dgx2"]).place(
        Request("tiny", gpus=0, vcpus=2, memory_mb=1024))
    spec = make_spec(placement, topo, networks=[NetworkSpec(type="user")])
    assert spec.mmio64_mb == 0 and spec.hostdevs == ()
    dom = build_domain(spec, topo)
    xml = dom.to_xml()
    root = ET.fromstring(xml)
    assert root.find("./devices/hostdev") is None
    assert [(c.get("type"), c.get("model")) for c in root.findall("./devices/controller")] == \
        [("pci", "pcie-root"), ("usb", "none")]
    assert root.find("./devices/controller/pcihole64") is None
    assert root.find("iothreads") is None and root.find("./cputune/iothreadpin") is None
    assert root.find("./os/boot").get("dev") == "hd"  # no OS disk to carry a boot order
    # QEMU's user networking has one queue: libvirt refuses queues for it.
    assert root.find("./devices/interface/driver") is None
    assert root.find("./devices/memballoon").get("model") == "none"
    assert root.find("./devices/rng/backend").text == "/dev/urandom"
    assert VmSpec.from_domain(Domain.from_xml(xml)) == spec
    validate(xml, tmp_path)


def test_single_vcpu_asks_for_no_queue_count(host):
    # One queue is virtio's default and libvirt drops queues='1' from what it stores: a spec
    # asking for it would differ from the stored domain on every run (a redefine each time).
    topo = host("dgx2")
    state = HostState(topo, PLATFORMS["dgx2"])
    net = [NetworkSpec(type="network", source="default")]
    one = make_spec(state.place(Request("one", gpus=0, vcpus=1, memory_mb=1024)), topo,
                    networks=net)
    four = make_spec(state.place(Request("four", gpus=0, vcpus=4, memory_mb=1024)), topo,
                     networks=net)
    assert [n.queues for n in one.networks] == [None]
    assert [n.queues for n in four.networks] == [4]
    root = ET.fromstring(build_domain(one, topo).to_xml())
    assert root.find("./devices/interface/driver") is None


def test_guest_threads_follow_host_siblings(host, tmp_path):
    topo = host("dgx2")
    state = HostState(topo, PLATFORMS["dgx2"])
    even = make_spec(state.place(Request("even", gpus=1, vcpus=6, memory_mb=4096)), topo)
    odd = make_spec(state.place(Request("odd", gpus=1, vcpus=3, memory_mb=4096)), topo)
    for spec, threads in ((even, 2), (odd, 1)):
        dom = build_domain(spec, topo)
        validate(dom.to_xml(), tmp_path)
        cpu = dom.cpu
        assert cpu.threads == threads
        assert cpu.sockets * cpu.cores * cpu.threads == spec.vcpus


# --- IOMMU groups -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grouped_host(tmp_path_factory):
    """pcie-4gpu with an H200 + HDMI audio function (and its root port) in one IOMMU group, and
    the two H100 behind the switch in one group (no ACS)."""
    desc = copy.deepcopy(sysfs_builder.load_host("pcie-4gpu"))
    desc["models"] = {"nvidia-hda": {"vendor": 0x10DE, "device": 0x22E8, "class": 0x040300,
                                     "driver": "vfio-pci",
                                     "bars": [{"index": 0, "size": "16K", "kind": "mem32"}]}}
    devices = desc["pci"][0]["devices"]
    switch = devices[2]["children"][0]
    for port in switch["children"]:
        port["children"] = [{"bdf": port["children"][0].split()[0], "model": "h100-sxm5-80gb",
                             "iommu_group": "noacs"}]
    devices[3] = {"bdf": "00:03.1", "model": "amd-root-port", "iommu_group": "h200",
                  "children": [{"bdf": "05:00.0", "model": "h200-sxm-141gb",
                                "iommu_group": "h200"},
                               {"bdf": "05:00.1", "model": "nvidia-hda",
                                "iommu_group": "h200"}]}
    root = str(tmp_path_factory.mktemp("grouped"))
    return read_host(*sysfs_builder.build(desc, root))


def test_group_members_follow_the_gpu(grouped_host, tmp_path):
    topo = grouped_host
    assert topo.pci["0000:05:00.1"].iommu_group == topo.pci["0000:05:00.0"].iommu_group
    placement = HostState(topo, PLATFORMS["generic"]).place(
        Request("grp", gpus=1, gpu_index=2, vcpus=4, memory_mb=4096))
    spec = make_spec(placement, topo)
    assert spec.gpus == ("0000:05:00.0",)
    assert spec.extra_hostdevs == ("0000:05:00.1",)  # not the root port 00:03.1 (a bridge)
    dom = build_domain(spec, topo)
    by_bdf = {h.bdf: h.address for h in dom.hostdevs}
    assert set(by_bdf) == {"0000:05:00.0", "0000:05:00.1"}
    gpu, audio = by_bdf["0000:05:00.0"], by_bdf["0000:05:00.1"]
    # One slot, functions kept, function 0 marked multifunction.
    assert (gpu.bus, gpu.slot, gpu.function, gpu.multifunction) == (audio.bus, 0, 0, True)
    assert (audio.function, audio.multifunction) == (1, None)
    xml = dom.to_xml()
    assert read_domain(xml).hostdevs == ("0000:05:00.0", "0000:05:00.1")
    assert VmSpec.from_domain(Domain.from_xml(xml)) == spec
    validate(xml, tmp_path)


def test_a_group_shared_with_another_gpu_is_refused(grouped_host):
    topo = grouped_host
    state = HostState(topo, PLATFORMS["generic"])
    placement = state.place(Request("half", gpus=1, gpu_index=0, vcpus=2, memory_mb=1024))
    with pytest.raises(SpecError, match=r"gpus: 0000:03:00.0 shares IOMMU group \d+ with GPU "
                                        r"0000:04:00.0, which this VM does not get"):
        make_spec(placement, topo)
    both = HostState(topo, PLATFORMS["generic"]).place(
        Request("both", gpus=2, gpu_index=0, vcpus=2, memory_mb=1024))
    assert make_spec(both, topo).extra_hostdevs == ()


# --- firmware, CPU modes, disks, NICs --------------------------------------------------------

def test_ovmf(host, tmp_path):
    topo = host("dgx-h100")
    _placement, spec = placed(topo, "dgx-h100", Request("uefi", gpus=2), firmware="ovmf")
    os_ = build_domain(spec, topo).os
    assert (os_.loader, os_.loader_readonly, os_.loader_type) == (
        "/usr/share/OVMF/OVMF_CODE_4M.fd", True, "pflash")
    assert os_.nvram == "/var/lib/libvirt/qemu/nvram/uefi_VARS.fd"
    assert os_.nvram_template == "/usr/share/OVMF/OVMF_VARS_4M.fd"
    custom = build_domain(spec, topo, ovmf_code="/opt/ovmf/CODE.fd",
                          ovmf_vars="/opt/ovmf/VARS.fd", nvram_dir="/srv/nvram/")
    assert (custom.os.loader, custom.os.nvram) == ("/opt/ovmf/CODE.fd",
                                                   "/srv/nvram/uefi_VARS.fd")
    validate(custom.to_xml(), tmp_path)
    xml = build_domain(spec, topo).to_xml()
    assert VmSpec.from_domain(Domain.from_xml(xml)).firmware == "ovmf"
    validate(xml, tmp_path)


def test_tcg_defaults_to_the_maximum_cpu(host, tmp_path):
    topo = host("dgx2")
    placement = HostState(topo, PLATFORMS["dgx2"]).place(
        Request("tcg", gpus=0, vcpus=1, memory_mb=128))
    spec = make_spec(placement, topo, domain_type="qemu")
    dom = build_domain(spec, topo)
    assert (dom.type, dom.cpu.mode, dom.cpu.migratable) == ("qemu", "maximum", False)
    assert not dom.cpu.features
    validate(dom.to_xml(), tmp_path)
    passthrough = build_domain(make_spec(placement, topo), topo)
    assert (passthrough.type, passthrough.cpu.mode) == ("kvm", "host-passthrough")
    model = build_domain(make_spec(placement, topo, cpu_mode="host-model"), topo).cpu
    assert (model.mode, model.check, model.migratable) == ("host-model", None, None)


def test_disks(host, tmp_path):
    topo = host("dgx2")
    _placement, spec = placed(topo, "dgx2", Request("d", gpus=1))
    dom = build_domain(spec, topo)
    validate(dom.to_xml(), tmp_path)
    os_disk, data, seed = dom.disks
    assert (os_disk.target_dev, os_disk.target_bus, os_disk.boot_order) == ("vda", "virtio", 1)
    assert (os_disk.cache, os_disk.io, os_disk.discard, os_disk.iothread) == (
        "none", "native", "unmap", 1)
    assert (os_disk.backing.source, os_disk.backing.format) == (
        "/var/lib/gpuvirt/images/dgx-os-6.2.qcow2", "qcow2")
    assert (data.target_dev, data.iothread, data.backing, data.boot_order) == ("vdb", 2, None,
                                                                               None)
    assert (seed.device, seed.target_dev, seed.target_bus, seed.readonly, seed.driver_type) == (
        "cdrom", "sda", "sata", True, "raw")
    assert dom.os.boot == []  # per-device boot order instead (libvirt forbids both)
    assert [(d.target, d.role, d.size_gb) for d in dom.gpuvirt.disks] == [
        ("vda", "os", 50), ("vdb", "data", 200), ("sda", "seed", None)]


def test_networks_and_macs():
    assert derive_mac("vm-a") == derive_mac("vm-a", 0)
    assert len({derive_mac("vm-a", 0), derive_mac("vm-a", 1), derive_mac("vm-b", 0)}) == 3
    assert re.match(r"^52:54:00(:[0-9a-f]{2}){3}$", derive_mac("vm-a"))
    assert normalize_mac("52-54-00-AA-bb-0C") == "52:54:00:aa:bb:0c"
    assert normalize_mac("5254.00aa.bb0c") == "52:54:00:aa:bb:0c"


def test_network_specs(host, tmp_path):
    topo = host("dgx2")
    placement = HostState(topo, PLATFORMS["dgx2"]).place(
        Request("n", gpus=0, vcpus=12, memory_mb=1024))
    spec = make_spec(placement, topo, networks=[
        NetworkSpec(type="network", source="default"),
        NetworkSpec(type="bridge", source="br0", mac="52:54:00:00:00:AA", queues=2),
        NetworkSpec(type="user")])
    assert [(n.type, n.source, n.queues) for n in spec.networks] == [
        ("network", "default", 8), ("bridge", "br0", 2), ("user", None, None)]
    assert spec.networks[0].mac == derive_mac("n", 0)
    assert spec.networks[1].mac == "52:54:00:00:00:aa"
    dom = build_domain(spec, topo)
    validate(dom.to_xml(), tmp_path)
    nics = dom.interfaces
    assert [(i.type, i.source, i.model, i.queues, i.driver_name) for i in nics] == [
        ("network", "default", "virtio", 8, None), ("bridge", "br0", "virtio", 2, None),
        ("user", None, "virtio", None, None)]


BAD = [
    (dict(domain_type="xen"), r"domain_type: 'xen' is not one of kvm, qemu"),
    (dict(domain_type="qemu", cpu_mode="host-passthrough"),
     "cpu_mode: host-passthrough needs domain_type kvm"),
    (dict(cpu_mode="custom"), "cpu_mode: 'custom' is not one of"),
    (dict(cpu_disable_features=["arch capabilities"]),
     r"cpu_disable_features\[0\]: 'arch capabilities' is not a CPU feature name"),
    (dict(firmware="coreboot"), "firmware: 'coreboot' is not one of bios, ovmf"),
    (dict(machine="pc"), "machine: 'pc' is not supported; GPU VMs use q35"),
    (dict(disks=[DiskSpec(role="swap", path="/x")]), r"disks\[0\].role: 'swap'"),
    (dict(disks=[DiskSpec(role="os", path="/a"), DiskSpec(role="os", path="/b")]),
     r"disks\[1\]: a VM has one os disk, disks\[0\] is one already"),
    (dict(disks=[DiskSpec(role="data", path="rel/x.qcow2")]),
     r"disks\[0\].path: 'rel/x.qcow2' is not an absolute path"),
    (dict(disks=[DiskSpec(role="data", path="/x", format="vmdk")]),
     r"disks\[0\].format: 'vmdk' is not one of qcow2, raw"),
    (dict(disks=[DiskSpec(role="os", path="/x", format="raw", backing="/b")]),
     r"disks\[0\]: a disk with a backing image must be qcow2"),
    (dict(networks=[NetworkSpec(type="macvtap", source="eth0")]),
     r"networks\[0\].type: 'macvtap'"),
    (dict(networks=[NetworkSpec(type="bridge")]),
     r"networks\[0\]: type bridge needs the host bridge name in source"),
    (dict(networks=[NetworkSpec(type="user", source="default")]),
     r"networks\[0\]: type user takes no source"),
    (dict(networks=[NetworkSpec(type="user", mac="52:54:00:zz:00:01")]),
     r"networks\[0\].mac: '52:54:00:zz:00:01' is not a MAC address"),
    (dict(networks=[NetworkSpec(type="user", mac="01:00:5e:00:00:01")]),
     r"networks\[0\].mac: '01:00:5e:00:00:01' is a multicast address"),
    (dict(networks=[NetworkSpec(type="user", mac="52:54:00:00:00:01"),
                    NetworkSpec(type="network", source="n", mac="52:54:00:00:00:01")]),
     r"networks\[1\].mac: 52:54:00:00:00:01 is used by networks\[0\] too"),
]


@pytest.mark.parametrize("kwargs, message", BAD)
def test_bad_input(host, kwargs, message):
    topo = host("dgx2")
    placement = HostState(topo, PLATFORMS["dgx2"]).place(
        Request("bad", gpus=0, vcpus=1, memory_mb=128))
    with pytest.raises(SpecError, match=message):
        make_spec(placement, topo, **kwargs)


def test_gpu_not_on_this_host(host):
    topo = host("dgx2")
    placement = HostState(host("dgx-h100"), PLATFORMS["dgx-h100"]).place(
        Request("elsewhere", gpus=1))
    with pytest.raises(SpecError, match="gpus: 0000:1b:00.0 is not a PCI device of this host"):
        make_spec(placement, topo)


# --- small parts ----------------------------------------------------------------------------------

def _dev(*bars):
    return PciDevice(bdf="0000:01:00.0", vendor=0x10DE, device=0x2330, class_code=0x030200,
                     driver=None, numa_node=0, iommu_group=1,
                     bars=tuple(Bar(index=i, start=0, size=s, flags=f)
                                for i, (s, f) in enumerate(bars)))


def test_mmio64_window():
    mem64pref, mem32 = 0x14220C, 0x40200
    assert mmio64_window_mb([]) == 0
    assert mmio64_window_mb([_dev((16 << 20, mem32))]) == 0  # 32-bit BARs do not count
    assert mmio64_window_mb([_dev((32 << 30, mem64pref), (32 << 20, mem64pref))]) == 128 << 10
    assert mmio64_window_mb([_dev((16 << 30, mem64pref))]) == 32 << 10  # exact power of two
    assert mmio64_window_mb([_dev((128 << 30, mem64pref))] * 3) == 1 << 20


def test_to_dict_is_json_and_diff_names_fields(host):
    topo = host("dgx2")
    _placement, spec = placed(topo, "dgx2", Request("j", gpus=2))
    data = spec.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["memory_by_node"] == {"0": spec.memory_mb}
    assert spec_diff(spec, spec) == {}
    bigger = dataclasses.replace(spec, memory_mb=spec.memory_mb * 2, owner_tag="t")
    assert spec_diff(spec, bigger) == {
        "memory_mb": {"before": spec.memory_mb, "after": spec.memory_mb * 2},
        "owner_tag": {"before": None, "after": "t"}}


def test_guest_agent_channel_is_read_back_and_its_absence_is_a_difference(host):
    topo = host("dgx2")
    _placement, spec = placed(topo, "dgx2", Request("j", gpus=1))
    assert spec.guest_agent
    root = ET.fromstring(build_domain(spec, topo).to_xml())
    assert [c.find("target").get("name") for c in root.findall("./devices/channel")] == [
        "org.qemu.guest_agent.0"]
    # a VM an earlier version made has no channel: read back as such, and a diff to add it
    older = dataclasses.replace(spec, guest_agent=False)
    xml = build_domain(older, topo).to_xml()
    assert ET.fromstring(xml).findall("./devices/channel") == []
    assert VmSpec.from_domain(Domain.from_xml(xml)) == older
    assert spec_diff(older, spec) == {"guest_agent": {"before": False, "after": True}}


def test_collection_version_matches_galaxy_yml():
    with open(os.path.join(REPO, "galaxy.yml"), encoding="utf-8") as handle:
        version = re.search(r"^version:\s*(\S+)", handle.read(), re.MULTILINE).group(1)
    assert COLLECTION_VERSION == version


# --- this machine's libvirt -----------------------------------------------------------------------

def _connect():
    libvirt = pytest.importorskip("libvirt")
    try:
        return libvirt, libvirt.open("qemu:///system")
    except libvirt.libvirtError as exc:
        pytest.skip("qemu:///system is not reachable: %s" % exc.get_error_message())


def _remove(libvirt, conn, name):
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    if dom.isActive():
        dom.destroy()
    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


@pytest.mark.libvirt
def test_libvirt_accepts_a_dgx2_gpu_vm(host):
    """libvirt takes the hostdev/expander/pcihole64 XML (define needs no devices; start would)."""
    libvirt, conn = _connect()
    topo = host("dgx2")
    name = "gpuvirt-unit-%s" % uuid.uuid4().hex[:8]
    _placement, spec = placed(topo, "dgx2", Request(name, gpus=16), firmware="ovmf")
    try:
        dom = conn.defineXML(build_domain(spec, topo).to_xml())
        stored = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        root = ET.fromstring(stored)
        assert len(root.findall("./devices/hostdev")) == 28
        assert [(e.find("model").get("name"), e.find("target").get("busNr"),
                 e.findtext("target/node"))
                for e in root.findall("./devices/controller[@model='pcie-expander-bus']")] == [
            ("pxb-pcie", "128", "0"), ("pxb-pcie", "160", "1")]
        assert root.findtext("./devices/controller[@model='pcie-root']/pcihole64") == str(
            2048 * GIB_KIB)
        assert root.find("./os/type").get("machine").startswith("pc-q35")
        # libvirt keeps the guest's address width and OVMF's window size (fw_cfg)
        assert root.find("./cpu/maxphysaddr").attrib == {"mode": "emulate", "bits": "43"}
        assert _fw_cfg_mb(root) == 2048 * 1024
        # the guest agent's channel (libvirt picks its socket's path when the VM starts)
        (channel,) = root.findall("./devices/channel")
        assert channel.get("type") == "unix"
        assert channel.find("target").attrib == {"type": "virtio",
                                                 "name": "org.qemu.guest_agent.0"}
        assert VmSpec.from_domain(Domain.from_xml(stored)) == spec
        alloc = read_domain(stored)
        assert alloc.hostdevs == tuple(sorted(spec.hostdevs))
    finally:
        _remove(libvirt, conn, name)
        conn.close()


@pytest.mark.libvirt
def test_libvirt_stores_the_rails_beside_their_gpus(host):
    """A 16-GPU DGX-2 VM with its eight rails (a VF each): libvirt keeps every NIC on a
    downstream port of the switch that holds the GPUs it serves, and the spec reads back."""
    libvirt, conn = _connect()
    topo = host("dgx2")
    name = "gpuvirt-unit-%s" % uuid.uuid4().hex[:8]
    _placement, spec = placed(topo, "dgx2", Request(name, gpus=16, nics="auto"),
                              firmware="ovmf")
    try:
        dom = conn.defineXML(build_domain(spec, topo).to_xml())
        stored = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        back = Domain.from_xml(stored)
        assert len(back.hostdevs) == 16 + 12 + 8
        upstreams = [c for c in back.controllers if c.model == "pcie-switch-upstream-port"]
        assert len(upstreams) == 8
        for nic in spec.nics:
            upstream, _down = _switch_of(back, nic)
            pf = topo.nics[nic].physfn
            mates = [g for g in spec.gpus if _switch_of(back, g)[0] == upstream]
            assert len(mates) == 2 and all(topo.link(pf, g) == "PIX" for g in mates)
        assert VmSpec.from_domain(back) == spec
    finally:
        _remove(libvirt, conn, name)
        conn.close()


# --- what the guest firmware and CPU must reach: the 64-bit window and the address width -------

FWCFG = "./{http://libvirt.org/schemas/domain/qemu/1.0}commandline"


def _fw_cfg_mb(root):
    arg = FWCFG + "/{http://libvirt.org/schemas/domain/qemu/1.0}arg"
    args = [a.get("value") for a in root.findall(arg)]
    assert args[0] == "-fw_cfg", args
    name, _sep, value = args[1].partition(",string=")
    assert name == "name=opt/ovmf/X-PciMmio64Mb"
    return int(value)


def _reaches(root, memory_mb, window_mb):
    """The guest CPU's address width covers RAM above 4 GiB and the window aligned above it."""
    bits = int(root.find("./cpu/maxphysaddr").get("bits"))
    assert root.find("./cpu/maxphysaddr").get("mode") == "emulate"
    ram_top = (4 * 1024 + max(0, memory_mb - 2048)) * 2 ** 20
    window = window_mb * 2 ** 20
    top = -(-ram_top // window) * window + window
    assert top <= 2 ** bits, (bits, top)
    return bits


def test_dgx2_16_gpus_with_1_4_tib_of_ram_reaches_all_its_bars(host, tmp_path):
    topo = host("dgx2")
    assert topo.phys_bits == 46
    memory_mb = 1434 * 1024  # 1.4 TiB
    _placement, spec = placed(topo, "dgx2", Request("big", gpus=16, memory_mb=memory_mb),
                              firmware="ovmf")
    assert spec.memory_mb == memory_mb and spec.mmio64_mb == 2048 * 1024
    xml = build_domain(spec, topo).to_xml()
    root = ET.fromstring(xml)
    # OVMF gets the 2 TiB window through fw_cfg; RAM ends near 1.4 TiB, the window takes
    # 2-4 TiB: 42 bits, plus one for firmware that places it by the address width.
    assert _fw_cfg_mb(root) == 2048 * 1024
    assert _reaches(root, memory_mb, spec.mmio64_mb) == 43
    assert root.find("./os/loader").get("type") == "pflash"
    assert VmSpec.from_domain(Domain.from_xml(xml)) == spec
    validate(xml, tmp_path)


def test_h100_8_gpus_reach_their_bars_for_every_cpu_mode(host, tmp_path):
    topo = host("dgx-h100")
    for cpu_mode, domain_type in (("host-passthrough", "kvm"), ("host-model", "kvm"),
                                  ("maximum", "qemu")):
        _placement, spec = placed(topo, "dgx-h100", Request("h8", gpus=8), firmware="ovmf",
                                  cpu_mode=cpu_mode, domain_type=domain_type)
        root = ET.fromstring(build_domain(spec, topo).to_xml())
        assert _fw_cfg_mb(root) == spec.mmio64_mb >= 8 * 128 * 1024
        bits = _reaches(root, spec.memory_mb, spec.mmio64_mb)
        assert bits <= topo.phys_bits or domain_type == "qemu"
        validate(build_domain(spec, topo).to_xml(), tmp_path)


def test_bios_vms_get_the_address_width_but_no_ovmf_entry(host):
    topo = host("dgx2")
    _placement, spec = placed(topo, "dgx2", Request("b", gpus=2))
    root = ET.fromstring(build_domain(spec, topo).to_xml())
    assert root.find(FWCFG) is None
    assert root.find("./cpu/maxphysaddr") is not None


def test_a_vm_without_gpus_keeps_qemus_defaults(host):
    topo = host("dgx2")
    request = Request("cpu-only", gpus=0, vcpus=2, memory_mb=2048)
    _placement, spec = placed(topo, "dgx2", request, firmware="ovmf")
    root = ET.fromstring(build_domain(spec, topo).to_xml())
    assert root.find(FWCFG) is None and root.find("./cpu/maxphysaddr") is None


def test_guest_phys_bits():
    assert guest_phys_bits(1024, 0) == 40  # never below QEMU's 40
    # 1 TiB of RAM (top near 1 TiB) and a 1 TiB window aligned above it: 2 TiB, 41 + 1 bits
    assert guest_phys_bits(1024 * 1024, 1024 * 1024) == 43
    # the same window with less RAM fits lower
    assert guest_phys_bits(64 * 1024, 1024 * 1024) == 42


def test_a_guest_the_host_cpu_cannot_address_is_refused(host):
    # One V100 (a 128 GiB window) above 66 GiB of RAM ends at 256 GiB: 38 bits.
    topo = dataclasses.replace(host("dgx2"), phys_bits=37)
    with pytest.raises(SpecError, match="need 38 physical address bits, and this host's CPU "
                                        "has 37"):
        placed(topo, "dgx2", Request("wide", gpus=1, memory_mb=64 * 1024))
    # Under TCG the guest CPU is emulated: any width goes.
    placed(topo, "dgx2", Request("wide", gpus=1, memory_mb=64 * 1024), domain_type="qemu",
           cpu_mode="maximum")


def _one_switch_host(tmp_path, name, ports):
    """A one-socket host whose single PCIe switch has a downstream port per entry of ``ports``
    (each a list of the devices below that port); its topology."""
    desc = {
        "name": name, "cpu": {"sockets": 1, "cores_per_socket": 8, "threads_per_core": 1},
        "numa": {"memory_gib": 64}, "iommu": {"enabled": True},
        "pci": [{"host_bridge": "0000:00", "node": 0, "devices": [
            "00:00.0 intel-skx-host-bridge",
            {"bdf": "00:01.0", "model": "intel-skx-root-port", "children": [
                {"bdf": "01:00.0", "model": "plx-pex9797-usp", "children": [
                    {"bdf": "02:%02x.0" % k, "model": "plx-pex9797-port", "children": devices}
                    for k, devices in enumerate(ports)]}]}]}],
    }
    return read_host(*sysfs_builder.build(desc, str(tmp_path / "host")))


DEFAULT_NETWORK = [NetworkSpec(type="network", source="default")]


def test_two_functions_of_one_nic_share_one_switch_and_pass_once(tmp_path):
    """A dual-port NIC (two functions of one slot) whole, beside two GPUs: one switch, each
    function passed through once, and the spec reads back."""
    topo = _one_switch_host(tmp_path, "dual", [
        ["03:00.0 a100-sxm4-80gb"], ["04:00.0 mellanox-cx7", "04:00.1 mellanox-cx7"],
        ["05:00.0 a100-sxm4-80gb"]])
    platform = PLATFORMS["generic"]
    placement = HostState(topo, platform).place(Request("dual", gpus=2, nics="auto", vcpus=2,
                                                        memory_mb=1024))
    assert sorted(placement.nics) == ["0000:04:00.0", "0000:04:00.1"]
    spec = make_spec(placement, topo, networks=DEFAULT_NETWORK)
    dom = build_domain(spec, topo)
    bdfs = [h.bdf for h in dom.hostdevs]
    assert len(bdfs) == len(set(bdfs)) == 4
    assert len([c for c in dom.controllers if c.model == "pcie-switch-upstream-port"]) == 1
    assert VmSpec.from_domain(Domain.from_xml(dom.to_xml())) == spec
    validate(dom.to_xml(), tmp_path)


def test_expander_buses_never_overlap_when_a_cell_needs_more_than_the_spacing():
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain_builder import (
        _expander_bus_numbers,
    )

    buses = _expander_bus_numbers(2, 33)
    assert buses[1] - buses[0] >= 33 and buses[1] + 33 - 1 <= 0xFF


def test_a_nic_in_a_gpus_iommu_group_stays_an_extra_and_the_vm_stays_as_it_is(tmp_path):
    """No ACS between a GPU and a ConnectX: the NIC follows the GPU as a group member, is no
    rail of the VM's, and a second placement of the defined VM changes nothing."""
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import holdings
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import nic_functions

    topo = _one_switch_host(tmp_path, "noacs", [
        [{"bdf": "03:00.0", "model": "a100-sxm4-80gb", "iommu_group": "g"}],
        [{"bdf": "04:00.0", "model": "mellanox-cx7", "iommu_group": "g"}]])
    platform = PLATFORMS["generic"]
    request = Request("vm", gpus=1, vcpus=2, memory_mb=1024)
    placement = HostState(topo, platform).place(request)
    spec = make_spec(placement, topo, networks=DEFAULT_NETWORK)
    assert spec.nics == () and spec.extra_hostdevs == ("0000:04:00.0",)
    xml = build_domain(spec, topo).to_xml()
    held = holdings([read_domain(xml)], ["0000:03:00.0"], [], nic_functions(topo))
    assert held[0].nics == () and held[0].extra_nics == ("0000:04:00.0",)
    again = HostState(topo, platform, held).place(request)
    assert make_spec(again, topo, networks=DEFAULT_NETWORK) \
        == VmSpec.from_domain(Domain.from_xml(xml)) == spec

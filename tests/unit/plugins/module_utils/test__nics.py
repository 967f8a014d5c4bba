# SPDX-License-Identifier: GPL-3.0-or-later
"""Rail NICs: discovery from sysfs and procfs, rails from the PCIe tree, the host's own NICs."""

import json
import os

import pytest

import sysfs_builder
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_facts import build
from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import (
    classify,
    gpu_rails,
    host_nics,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import detect, host_gpus
from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_host, read_routes


def _rails(topo):
    return {n.bdf: n for n in classify(topo, host_gpus(topo))}


def _bdfs(buses):
    return ["0000:%s:00.0" % b for b in buses.split()]


# Each platform's rails, from where the fixtures put the NICs (the published block diagrams):
# DGX-2 one ConnectX-5 under each level-2 switch with a GPU pair; DGX A100 and H100 one NIC per
# GPU under the GPU's switch.
@pytest.mark.parametrize("name, nics, gpus_per_nic", [
    ("dgx2", "35 3a 58 5d b8 bd e1 e6", 2),
    ("dgx-a100", "05 0a 45 4a 85 8a b5 ba", 1),
    ("dgx-h100", "18 40 4f 5e 9a c0 ce dc", 1),
])
def test_every_gpu_has_its_rail_under_its_switch(host_tree, name, nics, gpus_per_nic):
    topo = read_host(*host_tree(name))
    gpus = [g.bdf for g in host_gpus(topo)]
    rails = {bdf: n for bdf, n in _rails(topo).items() if n.rail_gpus}
    assert sorted(rails) == _bdfs(nics)
    served = []
    for bdf, nic in rails.items():
        assert nic.rail_link == "PIX" and nic.offered
        assert len(nic.rail_gpus) == gpus_per_nic
        for gpu in nic.rail_gpus:
            # derived from the tree: the NIC and its GPUs share the switch above them
            assert topo.link(bdf, gpu) == "PIX"
            assert topo.pci[bdf].bridges[:-1] == topo.pci[gpu].bridges[:-1]
        served += nic.rail_gpus
    assert sorted(served) == gpus
    by_gpu = gpu_rails(rails.values())
    assert all(len(by_gpu[g]) == 1 for g in gpus)


def test_dgx2_rails_are_infiniband_with_vfs(host_tree):
    topo = read_host(*host_tree("dgx2"))
    net = topo.nics["0000:35:00.0"]
    assert net.link_layer == "InfiniBand"
    assert net.netdevs == ("ibp53s0",) and net.rdma == ("mlx5_0",)
    assert (net.sriov_totalvfs, net.sriov_numvfs) == (8, 2)
    assert net.vfs == ("0000:35:00.1", "0000:35:00.2")
    groups = set()
    for vf in net.vfs:
        assert topo.nics[vf].physfn == "0000:35:00.0"
        dev = topo.pci[vf]
        assert dev.id_pair == (0x15B3, 0x1018) and dev.driver is None
        # a VF sits where its PF sits in the tree
        assert dev.bridges == topo.pci["0000:35:00.0"].bridges
        groups.add(dev.iommu_group)
    assert len(groups) == 2 and topo.pci["0000:35:00.0"].iommu_group not in groups
    # VFs are never rails of their own
    assert not set(net.vfs) & {d.bdf for d in host_nics(topo)}


def test_the_management_nic_is_never_offered(host_tree):
    dgx2 = read_host(*host_tree("dgx2"))
    assert dgx2.host_routes["enp1s0f0"] == ("default route", "route 10.33.0.0/24")
    # the onboard X550 is no ConnectX: not a NIC this collection hands out at all
    assert "0000:01:00.0" not in _rails(dgx2)
    a100 = read_host(*host_tree("dgx-a100"))
    storage = _rails(a100)["0000:23:00.0"]
    assert storage.model == "ConnectX-6 Dx"
    assert not storage.offered and not storage.rail_gpus
    assert storage.host_use == (
        "enp35s0f0np0 is enslaved to bond0 (which carries the host's default route, route "
        "10.40.0.0/22)")


def test_a_rail_that_carries_the_default_route_is_kept_by_the_host(fresh_host_tree):
    sysfs_root, proc_root = fresh_host_tree("dgx2")
    route = os.path.join(proc_root, "net", "route")
    with open(route) as handle:
        lines = handle.read().splitlines()
    lines.append("ibp53s0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0")
    with open(route, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    topo = read_host(sysfs_root, proc_root)
    nic = _rails(topo)["0000:35:00.0"]
    assert nic.rail_gpus and not nic.offered
    assert nic.host_use == "ibp53s0 carries the host's default route"
    by_gpu = gpu_rails(_rails(topo).values())
    assert "0000:34:00.0" not in by_gpu and by_gpu["0000:39:00.0"] == ["0000:3a:00.0"]


def test_ipv6_default_routes_count_too(tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "route").write_text("Iface\tDestination\n")
    (tmp_path / "net" / "ipv6_route").write_text(
        "%s 00 %s 00 %s 00000400 00000001 00000000 00000003 enp1s0f0\n"
        "%s 40 %s 00 %s 00000100 00000001 00000000 00000001 enp1s0f1\n"
        % ("0" * 32, "0" * 32, "fe80" + "0" * 27 + "1", "20010db8" + "0" * 24, "0" * 32,
           "0" * 32))
    assert read_routes(str(tmp_path)) == {"enp1s0f0": ("IPv6 default route",)}


def _host(devices, routes=()):
    """A one-socket host with a PCIe switch holding what ``devices`` lists."""
    return {
        "name": "nics",
        "cpu": {"sockets": 1, "cores_per_socket": 4, "threads_per_core": 1},
        "numa": {"memory_gib": 8},
        "iommu": {"enabled": True},
        "routes": list(routes),
        "pci": [{"host_bridge": "0000:00", "node": 0, "devices": [
            "00:00.0 intel-skx-host-bridge",
            {"bdf": "00:01.0", "model": "intel-skx-root-port", "children": [
                {"bdf": "01:00.0", "model": "plx-pex9797-usp", "children": [
                    {"bdf": "02:%02x.0" % i, "model": "plx-pex9797-port", "children": [d]}
                    for i, d in enumerate(devices)]}]},
            {"bdf": "00:02.0", "model": "intel-skx-root-port",
             "children": [{"bdf": "20:00.0", "model": "mellanox-cx6dx", "netdev": "enp32s0f0np0"}]},
        ]}],
    }


def test_nics_share_their_gpus_out_in_pci_order(tmp_path):
    # two GPUs (03, 05) and four NICs (04, 06, 07, 08) under one switch: two NICs per GPU
    devices = ["03:00.0 a100-sxm4-80gb", "04:00.0 mellanox-cx7", "05:00.0 a100-sxm4-80gb",
               "06:00.0 mellanox-cx7", "07:00.0 mellanox-cx7", "08:00.0 mellanox-cx7"]
    topo = read_host(*sysfs_builder.build(_host(devices), str(tmp_path)))
    rails = _rails(topo)
    assert {b: n.rail_gpus for b, n in rails.items() if n.rail_gpus} == {
        "0000:04:00.0": ("0000:03:00.0",), "0000:06:00.0": ("0000:03:00.0",),
        "0000:07:00.0": ("0000:05:00.0",), "0000:08:00.0": ("0000:05:00.0",)}
    # the NIC on its own root port is a NIC, but no GPU's rail: it is never offered
    alone = rails["0000:20:00.0"]
    assert alone.rail_gpus == () and alone.rail_link is None and not alone.offered
    assert topo.nics["0000:20:00.0"].link_layer == "Ethernet"
    assert topo.nics["0000:20:00.0"].sriov_totalvfs is None


def test_gpu_topology_reports_nics_vfs_and_their_holders(host_tree):
    topo = read_host(*host_tree("dgx2"))
    platform, reason = detect(topo)

    class Dom:
        name, active, managed, metadata = "tenant-1", True, True, {}
        hostdevs = ("0000:34:00.0", "0000:35:00.1")
        pinned_cpus, cpuset, numa_nodes, memory_kib, cpu_policy = (2,), (2,), (0,), 1 << 20, \
            "dedicated"

    result = build(topo, platform, reason, [Dom()], [])
    nics = {n["bdf"]: n for n in result["nics"]}
    assert len(nics) == 8
    first = nics["0000:35:00.0"]
    assert first["rail_gpus"] == ["0000:34:00.0", "0000:36:00.0"]
    assert first["link_layer"] == "InfiniBand" and first["rdma_devices"] == ["mlx5_0"]
    assert first["sriov"]["totalvfs"] == 8 and first["allocated_to"] is None
    assert [(vf["bdf"], vf["allocated_to"]) for vf in first["sriov"]["vfs"]] == [
        ("0000:35:00.1", "tenant-1"), ("0000:35:00.2", None)]
    assert result["gpus"][0]["rail_nics"] == ["0000:35:00.0"]
    assert result["allocations"][0]["nics"] == ["0000:35:00.1"]
    lines = result["allocation_map"]
    assert "NIC 0000:35:00.0 mlx5_0 node 0  rail of GPU 0-1 (PIX) -> free" in lines
    assert "  VF 0000:35:00.1 -> tenant-1 (running)" in lines


def test_the_host_nic_line_says_why(host_tree):
    topo = read_host(*host_tree("dgx-a100"))
    platform, reason = detect(topo)
    lines = build(topo, platform, reason, [], [])["allocation_map"]
    assert ("NIC 0000:23:00.0 mlx5_8 node 2  no GPU beside it -> host: enp35s0f0np0 is enslaved "
            "to bond0 (which carries the host's default route, route 10.40.0.0/22)") in lines


def test_a_nic_beside_no_gpu_is_not_offered_in_the_map(tmp_path):
    topo = read_host(*sysfs_builder.build(_host(["03:00.0 a100-sxm4-80gb", "04:00.0 mellanox-cx7"]),
                                          str(tmp_path)))
    platform, reason = detect(topo)
    lines = [line for line in build(topo, platform, reason, [], [])["allocation_map"]
             if line.startswith("NIC ")]
    assert lines[0].endswith("rail of GPU 0 (PIX) -> free")
    assert lines[1].endswith("no GPU beside it -> not offered")


def test_bad_sriov_descriptions_are_refused(tmp_path):
    nic = {"bdf": "04:00.0", "model": "mellanox-cx7", "sriov": {"totalvfs": 2, "numvfs": 3}}
    bad = _host(["03:00.0 a100-sxm4-80gb", nic])
    with pytest.raises(sysfs_builder.FixtureError, match="numvfs 3 is not within 0-2"):
        sysfs_builder.build(bad, str(tmp_path))


# --- choosing a VM's rails ------------------------------------------------------------------------

def _choose(topo, gpus, held=None, **kwargs):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import choose_nics

    return choose_nics(classify(topo, host_gpus(topo)), gpus, held or {}, **kwargs)


def test_a_vm_with_every_gpu_of_a_rail_gets_it_whole_unless_it_has_vfs(host_tree):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import NicChoiceError

    a100 = read_host(*host_tree("dgx-a100"))  # no VF created: whole functions
    quad = _bdfs("07 0f 47 4e")
    got = _choose(a100, quad)
    assert [(c.bdf, c.vf, c.gpus) for c in got] == [
        ("0000:05:00.0", False, ("0000:07:00.0",)), ("0000:0a:00.0", False, ("0000:0f:00.0",)),
        ("0000:45:00.0", False, ("0000:47:00.0",)), ("0000:4a:00.0", False, ("0000:4e:00.0",))]
    assert [c.bdf for c in _choose(a100, quad, count=1)] == ["0000:05:00.0"]
    assert _choose(a100, quad, count=0) == []
    # the DGX-2's NICs have VFs: vfio-pci takes no PF with SR-IOV enabled, so a VF each
    dgx2 = read_host(*host_tree("dgx2"))
    pair = _bdfs("34 36")
    assert [(c.bdf, c.vf, c.gpus) for c in _choose(dgx2, pair)] == [
        ("0000:35:00.1", True, tuple(pair))]
    with pytest.raises(NicChoiceError, match=r"rail NIC 0000:35:00.0 has 2 VF\(s\) "
                                             r"\(sriov_numvfs\), and vfio-pci takes no physical"):
        _choose(dgx2, pair, mode="whole")


def test_one_gpu_of_a_shared_rail_gets_a_vf_and_vfs_are_never_handed_out_twice(host_tree):
    topo = read_host(*host_tree("dgx2"))
    first = _choose(topo, _bdfs("34"))
    assert [(c.nic, c.bdf, c.vf) for c in first] == [("0000:35:00.0", "0000:35:00.1", True)]
    second = _choose(topo, _bdfs("36"), held={"0000:35:00.1": "one"})
    assert [c.bdf for c in second] == ["0000:35:00.2"]
    full = {"0000:35:00.1": "one", "0000:35:00.2": "two"}
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import NicChoiceError

    with pytest.raises(NicChoiceError, match=r"no VF of rail NIC 0000:35:00.0 is free \(held: "
                                             r"0000:35:00.1 \(one\), 0000:35:00.2 \(two\)\)"):
        _choose(topo, _bdfs("36"), held=full)
    assert _choose(topo, _bdfs("36"), held=full, allow_fewer=True) == []
    # the pair cannot have the NIC whole while a VF of it is someone's
    assert [c.bdf for c in _choose(topo, _bdfs("34 36"), held={"0000:35:00.1": "one"})] == [
        "0000:35:00.2"]
    with pytest.raises(NicChoiceError, match="nic_mode: whole, but rail NIC 0000:35:00.0 has 2"):
        _choose(topo, _bdfs("34 36"), held={"0000:35:00.1": "one"}, mode="whole")


def test_a_whole_nic_held_is_never_handed_out_again(host_tree):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import NicChoiceError

    topo = read_host(*host_tree("dgx-h100"))
    assert [c.bdf for c in _choose(topo, _bdfs("1b"))] == ["0000:18:00.0"]
    with pytest.raises(NicChoiceError, match="held whole by old-vm"):
        _choose(topo, _bdfs("1b"), held={"0000:18:00.0": "old-vm"})


@pytest.mark.parametrize("gpus, kwargs, message", [
    ("34", {"count": 2},
     r"nics: 2 asked, but GPU\(s\) 0000:34:00.0 have 1 rail NIC\(s\) the host does not use"),
    ("34", {"mode": "whole"}, r"nic_mode: whole, but rail NIC 0000:35:00.0 also serves GPU\(s\) "
                              r"0000:36:00.0, which this VM does not get; use nic_mode: vf"),
    ("34", {"mode": "bad"}, "nic_mode: 'bad' is not one of auto, whole, vf"),
])
def test_what_cannot_be_had_is_refused_naming_the_option(host_tree, gpus, kwargs, message):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import NicChoiceError

    topo = read_host(*host_tree("dgx2"))
    with pytest.raises(NicChoiceError, match=message):
        _choose(topo, _bdfs(gpus), **kwargs)


def test_vfs_of_a_nic_without_them(host_tree, tmp_path):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import NicChoiceError

    a100 = read_host(*host_tree("dgx-a100"))  # SR-IOV capable, no VF created
    with pytest.raises(NicChoiceError, match=r"0000:05:00.0 has no VFs yet \(sriov_numvfs is 0 "
                                             r"of 16\)"):
        _choose(a100, _bdfs("07"), mode="vf")
    # one NIC without SR-IOV under the switch of two GPUs
    devices = ["03:00.0 a100-sxm4-80gb", "04:00.0 mellanox-cx7", "05:00.0 a100-sxm4-80gb"]
    topo = read_host(*sysfs_builder.build(_host(devices), str(tmp_path)))
    assert _rails(topo)["0000:04:00.0"].rail_gpus == tuple(_bdfs("03 05"))
    with pytest.raises(NicChoiceError, match="0000:04:00.0 .* has no SR-IOV, so it has no VFs to "
                                             "share; give one VM all of"):
        _choose(topo, _bdfs("03"))


def test_a_host_without_rails_says_so(host_tree):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import NicChoiceError

    topo = read_host(*host_tree("pcie-4gpu"))
    with pytest.raises(NicChoiceError, match=r"no ConnectX or BlueField NIC sits beside a GPU\); "
                                             r"ask nics: 0"):
        _choose(topo, [g.bdf for g in host_gpus(topo)][:1])
    assert _choose(topo, [g.bdf for g in host_gpus(topo)][:1], count=0) == []


# --- the placement engine holds rails as it holds GPUs --------------------------------------------

def _state(topo, held=()):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement import HostState

    platform, _reason = detect(topo)
    return HostState(topo, platform, list(held))


def test_a_dgx2_day_gets_its_rails_and_no_function_twice(host_tree):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import (
        PlacementError,
        Request,
    )

    topo = read_host(*host_tree("dgx2"))
    state = _state(topo)
    day = [Request("eight", gpus=8, nics="auto"), Request("four", gpus=4, nics="auto"),
           Request("two", gpus=2, nics="auto"), Request("one-a", gpus=1, nics="auto"),
           Request("one-b", gpus=1, nics="auto"),
           Request("plain", gpus=0, vcpus=2, memory_mb=1024)]
    placed = dict((r.name, out) for r, out in state.plan(day))
    assert not [o for o in placed.values() if isinstance(o, PlacementError)]
    assert len(placed["eight"].nics) == 4 and len(placed["four"].nics) == 2
    # the DGX-2's NICs have VFs, so every rail is a VF (vfio-pci takes no PF with VFs)
    assert len(placed["two"].nics) == 1 and placed["two"].nics[0].endswith(".1")
    # the two singles share a pair's NIC: a VF each
    singles = placed["one-a"].nics + placed["one-b"].nics
    assert sorted(singles) == [placed["one-a"].nics[0][:-1] + "1",
                               placed["one-a"].nics[0][:-1] + "2"]
    every = [b for o in placed.values() for b in o.nics]
    assert len(every) == len(set(every)) == 9
    assert placed["plain"].nics == ()
    # each VM's NICs are its GPUs' rails
    for out in placed.values():
        for bdf in out.nics:
            pf = topo.nics[bdf].physfn or bdf
            assert set(_rails(topo)[pf].rail_gpus) & set(out.gpus)
    # the ledger holds them: releasing frees them for the next VM
    assert state.nic_holder[placed["one-a"].nics[0]] == "one-a"
    state.release("one-a")
    assert placed["one-a"].nics[0] not in state.nic_holder


def test_sticky_vms_keep_their_rails_and_a_failed_choice_places_nothing(host_tree):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import (
        PlacementError,
        Request,
    )

    topo = read_host(*host_tree("dgx2"))
    state = _state(topo)
    first = state.place(Request("a", gpus=1, nics="auto"))
    again = state.place(Request("a", gpus=1, nics="auto"))
    assert again.nics == first.nics and again.gpus == first.gpus
    # nics: 0 leaves a VM's NICs alone: it keeps them, and its CPUs, untouched
    bare = state.place(Request("a", gpus=1, nics=0))
    assert bare.nics == first.nics and bare.cpus == first.cpus
    # a new CPU shape re-fits CPUs and memory; the VF it holds stays its own
    bigger = state.place(Request("a", gpus=1, vcpus=4, memory_mb=4096, nics="auto"))
    assert bigger.nics == first.nics and bigger.vcpus == 4
    # a VF does not answer nic_mode: whole: its rails are chosen again, and on the DGX-2 (a NIC
    # for a GPU pair) that fails, keeping what it holds
    with pytest.raises(PlacementError, match="nic_mode: whole, but rail NIC .* also serves GPU"):
        state.place(Request("a", gpus=1, vcpus=4, memory_mb=4096, nics="auto", nic_mode="whole"))
    assert state.allocations["a"].nics == first.nics
    assert state.place(Request("a", gpus=1, vcpus=4, memory_mb=4096, nics="auto",
                               nic_mode="vf")).nics == first.nics
    with pytest.raises(PlacementError, match="request 'b' .*nics: 3 asked"):
        state.place(Request("b", gpus=1, nics=3))
    assert "b" not in state.allocations
    with pytest.raises(PlacementError, match="nics needs GPUs"):
        state.place(Request("c", gpus=0, nics="auto"))
    with pytest.raises(PlacementError, match="nics must be auto, 0 or a number"):
        state.place(Request("d", gpus=1, nics=-1))


def test_rails_that_domains_hold_are_never_handed_out(host_tree):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import (
        Holding,
        PlacementError,
        Request,
    )

    topo = read_host(*host_tree("dgx-h100"))
    # a hand-made domain holds GPU0's NIC without its GPU
    state = _state(topo, [Holding(name="by-hand", nics=("0000:18:00.0",))])
    with pytest.raises(PlacementError, match="held whole by by-hand"):
        state.place(Request("x", gpus=1, gpu_index=0, nics="auto"))
    placed = state.place(Request("y", gpus=1, gpu_index=1, nics="auto"))
    # held outside placement (by hand, or in a GPU's IOMMU group): taken all the same
    other = _state(topo, [Holding(name="by-hand", extra_nics=("0000:40:00.0",))])
    with pytest.raises(PlacementError, match="held whole by by-hand"):
        other.place(Request("z", gpus=1, gpu_index=1, nics="auto"))
    assert placed.nics == ("0000:40:00.0",)
    # without gpu_index, a VM whose first-choice GPU has its rail held takes the next GPU whose
    # rail is free, instead of failing
    plain = _state(topo, [Holding(name="by-hand", nics=("0000:18:00.0",))])
    assert plain.place(Request("v", gpus=1)).gpus == ("0000:1b:00.0",)  # no nics: first choice
    plain.release("v")
    free = plain.place(Request("w", gpus=1, nics="auto"))
    assert free.gpus != ("0000:1b:00.0",) and free.nics and "0000:18:00.0" not in free.nics
    # when no GPU's rails can be had, the first choice's reason is given
    every = _state(topo, [Holding(name="by-hand", nics=tuple(
        n.bdf for n in classify(topo, host_gpus(topo)) if n.offered))])
    with pytest.raises(PlacementError, match=r"request 'u' \(1 GPU\): nics: rail NIC "
                                             r"0000:18:00.0 .* held whole by by-hand"):
        every.place(Request("u", gpus=1, nics="auto"))
    # node 0's CPUs all pinned, node 1's rails all held: the rails are what to change, and the
    # error says so (not "lower vcpus/memory")
    node0 = [n for n in topo.numa_nodes if n.id == 0][0]
    node1_gpus = [g.bdf for g in host_gpus(topo) if g.numa_node == 1]
    hog = Holding(name="hog", cpus=tuple(node0.cpus), numa_nodes=(0,))
    rails1 = Holding(name="by-hand", nics=tuple(
        n.bdf for n in classify(topo, host_gpus(topo)) if set(n.rail_gpus) & set(node1_gpus)))
    with pytest.raises(PlacementError, match=r"request 't' \(1 GPU\): nics: rail NIC .* held "
                                             r"whole by by-hand"):
        _state(topo, [hog, rails1]).place(Request("t", gpus=1, vcpus=4, nics="auto"))


# --- ACS and ATS for GPUDirect RDMA ---------------------------------------------------------

def _rdma(topo):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import gpudirect_rdma

    return {r["nic"]: r for r in gpudirect_rdma(topo, classify(topo, host_gpus(topo)))}


def test_gpudirect_rdma_readiness_reads_acs_and_ats_from_config_space(host_tree):
    h100 = _rdma(read_host(*host_tree("dgx-h100")))
    assert len(h100) == 8 and all(r["ready"] for r in h100.values())
    first = h100["0000:18:00.0"]
    assert first["ats"] == {"0000:18:00.0": "enabled", "0000:1b:00.0": "enabled"}
    # the two downstream ports of the GPU's switch, one above the NIC and one above the GPU
    assert [(p["bdf"], p["acs"], p["redirects_p2p"]) for p in first["ports"]] == [
        ("0000:17:00.0", "RR CR DT", False), ("0000:17:03.0", "RR CR DT", False)]
    a100 = _rdma(read_host(*host_tree("dgx-a100")))["0000:05:00.0"]
    assert not a100["ready"]
    assert a100["ats"] == {"0000:05:00.0": "absent", "0000:07:00.0": "enabled"}
    assert a100["why"] == [
        "NIC 0000:05:00.0 has no ATS capability (ConnectX: mlxconfig -d 0000:05:00.0 set "
        "ATS_ENABLED=true, then a cold reset)",
        "switch port 0000:04:00.0 redirects peer-to-peer requests to the root complex (ACS RR "
        "without DT): set Direct Translated P2P (DT) on it",
        "switch port 0000:04:02.0 redirects peer-to-peer requests to the root complex (ACS RR "
        "without DT): set Direct Translated P2P (DT) on it"]


def test_config_space_read_without_root_is_unknown_not_absent(fresh_host_tree):
    sysfs_root, proc_root = fresh_host_tree("dgx-h100")
    for bdf in ("0000:18:00.0", "0000:17:00.0"):
        path = os.path.join(sysfs_root, "bus", "pci", "devices", bdf, "config")
        with open(path, "rb") as handle:
            head = handle.read(64)  # what a user other than root reads
        with open(path, "wb") as handle:
            handle.write(head)
    report = _rdma(read_host(sysfs_root, proc_root))["0000:18:00.0"]
    assert report["ats"]["0000:18:00.0"] == "unknown"
    assert report["ports"][0] == {"bdf": "0000:17:00.0", "acs": "unknown", "redirects_p2p": None}
    assert not report["ready"] and "run gpu_topology as root" in report["why"][0]


def test_parse_ext_caps_walks_the_list_and_stops_on_loops():
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._topology import parse_ext_caps

    cfg = bytearray(4096)
    cfg[0x100:0x104] = (0x0001 | 1 << 16 | 0x140 << 20).to_bytes(4, "little")  # AER first
    cfg[0x140:0x144] = (0x000F | 1 << 16 | 0x160 << 20).to_bytes(4, "little")  # ATS
    cfg[0x146:0x148] = (0x8000).to_bytes(2, "little")
    cfg[0x160:0x164] = (0x000D | 1 << 16 | 0x100 << 20).to_bytes(4, "little")  # ACS, loops back
    cfg[0x166:0x168] = (0x005D).to_bytes(2, "little")
    caps = parse_ext_caps(bytes(cfg))
    assert (caps.readable, caps.acs_ctrl, caps.ats_ctrl) == (True, 0x5D, 0x8000)
    assert not parse_ext_caps(bytes(256)).readable
    assert parse_ext_caps(bytes(4096)).acs_ctrl is None


def test_a_vf_stays_with_its_vm_when_others_come_and_go(host_tree):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import Request

    topo = read_host(*host_tree("dgx2"))
    state = _state(topo)
    a = state.place(Request("a", gpus=1, gpu_index=0, nics="auto"))
    b = state.place(Request("b", gpus=1, gpu_index=1, nics="auto"))
    assert (a.nics, b.nics) == (("0000:35:00.1",), ("0000:35:00.2",))
    state.release("a")
    again = state.place(Request("b", gpus=1, gpu_index=1, vcpus=6, memory_mb=8192, nics="auto"))
    assert again.nics == ("0000:35:00.2",) and again.vcpus == 6


def test_a_rail_that_cannot_be_had_gives_way_to_the_next(host_tree):
    topo = read_host(*host_tree("dgx-h100"))
    quad = _bdfs("1b 43 52 61")
    got = _choose(topo, quad, count=1, held={"0000:18:00.0": "other"})
    assert [c.bdf for c in got] == ["0000:40:00.0"]


def test_auto_fails_for_gpus_without_a_rail_unless_fewer_are_allowed(host_tree, fresh_host_tree):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import NicChoiceError

    sysfs_root, proc_root = fresh_host_tree("dgx-h100")
    # the host runs an IPoIB child interface on GPU0's rail
    net = os.path.join(sysfs_root, "bus", "pci", "devices", "0000:18:00.0", "net", "ibp24s0")
    upper = os.path.join(net, "upper_ibp24s0.8001")
    os.symlink("../../../../../../virtual/net/ibp24s0.8001", upper)
    with open(os.path.join(proc_root, "net", "route"), "a") as handle:
        handle.write("ibp24s0.8001\t0000A8C0\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n")
    topo = read_host(sysfs_root, proc_root)
    nic = _rails(topo)["0000:18:00.0"]
    assert nic.host_use == ("ibp24s0 has ibp24s0.8001 on it (which carries the host's route "
                            "192.168.0.0/16)")
    with pytest.raises(NicChoiceError, match=r"nics: auto asked, but GPU\(s\) 0000:1b:00.0 have "
                                             r"0 rail NIC\(s\) .*ask nics: 0"):
        _choose(topo, _bdfs("1b"))
    assert _choose(topo, _bdfs("1b"), allow_fewer=True) == []


# --- what a platform file says of its NICs ------------------------------------------------------

def test_a_platform_names_its_rails_and_the_topology_still_decides(host_tree):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import platform_warnings
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._platform_data import (
        platform_from_dict,
    )

    topo = read_host(*host_tree("dgx-h100"))
    platform = platform_from_dict({"base": "dgx-h100", "rail_nics": [
        "18:00.0", "0000:40:00.0", "0000:01:00.0"]}, "test.yml")
    assert platform.rail_nics == ("0000:01:00.0", "0000:18:00.0", "0000:40:00.0")
    nics = classify(topo, host_gpus(topo), platform)
    assert [n.bdf for n in nics if n.offered] == ["0000:18:00.0", "0000:40:00.0"]
    assert platform_warnings(topo, host_gpus(topo), nics, platform) == [
        "platform dgx-h100 names rail NIC 0000:01:00.0, which is no NIC of this host (its "
        "nic_ids and nic_classes, or the built-in ConnectX / BlueField list); it is not offered"]
    # the platform's data survives the trip through placement_state (the fleet planner's copy)
    again = platform_from_dict(platform.to_dict(), "facts")
    assert (again.rail_nics, again.nic_ids, again.nic_classes) == (
        platform.rail_nics, platform.nic_ids, platform.nic_classes)


def test_a_platform_file_may_count_other_nics_and_name_a_non_rail(host_tree):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import platform_warnings
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._platform_data import (
        platform_from_dict,
    )
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import PlatformError

    topo = read_host(*host_tree("dgx2"))
    # the onboard X550 (8086:1563) counted as a NIC: it is no GPU's rail, and it is the host's
    platform = platform_from_dict({"base": "dgx2", "nic_ids": ["8086:1563"],
                                   "rail_nics": ["0000:01:00.0"]}, "lab.yml")
    nics = classify(topo, host_gpus(topo), platform)
    assert [n.bdf for n in nics] == ["0000:01:00.0", "0000:01:00.1"]
    assert not any(n.offered for n in nics)
    assert nics[0].host_use == "enp1s0f0 carries the host's default route; enp1s0f0 carries " \
        "the host's route 10.33.0.0/24"
    assert platform_warnings(topo, host_gpus(topo), nics, platform) == [
        "platform dgx2 names rail NIC 0000:01:00.0, but it shares no PCIe switch with a GPU "
        "(the nearest is NODE); rails come from the topology, so it is not offered"]
    with pytest.raises(PlatformError, match="rail_nics: "):
        platform_from_dict({"base": "dgx2", "rail_nics": ["not-a-bdf"]}, "bad.yml")
    with pytest.raises(PlatformError, match="rail_nics must be a list"):
        platform_from_dict({"base": "dgx2", "rail_nics": "0000:35:00.0"}, "bad.yml")


def test_a_nic_in_a_gpus_iommu_group_goes_with_the_gpu(tmp_path):
    # a board without ACS between a GPU and its NIC: one IOMMU group, which vfio gives one VM
    from ansible_collections.gpuvirt.kvm.plugins.module_utils import _fleet_plan
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import (
        Holding,
        PlacementError,
        Request,
    )

    devices = [{"bdf": "03:00.0", "model": "a100-sxm4-80gb", "iommu_group": "g"},
               {"bdf": "04:00.0", "model": "mellanox-cx7", "iommu_group": "g"},
               "05:00.0 a100-sxm4-80gb", "06:00.0 mellanox-cx7"]
    topo = read_host(*sysfs_builder.build(_host(devices), str(tmp_path)))
    state = _state(topo)
    assert state.model.gpu_group_nics == {"0000:03:00.0": ("0000:04:00.0",)}
    # a VM held the NIC: the GPU in its group is not free, and another GPU is taken instead
    held = _state(topo, [Holding(name="by-hand", nics=("0000:04:00.0",))])
    with pytest.raises(PlacementError, match=r"GPU 0000:03:00.0 shares its IOMMU group with NIC "
                                             r"function 0000:04:00.0, which by-hand holds"):
        held.place(Request("pinned", gpus=1, gpu_index=0))
    assert held.place(Request("any", gpus=1)).gpus == ("0000:05:00.0",)
    # the VM that gets the GPU holds the NIC with it (counted as taken), and frees it with it
    first = state.place(Request("c", gpus=1, gpu_index=0))
    assert first.gpus == ("0000:03:00.0",) and first.nics == ()
    assert state.nic_holder["0000:04:00.0"] == "c"
    assert state.allocations["c"].extra_nics == ("0000:04:00.0",)
    assert state.place(Request("d", gpus=1, nics="auto")).nics == ("0000:06:00.0",)
    state.release("c")
    assert "0000:04:00.0" not in state.nic_holder
    # the fleet planner reads the same from the facts
    facts = build(topo, state.model.platform, "test", [], [])
    assert facts["placement_state"]["gpu_group_nics"] == {"0000:03:00.0": ["0000:04:00.0"]}
    rebuilt = _fleet_plan.StateBuilder().state("h", json.loads(json.dumps(facts)))
    assert rebuilt.model.gpu_group_nics == state.model.gpu_group_nics
    out = _fleet_plan.fleet_plan({"h": facts}, [{"name": "by-hand-gpu", "gpus": 1, "gpu_index": 0},
                                                {"name": "rail", "gpus": 1, "nics": "auto"}])
    assert out["by_name"]["by-hand-gpu"]["gpus"] == ["0000:03:00.0"]
    assert out["by_name"]["rail"]["gpus"] == ["0000:05:00.0"]
    assert out["by_name"]["rail"]["nics"] == ["0000:06:00.0"]

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""kvm_host_nics: what the kvm_host role binds and creates for rail NICs, on the fixture hosts'
gpu_topology ``nics``, and gpuvirt-sriov's check mode on their sysfs trees."""

from __future__ import annotations

import os
import subprocess

import pytest

import sysfs_builder
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_facts import build
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_nics import host_nic_plan, vf_bdf
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import detect, host_gpus
from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_host

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))
SRIOV = os.path.join(ROOT, "roles", "kvm_host", "files", "gpuvirt-sriov")


def _nics(sysfs, proc, domains=()):
    topo = read_host(sysfs, proc)
    platform, reason = detect(topo)
    return build(topo, platform, reason, list(domains), [])["nics"]


def _one(problems, *words):
    assert len(problems) == 1, problems
    for word in words:
        assert word in problems[0], problems[0]


def test_vf_addresses_follow_the_kernel(host_tree):
    # offset 1, stride 1: functions 1-7 of the PF's slot, then the next slots (ARI)
    assert vf_bdf("0000:18:00.0", 1, 1, 0) == "0000:18:00.1"
    assert vf_bdf("0000:18:00.0", 1, 1, 7) == "0000:18:01.0"
    assert vf_bdf("0000:18:00.0", 2, 2, 3) == "0000:18:01.0"
    # the fixture tree's VFs are where the kernel would put them
    nics = _nics(*host_tree("dgx2"))
    for nic in nics:
        sriov = nic["sriov"]
        got = [vf["bdf"] for vf in sriov["vfs"]]
        offset, stride = sriov["offset"], sriov["stride"]
        assert got == [vf_bdf(nic["bdf"], offset, stride, n) for n in range(len(got))]


def test_vfs_on_h100_rails_and_a_whole_function(host_tree):
    nics = _nics(*host_tree("dgx-h100"))
    plan = host_nic_plan([
        {"nic": "ibp24s0", "vfs": 9, "vf_settings": [
            {"node_guid": "0C:42:A1:03:00:24:00:01", "port_guid": "0c:42:a1:03:00:24:01:01"}]},
        {"nic": "mlx5_1"},
    ], nics)
    assert plan["problems"] == []
    first, second = plan["nics"]
    assert first["bdf"] == "0000:18:00.0" and first["vfs"] == 9 and first["numvfs_now"] == 0
    assert first["vf_bdfs"][0] == "0000:18:00.1" and first["vf_bdfs"][-1] == "0000:18:01.1"
    assert first["bind"] == first["vf_bdfs"]
    assert first["conf"] == [
        "pf 0000:18:00.0 9",
        "vf 0000:18:00.0 0 node_guid=0c:42:a1:03:00:24:00:01 port_guid=0c:42:a1:03:00:24:01:01"]
    # the whole function: bound itself, no VFs, nothing for gpuvirt-sriov
    assert second["bdf"] == "0000:40:00.0" and second["bind"] == ["0000:40:00.0"]
    assert second["conf"] == []
    assert plan["bind"] == sorted(first["vf_bdfs"] + ["0000:40:00.0"])
    assert plan["vfs"] == sorted(first["vf_bdfs"])
    assert "pf 0000:18:00.0 9\n" in plan["conf"] and plan["conf"].startswith("# Managed by")
    assert plan["record"] == {
        "0000:18:00.0": {"vfs": 9, "numvfs_before": 0, "name": "ibp24s0"},
        "0000:40:00.0": {"vfs": 0, "numvfs_before": 0, "name": "mlx5_1"}}
    assert plan["dropped"] == [] and plan["release"] == []
    # the role makes all 9 VFs: they are not recorded with a driver to go back to
    assert plan["made_vfs"] == first["vf_bdfs"]


def test_next_runs_find_a_whole_function_by_its_name_and_give_it_back(host_tree):
    nics = _nics(*host_tree("dgx-h100"))
    first = host_nic_plan([{"nic": "mlx5_1"}], nics)
    # on vfio-pci the function has no interface or RDMA device left: the record names it
    gone = [dict(n, netdevs=[], rdma_devices=[], driver="vfio-pci") if n["bdf"] == "0000:40:00.0"
            else n for n in nics]
    again = host_nic_plan([{"nic": "mlx5_1"}], gone, recorded=first["record"])
    assert again["problems"] == [] and again["bind"] == ["0000:40:00.0"]
    # taken out of the list, or given VFs instead: back to its driver first, no count to revert
    dropped = host_nic_plan([], gone, recorded=first["record"])
    assert dropped["release"] == ["0000:40:00.0"] and dropped["dropped"] == []
    to_vfs = host_nic_plan([{"nic": "mlx5_1", "vfs": 2}], gone, recorded=first["record"])
    assert to_vfs["problems"] == [] and to_vfs["release"] == ["0000:40:00.0"]
    # a function on vfio-pci that this role did not put there is not touched
    theirs = host_nic_plan([{"nic": "0000:40:00.0", "vfs": 2}], gone)
    _one(theirs["problems"], "is on vfio-pci, but not by this role")


def test_existing_vfs_are_taken_as_they_are_and_kept_on_revert(host_tree):
    nics = _nics(*host_tree("dgx2"))
    plan = host_nic_plan([{"nic": "0000:35:00.0", "vfs": 2}], nics)
    assert plan["problems"] == []
    assert plan["nics"][0]["vf_bdfs"] == ["0000:35:00.1", "0000:35:00.2"]
    assert plan["record"]["0000:35:00.0"] == {"vfs": 2, "numvfs_before": 2, "name": "0000:35:00.0"}
    # the host's VFs: recorded with their driver like any function, not made by the role
    assert plan["made_vfs"] == []
    # their count stays theirs, even once recorded
    more = host_nic_plan([{"nic": "0000:35:00.0", "vfs": 4}], nics, recorded=plan["record"])
    _one(more["problems"], "has 2 VF(s) that this role did not make")
    # taken out of the list: nothing to give back, the 2 from before stay
    again = host_nic_plan([], nics, recorded=plan["record"])
    assert again["problems"] == [] and again["dropped"] == [] and again["release"] == []
    assert again["record"] == {}


def test_a_count_of_vfs_the_role_did_not_make_is_not_changed(host_tree):
    nics = _nics(*host_tree("dgx2"))
    plan = host_nic_plan([{"nic": "ibp53s0", "vfs": 4}], nics)
    _one(plan["problems"], "kvm_host_nics[0] (ibp53s0)",
         "0000:35:00.0 has 2 VF(s) that this role did not make", "Set vfs: 2")
    # once the role made them (its record says so), the count may change
    ours = host_nic_plan([{"nic": "ibp53s0", "vfs": 4}], nics,
                         recorded={"0000:35:00.0": {"vfs": 2, "numvfs_before": 0}})
    assert ours["problems"] == [] and ours["nics"][0]["conf"] == ["pf 0000:35:00.0 4"]
    assert ours["record"]["0000:35:00.0"] == {"vfs": 4, "numvfs_before": 0, "name": "ibp53s0"}
    # taken out of the list: back to the 0 from before
    dropped = host_nic_plan([], nics, recorded={"0000:35:00.0": {"vfs": 2, "numvfs_before": 0}})
    assert dropped["dropped"] == ["0000:35:00.0=0"]
    # and back to the whole function: 0 VFs
    whole = host_nic_plan([{"nic": "ibp53s0", "vfs": 0}], nics,
                          recorded={"0000:35:00.0": {"vfs": 2, "numvfs_before": 0}})
    assert whole["problems"] == [] and whole["nics"][0]["conf"] == ["pf 0000:35:00.0 0"]
    assert whole["nics"][0]["bind"] == ["0000:35:00.0"]


class _Dom:
    name, active, managed, metadata = "tenant-1", True, True, {}
    hostdevs = ("0000:34:00.0", "0000:35:00.1")
    pinned_cpus, cpuset, numa_nodes, memory_kib, cpu_policy = (2,), (2,), (0,), 1 << 20, "dedicated"


def test_vfs_a_vm_holds_are_never_removed(host_tree):
    nics = _nics(*host_tree("dgx2"), domains=[_Dom()])
    recorded = {"0000:35:00.0": {"vfs": 2, "numvfs_before": 0}}
    plan = host_nic_plan([{"nic": "ibp53s0", "vfs": 4}], nics, recorded=recorded)
    _one(plan["problems"], "VM(s) tenant-1 hold 0000:35:00.1", "remove those VMs first")
    dropped = host_nic_plan([], nics, recorded=recorded)
    _one(dropped["problems"], "0000:35:00.0 is no longer listed", "tenant-1")


def test_the_host_nic_is_refused(host_tree):
    nics = _nics(*host_tree("dgx-a100"))
    for entry in ({"nic": "enp35s0f0np0"}, {"nic": "0000:23:00.1", "vfs": 0}):
        plan = host_nic_plan([entry], nics)
        _one(plan["problems"], "is the host's own", "default route",
             "Leave it out of kvm_host_nics")
    # a NIC that is no model the collection offers (the X550 with the default route on DGX-2)
    plan = host_nic_plan([{"nic": "enp1s0f0"}], _nics(*host_tree("dgx2")))
    _one(plan["problems"], "no NIC of a model the collection offers is named enp1s0f0",
         "0000:35:00.0 (ibp53s0)")


@pytest.mark.parametrize("entry, words", [
    ({"nic": "ibp24s0", "vfs": 17},
     ["vfs 17 is more than 0000:18:00.0 offers (sriov_totalvfs 16)"]),
    ({"nic": "ibp24s0", "vfs": -1}, ["vfs -1 is not a count"]),
    ({"nic": "ibp24s0", "vfs": 1, "vf_settings": [{"mac": "52:54:00:00:00:01"}]},
     ["mac is only for Ethernet VFs", "node_guid, port_guid"]),
    ({"nic": "ibp24s0", "vfs": 1, "vf_settings": [{"node_guid": "0c:42"}]},
     ["node_guid '0c:42' is not a GUID"]),
    ({"nic": "ibp24s0", "vfs": 1, "vf_settings": [{}, {}]},
     ["vf_settings has 2 entries for 1 VF(s)"]),
    ({"nic": "ibp24s0", "vfs": 1, "vf_settings": [{"speed": 1}]}, ["speed is not a setting"]),
    ({"nic": "ibp24s0", "vfz": 1}, ["unknown key(s) vfz"]),
    ({"vfs": 1}, ["kvm_host_nics[0]: each entry is a mapping with nic"]),
    # YAML 1.1 reads an unquoted 0000:18:00.0 as a base-60 number
    ({"nic": 2400.0}, ["nic is the number 2400.0, not text", "quote it"]),
])
def test_bad_entries_name_the_option(host_tree, entry, words):
    plan = host_nic_plan([entry], _nics(*host_tree("dgx-h100")))
    _one(plan["problems"], *words)


def _switch_host(tmp_path, nics, others=()):
    """A switch with a GPU (03:00.0) on one port and ``nics`` (fixture devices) on another;
    ``others`` on root ports of their own."""
    host = {
        "name": "nics", "cpu": {"sockets": 1, "cores_per_socket": 4, "threads_per_core": 1},
        "numa": {"memory_gib": 8}, "iommu": {"enabled": True},
        "pci": [{"host_bridge": "0000:00", "node": 0, "devices": [
            "00:00.0 intel-skx-host-bridge",
            {"bdf": "00:01.0", "model": "intel-skx-root-port", "children": [
                {"bdf": "01:00.0", "model": "plx-pex9797-usp", "children": [
                    {"bdf": "02:00.0", "model": "plx-pex9797-port",
                     "children": ["03:00.0 a100-sxm4-80gb"]},
                    {"bdf": "02:01.0", "model": "plx-pex9797-port", "children": list(nics)}]}]},
        ] + [{"bdf": "00:%02x.0" % (2 + n), "model": "intel-skx-root-port", "children": [dev]}
             for n, dev in enumerate(others)]}],
    }
    return sysfs_builder.build(host, str(tmp_path))


def _ethernet_host(tmp_path):
    """A switch with a GPU and a ConnectX-6 Dx with SR-IOV (Ethernet), and on a root port of its
    own a ConnectX-6 Dx without SR-IOV."""
    return _switch_host(tmp_path, [
        {"bdf": "04:00.0", "model": "mellanox-cx6dx", "netdev": "enp4s0f0np0",
         "sriov": {"totalvfs": 8, "numvfs": 0, "vf_device": 0x101e}}],
        others=[{"bdf": "20:00.0", "model": "mellanox-cx6dx", "netdev": "enp32s0f0np0"}])


def test_ethernet_vf_settings_and_no_sriov(tmp_path):
    nics = _nics(*_ethernet_host(tmp_path))
    plan = host_nic_plan([{"nic": "enp4s0f0np0", "vfs": 2, "vf_settings": [
        {"mac": "52:54:00:AA:00:01", "vlan": 100, "spoofchk": "yes"},
        {"mac": "52:54:00:aa:00:02", "spoofchk": False}]}], nics)
    assert plan["problems"] == []
    assert plan["nics"][0]["link_layer"] == "Ethernet"
    assert plan["nics"][0]["conf"] == [
        "pf 0000:04:00.0 2",
        "vf 0000:04:00.0 0 mac=52:54:00:aa:00:01 vlan=100 spoofchk=on",
        "vf 0000:04:00.0 1 mac=52:54:00:aa:00:02 spoofchk=off"]
    for settings, words in [
        ({"mac": "01:00:5e:00:00:01"}, "is not a unicast MAC address"),
        ({"vlan": 4095}, "vlan 4095 is not a VLAN ID"),
        ({"spoofchk": "maybe"}, "spoofchk 'maybe' is not true or false"),
        ({"node_guid": "0c:42:a1:03:00:24:00:01"}, "node_guid is only for InfiniBand VFs"),
    ]:
        bad = host_nic_plan([{"nic": "0000:04:00.0", "vfs": 1, "vf_settings": [settings]}], nics)
        _one(bad["problems"], words)
    twice = host_nic_plan([{"nic": "0000:04:00.0", "vfs": 2, "vf_settings": [
        {"mac": "52:54:00:aa:00:01"}, {"mac": "52:54:00:AA:00:01"}]}], nics)
    _one(twice["problems"], "mac 52:54:00:aa:00:01 is given twice")
    no_sriov = host_nic_plan([{"nic": "enp32s0f0np0", "vfs": 2}], nics)
    _one(no_sriov["problems"], "0000:20:00.0 has no SR-IOV capability", "set vfs: 0")
    # the same NIC twice, by two names
    dup = host_nic_plan([{"nic": "enp32s0f0np0"}, {"nic": "20:00.0"}], nics)
    _one(dup["problems"], "0000:20:00.0 is named twice")


def _sriov(*args):
    return subprocess.run(["bash", SRIOV] + list(args), capture_output=True, text=True, check=False)


def test_gpuvirt_sriov_check_mode_on_a_fixture_tree(host_tree):
    sysfs, _proc = host_tree("dgx2")
    out = _sriov("--sysfs", sysfs, "--check", "apply", "pf 0000:35:00.0 2", "pf 0000:3a:00.0 4",
                 "vf 0000:3a:00.0 0 node_guid=0c:42:a1:03:00:24:00:01")
    assert out.returncode == 0, out.stderr
    # 35:00.0 has its 2 VFs: nothing to do; 3a:00.0 gets 4 (0 first), and its VF 0 its GUID
    assert out.stdout.splitlines() == [
        "would set 0000:3a:00.0 to 4 VF(s) (now 2)",
        "would set VF 0 of 0000:3a:00.0: node_guid=0c:42:a1:03:00:24:00:01"]
    too_many = _sriov("--sysfs", sysfs, "--check", "apply", "pf 0000:35:00.0 9")
    assert too_many.returncode == 2 and "9 VFs asked, sriov_totalvfs is 8" in too_many.stderr
    revert = _sriov("--sysfs", sysfs, "--check", "revert", "0000:35:00.0=0", "0000:3a:00.0=2")
    assert revert.returncode == 0, revert.stderr
    # the count from before, and the kernel's default for probing VFs, whatever the count
    assert revert.stdout.splitlines() == [
        "would set 0000:35:00.0 to 0 VF(s) (now 2)",
        "would let drivers probe 0000:35:00.0's VFs again (sriov_drivers_autoprobe 1)",
        "would let drivers probe 0000:3a:00.0's VFs again (sriov_drivers_autoprobe 1)"]
    # a function without SR-IOV (the X550) has no count to give back: nothing to do
    plain = _sriov("--sysfs", sysfs, "--check", "revert", "0000:01:00.0=0")
    assert plain.returncode == 0 and plain.stdout == ""
    # a fixture tree is for --check only; a real run changes this machine's own /sys
    refused = _sriov("--sysfs", sysfs, "apply", "pf 0000:35:00.0 2")
    assert refused.returncode == 1 and "--sysfs is for --check only" in refused.stderr
    garbled = _sriov("--sysfs", sysfs, "--check", "apply", "pf 35:00.0 x")
    assert garbled.returncode == 2 and "not understood" in garbled.stderr


def test_vfs_in_their_pfs_iommu_group_are_not_offered(tmp_path):
    # an endpoint without ACS: the kernel puts its VFs in the PF's group (the lab's NVMe)
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import (
        NicChoiceError,
        choose_nics,
        classify,
    )
    tree = _switch_host(tmp_path, [
        {"bdf": "04:00.0", "model": "mellanox-cx6dx", "netdev": "enp4s0f0np0",
         "sriov": {"totalvfs": 2, "numvfs": 2, "vf_device": 0x101e, "vf_group": "pf"}}])
    topo = read_host(*tree)
    assert topo.pci["0000:04:00.1"].iommu_group == topo.pci["0000:04:00.0"].iommu_group
    gpus = ["0000:03:00.0"]
    nics = classify(topo, host_gpus(topo))
    with pytest.raises(NicChoiceError, match="share their IOMMU group with 0000:04:00.0"):
        choose_nics(nics, gpus, {}, count=1, mode="vf")


def test_a_dual_function_nic_without_acs_goes_whole_when_both_are_listed(tmp_path):
    tree = _switch_host(tmp_path, [
        {"bdf": "04:00.%d" % f, "model": "mellanox-cx6dx", "netdev": "enp4s0f%dnp%d" % (f, f),
         "iommu_group": "cx"} for f in (0, 1)])
    nics = _nics(*tree)
    one = host_nic_plan([{"nic": "enp4s0f0np0"}], nics)
    _one(one["problems"], "shares IOMMU group", "with 0000:04:00.1",
         "list those functions with vfs: 0 as well")
    both = host_nic_plan([{"nic": "enp4s0f0np0"}, {"nic": "enp4s0f1np1"}], nics)
    assert both["problems"] == [] and both["bind"] == ["0000:04:00.0", "0000:04:00.1"]
    # unquoted MACs are base-60 numbers to YAML 1.1 too
    sriov = [dict(n, sriov={"totalvfs": 4, "numvfs": 0, "offset": 8, "stride": 1, "vfs": []})
             for n in nics]
    bad = host_nic_plan([{"nic": "enp4s0f0np0", "vfs": 1, "vf_settings": [{"mac": 123456}]}],
                        sriov)
    _one(bad["problems"], "mac is the number 123456")
    # where the VFs will be is read from sysfs, never guessed
    unknown = [dict(n, sriov={"totalvfs": 4, "numvfs": 0, "offset": 0, "stride": 0, "vfs": []})
               for n in nics]
    guess = host_nic_plan([{"nic": "enp4s0f0np0", "vfs": 1}], unknown)
    _one(guess["problems"], "does not say where its VFs will be (sriov_offset 0")
    placed = host_nic_plan([{"nic": "enp4s0f0np0", "vfs": 2}], sriov)
    assert placed["nics"][0]["vf_bdfs"] == ["0000:04:01.0", "0000:04:01.1"]

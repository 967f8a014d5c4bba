# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The filters behind the guest_image and gpu_vms roles and the fleet report."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.gpuvirt.kvm.plugins.filter.fleet_summary import fleet_summary
from ansible_collections.gpuvirt.kvm.plugins.filter.image_entry_problems import (
    image_entry_problems,
)
from ansible_collections.gpuvirt.kvm.plugins.filter.image_prune_candidates import (
    image_prune_candidates,
    version_key,
)
from ansible_collections.gpuvirt.kvm.plugins.filter.layout_report import layout_report

SHA = "sha256:" + "a" * 64


# --- image_entry_problems ----------------------------------------------------------------------

def test_good_entries_have_no_problem():
    assert image_entry_problems([
        {"name": "dgx-os", "version": "6.2", "src": "https://m/x.qcow2", "checksum": SHA,
         "default": True},
        {"name": "dgx-kvm-image", "version": "4-0-5", "package": "dgx-kvm-image-4-0-5"},
    ]) == []


@pytest.mark.parametrize("entry, words", [
    ({"name": "a", "version": "1", "src": "/x.qcow2"},
     "guest_image_images[0] (a 1): checksum is missing"),
    ({"name": "a", "version": "1", "src": "/x", "checksum": "md5:00"}, "is not sha256:<64 hex>"),
    ({"name": "a", "src": "/x", "checksum": SHA}, "guest_image_images[0]: version is missing"),
    ({"name": "a", "version": "1"}, "give exactly one of src (a path or URL) and package"),
    ({"name": "a", "version": "1", "package": "p", "src": "/x", "checksum": SHA}, "exactly one"),
    ({"name": "a", "version": "1", "package": "p", "sum": 1}, "unknown key(s) sum"),
    ("dgx-os", "expected a dict"),
])
def test_bad_entries_are_named(entry, words):
    problems = image_entry_problems([entry])
    assert any(words in p for p in problems), problems


def test_twice_and_two_defaults():
    entry = {"name": "a", "version": "1", "package": "p", "default": True}
    problems = image_entry_problems([entry, entry, dict(entry, version="2")])
    assert "guest_image_images[1] (a 1): listed twice (also guest_image_images[0])" in problems
    assert any("default: true on several versions (1, 1, 2)" in p for p in problems)


# --- image_prune_candidates --------------------------------------------------------------------

def img(version, name="os", **kw):
    return dict({"name": name, "version": version, "ref": "%s-%s" % (name, version),
                 "is_default": False, "used_by": [], "base_of": []}, **kw)


def test_versions_compare_as_numbers():
    assert sorted(["4-0-9", "4-0-10", "4-0", "4-1"], key=version_key) == \
        ["4-0", "4-0-9", "4-0-10", "4-1"]


def test_prune_keeps_newest_default_used_and_listed():
    store = [img("1"), img("2", used_by=["vm-a"]), img("3", is_default=True), img("4"),
             img("5"), img("6"), img("10"), img("1", name="other")]
    listed = [{"name": "os", "version": "4"}]
    out = image_prune_candidates(store, 2, listed)
    # newest two are 10 and 6; 4 listed, 3 default, 2 used: 5 and 1 go; "other" is not ours.
    assert [i["ref"] for i in out] == ["os-1", "os-5"]
    assert [i["ref"] for i in image_prune_candidates(store, 0, listed)] == \
        ["os-1", "os-5", "os-6", "os-10"]
    with pytest.raises(AnsibleFilterError, match="keep must be 0 or more"):
        image_prune_candidates(store, -1, listed)


# --- layout_report -----------------------------------------------------------------------------

TOPO = {
    "gpus": [{"bdf": "0000:34:00.0", "index": 0, "healthy": True, "allocated_to": "a"},
             {"bdf": "0000:36:00.0", "index": 1, "healthy": False, "allocated_to": None}],
    "allocations": [{"name": "a", "active": True, "managed": True, "gpus": ["0000:34:00.0"]},
                    {"name": "b", "active": False, "managed": True, "gpus": []},
                    {"name": "theirs", "active": True, "managed": False, "gpus": []}],
    "free_blocks": {"1": 0},
    "versions": {"collection": "0.1.0", "kernel": "5.15.0-1042-nvidia", "libvirt": "9.0.0",
                 "qemu": "7.2.12", "ovmf": None, "nvidia_driver": None,
                 "nvidia_driver_loaded": False, "fabric_manager": None},
}


def test_report_desired_vs_actual():
    vms = [{"name": "a", "gpus": 1}, {"name": "b", "state": "present"},
           {"name": "c", "state": "running"}]
    result = {"changed": True, "actions": ["a: define a"], "removed": ["old"],
              "vms": [{"vm": {"name": "a"}}, {"vm": {"name": "b"}},
                      {"vm": {"name": "c"}, "error": "c: no free 1-GPU block"}]}
    report = layout_report(vms, result, TOPO, host="h", layout="day")
    by = {d["name"]: d for d in report["desired"]}
    assert by["a"] == {"name": "a", "gpus": 1, "state": "running", "actual": "running",
                       "gpu_indexes": [0], "nics": [], "matches": True, "error": None}
    assert by["b"]["actual"] == "stopped" and by["b"]["matches"]
    assert by["c"]["actual"] == "absent" and not by["c"]["matches"]
    assert report["failed"] == [{"name": "c", "error": "c: no free 1-GPU block"}]
    assert not report["ok"] and report["removed"] == ["old"]
    assert report["others"] == [{"name": "theirs", "managed": False, "active": True, "gpus": 0}]
    assert report["degraded_gpus"] == [{"bdf": "0000:36:00.0", "index": 1, "allocated_to": None}]


def test_report_of_a_module_failure():
    # failed_when: false clears .failed: the module's msg without vms is the failure.
    report = layout_report([{"name": "a"}], {"changed": False, "msg": "cannot connect"}, TOPO)
    assert report["failed"] == [{"name": None, "error": "cannot connect"}] and not report["ok"]
    with pytest.raises(AnsibleFilterError, match="expected the layout's VMs"):
        layout_report([{"gpus": 1}], {}, TOPO)


# --- fleet_summary -----------------------------------------------------------------------------

def test_fleet_summary_lists_every_host():
    good = layout_report([{"name": "a", "gpus": 1}], {"vms": [{"vm": {"name": "a"}}],
                                                      "changed": True}, TOPO, "h1", "night")
    hostvars = {
        "h1": {"gpu_vms_report": good},
        "h2": {"gpuvirt_host_error": "gpu_vms: layout 'night' cannot be converged on h2: x"},
        "h3": {},
    }
    out = fleet_summary(hostvars, ["h3", "h2", "h1"])
    assert [(e["host"], e["status"]) for e in out] == \
        [("h1", "ok"), ("h2", "failed"), ("h3", "no report")]
    assert out[0]["changed"] and "1 VM(s), changed" in out[0]["line"]
    assert out[1]["errors"] == ["gpu_vms: layout 'night' cannot be converged on h2: x"]
    # Each host's stack, as gpu_topology read it after the converge (none without a report).
    assert out[0]["versions"] == TOPO["versions"]
    assert out[0]["stack"] == ("gpuvirt.kvm 0.1.0, kernel 5.15.0-1042-nvidia, libvirt 9.0.0, "
                               "QEMU 7.2.12")
    assert (out[1]["versions"], out[1]["stack"]) == ({}, "")
    assert (out[2]["versions"], out[2]["stack"]) == ({}, "")
    with pytest.raises(AnsibleFilterError):
        fleet_summary(hostvars, "h1")


def test_reports_show_rail_nics_and_vfs_with_their_holders():
    topo = dict(TOPO, allocations=[
        {"name": "a", "active": True, "managed": True, "gpus": ["0000:34:00.0"],
         "nics": ["0000:35:00.1"]}],
        nics=[{"bdf": "0000:35:00.0", "model": "ConnectX-5", "offered": True, "host_use": None,
               "rail_gpus": ["0000:34:00.0", "0000:36:00.0"], "allocated_to": None,
               "sriov": {"totalvfs": 8, "numvfs": 2, "vfs": [
                   {"bdf": "0000:35:00.1", "allocated_to": "a"},
                   {"bdf": "0000:35:00.2", "allocated_to": None}]}},
              {"bdf": "0000:3a:00.0", "model": "ConnectX-5", "offered": True, "host_use": None,
               "rail_gpus": ["0000:39:00.0"], "allocated_to": None, "sriov": None},
              {"bdf": "0000:23:00.0", "model": "ConnectX-6 Dx", "offered": False,
               "host_use": "enp35s0f0np0 carries the host's default route", "rail_gpus": [],
               "allocated_to": None, "sriov": None}])
    report = layout_report([{"name": "a", "gpus": 1}], {"vms": [{"vm": {"name": "a"}}]}, topo,
                           "h1", "day")
    assert report["desired"][0]["nics"] == ["0000:35:00.1"]
    first = report["nics"][0]
    assert first["rail_gpu_indexes"] == [0, 1]
    assert first["vfs"] == [{"bdf": "0000:35:00.1", "allocated_to": "a"},
                            {"bdf": "0000:35:00.2", "allocated_to": None}]
    assert report["nics"][2]["host_use"].endswith("default route")
    entry = fleet_summary({"h1": {"gpu_vms_report": report}}, ["h1"])[0]
    # the rail with a VF held is not free; the host's own NIC is not counted
    assert entry["line"].endswith(", rail NICs free 1 of 2 (held: 0000:35:00.1 a)")
    assert entry["nic_holders"] == {"0000:35:00.1": "a"}


def test_report_in_check_mode_is_ok_when_nothing_failed():
    # Check mode changes nothing: the VMs are not there yet, and that is no failure.
    vms = [{"name": "new", "gpus": 1}]
    result = {"changed": True, "vms": [{"vm": {"name": "new"}}]}
    assert not layout_report(vms, result, TOPO)["ok"]
    report = layout_report(vms, result, TOPO, check_mode=True)
    assert report["ok"] and report["check_mode"]
    assert report["desired"][0]["actual"] == "absent"


def test_gpu_tools_module_ids_takes_the_lines_the_role_gives():
    """kvm_host hands the filter stdout_lines + stderr_lines: each line is read on its own, so
    the stdout's device list cannot lend its address to the log's first module name."""
    import os

    from ansible_collections.gpuvirt.kvm.plugins.filter.gpu_tools_module_ids import (
        gpu_tools_module_ids,
    )

    path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "fixtures",
                        "gpu-admin-tools", "hgx-h100-module-names.txt")
    with open(path, encoding="utf-8") as handle:
        log = handle.read().splitlines()
    stdout = ["GPUs:", "  0 GPU 0000:bb:00.0 H100 0x2330 BAR0 0x27000000000"]
    found = gpu_tools_module_ids(stdout + log)
    assert found["0000:0f:00.0"] == 5 and found["0000:bb:00.0"] == 4 and len(found) == 8
    assert gpu_tools_module_ids("\n".join(stdout + log)) == found
    with pytest.raises(AnsibleFilterError, match="named no GPU's module"):
        gpu_tools_module_ids(stdout)


# --- vm_line ------------------------------------------------------------------------------------

def test_vm_line_names_the_gpus_switches_and_rails():
    from ansible_collections.gpuvirt.kvm.plugins.filter.vm_line import vm_line

    vm = {"name": "lab-pair", "state": "running", "gpu_indexes": [0, 1], "vcpus": 1,
          "nvswitches": ["0000:48:00.0"], "nics": ["0000:45:00.0"], "cpus": [0],
          "spec": {"cpu_policy": "shared"}, "memory_mb": 64, "numa_nodes": [0]}
    assert vm_line(vm) == ("lab-pair       running  GPUs 0-1 (2) + 1 NVSwitch + 1 rail NIC "
                           "1 vCPU(s) on 0 (shared)  64 MiB  node 0")
    two = dict(vm, nics=["0000:45:00.1", "0000:45:00.2"], nvswitches=[])
    assert "GPUs 0-1 (2) + 2 rail NICs" in vm_line(two)
    assert "rail" not in vm_line(dict(vm, nics=[]))
    with pytest.raises(AnsibleFilterError, match="expected a vm dict"):
        vm_line({"state": "running"})

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Device health from sysfs (issue 17, point 1): the kernel's file formats, each signal on the
DGX H100 and DGX-2 fixture trees (faults written by tests/fixtures/sysfs_builder.py as the kernel
lays them out), and what placement makes of a failed GPU."""

from __future__ import annotations

import copy
import json
import os

import pytest

import sysfs_builder
from ansible_collections.gpuvirt.kvm.plugins.module_utils._health import (
    HEALTH_DEGRADED,
    HEALTH_FAILED,
    HEALTH_OK,
    SxidEvent,
    judge,
    parse_aer,
    parse_link_speed,
    parse_sxid,
    sxid_signals,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_context import (
    HostContextError,
    host_context,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_pci_health

# drivers/pci/pcie/aer.c since 4.19 (short names), and the ABI document's sample (older names).
NEW_FATAL = ("Undefined 0\nDLP 0\nSDES 0\nTLP 0\nFCP 0\nCmpltTO 2\nCmpltAbrt 0\nUnxCmplt 0\n"
             "RxOF 0\nMalfTLP 1\nECRC 0\nUnsupReq 0\nACSViol 0\nUncorrIntErr 0\nBlockedTLP 0\n"
             "AtomicOpBlocked 0\nTLPBlockedErr 0\nPoisonTLPBlocked 0\ndev_fatal_errs_bit[9] 1\n"
             "TOTAL_ERR_FATAL 4\n")
OLD_CORRECTABLE = ("Receiver Error 2\nBad TLP 0\nBad DLLP 0\nRELAY_NUM Rollover 0\n"
                   "Replay Timer Timeout 0\nAdvisory Non-Fatal 0\nCorrected Internal Error 0\n"
                   "Header Log Overflow 0\nTOTAL_ERR_COR 2\n")


def test_aer_files_are_read_in_both_spellings_with_their_totals():
    total, counts = parse_aer(NEW_FATAL)
    assert total == 4
    assert counts["CmpltTO"] == 2 and counts["MalfTLP"] == 1
    assert counts["dev_fatal_errs_bit[9]"] == 1
    total, counts = parse_aer(OLD_CORRECTABLE)
    assert (total, counts["Receiver Error"], counts["RELAY_NUM Rollover"]) == (2, 2, 0)
    assert parse_aer("") == (None, {})


@pytest.mark.parametrize("text, speed", [("16.0 GT/s PCIe\n", 16.0), ("8 GT/s\n", 8.0),
                                         ("2.5 GT/s PCIe", 2.5), ("Unknown\n", None),
                                         ("", None)])
def test_link_speeds_as_the_kernel_prints_them(text, speed):
    assert parse_link_speed(text) == speed


def _files(**over):
    files = {"current_link_speed": "16.0 GT/s PCIe\n", "max_link_speed": "16.0 GT/s PCIe\n",
             "current_link_width": "16\n", "max_link_width": "16\n", "power_state": "D0\n",
             "aer_dev_correctable": "RxErr 0\nTOTAL_ERR_COR 0\n",
             "aer_dev_nonfatal": "CmpltTO 0\nTOTAL_ERR_NONFATAL 0\n",
             "aer_dev_fatal": "CmpltTO 0\nTOTAL_ERR_FATAL 0\n", "config_head": b"\xde\x10\x30\x23",
             "enable": "0\n"}
    files.update(over)
    return files


@pytest.mark.parametrize("over, state, words", [
    ({}, HEALTH_OK, None),
    ({"aer_dev_fatal": NEW_FATAL}, HEALTH_FAILED, "4 fatal uncorrectable PCIe errors since boot"),
    ({"aer_dev_nonfatal": "CmpltTO 1\nTOTAL_ERR_NONFATAL 1\n"}, HEALTH_DEGRADED,
     "1 non-fatal uncorrectable PCIe error since boot (CmpltTO 1)"),
    ({"aer_dev_correctable": "RxErr 101\nTOTAL_ERR_COR 101\n"}, HEALTH_DEGRADED,
     "101 correctable PCIe errors since boot (RxErr 101), over the threshold of 100"),
    ({"aer_dev_correctable": "RxErr 100\nTOTAL_ERR_COR 100\n"}, HEALTH_OK, None),
    ({"current_link_width": "8\n"}, HEALTH_DEGRADED, "link trained at x8 of x16"),
    ({"current_link_width": "0\n"}, HEALTH_FAILED, "link is down (x0 of x16)"),
    ({"current_link_speed": "8.0 GT/s PCIe\n"}, HEALTH_DEGRADED, "runs at 8 GT/s of 16 GT/s"),
    # a guest's driver runs it (vfio-pci enabled it), or it sleeps: its speed says nothing
    ({"current_link_speed": "2.5 GT/s PCIe\n", "enable": "1\n"}, HEALTH_OK, None),
    ({"current_link_speed": "2.5 GT/s PCIe\n", "power_state": "D3hot\n"}, HEALTH_OK, None),
    # a Gen5 x16 card behind a Gen4 x8 port trains at Gen4 x8: as good as it gets
    ({"current_link_speed": "16.0 GT/s PCIe\n", "max_link_speed": "32.0 GT/s PCIe\n",
      "current_link_width": "8\n", "port_max_link_speed": "16.0 GT/s PCIe\n",
      "port_max_link_width": "8\n"}, HEALTH_OK, None),
    ({"power_state": "error\n"}, HEALTH_FAILED, "power state as error"),
    ({"config_head": b"\xff\xff\xff\xff", "power_state": "D3cold\n"}, HEALTH_FAILED,
     "config space reads as all ones in power state D3cold"),
    ({"power_state": "D3cold\n"}, HEALTH_OK, None),  # idle on vfio-pci, still answering
])
def test_each_signal_and_how_bad_it_is(over, state, words):
    health = judge("0000:1b:00.0", _files(**over))
    assert health.state == state
    if words:
        assert words in health.reason
    else:
        assert health.signals == ()


def test_a_function_gone_from_the_bus_has_failed():
    health = judge("0000:1b:00.0", None)
    assert health.failed and "missing from the PCI bus" in health.reason


def _device(tree, bdf):
    """The entry of ``bdf`` in a host description's PCI tree (a short "BDF MODEL" entry is made
    a mapping in place, so that fields can be added)."""
    lists = [tree]
    while lists:
        entries = lists.pop()
        for i, entry in enumerate(entries):
            if isinstance(entry, str):
                short, model = entry.split()
                if short.lower() in (bdf, bdf[5:]):
                    entries[i] = {"bdf": short, "model": model}
                    return entries[i]
                continue
            if str(entry.get("bdf", "")).lower() in (bdf, bdf[5:]):
                return entry
            lists.extend(x for x in (entry.get("children"), entry.get("devices")) if x)
    raise AssertionError("no %s in the fixture" % bdf)


def _faulty(name, faults, root):
    """Fixture host ``name`` with ``{bdf: fields}`` written into its entries, built under root."""
    desc = copy.deepcopy(sysfs_builder.load_host(name))
    for bdf, fields in faults.items():
        _device(desc["pci"], bdf).update(fields)
    return sysfs_builder.build(desc, str(root))


def _params(sysfs_root, proc_root, **over):
    p = {"sysfs_root": sysfs_root, "proc_root": proc_root, "platform": "auto",
         "nvidia_smi_topo": None, "unhealthy_gpus": [], "reserved_cpus": None,
         "reserved_memory_mb": None, "fabric_manager": None,
         "host_record": "/nonexistent/kvm_host.json", "aer_correctable_threshold": 100}
    p.update(over)
    return p


def test_the_fixture_trees_carry_healthy_files_the_reader_finds(host_tree):
    sysfs_root, _proc = host_tree("dgx-h100")
    files = read_pci_health(sysfs_root, "0000:1b:00.0")
    assert files["current_link_speed"] == "16.0 GT/s PCIe\n"
    assert files["aer_dev_fatal"].splitlines()[-1] == "TOTAL_ERR_FATAL 0"
    assert judge("0000:1b:00.0", files).state == HEALTH_OK
    assert read_pci_health(sysfs_root, "0000:ee:00.0") is None


def test_faults_on_the_dgx_h100_make_failed_gpus_unplaceable_and_degraded_ones_reported(
        tmp_path):
    sysfs_root, proc_root = _faulty("dgx-h100", {
        "0000:1b:00.0": {"aer": {"fatal": {"CmpltTO": 1}}},       # fatal AER: failed
        "0000:43:00.0": {"link": {"width": 8, "max_width": 16}},  # downtrained: degraded
        "0000:52:00.0": {"gone": True},                            # all ones: failed
        "0000:07:00.0": {"power_state": "error"},                  # an NVSwitch: failed
    }, tmp_path / "h100")
    ctx = host_context(_params(sysfs_root, proc_root), bridges=False)
    assert ctx.platform.name == "dgx-h100"
    states = {b: h.state for b, h in ctx.health.items()}
    assert states["0000:1b:00.0"] == HEALTH_FAILED
    assert states["0000:43:00.0"] == HEALTH_DEGRADED
    assert states["0000:52:00.0"] == HEALTH_FAILED
    assert states["0000:07:00.0"] == HEALTH_FAILED
    assert states["0000:61:00.0"] == HEALTH_OK
    # failed GPUs join unhealthy_gpus (never placed); a degraded one does not
    assert set(ctx.unhealthy_gpus) == {"0000:1b:00.0", "0000:52:00.0"}
    text = " ".join(ctx.warnings)
    assert "GPU 0000:1b:00.0 failed its health check: 0000:1b:00.0: 1 fatal" in text
    assert "NVSwitch 0000:07:00.0 failed its health check" in text
    assert "0000:43:00.0" not in text


def test_a_manual_unhealthy_gpu_stays_beside_the_failed_ones(tmp_path):
    sysfs_root, proc_root = _faulty("dgx2", {"0000:34:00.0": {"aer": {"fatal": {"DLP": 3}}}},
                                    tmp_path / "dgx2")
    ctx = host_context(_params(sysfs_root, proc_root, unhealthy_gpus=["0000:36:00.0",
                                                                      "0000:34:00.0"]),
                       bridges=False)
    assert ctx.unhealthy_gpus == ("0000:36:00.0", "0000:34:00.0")
    assert ctx.health["0000:34:00.0"].failed


def test_a_negative_threshold_is_refused_naming_the_option(host_tree):
    sysfs_root, proc_root = host_tree("dgx-h100")
    with pytest.raises(HostContextError, match="aer_correctable_threshold must be a number of "
                                               "errors, 0 or more; got -1"):
        host_context(_params(sysfs_root, proc_root, aer_correctable_threshold=-1), bridges=False)


def test_a_fixture_fault_the_kernel_cannot_print_is_refused(tmp_path):
    desc = copy.deepcopy(sysfs_builder.load_host("dgx-h100"))
    _device(desc["pci"], "0000:1b:00.0").update({"aer": {"fatal": {"Oops": 1}}})
    with pytest.raises(sysfs_builder.FixtureError, match="the kernel's are Undefined, DLP"):
        sysfs_builder.build(desc, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad" / "sys" / "bus")


def test_placement_passes_over_a_failed_gpu_and_the_report_says_why(tmp_path):
    """DGX H100 with GPU 0 failed: no 8-GPU VM; a 4-GPU VM gets modules 5-8 (the other
    half), and gpu_topology's entries carry each GPU's health."""
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_facts import build
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_request import plan_requests

    sysfs_root, proc_root = _faulty("dgx-h100", {"0000:1b:00.0": {"aer": {"fatal": {"DLP": 1}}}},
                                    tmp_path / "h100")
    ctx = host_context(_params(sysfs_root, proc_root, reserved_cpus=""), bridges=False)
    result = build(ctx.topology, ctx.platform, ctx.platform_reason, [],
                   plan_requests([{"name": "all", "gpus": 8}, {"name": "half", "gpus": 4}]),
                   reserved_cpus="", unhealthy_gpus=ctx.unhealthy_gpus, health=ctx.health)
    whole, half = result["plan"]
    assert "error" in whole
    assert "error" not in half and 0 not in half["gpu_indexes"]
    first = result["gpus"][0]
    assert (first["healthy"], first["health"]["state"]) == (False, HEALTH_FAILED)
    assert first["health"]["signals"][0]["source"] == "aer"
    assert result["gpus"][1]["health"] == {"state": HEALTH_OK, "signals": []}
    assert result["nvswitches"][0]["health"]["state"] == HEALTH_OK


def test_a_failed_nvswitch_keeps_vms_off_the_blocks_that_need_it(tmp_path):
    """DGX-2 in full passthrough: NVSwitch 61:00.0 (baseboard 1) failed. No 16-GPU VM (it needs
    all 12 switches); an 8-GPU VM gets baseboard 2 with its 6 switches; the map says why."""
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_facts import build
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_request import plan_requests

    sysfs_root, proc_root = _faulty("dgx2", {"0000:61:00.0": {"gone": True}}, tmp_path / "dgx2")
    ctx = host_context(_params(sysfs_root, proc_root, reserved_cpus=""), bridges=False)
    assert ctx.failed_switches == ("0000:61:00.0",)
    assert ctx.unhealthy_gpus == ()
    result = build(ctx.topology, ctx.platform, ctx.platform_reason, [],
                   plan_requests([{"name": "all", "gpus": 16}, {"name": "board", "gpus": 8}]),
                   reserved_cpus="", unhealthy_gpus=ctx.unhealthy_gpus, health=ctx.health)
    whole, board = result["plan"]
    assert "NVSwitch 0 (0000:61:00.0) failed its health check" in whole["error"]
    assert "error" not in board and board["gpu_indexes"] == list(range(8, 16))
    assert "0000:61:00.0" not in board["nvswitches"]
    switch = result["nvswitches"][0]
    assert (switch["bdf"], switch["healthy"], switch["health"]["state"]) == (
        "0000:61:00.0", False, HEALTH_FAILED)


def test_the_allocation_map_names_failed_and_degraded_devices_with_their_reason(tmp_path):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_facts import (
        allocation_map,
        build,
    )

    sysfs_root, proc_root = _faulty("dgx2", {
        "0000:34:00.0": {"power_state": "error"},
        "0000:36:00.0": {"link": {"width": 8, "max_width": 16}},
        "0000:61:00.0": {"gone": True}}, tmp_path / "dgx2")
    ctx = host_context(_params(sysfs_root, proc_root, reserved_cpus=""), bridges=False)
    lines = allocation_map(build(ctx.topology, ctx.platform, ctx.platform_reason, [], [],
                                 reserved_cpus="", unhealthy_gpus=ctx.unhealthy_gpus,
                                 health=ctx.health))
    assert ("GPU0  0000:34:00.0 node 0  -> free FAILED: the kernel reports 0000:34:00.0's power "
            "state as error") in lines
    assert ("GPU1  0000:36:00.0 node 0  -> free degraded: 0000:36:00.0's link trained at x8 of "
            "x16") in lines
    assert any(line.startswith("NVSwitch0  0000:61:00.0") and " FAILED: 0000:61:00.0's config "
               "space reads as all ones" in line for line in lines)


def _slots(topology, devices):
    """What kvm_host records of each device at conversion (gpu_topology's entries)."""
    return {d.bdf: {"id": "%04x:%04x" % d.id_pair, "numa_node": d.numa_node,
                    "path": list(d.path), "host_bridge": d.host_bridge,
                    "mmio64_mb": d.mmio64_size >> 20} for d in devices}


def _without(name, bdfs, root):
    """Fixture host ``name`` with these functions gone from its PCI tree."""
    desc = copy.deepcopy(sysfs_builder.load_host(name))
    lists = [desc["pci"]]
    while lists:
        entries = lists.pop()
        for entry in list(entries):
            short = entry.split()[0] if isinstance(entry, str) else str(entry.get("bdf", ""))
            if short.lower() in {b[5:] for b in bdfs}:
                entries.remove(entry)
            elif isinstance(entry, dict):
                lists.extend(x for x in (entry.get("children"), entry.get("devices")) if x)
    return sysfs_builder.build(desc, str(root))


def test_a_dgx2_with_a_gpu_gone_stays_a_dgx2_and_places_around_it(host_tree, tmp_path):
    """Point 4 (degraded, not demoted): GPU 3 (3b:00.0) fell off the bus. With the slots
    kvm_host recorded at conversion, the host is still a DGX-2: indexes stay, the missing GPU is
    failed, and 8 + 4 + 2 + 1 GPUs still place on the healthy side with their switches."""
    import json

    from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_facts import build
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
        platform_gpus,
        platform_nvswitches,
    )
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_host
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_request import plan_requests

    whole = read_host(*host_tree("dgx2"))
    dgx2 = host_context(_params(*host_tree("dgx2")), bridges=False).platform
    record = tmp_path / "kvm_host.json"
    record.write_text(json.dumps({"slots": {
        "gpus": _slots(whole, platform_gpus(whole, dgx2)),
        "nvswitches": _slots(whole, platform_nvswitches(whole, dgx2))}}))
    sysfs_root, proc_root = _without("dgx2", ["0000:3b:00.0"], tmp_path / "d")
    # without the record: generic, as before
    plain = host_context(_params(sysfs_root, proc_root), bridges=False)
    assert plain.platform.name == "generic"
    ctx = host_context(_params(sysfs_root, proc_root, host_record=str(record),
                               reserved_cpus=""), bridges=False)
    assert ctx.platform.name == "dgx2"
    assert ctx.platform_reason.startswith("degraded dgx2: 0000:3b:00.0 missing")
    assert ctx.gpu_bdfs[3] == "0000:3b:00.0" and len(ctx.gpu_bdfs) == 16
    # the stand-in keeps the 64-bit window it had: a VM that holds it keeps its definition
    stand_in = ctx.topology.pci["0000:3b:00.0"]
    assert stand_in.missing and stand_in.mmio64_size == whole.pci["0000:3b:00.0"].mmio64_size > 0
    assert ctx.health["0000:3b:00.0"].failed and "0000:3b:00.0" in ctx.unhealthy_gpus
    assert ctx.failed_switches == ()
    result = build(ctx.topology, ctx.platform, ctx.platform_reason, [], plan_requests(
        [{"name": "eight", "gpus": 8}, {"name": "four", "gpus": 4}, {"name": "two", "gpus": 2},
         {"name": "one", "gpus": 1}, {"name": "sixteen", "gpus": 16}]),
        reserved_cpus="", unhealthy_gpus=ctx.unhealthy_gpus, health=ctx.health)
    eight, four, two, one, sixteen = result["plan"]
    assert "error" in sixteen
    assert eight["gpu_indexes"] == list(range(8, 16)) and len(eight["nvswitches"]) == 6
    used = set(eight["gpu_indexes"])
    for entry in (four, two, one):
        assert "error" not in entry, entry
        assert 3 not in entry["gpu_indexes"] and not used & set(entry["gpu_indexes"])
        used |= set(entry["gpu_indexes"])
    gpu3 = result["gpus"][3]
    assert (gpu3["missing"], gpu3["healthy"], gpu3["health"]["state"]) == (True, False, "failed")
    # a slot that now holds something the platform does not count: indexes would shift
    bad = json.loads(record.read_text())
    bad["slots"]["gpus"]["0000:3b:00.0"]["id"] = "10de:1db8"
    bad["slots"]["gpus"]["0000:99:00.0"] = bad["slots"]["gpus"].pop("0000:34:00.0")
    record.write_text(json.dumps(bad))
    assert host_context(_params(sysfs_root, proc_root, host_record=str(record)),
                        bridges=False).platform.name == "generic"
    record.write_text(json.dumps({"slots": {"gpus": ["not", "a", "map"]}}))
    assert host_context(_params(sysfs_root, proc_root, host_record=str(record)),
                        bridges=False).platform.name == "generic"
    assert result["readiness"]["not_on_vfio"] == []


def test_slots_keep_a_platform_only_when_every_device_found_sits_in_one(host_tree, tmp_path):
    """No device missing, a device outside the recorded slots, or slots that make no known
    platform: detection stays as it was."""
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
        PLATFORMS,
        detect_degraded,
        platform_gpus,
        platform_nvswitches,
    )
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_host

    whole = read_host(*host_tree("dgx2"))
    dgx2 = PLATFORMS["dgx2"]
    gpus = _slots(whole, platform_gpus(whole, dgx2))
    switches = _slots(whole, platform_nvswitches(whole, dgx2))
    assert detect_degraded(whole, {"gpus": gpus, "nvswitches": switches}) is None  # all there
    gone = read_host(*_without("dgx2", ["0000:3b:00.0"], tmp_path / "d"))
    found = detect_degraded(gone, {"gpus": gpus, "nvswitches": switches})
    assert (found[0].name, found[1]) == ("dgx2", ["0000:3b:00.0"])
    # a GPU found that the slots do not name: not this host's record
    other = dict(gpus)
    other["0000:99:00.0"] = other.pop("0000:34:00.0")
    assert detect_degraded(gone, {"gpus": other, "nvswitches": switches}) is None
    # 15 slots make no platform
    fewer = {b: s for b, s in gpus.items() if b != "0000:3b:00.0"}
    assert detect_degraded(gone, {"gpus": fewer, "nvswitches": switches}) is None
    assert detect_degraded(gone, {}) is None


# --- SXid lines (NVSwitches on the nvidia-nvswitch driver) --------------------------------------

KMSG = (
    "6,1042,5312345678,-;nvidia-nvswitch0: SXid (PCI:0000:c3:00.0): 20009, Non-fatal, Link 28 "
    "RX Short Error Rate\n"
    "4,1043,5312345680,-;NVRM: Xid (PCI:0000:91:00): 79, pid='<unknown>', name=<unknown>, GPU "
    "has fallen off the bus.\n"
    "3,1044,5312345690,-,caller=T412;nvidia-nvswitch0: SXid (PCI:0000:C3:00.0): 24007, Fatal, "
    "Link 30 sourcetrack timeout error\n"
    "[6781753.400584] nvidia-nvswitch1: SXid (PCI:0000:06:00.0): 12028, Non-fatal, Link 32 "
    "egress non-posted PRIV error (First)\n"
    "nvidia-nvswitch3: SXid (PCI:0000:c1:00.0): garbled, Fatal\n"
    "nvidia-nvswitch3: SXid (PCI:0000:c1:00.0): 22013, Non-fatal\n")


def test_sxid_lines_are_read_from_kmsg_and_dmesg_layouts():
    found = parse_sxid(KMSG)
    assert found == {
        "0000:c3:00.0": [SxidEvent(20009, False, "Link 28 RX Short Error Rate", 5312345678),
                         SxidEvent(24007, True, "Link 30 sourcetrack timeout error",
                                   5312345690)],
        "0000:06:00.0": [SxidEvent(12028, False, "Link 32 egress non-posted PRIV error (First)",
                                   6781753400584)],
        "0000:c1:00.0": [SxidEvent(22013, False, "", None)],
    }
    assert found["0000:06:00.0"][0].logged == "[6781753.400584]"
    assert found["0000:c1:00.0"][0].logged == ""


def test_sxid_lines_without_a_severity_degrade_the_switch():
    """NVSWITCH_PRINT_SXID lines whose text is not "Fatal, ..." or "Non-fatal, ...": the host
    I/O failure (NVSWITCH_ERR_HW_HOST_IO_FAILURE, 10007, "IO failure") and the thermal warning
    (NVSWITCH_ERR_HW_HOST_THERMAL_EVENT_START, 10004, "NVSWITCH Temperature %dC | TSENSE WARN
    Threshold %dC"), as the driver's format strings print them."""
    found = parse_sxid(
        "[ 812.000100] nvidia-nvswitch2: SXid (PCI:0000:09:00.0): 10007, IO failure\n"
        "[ 913.000200] nvidia-nvswitch2: SXid (PCI:0000:09:00.0): 10004, NVSWITCH Temperature "
        "98C | TSENSE WARN Threshold 95C\n")
    assert found == {"0000:09:00.0": [
        SxidEvent(10007, False, "IO failure", 812000100),
        SxidEvent(10004, False, "NVSWITCH Temperature 98C | TSENSE WARN Threshold 95C",
                  913000200)]}
    (signal,) = sxid_signals("0000:09:00.0", found["0000:09:00.0"])
    assert signal.state == HEALTH_DEGRADED and "SXid 10004" in signal.reason


def test_the_lines_after_an_sxid_are_part_of_its_error():
    """nvswitch_record_error prints, after an error's own line, two more with its code
    (_nvswitch_dump_error_entry: "Severity %d Engine instance %02d Sub-engine instance %02d",
    "Data {0x%08x, ...}"): they add nothing, and must not count as severity-less errors."""
    found = parse_sxid(
        "[ 700.000001] nvidia-nvswitch0: SXid (PCI:0000:07:00.0): 24007, Fatal, Link 30 "
        "sourcetrack timeout error\n"
        "[ 700.000002] nvidia-nvswitch0: SXid (PCI:0000:07:00.0): 24007, Severity 1 Engine "
        "instance 30 Sub-engine instance 00\n"
        "[ 700.000003] nvidia-nvswitch0: SXid (PCI:0000:07:00.0): 24007, Data {0x00000000, "
        "0x00000000, 0x00000000, 0x00000000, 0x00000000, 0x00000000, 0x00000000, 0x00000000, "
        "0x00000000}\n")
    assert found == {"0000:07:00.0": [
        SxidEvent(24007, True, "Link 30 sourcetrack timeout error", 700000001)]}
    assert [s.state for s in sxid_signals("0000:07:00.0", found["0000:07:00.0"])] == [
        HEALTH_FAILED]


def test_a_fatal_sxid_fails_the_switch_and_non_fatal_ones_degrade_it():
    found = parse_sxid(KMSG)
    signals = sxid_signals("0000:c3:00.0", found["0000:c3:00.0"])
    assert [(s.source, s.state) for s in signals] == [("sxid", HEALTH_FAILED),
                                                      ("sxid", HEALTH_DEGRADED)]
    assert signals[0].reason == ("0000:c3:00.0: fatal SXid 24007 in the kernel log at "
                                 "[5312.345690]: Link 30 sourcetrack timeout error")
    assert signals[1].reason == ("0000:c3:00.0: non-fatal SXid 20009 in the kernel log at "
                                 "[5312.345678]: Link 28 RX Short Error Rate")
    only = sxid_signals("0000:06:00.0", found["0000:06:00.0"])
    assert [s.state for s in only] == [HEALTH_DEGRADED]
    assert sxid_signals("0000:c1:00.0", found["0000:c1:00.0"])[0].reason == (
        "0000:c1:00.0: non-fatal SXid 22013 in the kernel log")
    assert sxid_signals("0000:61:00.0", []) == ()


def test_an_sxid_signal_is_the_same_while_its_newest_line_is_and_changes_with_a_new_one():
    """What a clear hides is the reason: it names the newest line of each severity, so the same
    lines read again, or fewer of them (the ring buffer dropped the oldest), give the same
    reason; a new line, even with the same code and words, gives another."""
    old = "3,1044,5312345690,-;nvidia-nvswitch0: SXid (PCI:0000:07:00.0): 24007, Fatal, Link 30\n"
    older = "3,1001,5300000000,-;nvidia-nvswitch0: SXid (PCI:0000:07:00.0): 24007, Fatal, Link 3\n"
    new = "3,2087,7312345690,-;nvidia-nvswitch0: SXid (PCI:0000:07:00.0): 24007, Fatal, Link 30\n"

    def reason(text):
        return sxid_signals("0000:07:00.0", parse_sxid(text)["0000:07:00.0"])[0].reason

    assert reason(older + old) == reason(old) == reason(old + old)
    assert reason(old + new) != reason(old)
    assert "[7312.345690]" in reason(old + new)


def append_kmsg(sysfs_root, *lines):
    """Append kmsg records to the fixture tree's dev/kmsg (beside sys/)."""
    path = os.path.join(os.path.dirname(sysfs_root), "dev", "kmsg")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
    return path


SXID_FATAL = ("3,1044,5312345690,-;nvidia-nvswitch0: SXid (PCI:0000:07:00.0): 24007, Fatal, "
              "Link 30 sourcetrack timeout error")
SXID_NONFATAL = ("3,1045,5312346001,-;nvidia-nvswitch2: SXid (PCI:0000:09:00.0): 12028, "
                 "Non-fatal, Link 32 egress non-posted PRIV error (First)")


def test_sxid_lines_land_on_their_nvswitch_of_a_shared_nvswitch_host(fresh_host_tree):
    sysfs_root, proc_root = fresh_host_tree("dgx-h100")
    append_kmsg(
        sysfs_root, "6,1000,5300000000,-;Linux version 5.15.0-1042-nvidia", " SUBSYSTEM=pci",
        SXID_FATAL,
        "4,1046,5312346100,-;NVRM: Xid (PCI:0000:1b:00): 79, GPU has fallen off the bus.",
        SXID_NONFATAL)
    ctx = host_context(_params(sysfs_root, proc_root), bridges=False)
    assert ctx.switch_bdfs == ["0000:07:00.0", "0000:08:00.0", "0000:09:00.0", "0000:0a:00.0"]
    signals = {b: [(s.source, s.state) for s in h.signals] for b, h in ctx.live_health.items()
               if h.signals}
    assert signals == {"0000:07:00.0": [("sxid", HEALTH_FAILED)],
                       "0000:09:00.0": [("sxid", HEALTH_DEGRADED)]}
    assert ctx.health["0000:07:00.0"].reason == (
        "0000:07:00.0: fatal SXid 24007 in the kernel log at [5312.345690]: Link 30 "
        "sourcetrack timeout error")
    assert ctx.failed_switches == ("0000:07:00.0",)
    # A switch is Fabric Manager's on such a host: no GPU is taken out for it (docs/health.md).
    assert ctx.unhealthy_gpus == ()
    assert any(w.startswith("NVSwitch 0000:07:00.0 failed its health check: 0000:07:00.0: "
                            "fatal SXid 24007") for w in ctx.warnings)
    assert not any("SXid errors are not read" in w for w in ctx.warnings)


def test_sxid_lines_of_a_device_that_is_no_switch_of_the_platform_are_named(fresh_host_tree):
    sysfs_root, proc_root = fresh_host_tree("dgx-h100")
    path = append_kmsg(sysfs_root, SXID_FATAL.replace("0000:07:00.0", "0000:c5:00.0"))
    ctx = host_context(_params(sysfs_root, proc_root), bridges=False)
    assert not any(h.signals for h in ctx.live_health.values())
    assert "the kernel log %s has SXid lines of 0000:c5:00.0, which is not an NVSwitch of this " \
           "platform; they are not counted" % path in ctx.warnings


def test_a_full_passthrough_host_never_reads_the_kernel_log(fresh_host_tree):
    """DGX-2: its switches go to VMs whole (no driver of the host runs them), so SXid lines
    cannot be the host's; the kernel log is not opened: lines naming its switch count for
    nothing, and a log that cannot be read goes unnoticed (a shared-NVSwitch host warns)."""
    sysfs_root, proc_root = fresh_host_tree("dgx2")
    ctx = host_context(_params(sysfs_root, proc_root), bridges=False)
    switch = ctx.switch_bdfs[0]
    path = append_kmsg(sysfs_root, SXID_FATAL.replace("0000:07:00.0", switch))
    ctx = host_context(_params(sysfs_root, proc_root), bridges=False)
    assert ctx.platform.name == "dgx2"
    assert ctx.health[switch].state == HEALTH_OK and ctx.failed_switches == ()
    os.unlink(path)
    os.mkdir(path)
    ctx = host_context(_params(sysfs_root, proc_root), bridges=False)
    assert not any("kernel log" in w for w in ctx.warnings)


def test_an_unreadable_kernel_log_warns_and_the_run_goes_on(fresh_host_tree):
    sysfs_root, proc_root = fresh_host_tree("dgx-h100")
    path = os.path.join(os.path.dirname(sysfs_root), "dev", "kmsg")
    os.unlink(path)
    ctx = host_context(_params(sysfs_root, proc_root), bridges=False)
    assert all(h.state == HEALTH_OK for h in ctx.health.values())
    assert ("cannot read the kernel log %s: No such file or directory: the NVSwitches' SXid "
            "errors are not read this run; the health record's last word on them stands "
            "(docs/health.md)" % path) in ctx.warnings
    os.mkdir(path)  # read() fails (EISDIR), as a kmsg the run may not read does (EPERM)
    ctx = host_context(_params(sysfs_root, proc_root), bridges=False)
    assert any(w.startswith("cannot read the kernel log %s: Is a directory" % path)
               for w in ctx.warnings)
    assert ctx.failed_switches == ()


# --- Fabric Manager's NVLink-failed devices -----------------------------------------------------

def fm_options(fm_state, tmp_path, monkeypatch, gpus, **failed):
    """host_context options for a DGX H100 tree whose Fabric Manager is the stand-in (H100
    table, module IDs 1-8 in PCI order from a host record), reporting ``failed`` devices."""
    from conftest import FMPM

    fm_state("h100")
    state = fm_state.state()
    state.update(failed)
    with open(fm_state.path, "w", encoding="utf-8") as handle:
        json.dump(state, handle)
    monkeypatch.setenv("FMPM_STATE", fm_state.path)
    record = tmp_path / "kvm_host.json"
    record.write_text(json.dumps({"fabric": {"module_ids": {b: i + 1
                                                            for i, b in enumerate(gpus)}}}))
    return {"fabric_manager": {"address": None, "fmpm": FMPM, "starting_wait": 0,
                               "service_vm": None},
            "host_record": str(record)}


def test_fabric_managers_nvlink_failures_degrade_the_devices_it_names(
        host_tree, fm_state, tmp_path, monkeypatch):
    sysfs_root, proc_root = host_tree("dgx-h100")
    gpus = list(host_context(_params(sysfs_root, proc_root), bridges=False).gpu_bdfs)
    over = fm_options(fm_state, tmp_path, monkeypatch, gpus, failed_gpus=[
        {"uuid": "GPU-8f1e", "pciBusId": "00000000:DF:00.0", "portNum": [3, 7]},
        {"uuid": "GPU-0000", "pciBusId": "", "portNum": [1]}],  # no address: elsewhere
        failed_switches=[{"uuid": "", "pciBusId": "00000000:08:00.0", "portNum": [10]}])
    ctx = host_context(_params(sysfs_root, proc_root, **over), bridges=False)
    assert ctx.fabric_error is None
    found = {b: [(s.source, s.state, s.reason) for s in h.signals]
             for b, h in ctx.live_health.items() if h.signals}
    assert found == {
        "0000:df:00.0": [("fabric-manager", HEALTH_DEGRADED,
                          "Fabric Manager at 127.0.0.1 reports failed NVLinks on GPU "
                          "0000:df:00.0 (GPU-8f1e), ports 3, 7: it joins no multi-GPU "
                          "partition")],
        "0000:08:00.0": [("fabric-manager", HEALTH_DEGRADED,
                          "Fabric Manager at 127.0.0.1 reports failed NVLinks on NVSwitch "
                          "0000:08:00.0, port 10: no multi-GPU partition is placed")],
    }
    # Degraded: reported, never failed, so the GPU still serves a one-GPU VM...
    assert ctx.unhealthy_gpus == () and ctx.failed_switches == ()
    assert ctx.health["0000:df:00.0"].state == HEALTH_DEGRADED
    # ...while the partitions FM's failures break stay out of placement, as before.
    # (the switch's failure breaks every multi-GPU partition: the single-GPU ones, 7-14, stay)
    assert [p["id"] for p in ctx.fabric["partitions"] if p["placeable"]] == list(range(7, 15))
    assert ctx.fabric["failed_elsewhere"] == ["GPU GPU-0000"]


def test_fabric_manager_in_a_service_vm_names_no_host_device(
        host_tree, fm_state, tmp_path, monkeypatch):
    sysfs_root, proc_root = host_tree("dgx-h100")
    gpus = host_context(_params(sysfs_root, proc_root), bridges=False).gpu_bdfs
    over = fm_options(fm_state, tmp_path, monkeypatch, gpus, failed_gpus=[
        {"uuid": "GPU-8f1e", "pciBusId": "00000000:DF:00.0", "portNum": [3]}])
    over["fabric_manager"]["service_vm"] = "fabric-manager"
    ctx = host_context(_params(sysfs_root, proc_root, **over), bridges=False)
    assert ctx.fabric_error is None
    assert not any(h.signals for h in ctx.live_health.values())


def test_fabric_manager_down_gives_no_signal_and_no_failure(
        host_tree, fm_state, tmp_path, monkeypatch):
    sysfs_root, proc_root = host_tree("dgx-h100")
    gpus = host_context(_params(sysfs_root, proc_root), bridges=False).gpu_bdfs
    over = fm_options(fm_state, tmp_path, monkeypatch, gpus, failed_gpus=[
        {"uuid": "", "pciBusId": "00000000:DF:00.0", "portNum": [3]}])
    fm_state.control("stop")
    ctx = host_context(_params(sysfs_root, proc_root, **over), bridges=False)
    assert "fabric_manager" in ctx.fabric_error
    assert all(h.state == HEALTH_OK for h in ctx.health.values())

# SPDX-License-Identifier: GPL-3.0-or-later
"""allocation_map: who holds each GPU and NVSwitch, in words an admin reads."""

from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_facts import allocation_map


def _result(allocations, plan=()):
    gpus = [{"index": i, "bdf": "0000:%02x:00.0" % (0x10 + i), "numa_node": i // 2}
            for i in range(4)]
    return {
        "platform": {"name": "generic", "reason": "test"},
        "gpus": gpus,
        "nvswitches": [{"index": 0, "bdf": "0000:20:00.0", "numa_node": 0}],
        "allocations": list(allocations),
        "plan": list(plan),
        "free_blocks": {"1": 1},
    }


def test_running_defined_planned_and_free_are_told_apart():
    result = _result(
        [{"name": "day-a", "gpus": ["0000:10:00.0"], "nvswitches": ["0000:20:00.0"],
          "active": True},
         {"name": "day-b", "gpus": ["0000:11:00.0"], "nvswitches": [], "active": False}],
        [{"name": "next", "gpus": ["0000:12:00.0"], "nvswitches": [], "gpu_indexes": [2],
          "vcpus": 2, "cpuset": "4-5", "cpu_policy": "dedicated", "emulator_cpus": [0],
          "memory_mb": 1024, "numa_nodes": [1]}])
    lines = allocation_map(result)
    by_bdf = {line.split()[1]: line for line in lines if line.startswith(("GPU", "NVSwitch"))}
    assert by_bdf["0000:10:00.0"].endswith("-> day-a (running)")
    assert by_bdf["0000:20:00.0"].endswith("-> day-a (running)")
    assert by_bdf["0000:11:00.0"].endswith("-> day-b (defined)")
    assert by_bdf["0000:12:00.0"].endswith("-> next (planned)")
    assert by_bdf["0000:13:00.0"].endswith("-> free")
    assert lines[-1] == "free blocks: 1 x 1"


def test_an_allocation_without_an_active_flag_reads_defined():
    lines = allocation_map(_result([{"name": "old", "gpus": ["0000:10:00.0"], "nvswitches": []}]))
    assert any(line.endswith("-> old (defined)") for line in lines)


def test_every_gpu_of_a_mixed_server_is_reported_with_its_model(host_tree):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_facts import build
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import detect
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_host
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_request import plan_requests

    topology = read_host(*host_tree("pcie-mixed"))
    platform, reason = detect(topology)
    result = build(topology, platform, reason, [], plan_requests(
        [{"name": "pair", "gpus": 2}, {"name": "mix", "gpus": 2, "gpu_model": "any"}]))
    assert [g["model"] for g in result["gpus"]] == [
        "L40S", "L40S", "L4", "RTX-6000-Ada", "L4", "L4", "H100-NVL", "unknown 10de:2bff"]
    assert [g["id"] for g in result["gpus"]][-1] == "10de:2bff"
    assert result["warnings"] == [
        "GPU 0000:b9:00.0 (10de:2bff) is an NVIDIA GPU of a model this collection does not name; "
        "it is placed as a PCIe GPU of its own model (ask for it with gpu_model: 10de:2bff)"]
    pair, mix = result["plan"]
    assert len({result["gpus"][i]["model"] for i in pair["gpu_indexes"]}) == 1
    assert "error" not in mix


def test_the_platform_files_module_map_is_reported(host_tree):
    """kvm_host reads platform.module_ids to tell which GPUs still lack a module ID."""
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_facts import build
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._platform_file import (
        platform_from_dict,
    )
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import detect
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_host

    topology = read_host(*host_tree("dgx-h100"))
    built_in, _reason = detect(topology)
    assert build(topology, built_in, "detected", [], [])["platform"]["module_ids"] == {}
    mapped = platform_from_dict({"base": "dgx-h100", "module_ids": {"0000:1b:00.0": 5}})
    result = build(topology, mapped, "file", [], [])
    assert result["platform"]["fabric"] == "shared_nvswitch"
    assert result["platform"]["module_ids"] == {"0000:1b:00.0": 5}
    assert result["platform"]["nvswitch_driver"] == "nvidia"
    standins = platform_from_dict({"base": "dgx-h100", "nvswitch_driver": "virtio-pci"})
    shared = build(topology, standins, "file", [], [])
    assert shared["platform"]["nvswitch_driver"] == "virtio-pci"
    # the switches are the host's on a shared-NVSwitch platform, free for VMs on a DGX-2
    switch_lines = [line for line in shared["allocation_map"] if line.startswith("NVSwitch")]
    assert len(switch_lines) == 4
    assert all(line.endswith("-> host, for Fabric Manager (virtio-pci)") for line in switch_lines)
    dgx2_topology = read_host(*host_tree("dgx2"))
    dgx2 = build(dgx2_topology, detect(dgx2_topology)[0], "detected", [], [])
    assert [line for line in dgx2["allocation_map"] if line.startswith("NVSwitch")][0].endswith(
        "-> free")

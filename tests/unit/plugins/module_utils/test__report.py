# SPDX-License-Identifier: GPL-3.0-or-later
"""allocation_map: who holds each GPU and NVSwitch, in words an admin reads."""

from ansible_collections.gpuvirt.kvm.plugins.module_utils._report import allocation_map


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

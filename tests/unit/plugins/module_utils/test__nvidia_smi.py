# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""nvidia-smi topo -m parsing, on captured and fixture texts."""

import os

import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils._nvidia_smi import (
    NvidiaSmiQueryError,
    NvidiaSmiTopoError,
    parse_memory_health,
    parse_module_ids,
    parse_topo_matrix,
)

HERE = os.path.dirname(__file__)
TEXTS = os.path.join(HERE, "..", "..", "..", "fixtures", "nvidia-smi")
TOOLS = os.path.join(HERE, "..", "..", "..", "fixtures", "gpu-admin-tools")


def text(name):
    with open(os.path.join(TEXTS, name), encoding="utf-8") as handle:
        return handle.read()


def test_real_h100_capture_with_ansi_header():
    topo = parse_topo_matrix(text("h100-cloud-vm.txt"))
    assert topo.gpu_count == 1
    assert topo.links == {}
    assert topo.cpu_affinity == {0: "0-15"}
    assert topo.numa_affinity == {0: 0}


def test_real_h200_capture_of_driver_580():
    # Driver 580, with the "GPU NUMA ID" column (N/A: no GPU memory node), which is skipped.
    topo = parse_topo_matrix(text("h200-cloud-vm.txt"))
    assert topo.gpu_count == 1
    assert topo.links == {}
    assert topo.cpu_affinity == {0: "0-15"}
    assert topo.numa_affinity == {0: 0}


def test_dgx2_all_pairs_nv6_and_nic_column_ignored():
    topo = parse_topo_matrix(text("dgx2.txt"))
    assert topo.gpu_count == 16
    assert len(topo.links) == 16 * 15
    assert {topo.nvlinks(i, j) for (i, j) in topo.links} == {6}
    assert topo.cpu_affinity[8] == "24-47,72-95"
    assert topo.numa_affinity[15] == 1


def test_pcie_bridge_pair():
    topo = parse_topo_matrix(text("pcie-4gpu.txt"))
    assert topo.nvlink_matrix() == {(0, 1): 12, (1, 0): 12}
    assert topo.links[(0, 2)] == "PHB"
    assert topo.nvlinks(2, 3) == 0


@pytest.mark.parametrize(
    "bad, words",
    [
        ("", "empty"),
        ("hello world\n", "no header"),
        ("\tGPU0\tGPU1\nGPU0\t X\tNV4\n", "no row for GPU1"),
        ("\tGPU0\tGPU1\nGPU0\t X\tNV4\nGPU1\tPIX\t X\n", "symmetric"),
        ("\tGPU0\tGPU1\nGPU0\t X\tFAST\nGPU1\tFAST\t X\n", "not a link type"),
        ("\tGPU0\tGPU1\nGPU0\t NV2\tNV4\nGPU1\tNV4\t X\n", "diagonal"),
        ("\tGPU0\tGPU2\nGPU0\t X\tNV4\nGPU2\tNV4\t X\n", "in order"),
        ("\tGPU0\tGPU1\nGPU0\t X\nGPU1\tNV4\t X\n", "cells"),
    ],
)
def test_malformed_text_names_the_option(bad, words):
    with pytest.raises(NvidiaSmiTopoError) as err:
        parse_topo_matrix(bad)
    assert "nvidia_smi_topo" in str(err.value)
    assert words in str(err.value)


def test_text_of_another_host_is_refused():
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._nvidia_smi import (
        nvlinks_for_host,
    )

    assert nvlinks_for_host(text("pcie-4gpu.txt"), 4, "/sys") == {(0, 1): 12, (1, 0): 12}
    with pytest.raises(NvidiaSmiTopoError, match="lists 16 GPUs but 4 were found"):
        nvlinks_for_host(text("dgx2.txt"), 4, "/sys")


# --- nvidia-smi -q: module IDs ------------------------------------------------------------------

def test_module_id_from_a_real_h200_capture():
    # Driver 580 prints "Module Id" under "Platform Info"; "Module Power Readings" is no match.
    query = os.path.join(TEXTS, "..", "captured", "h200-cloud-vm", "nvidia-smi-q.txt")
    with open(query, encoding="utf-8") as handle:
        assert parse_module_ids(handle.read()) == {"0000:00:06.0": 7}


HGX_QUERY = """
==============NVSMI LOG==============

Driver Version                                         : 570.133.20
Attached GPUs                                          : 3
GPU 00000000:1B:00.0
    Product Name                                       : NVIDIA H100 80GB HBM3
    Platform Info
        Peer Type                                      : Switch Connected
        Module Id                                      : 5
GPU 00000000:9D:00.0
    Product Name                                       : NVIDIA H100 80GB HBM3
    Platform Info
        Module ID                                      : 1
GPU 00000001:C3:00.0
    Product Name                                       : NVIDIA H100 NVL
    Platform Info
        Module Id                                      : N/A
    Module Power Readings
        Average Power Draw                             : N/A
"""


def test_module_ids_by_address_whatever_the_case_and_domain():
    assert parse_module_ids(HGX_QUERY) == {"0000:1b:00.0": 5, "0000:9d:00.0": 1,
                                           "0001:c3:00.0": None}


@pytest.mark.parametrize("text, message", [
    ("Driver Version : 570.133.20\n", "no 'GPU 00000000:BB:DD.F' section"),
    ("GPU 00000000:1B:00.0\n    Module Id : five\n", "module ID 'five', not a number"),
    (None, "expected its text"),
])
def test_module_ids_refuse_other_text(text, message):
    with pytest.raises(NvidiaSmiQueryError, match=message):
        parse_module_ids(text)


def test_module_ids_filter_raises_ansible_errors():
    from ansible.errors import AnsibleFilterError

    from ansible_collections.gpuvirt.kvm.plugins.filter.nvidia_smi_module_ids import (
        nvidia_smi_module_ids,
    )
    assert nvidia_smi_module_ids(HGX_QUERY)["0000:9d:00.0"] == 1
    with pytest.raises(AnsibleFilterError, match="no 'GPU 00000000"):
        nvidia_smi_module_ids("")


def test_gpu_admin_tools_module_names():
    """nvidia_gpu_tools.py --query-module-name as gpu-admin-tools logs it (fixture from its
    source): GPUs' SXM_n is the module ID; NVSwitches' names are not GPUs'."""
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._nvidia_smi import (
        parse_gpu_tools_module_names,
    )

    with open(os.path.join(TOOLS, "hgx-h100-module-names.txt"), encoding="utf-8") as handle:
        text = handle.read()
    # NVIDIA's HGX integration guide: bus 0f->5, 10->7, 41->6, 44->8, 86->1, 87->3, b8->2, bb->4
    assert parse_gpu_tools_module_names(text) == {
        "0000:0f:00.0": 5, "0000:10:00.0": 7, "0000:41:00.0": 6, "0000:44:00.0": 8,
        "0000:86:00.0": 1, "0000:87:00.0": 3, "0000:b8:00.0": 2, "0000:bb:00.0": 4}
    # stdout's device list first, then the log (the role joins the two)
    assert parse_gpu_tools_module_names("GPUs:\n  0 GPU 0000:0F:00.0 H100 0x2330 BAR0 0x0\n"
                                        + text)["0000:0f:00.0"] == 5
    with open(os.path.join(TOOLS, "pcie-unsupported.txt"), encoding="utf-8") as handle:
        with pytest.raises(NvidiaSmiQueryError, match="named no GPU's module.*0000:17:00.0 H100 "
                           "0x2331 BAR0 0x30000000000 does not support module name query"):
            parse_gpu_tools_module_names(handle.read())
    with pytest.raises(NvidiaSmiQueryError, match="expected its output"):
        parse_gpu_tools_module_names(None)


# --- nvidia-smi -q: memory health (the deep check) ----------------------------------------------

def test_a_healthy_h200_capture_says_nothing():
    """Driver 580's ECC section, with its new Repair Pending and Unrepairable Memory lines."""
    query = os.path.join(TEXTS, "..", "captured", "h200-cloud-vm", "nvidia-smi-q.txt")
    with open(query, encoding="utf-8") as handle:
        assert parse_memory_health(handle.read()) == {"0000:00:06.0": ()}


def test_pending_remaps_and_uncorrectable_errors_in_an_a100_query():
    found = parse_memory_health(text("q-memory-a100.txt"))
    # 177 correctable and an aggregate (earlier) uncorrectable count say nothing; the pending
    # remap waits for a reset
    assert found["0000:10:1c.0"] == (
        ("degraded", "a row remap waits for a GPU reset (nvidia-smi -q: Remapped Rows Pending)"),)
    states = [state for state, _why in found["0000:10:1d.0"]]
    assert states == ["failed", "failed"]
    assert found["0000:10:1d.0"][0][1] == (
        "3 DRAM uncorrectable ECC errors since the driver loaded (nvidia-smi -q)")
    assert "Remapping Failure Occurred" in found["0000:10:1d.0"][1][1]


def test_new_repair_lines_count():
    q = text("q-memory-a100.txt").replace(
        "    Retired Pages\n", "        Unrepairable Memory               : Yes\n"
        "        TPC Repair Pending                : Yes\n    Retired Pages\n", 1)
    first = parse_memory_health(q)["0000:10:1c.0"]
    assert ("failed", "memory the GPU cannot repair (nvidia-smi -q: Unrepairable Memory)") in first
    assert ("degraded",
            "a repair waits for a GPU reset (nvidia-smi -q: TPC Repair Pending)") in first


def test_a_text_without_gpus_is_refused():
    with pytest.raises(NvidiaSmiQueryError, match="no GPU section"):
        parse_memory_health("NVIDIA-SMI has failed because it couldn't communicate with the "
                            "NVIDIA driver.\n")

# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Platform data, detection and platform files."""

import dataclasses
import json

import pytest
import topo_factory

from ansible_collections.gpuvirt.kvm.plugins.module_utils import _platforms
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platform_data import platform_from_dict
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platform_file import get_platform
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
    GPU_IDS,
    NVSWITCH_IDS,
    PLATFORMS,
    PlatformError,
    detect,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_host


def _r(a, b):
    return tuple(range(a, b + 1))


# Written out by hand from docs/hardware.md sections 3 and 4, not computed like the module does.
EXPECTED_PARTITIONS = {
    "dgx2": {
        16: [_r(0, 15)],
        8: [_r(0, 7), _r(8, 15)],
        4: [_r(0, 3), _r(4, 7), _r(8, 11), _r(12, 15)],
        2: [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15)],
        1: [(i,) for i in range(16)],
    },
    "dgx-a100": {
        8: [_r(0, 7)],
        4: [_r(0, 3), _r(4, 7)],
        2: [(0, 1), (2, 3), (4, 5), (6, 7)],
        1: [(i,) for i in range(8)],
    },
    # FM pairs are modules (1,3) (2,4) (5,7) (6,8): indexes (0,2) (1,3) (4,6) (5,7).
    "dgx-h100": {
        8: [_r(0, 7)],
        4: [_r(0, 3), _r(4, 7)],
        2: [(0, 2), (1, 3), (4, 6), (5, 7)],
        1: [(i,) for i in range(8)],
    },
    "generic": {},
}

DGX2_SWITCHES = {
    _r(0, 15): _r(0, 11),
    _r(0, 7): _r(0, 5), _r(8, 15): _r(6, 11),
    _r(0, 3): (0, 1, 2), _r(4, 7): (3, 4, 5), _r(8, 11): (6, 7, 8), _r(12, 15): (9, 10, 11),
    (0, 1): (0,), (2, 3): (1,), (4, 5): (3,), (6, 7): (4,),
    (8, 9): (6,), (10, 11): (7,), (12, 13): (9,), (14, 15): (10,),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARTITIONS))
def test_partition_tables(name):
    plat = PLATFORMS[name]
    assert {k: list(v) for k, v in plat.partitions.items()} == EXPECTED_PARTITIONS[name]
    assert plat.allowed_sizes == tuple(sorted(EXPECTED_PARTITIONS[name]))
    assert set(plat.gpu_ids) <= set(GPU_IDS)
    assert set(plat.nvswitch_ids) <= set(NVSWITCH_IDS)


@pytest.mark.parametrize("block", sorted(EXPECTED_PARTITIONS["dgx2"][1]) + sorted(DGX2_SWITCHES))
def test_dgx2_nvswitch_subsets(block):
    assert PLATFORMS["dgx2"].nvswitches_for(block) == DGX2_SWITCHES.get(block, ())


def test_dgx2_disjoint_blocks_never_share_a_switch():
    plat = PLATFORMS["dgx2"]
    blocks = [b for size in plat.partitions.values() for b in size]
    for a in blocks:
        for b in blocks:
            if not set(a) & set(b):
                assert not set(plat.nvswitches_for(a)) & set(plat.nvswitches_for(b)), (a, b)


@pytest.mark.parametrize("name", ["dgx-a100", "dgx-h100", "generic"])
def test_shared_fabric_gives_vms_no_switches(name):
    plat = PLATFORMS[name]
    for blocks in plat.partitions.values():
        for block in blocks:
            assert plat.nvswitches_for(block) == ()


@pytest.mark.parametrize("name, block, fm_id", [
    ("dgx-h100", (0, 2), 3), ("dgx-h100", (5, 7), 6), ("dgx-h100", _r(4, 7), 2),
    ("dgx-h100", _r(0, 7), 0), ("dgx-h100", (3,), 10),
    ("dgx-a100", (0, 1), 11), ("dgx-a100", _r(4, 7), 8), ("dgx-a100", _r(0, 7), 1),
    ("dgx-a100", (7,), 26), ("dgx-a100", (1, 2), None),
])
def test_fm_partition_ids(name, block, fm_id):
    assert PLATFORMS[name].fm_partition_for(block) == fm_id


def test_h100_service_vm_device():
    assert (0x11F8, 0x4128) in PLATFORMS["dgx-h100"].extra_passthrough_ids
    assert PLATFORMS["dgx-h100"].fabric == "shared_nvswitch"
    assert PLATFORMS["dgx2"].fabric == "full_passthrough"


@pytest.mark.parametrize("host, name, why", [
    ("dgx2", "dgx2", "16 x Tesla V100-SXM3-32GB"),
    ("dgx-a100", "dgx-a100", "8 x A100-SXM4-80GB"),
    ("dgx-h100", "dgx-h100", "4 x NVSwitch gen 3"),
    ("pcie4", "generic", "dgx-h100 needs 8 GPUs and 4 NVSwitches"),
    ("cpu-only", "generic", "found no NVIDIA GPU"),
])
def test_detect(host, name, why):
    plat, reason = detect(topo_factory.HOSTS[host]())
    assert plat.name == name
    assert why in reason


def test_detect_h200_as_h100_platform():
    assert detect(topo_factory.dgx_h100(device_id=0x2335))[0].name == "dgx-h100"


def test_detect_dgx2_missing_a_gpu_is_generic():
    # Indexes would shift under the partition table, so a 15-GPU DGX-2 must not match dgx2.
    topo = topo_factory.dgx2()
    del topo.pci["0000:39:00.0"]
    plat, reason = detect(topo)
    assert plat.name == "generic"
    assert "15 GPUs" in reason and "dgx2 needs 16 GPUs" in reason


def test_get_platform_auto_and_names():
    topo = topo_factory.dgx_a100()
    assert get_platform("auto", topo).name == "dgx-a100"
    assert get_platform("dgx-a100", topo) is PLATFORMS["dgx-a100"]
    assert get_platform("generic", topo).name == "generic"


def test_unknown_name_lists_known_ones():
    with pytest.raises(PlatformError) as err:
        get_platform("dgx-b200", topo_factory.pcie4())
    text = str(err.value)
    assert text.startswith("platform:")
    for name in PLATFORMS:
        assert name in text


def test_known_name_on_wrong_host():
    with pytest.raises(PlatformError) as err:
        get_platform("dgx2", topo_factory.pcie4())
    assert "dgx2 expects 16 GPUs" in str(err.value) and "has 0" in str(err.value)


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_round_trip_through_a_json_file(tmp_path):
    for name, plat in PLATFORMS.items():
        path = _write(tmp_path, name + ".json", plat.to_dict())
        loaded = get_platform(path)
        assert loaded.partitions == plat.partitions
        assert loaded.partition_nvswitches == plat.partition_nvswitches
        assert loaded.fm_partitions == plat.fm_partitions
        assert dataclasses.replace(loaded, source="built-in") == plat


def test_yaml_file_with_base_and_strapped_ids(tmp_path):
    # A single-board DGX A100 strapped as physical IDs 9-16: FM partitions 2, 9, 10, 15-18 fit.
    path = _write(tmp_path, "a100-9-16.yml", (
        "base: dgx-a100\n"
        "name: a100-upper\n"
        "physical_ids: [9, 10, 11, 12, 13, 14, 15, 16]\n"
        "templates:\n  1: {vcpus: 16, memory_mb: 131072}\n"))
    plat = get_platform(path, topo_factory.dgx_a100())
    assert plat.name == "a100-upper"
    assert plat.partitions[4] == (_r(0, 3), _r(4, 7))
    assert plat.fm_partition_for((0, 1)) == 15
    assert plat.fm_partition_for(_r(0, 7)) == 2
    assert plat.template_override(1) == {"vcpus": 16, "memory_mb": 131072}


def test_file_partitions_by_physical_id_and_nvswitches(tmp_path):
    data = {"base": "dgx-h100", "name": "h100-pairs-only",
            "partitions": {"2": [{"physical_ids": [1, 3]}, {"physical_ids": [2, 4]}],
                           "1": [[0], [1], [2], [3]]}}
    plat = get_platform(_write(tmp_path, "p.json", data), topo_factory.dgx_h100())
    assert plat.partitions == {2: ((0, 2), (1, 3)), 1: ((0,), (1,), (2,), (3,))}
    full = platform_from_dict({"base": "dgx2", "partitions": {
        "2": [{"gpus": [0, 1], "nvswitches": [5]}]}, "allowed_sizes": [2]})
    assert full.nvswitches_for((0, 1)) == (5,)


@pytest.mark.parametrize("name, content, fragment", [
    ("bad.json", "{not json", "is not valid JSON"),
    ("bad.yml", "a: [1, 2\n", "is not valid YAML"),
    ("list.json", [1, 2], "must hold a mapping"),
    ("unknown.json", {"base": "dgx2", "gpus": 3}, "unknown field(s) gpus"),
    ("noname.json", {"gpu_count": 4}, "missing field 'name'"),
    ("base.json", {"base": "dgx-9000"}, "base 'dgx-9000' is not a known platform"),
    ("fabric.json", {"base": "dgx2", "fabric": "magic"}, "fabric 'magic' is not one of"),
    ("ids.json", {"base": "dgx2", "gpu_ids": ["10de-1db8"]}, "is not a PCI ID"),
    ("classes.json", {"name": "lab", "gpu_ids": ["8086:10d3"], "gpu_classes": ["nic"]},
     "not a hex PCI class"),
    ("classes2.json", {"name": "lab", "gpu_classes": []}, "non-empty list"),
    ("index.json", {"base": "dgx-h100", "partitions": {"2": [[6, 8]]}},
     "names GPU index 8, but the platform has 8 GPUs"),
    ("physid.json", {"base": "dgx-h100", "partitions": {"2": [{"physical_ids": [7, 12]}]}},
     "names physical ID 12"),
    ("twice.json", {"base": "dgx-h100", "partitions": {"2": [[0, 2]], "02": [[1, 3]]}},
     "lists size 2 twice"),
    ("count.json", {"base": "dgx-h100", "partitions": {"4": [[0, 1, 2]]}},
     "has 3 GPUs but is listed under size 4"),
    ("dup.json", {"base": "dgx-h100", "partitions": {"2": [[0, 2], [2, 0]]}},
     "is listed twice under size 2"),
    ("allowed.json", {"base": "dgx-h100", "allowed_sizes": [1, 2, 4]},
     "partitions list size(s) 8 that allowed_sizes"),
    ("empty-size.json", {"base": "dgx-h100", "allowed_sizes": [1, 2, 3, 4, 8]},
     "allowed_sizes has size(s) 3 with no partition"),
    ("physcount.json", {"base": "dgx-h100", "physical_ids": [1, 2, 3]},
     "physical_ids has 3 entries but gpu_count is 8"),
    ("switch.json", {"base": "dgx2", "partitions": {"2": [{"gpus": [0, 1], "nvswitches": [12]}]},
                     "allowed_sizes": [2]}, "names NVSwitch index 12"),
    ("tpl.json", {"base": "dgx2", "templates": {"1": {"cpus": 4}}}, "unknown field(s) cpus"),
    ("driver.json", {"base": "dgx-h100", "nvswitch_driver": "nvidia; reboot"},
     "nvswitch_driver must be the name of the host driver"),
    ("driver2.json", {"base": "dgx-h100", "nvswitch_driver": ["nvidia"]},
     "nvswitch_driver must be the name"),
])
def test_bad_platform_files(tmp_path, name, content, fragment):
    path = _write(tmp_path, name, content)
    with pytest.raises(PlatformError) as err:
        get_platform(path)
    text = str(err.value)
    assert text.startswith("platform:")
    assert fragment in text


def test_partition_beyond_this_host(tmp_path):
    # The file is self-consistent, but this host has 4 GPUs, not 6.
    path = _write(tmp_path, "six.json", {"name": "six", "partitions": {
        "2": [[0, 1], [2, 3], [4, 5]]}})
    with pytest.raises(PlatformError) as err:
        get_platform(path, topo_factory.pcie4())
    assert "names GPU index 5, but this host has 4 GPUs" in str(err.value)


def test_yaml_without_pyyaml_says_use_json(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "yaml", None)  # "import yaml" now raises ImportError
    path = _write(tmp_path, "p.yaml", "base: dgx2\n")
    with pytest.raises(PlatformError) as err:
        get_platform(path)
    assert "PyYAML is not importable" in str(err.value) and "as JSON" in str(err.value)
    assert get_platform(_write(tmp_path, "p.json", {"base": "dgx2"})).partitions == \
        PLATFORMS["dgx2"].partitions


def test_missing_file(tmp_path):
    with pytest.raises(PlatformError) as err:
        get_platform(str(tmp_path / "nope.yml"))
    assert "cannot read platform file" in str(err.value)


def test_file_may_declare_stand_in_devices(tmp_path, host_tree):
    """A lab's stand-ins (NICs named as GPUs) count only through an explicit platform file."""
    sysfs, proc = host_tree("pcie-4gpu")
    topo = read_host(sysfs, proc)
    nics = sorted(d.bdf for d in topo.pci.values() if d.id_pair == (0x8086, 0x1521))
    assert nics == ["0000:06:00.0", "0000:06:00.1"]
    path = tmp_path / "lab.json"
    path.write_text(json.dumps({"name": "lab", "gpu_ids": ["8086:1521"],
                                "gpu_classes": ["0x0200"]}))
    lab = get_platform(str(path))
    assert lab.gpu_classes == (0x0200,)
    assert [d.bdf for d in _platforms.platform_gpus(topo, lab)] == nics
    # Without the class widened, the same IDs are not GPUs; the built-in list never has NICs.
    path.write_text(json.dumps({"name": "lab", "gpu_ids": ["8086:1521"]}))
    assert _platforms.platform_gpus(topo, get_platform(str(path))) == []
    assert not set(nics) & {d.bdf for d in _platforms.host_gpus(topo)}

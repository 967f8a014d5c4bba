# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Placement on a shared-NVSwitch host from Fabric Manager's live list (_fabric_placement).

The lists come from the stand-in fmpm (tests/fixtures/fabric), which prints what fmpm 1.0.1
prints; everything after that is pure and tested with tables.
"""

import json

import pytest
import topo_factory

from ansible_collections.gpuvirt.kvm.plugins.module_utils import _fleet_plan
from ansible_collections.gpuvirt.kvm.plugins.module_utils._fabric_model import (
    FailedDevice,
    NvlinkFailures,
    parse_partition_list,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._fabric_placement import (
    FabricPlacementError,
    fabric_view,
    fm_bus_ids,
    module_map,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import DefinedDomain
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_facts import build
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement import HostState
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import (
    Holding,
    PlacementError,
    Request,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platform_data import platform_from_dict
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import PLATFORMS, detect

H100_BDFS = ["0000:%02x:00.0" % b for b in topo_factory.H100_GPU_BUSES]
IDENTITY = tuple(range(1, 9))
# NVIDIA's HGX integration guide (WP-12736-002), bus -> module: 0f->5, 10->7, 41->6, 44->8,
# 86->1, 87->3, b8->2, bb->4 (fabric.md section 5): module IDs do not follow PCI order.
WP_BUSES = (0x0F, 0x10, 0x41, 0x44, 0x86, 0x87, 0xB8, 0xBB)
WP_MODULES = (5, 7, 6, 8, 1, 3, 2, 4)


def _blocks(platform, size):
    return platform.partitions.get(size, ())


# --- the module map ------------------------------------------------------------------------------

def test_module_ids_come_from_the_first_source_that_names_the_gpu():
    record = {b: i + 1 for i, b in enumerate(H100_BDFS)}
    platform_file = {"1b:00.0": 8, "0000:DF:00.0": 1}  # other spellings of two addresses
    ids = module_map(H100_BDFS, [("platform file", platform_file), ("host record", record)])
    assert ids == (8, 2, 3, 4, 5, 6, 7, 1)


def _gpu(module, bus):
    return {"physicalId": module, "uuid": "", "pciBusId": bus, "numNvLinksAvailable": 12,
            "maxNumNvLinks": 12, "nvlinkLineRateMBps": 25781}


def test_fm_pci_bus_ids_map_modules_where_fm_gives_them():
    """DGX-2 and A100: FM names each GPU's address (NVML's 8-digit domain). It then maps the
    GPUs, after a platform file and before the host record; H100's empty addresses give none."""
    text = json.dumps({"version": 1, "numPartitions": 2, "maxNumPartitions": 2, "partitionInfo": [
        {"partitionId": 0, "isActive": 0, "numGpus": 2,
         "gpuInfo": [_gpu(9, "00000000:1B:00.0"), _gpu(10, "00000000:43:00.0")]},
        {"partitionId": 1, "isActive": 0, "numGpus": 1, "gpuInfo": [_gpu(9, "00000000:1B:00.0")]},
        {"partitionId": 2, "isActive": 0, "numGpus": 1, "gpuInfo": [_gpu(11, "")]}]})
    bus = fm_bus_ids(parse_partition_list(text))
    assert bus == {"0000:1b:00.0": 9, "0000:43:00.0": 10}
    record = {b: i + 1 for i, b in enumerate(H100_BDFS)}
    ids = module_map(H100_BDFS, [("platform file", {"0000:43:00.0": 20}),
                                 ("Fabric Manager's pciBusId", bus), ("host record", record)])
    assert ids[:3] == (9, 20, 3)
    # an address FM gives two modules is no map at all
    twice = json.dumps({"version": 1, "numPartitions": 1, "maxNumPartitions": 1, "partitionInfo": [
        {"partitionId": 0, "isActive": 0, "numGpus": 2,
         "gpuInfo": [_gpu(1, "00000000:1B:00.0"), _gpu(2, "00000000:1b:00.0")]}]})
    assert fm_bus_ids(parse_partition_list(twice)) == {}
    h100 = json.dumps({"version": 1, "numPartitions": 1, "maxNumPartitions": 1, "partitionInfo": [
        {"partitionId": 0, "isActive": 0, "numGpus": 1, "gpuInfo": [_gpu(1, "")]}]})
    assert fm_bus_ids(parse_partition_list(h100)) == {}


def test_fm_in_a_service_vm_gives_its_own_addresses_which_are_never_read_as_the_hosts():
    """FM in a service VM names the GPUs at the VM's PCI addresses: with ``service_vm`` its
    pciBusId is not a source, and the host record's map decides; without, FM's wins."""
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_context import (
        module_id_sources,
    )
    # inside the VM, the guest's bus 1b holds the GPU that is the host's 43:00.0 (module 2)
    text = json.dumps({"version": 1, "numPartitions": 1, "maxNumPartitions": 1, "partitionInfo": [
        {"partitionId": 0, "isActive": 0, "numGpus": 2,
         "gpuInfo": [_gpu(2, "00000000:1B:00.0"), _gpu(1, "00000000:43:00.0")]}]})
    listing = parse_partition_list(text)
    record = {b: i + 1 for i, b in enumerate(H100_BDFS)}
    platform = PLATFORMS["dgx-h100"]
    on_host = module_map(H100_BDFS, module_id_sources(platform, listing, ("host record", record)))
    assert on_host[:2] == (2, 1)
    in_vm = module_map(H100_BDFS, module_id_sources(platform, listing, ("host record", record),
                                                    service_vm="fabric-manager"))
    assert in_vm == tuple(range(1, 9))


def test_a_gpu_without_module_id_stops_placement_and_says_how_to_give_one():
    record = {b: i + 1 for i, b in enumerate(H100_BDFS[:6])}
    with pytest.raises(FabricPlacementError) as err:
        module_map(H100_BDFS, [("host record", record)])
    msg = str(err.value)
    assert "no module ID for GPUs 6 (0000:d1:00.0), 7 (0000:df:00.0)" in msg
    assert "module_ids in a platform file" in msg and "nvidia-smi -q" in msg
    assert "fabric.module_ids section of the file the host_record option names" in msg


def test_a_module_id_given_twice_is_refused():
    record = {b: 3 for b in H100_BDFS}
    with pytest.raises(FabricPlacementError, match=r"GPUs 0 \(0000:1b:00.0, from host record\) "
                                                   r"and 1 .* both have module ID 3"):
        module_map(H100_BDFS, [("host record", record)])


@pytest.mark.parametrize("ids", [tuple(range(0, 8)), tuple(range(11, 19))], ids=["0-7", "11-18"])
def test_module_ids_that_fm_does_not_list_are_refused(fm_state, ids):
    listing = fm_state("h100").partitions()
    with pytest.raises(FabricPlacementError) as err:
        fabric_view(listing, ids, H100_BDFS)
    assert "do not match Fabric Manager's partitions" in str(err.value)
    assert "has module ID %d, which no partition names" % ids[0] in str(err.value)
    assert "FM lists GPU modules 1, 2, 3, 4, 5, 6, 7, 8" in str(err.value)


def test_a_host_record_whose_map_is_not_a_mapping_is_refused():
    with pytest.raises(FabricPlacementError, match="host record: module_ids must map GPU "
                                                   "addresses to module IDs"):
        module_map(H100_BDFS, [("platform file", {}), ("host record", ["x"])])


def test_a_platform_file_carries_module_ids_and_checks_them():
    plat = platform_from_dict({"base": "dgx-h100", "module_ids": {"1b:00.0": 5, "43:00.0": 7}})
    assert plat.module_ids == {"0000:1b:00.0": 5, "0000:43:00.0": 7}
    assert platform_from_dict(plat.to_dict()).module_ids == plat.module_ids  # facts round trip
    with pytest.raises(Exception, match="module_ids gives module ID 5 to both"):
        platform_from_dict({"base": "dgx-h100", "module_ids": {"1b:00.0": 5, "43:00.0": 5}})
    with pytest.raises(Exception, match="module_ids: 'GPU0' is not a PCI address"):
        platform_from_dict({"base": "dgx-h100", "module_ids": {"GPU0": 1}})


# --- partitions from the live list ---------------------------------------------------------------

def test_h100_pairs_are_modules_1_3_and_2_4(fm_state):
    view = fabric_view(fm_state("h100").partitions(), IDENTITY, H100_BDFS)
    plat = view.platform(PLATFORMS["dgx-h100"])
    assert _blocks(plat, 2) == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert _blocks(plat, 4) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert view.partition_for((0, 2)) == 3 and view.partition_for((0, 1)) is None
    assert view.partition_for(range(8)) == 0


def test_b200_pairs_are_modules_1_2_and_there_is_no_partition_0(fm_state):
    view = fabric_view(fm_state("b200").partitions(), IDENTITY, H100_BDFS)
    plat = view.platform(PLATFORMS["hgx-b200"])
    assert _blocks(plat, 2) == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert view.partition_for(range(8)) == 1 and view.partition_for((0, 1)) == 4
    assert view.partition_for((7,)) == 15


def test_the_live_list_wins_over_the_table(fm_state):
    # A B200 board's FM behind a platform whose table is H100's: the pairs are FM's.
    view = fabric_view(fm_state("b200").partitions(), IDENTITY, H100_BDFS)
    plat = view.platform(PLATFORMS["dgx-h100"])
    assert _blocks(plat, 2) == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert plat.fm_partition_for((0, 1)) == 4 and plat.fm_partition_for((0, 2)) is None


def test_module_ids_out_of_pci_order_map_partitions_to_the_right_gpus(fm_state):
    bdfs = ["0000:%02x:00.0" % b for b in WP_BUSES]
    view = fabric_view(fm_state("h100").partitions(), WP_MODULES, bdfs)
    plat = view.platform(PLATFORMS["dgx-h100"])
    # {1,3} is buses 86, 87; {2,4} b8, bb; {5,7} 0f, 10; {6,8} 41, 44.
    assert _blocks(plat, 2) == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert view.partition_for((4, 5)) == 3 and view.partition_for((0, 1)) == 5
    assert _blocks(plat, 4) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert view.partition_for((4, 5, 6, 7)) == 1


# --- what is not free ----------------------------------------------------------------------------

def _state(topology, fm_listing_view, base, allocations=(), unhealthy=()):
    plat = fm_listing_view.platform(base)
    bdfs = [d.bdf for d in topology.pci.values() if d.class_code >> 8 == 0x0302]
    return HostState(topology, plat, allocations, unhealthy_gpus=unhealthy,
                     busy_gpus=fm_listing_view.busy_gpus(sorted(bdfs)))


def test_gpus_of_an_active_partition_and_those_overlapping_it_are_not_free(fm_state):
    fm = fm_state("h100")
    fm.activate(3)  # modules 1, 3: GPUs 0 and 2
    view = fabric_view(fm.partitions(), IDENTITY, H100_BDFS)
    assert view.busy == {0: 3, 2: 3}
    assert view.busy_gpus(H100_BDFS) == {
        "0000:1b:00.0": "in active FM partition 3 (GPU modules 1, 3)",
        "0000:52:00.0": "in active FM partition 3 (GPU modules 1, 3)"}
    state = _state(topo_factory.dgx_h100(), view, PLATFORMS["dgx-h100"])
    got = state.place(Request(name="a", gpus=2, vcpus=4, memory_mb=1024))
    assert got.gpu_indexes == (1, 3) and got.fm_partition == 4
    with pytest.raises(PlacementError) as err:  # the quad 1-4 overlaps the active pair
        state.place(Request(name="b", gpus=4, gpu_index=0, vcpus=4, memory_mb=1024))
    assert "GPUs 0,2 in active FM partition 3 (GPU modules 1, 3), GPUs 1,3 held by a" \
        in str(err.value)
    assert state.place(Request(name="c", gpus=4, vcpus=4, memory_mb=1024)).gpu_indexes == \
        (4, 5, 6, 7)
    assert state.summary()["gpus"][0]["busy"] == "in active FM partition 3 (GPU modules 1, 3)"


def test_busy_gpus_stay_busy_when_the_vm_holding_them_is_released(fm_state):
    fm = fm_state("h100")
    fm.activate(4)  # modules 2, 4: GPUs 1 and 3, held by VM x
    view = fabric_view(fm.partitions(), IDENTITY, H100_BDFS)
    held = Holding(name="x", gpus=(H100_BDFS[1], H100_BDFS[3]), memory_mb=1024)
    state = _state(topo_factory.dgx_h100(), view, PLATFORMS["dgx-h100"], allocations=[held])
    assert state.summary()["gpus"][1]["holder"] == "x"
    for ledger in (state.copy(), state.derive([held], busy_gpus=view.busy_gpus(H100_BDFS)),
                   state):
        ledger.release("x")  # x is undefined while its partition is still active
        assert set(ledger.free_gpu_indexes()) == set(range(8)) - {1, 3}
    assert state.derive([held]).free_gpu_indexes() == [0, 2, 4, 5, 6, 7]  # held, not busy


def test_busy_gpus_travel_to_the_fleet_planner(fm_state):
    fm = fm_state("h100")
    fm.activate(3)
    view = fabric_view(fm.partitions(), IDENTITY, H100_BDFS)
    plat = view.platform(PLATFORMS["dgx-h100"])
    topology = topo_factory.dgx_h100()
    facts = build(topology, plat, "test", [], [], busy_gpus=view.busy_gpus(H100_BDFS))
    rebuilt = _fleet_plan.StateBuilder().state("h", facts)
    assert rebuilt.busy == {0: view.busy_gpus(H100_BDFS)[H100_BDFS[0]],
                            2: view.busy_gpus(H100_BDFS)[H100_BDFS[2]]}
    with pytest.raises(PlacementError, match="in active FM partition 3"):
        rebuilt.place(Request(name="q", gpus=4, gpu_index=0, vcpus=4, memory_mb=1024))


def test_a_degraded_gpu_makes_its_multi_gpu_partitions_unplaceable(fm_state):
    fm = fm_state("h100")
    fm_state.control("degrade", 2, 12)  # module 2 = GPU 1 keeps 12 of 18 links
    view = fabric_view(fm.partitions(), IDENTITY, H100_BDFS)
    assert sorted(view.unplaceable) == [0, 1, 4]  # 1-8, 1-4, {2,4}; single 8 stays
    plat = view.platform(PLATFORMS["dgx-h100"])
    assert _blocks(plat, 2) == ((0, 2), (4, 6), (5, 7)) and 8 not in plat.partitions
    assert (1,) in _blocks(plat, 1)
    state = HostState(topo_factory.dgx_h100(), plat)
    with pytest.raises(PlacementError) as err:
        state.place(Request(name="a", gpus=2, gpu_index=1, vcpus=4, memory_mb=1024))
    assert "gpu_index 1 cannot be placed now: GPUs 1,3: FM partition 4: FM reports fewer " \
           "NVLinks than the GPUs have on GPU modules 2" in str(err.value)
    with pytest.raises(PlacementError, match="no 8-GPU block can be placed now"):
        state.place(Request(name="b", gpus=8, vcpus=4, memory_mb=1024))
    row = [r for r in view.report(H100_BDFS)["partitions"] if r["id"] == 4][0]
    assert row["placeable"] is False and "GPU modules 2" in row["why_not"]
    # The fleet planner rebuilds the platform from the host's facts, reasons included.
    facts = build(topo_factory.dgx_h100(), plat, "test", [], [])
    rebuilt = _fleet_plan.StateBuilder().state("h", facts)
    with pytest.raises(PlacementError, match="no 8-GPU block can be placed now: GPUs 0-7: FM "
                                             "partition 0: FM reports fewer NVLinks"):
        rebuilt.place(Request(name="b", gpus=8, vcpus=4, memory_mb=1024))


def test_failed_devices_and_unsupported_partitions(fm_state):
    listing = fm_state("h100").partitions()
    gpu = FailedDevice("gpu", "GPU-0001", "00000000:DF:00.0", (3,))  # module 8
    switch = FailedDevice("switch", "", "00000000:07:00.0", (10,))
    view = fabric_view(listing, IDENTITY, H100_BDFS, NvlinkFailures(gpus=(gpu,)))
    assert sorted(view.unplaceable) == [0, 2, 6]
    other = FailedDevice("gpu", "GPU-9", "00000000:AA:00.0", ())
    view = fabric_view(listing, IDENTITY, H100_BDFS, NvlinkFailures(gpus=(other,)))
    assert view.unplaceable == {} and view.failed_elsewhere == ("GPU 00000000:AA:00.0",)
    view = fabric_view(listing, IDENTITY, H100_BDFS, NvlinkFailures(switches=(switch,)))
    assert sorted(view.unplaceable) == list(range(7))  # every multi-GPU partition
    assert "NVSwitch 00000000:07:00.0" in view.unplaceable[3]
    view = fabric_view(listing, IDENTITY, H100_BDFS, unsupported={5: (5, 7)})
    assert view.unplaceable == {5: "FM lists it as unsupported (degraded NVLinks)"}
    # FM in a service VM names the VM's addresses: a failed GPU is not matched by address
    view = fabric_view(listing, IDENTITY, H100_BDFS, NvlinkFailures(gpus=(gpu,)),
                       by_address=False)
    assert view.unplaceable == {}
    assert view.failed_elsewhere == (
        "GPU 00000000:DF:00.0 (an address in the Fabric Manager VM)",)


def test_partitions_of_gpus_this_host_lacks_are_left_out(fm_state):
    listing = fm_state("h100").partitions()
    view = fabric_view(listing, (1, 2, 3, 4), H100_BDFS[:4])
    assert set(view.foreign) == {0, 2, 5, 6} | set(range(11, 15))
    plat = view.platform(PLATFORMS["dgx-h100"])
    assert plat.partitions == {1: ((0,), (1,), (2,), (3,)), 2: ((0, 2), (1, 3)),
                               4: ((0, 1, 2, 3),)}


# --- B200 ----------------------------------------------------------------------------------------

def test_hgx_b200_is_detected_and_places_fm_pairs():
    plat, why = detect(topo_factory.dgx_b200())
    assert plat.name == "hgx-b200" and "8 GPUs (8 x B200) and 0 NVSwitches" in why
    assert plat.nvswitch_count == 0 and plat.allowed_sizes == (1, 2, 4, 8)
    assert sorted(plat.fm_partitions) == list(range(1, 16))
    state = HostState(topo_factory.dgx_b200(), plat)
    got = state.place(Request(name="a", gpus=2, gpu_index=2, vcpus=4, memory_mb=1024))
    assert got.gpu_indexes == (2, 3) and got.fm_partition == 5 and got.nvswitches == ()


def test_a_running_tenant_without_its_active_partition_is_reported(fm_state):
    fm = fm_state("h100")
    fm.activate(4)
    view = fabric_view(fm.partitions(), IDENTITY, H100_BDFS)
    plat = view.platform(PLATFORMS["dgx-h100"])

    def tenant(name, pid, gpus, active=True):
        return DefinedDomain(name=name, uuid=None, active=active, managed=True,
                             hostdevs=tuple(H100_BDFS[i] for i in gpus), memory_kib=1 << 20,
                             metadata={"owner": "gpuvirt.kvm", "fm_partition": pid})

    domains = [tenant("ok", 4, (1, 3)), tenant("lost", 3, (0, 2)),
               tenant("off", 5, (4, 6), active=False)]
    report = dict(view.report(H100_BDFS), address="127.0.0.1")
    facts = build(topo_factory.dgx_h100(), plat, "test", domains, [], fabric=report,
                  busy_gpus=view.busy_gpus(H100_BDFS))
    lost = [w for w in facts["warnings"] if "partition" in w]
    assert len(lost) == 1 and lost[0].startswith("lost is running, but its Fabric Manager "
                                                 "partition 3 is not active")
    assert [a["fm_partition"] for a in facts["allocations"]] == [4, 3, 5]
    assert "FM partition 4  GPU 1,3 -> active, ok (running)" in facts["allocation_map"]
    assert facts["allocation_map"][2].endswith("-> ok (running)")  # GPU 1: held, not "busy"


@pytest.mark.parametrize("request_kw, words", [
    ({"gpus": 3}, "places only 1/2/4/8-GPU VMs; set gpus to one of 1, 2, 4, 8"),
    ({"gpus": 4, "gpu_index": 1}, "gpu_index 1 is misaligned: on dgx-h100 a 4-GPU VM starts at "
                                  "gpu_index 0, 4"),
    ({"gpus": 2, "gpu_index": 2}, "gpu_index 2 is misaligned: on dgx-h100 a 2-GPU VM starts at "
                                  "gpu_index 0, 1, 4, 5"),
])
def test_sizes_and_indexes_that_start_no_live_partition_are_refused(fm_state, request_kw, words):
    view = fabric_view(fm_state("h100").partitions(), IDENTITY, H100_BDFS)
    state = HostState(topo_factory.dgx_h100(), view.platform(PLATFORMS["dgx-h100"]))
    with pytest.raises(PlacementError, match=words):
        state.place(Request(name="a", vcpus=4, memory_mb=1024, **request_kw))

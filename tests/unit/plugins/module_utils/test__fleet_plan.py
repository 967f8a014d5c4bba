# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Fleet planning over gpu_topology facts: rebuilt host states, where, packing, determinism."""

import json
import os
import random
import sys
from dataclasses import replace

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.gpuvirt.kvm.plugins.module_utils import _fleet_plan
from ansible_collections.gpuvirt.kvm.plugins.module_utils._fleet_placement import (
    Fleet,
    place_on_fleet,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import DefinedDomain, holdings
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_facts import build
from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import nic_functions
from ansible_collections.gpuvirt.kvm.plugins.module_utils._nvidia_smi import nvlinks_for_host
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement import HostState
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import (
    POLICY_DEDICATED,
    PlacementError,
    Request,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platform_file import get_platform
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
    platform_gpus,
    platform_nvswitches,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_host
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_request import plan_requests

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "..", "fixtures")


class Host(object):
    """A fixture host as gpu_topology sees it: its facts, and how to rebuild its real state."""

    def __init__(self, host_tree, name, domains=(), platform="auto", nvidia_smi=None,
                 **options):
        sysfs_root, proc_root = host_tree(name)
        self.topology = read_host(sysfs_root, proc_root)
        self.platform = get_platform(platform, self.topology)
        self.nvlinks = None
        if nvidia_smi:
            with open(os.path.join(FIXTURES, "nvidia-smi", nvidia_smi), encoding="utf-8") as f:
                self.nvlinks = nvlinks_for_host(
                    f.read(), len(platform_gpus(self.topology, self.platform)), sysfs_root)
        self.domains = list(domains)
        self.options = dict(options, nvlinks=self.nvlinks)
        # Facts travel as JSON (a registered result, hostvars, an AWX artifact).
        self.facts = json.loads(json.dumps(self.result()))

    def result(self, requests=()):
        """gpu_topology's result, planning requests on this host as kvm_layout would."""
        return build(self.topology, self.platform, "test", self.domains, list(requests),
                     **self.options)

    def state(self):
        """The HostState gpu_topology and kvm_layout build on the host itself."""
        gpus = [d.bdf for d in platform_gpus(self.topology, self.platform)]
        switches = [d.bdf for d in platform_nvswitches(self.topology, self.platform)]
        options = dict(self.options)
        unhealthy = sorted(options.pop("unhealthy_gpus", ()))
        return HostState(self.topology, self.platform,
                         holdings(self.domains, gpus, switches,
                                  nic_functions(self.topology, self.platform)),
                         unhealthy_gpus=unhealthy, **options)


def domain(name, placement, managed=True, owner_tag=None):
    """The DefinedDomain libvirt would report for a VM defined from a placement."""
    dedicated = placement.cpu_policy == POLICY_DEDICATED
    return DefinedDomain(
        name=name, uuid=name, active=True,
        hostdevs=tuple(sorted(placement.gpus + placement.nvswitches + placement.nics)),
        pinned_cpus=tuple(sorted(placement.cpus)) if dedicated else (),
        cpuset=() if dedicated else tuple(placement.cpus),
        numa_nodes=tuple(placement.numa_nodes), memory_kib=placement.memory_mb * 1024,
        managed=managed, metadata={"owner_tag": owner_tag} if owner_tag else {})


def domains_for(host_tree, name, requests, **kw):
    """Domains of VMs placed on a fresh host by these requests."""
    host = Host(host_tree, name, **kw)
    state = host.state()
    return [domain(r.name, state.place(r)) for r in requests]


def assert_same_state(real, rebuilt):
    a, b = real.model, rebuilt.model
    for attr in ("gpu_bdfs", "switch_bdfs", "gpu_count", "switch_count", "gpu_node", "node_ids",
                 "reserved", "node_cpus", "node_cores", "node_reserved", "reserve_mb",
                 "huge_total", "mem_capacity", "threads_per_core", "sizes_desc", "partitioned",
                 "nvlinks", "pair_score"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert [n for n in a.nics if n.rail_gpus] == list(b.nics)
    assert a.nic_vfs == b.nic_vfs and a.gpu_group_nics == b.gpu_group_nics
    assert replace(a.platform, source="") == replace(b.platform, source="")
    assert [(k.indexes, k.switches, k.mask, k.nodes) for k in a.all_blocks] == \
        [(k.indexes, k.switches, k.mask, k.nodes) for k in b.all_blocks]
    for attr in ("gpu_holder", "switch_holder", "cpu_holder", "node_free", "mem_used",
                 "huge_used", "free_mask", "free_gpus", "unhealthy", "allocations", "warnings",
                 "nic_holder"):
        assert getattr(real, attr) == getattr(rebuilt, attr), attr
    assert real.templates() == rebuilt.templates()
    assert real.free_blocks() == rebuilt.free_blocks()


def outcomes(state, requests):
    return [(req.name, str(out) if isinstance(out, PlacementError) else out)
            for req, out in state.plan(requests)]


def R(name, gpus=0, **kw):
    return Request(name, gpus=gpus, **kw)


# --- facts -> HostState, exactly -----------------------------------------------------------------

DGX2_DAY = [R("a", 8, nics="auto"), R("b", 4), R("c", 2, nics=1), R("d", 1, nics="auto"),
            R("e", 1, nics="auto", nic_mode="vf"), R("cpu", 0, vcpus=4,
            memory_mb=4096), R("sh", 0, vcpus=8, memory_mb=8192, cpu_policy="shared")]

CASES = {
    "dgx2 empty, NVLinks": dict(name="dgx2", nvidia_smi="dgx2.txt"),
    "dgx2 busy": dict(name="dgx2", held=[R("vm-a", 4, nics="auto"), R("vm-b", 1, nics="auto"),
                                         R("vm-s", 0, vcpus=4, memory_mb=2048,
                                           cpu_policy="shared")],
                      unhealthy_gpus=["0000:e7:00.0"], reserved_cpus="0-1,48-49",
                      reserved_memory_mb=4096),
    "dgx2-fresh": dict(name="dgx2-fresh"),
    "dgx-a100 busy": dict(name="dgx-a100", held=[R("vm-a", 2, nics="auto"), R("vm-b", 1)]),
    "dgx-h100": dict(name="dgx-h100", held=[R("vm-a", 4)]),
    "pcie-4gpu, NVLinks, hugepages": dict(name="pcie-4gpu", nvidia_smi="pcie-4gpu.txt",
                                          held=[R("vm-a", 1, hugepages=True, memory_mb=2048)]),
    "h100-cloud-vm": dict(name="h100-cloud-vm", nvidia_smi="h100-cloud-vm.txt"),
}

PLANS = {
    "dgx2": DGX2_DAY,
    "dgx2-fresh": DGX2_DAY,
    "dgx-a100": [R("a", 4, nics="auto"), R("b", 2), R("c", 1, nics=1),
                 R("cpu", 0, vcpus=2, memory_mb=2048)],
    "dgx-h100": [R("a", 2, nics="auto"), R("b", 1, nics=2), R("c", 1, nics="auto")],
    "pcie-4gpu": [R("a", 2), R("b", 1, hugepages=True, memory_mb=4096), R("c", 1)],
    "h100-cloud-vm": [R("a", 1, vcpus=2, memory_mb=2048)],
}


def case_host(host_tree, case):
    case = dict(CASES[case])
    name = case.pop("name")
    held = case.pop("held", ())
    setup = dict((k, v) for k, v in case.items() if k == "nvidia_smi")
    domains = domains_for(host_tree, name, held, **setup) if held else ()
    return Host(host_tree, name, domains=domains, **case)


@pytest.mark.parametrize("case", sorted(CASES))
def test_facts_rebuild_the_host_state_exactly(host_tree, case):
    host = case_host(host_tree, case)
    real = host.state()
    rebuilt = _fleet_plan.StateBuilder().state("h", host.facts)
    assert_same_state(real, rebuilt)
    name = CASES[case]["name"]
    assert outcomes(real, PLANS[name]) == outcomes(rebuilt, PLANS[name])


def test_placement_state_is_small_and_plain(host_tree):
    facts = Host(host_tree, "dgx2", nvidia_smi="dgx2.txt").facts
    ps = facts["placement_state"]
    assert set(ps) == {"format", "platform", "cpu_siblings", "reserved_memory_mb", "nvlinks",
                       "nics", "gpu_group_nics"}
    assert ps["platform"] is None  # built in: the name in platform.name is enough
    assert ps["cpu_siblings"][:2] == ["0,48", "1,49"]
    assert ps["nvlinks"] and all(len(x) == 3 for x in ps["nvlinks"])
    assert len(json.dumps(ps)) < 4000  # the 8 rails with their VFs are a quarter of it
    assert facts["gpus"][0]["host_bridge"].startswith("pci0000:")


@pytest.mark.parametrize("ext", ["yml", "json"])
def test_a_platform_file_travels_as_data_not_as_its_path(host_tree, tmp_path, ext):
    data = {"base": "dgx2", "name": "dgx2-lab", "templates": {1: {"vcpus": 6, "memory_mb": 8192}},
            "allowed_sizes": [1, 2, 4, 8, 16]}
    path = tmp_path / ("lab-platform." + ext)
    path.write_text(yaml.safe_dump(data) if ext == "yml" else json.dumps(data))
    host = Host(host_tree, "dgx2", platform=str(path))
    assert host.facts["platform"]["name"] == "dgx2-lab"
    assert str(path) not in json.dumps(host.facts["placement_state"])
    assert host.facts["placement_state"]["platform"]["name"] == "dgx2-lab"
    path.unlink()  # the controller never sees the managed host's file
    rebuilt = _fleet_plan.StateBuilder().state("h", host.facts)
    assert_same_state(host.state(), rebuilt)
    assert rebuilt.template(1).vcpus == 6
    out = _fleet_plan.fleet_plan({"h": host.facts}, [{"name": "x", "gpus": 1}])
    assert out["by_name"]["x"]["vcpus"] == 6


def test_hosts_built_alike_share_one_model(host_tree):
    facts = Host(host_tree, "dgx2").facts
    busy = case_host(host_tree, "dgx2 busy").facts
    builder = _fleet_plan.StateBuilder()
    a, b = builder.state("a", facts), builder.state("b", json.loads(json.dumps(facts)))
    assert a.model is b.model and a is not b
    c = builder.state("c", busy)  # other reserved CPUs and memory: its own model
    assert c.model is not a.model


def test_derive_is_what_the_constructor_makes(host_tree):
    host = case_host(host_tree, "dgx2 busy")
    real = host.state()
    empty = HostState(host.topology, host.platform, reserved_cpus="0-1,48-49",
                      reserved_memory_mb=4096)
    derived = empty.derive(list(real.allocations.values()), ["0000:e7:00.0"])
    assert_same_state(real, derived)


def test_old_or_foreign_facts_are_refused_with_the_fix(host_tree):
    facts = Host(host_tree, "pcie-4gpu").facts
    old = dict(facts)
    del old["placement_state"]
    with pytest.raises(_fleet_plan.FleetError, match="'h'.*placement_state.*gpu_topology"):
        _fleet_plan.fleet_plan({"h": old}, [])
    newer = json.loads(json.dumps(facts))
    newer["placement_state"]["format"] = 99
    with pytest.raises(_fleet_plan.FleetError, match="format 99"):
        _fleet_plan.fleet_plan({"h": newer}, [])
    unknown = json.loads(json.dumps(facts))
    unknown["platform"]["name"] = "dgx-9000"
    with pytest.raises(_fleet_plan.FleetError, match="'dgx-9000' is not built into"):
        _fleet_plan.fleet_plan({"h": unknown}, [])
    with pytest.raises(_fleet_plan.FleetError, match="expected its gpu_topology result"):
        _fleet_plan.fleet_plan({"h": "nope"}, [])
    broken = json.loads(json.dumps(facts))
    del broken["gpus"][0]["bdf"]
    with pytest.raises(_fleet_plan.FleetError, match="'h'.*malformed"):
        _fleet_plan.fleet_plan({"h": broken}, [])


# --- the plan against what each host would do itself ---------------------------------------------

@pytest.fixture
def trio(host_tree):
    """Three hosts of different kinds, one with VMs already defined."""
    held = domains_for(host_tree, "dgx-a100", [R("old-a", 2), R("old-b", 1)])
    return {
        "dgx2-01": Host(host_tree, "dgx2", nvidia_smi="dgx2.txt"),
        "a100-01": Host(host_tree, "dgx-a100", domains=held),
        "pcie-01": Host(host_tree, "pcie-4gpu", nvidia_smi="pcie-4gpu.txt"),
    }


TRIO_REQUESTS = [
    {"name": "train-16", "gpus": 16, "image": "dgx-os"},
    {"name": "train-4", "gpus": 4, "where": "platform == 'dgx-a100'"},
    {"name": "dev-1", "gpus": 1, "memory": "16GiB", "vcpus": 4},
    {"name": "dev-2", "gpus": 2, "where": "labels.pool == 'dev'"},
    {"name": "pinned", "gpus": 1, "host": "pcie-01", "cpu_policy": "shared"},
    {"name": "old-a", "gpus": 2},
    {"name": "cpu-only", "gpus": 0, "vcpus": 2, "memory": 2048},
    {"name": "huge", "gpus": 1, "hugepages": True, "memory": "4GiB",
     "where": "platform == 'generic'"},
    {"name": "too-big", "gpus": 8, "where": "platform == 'generic'"},
]
TRIO_LABELS = {"pcie-01": {"pool": "dev"}, "dgx2-01": {"pool": "train"}}


def test_each_share_lands_where_the_host_itself_would_place_it(trio):
    out = _fleet_plan.fleet_plan(dict((h, x.facts) for h, x in trio.items()), TRIO_REQUESTS,
                                 labels=TRIO_LABELS)
    assigned = dict((h, [e["name"] for e in share]) for h, share in out["assignments"].items())
    assert assigned == {
        "a100-01": ["train-4", "dev-1", "old-a", "cpu-only"],
        "dgx2-01": ["train-16"],
        "pcie-01": ["dev-2", "pinned", "huge"],
    }
    assert [u["name"] for u in out["unplaced"]] == ["too-big"]
    assert "no allowed host (1 of 3)" in out["unplaced"][0]["reason"]
    # The shares are kvm_layout's vms: the request minus host and where.
    assert out["assignments"]["dgx2-01"] == [{"name": "train-16", "gpus": 16, "image": "dgx-os"}]
    assert out["assignments"]["pcie-01"][1] == {"name": "pinned", "gpus": 1,
                                                "cpu_policy": "shared"}
    for host, share in out["assignments"].items():
        # gpu_topology's plan (and kvm_layout, which plans the same way) on that host alone.
        local = trio[host].result(plan_requests(share))["plan"]
        for entry in local:
            planned = dict(out["by_name"][entry["name"]])
            assert planned.pop("host") == host
            assert planned == entry
    assert out["by_name"]["old-a"]["gpu_indexes"] == [0, 1]  # sticky: keeps its GPUs
    assert out["by_name"]["too-big"] == {"name": "too-big", "host": None, "gpus_requested": 8,
                                         "error": out["unplaced"][0]["reason"]}
    assert out["summary"] == {"hosts": 3, "requests": 9, "placed": 8, "unplaced": 1,
                              "gpus_requested": 35, "gpus_placed": 27}
    assert out["hosts"]["a100-01"]["free_gpus_before"] == 5
    assert out["hosts"]["a100-01"]["vms"] == assigned["a100-01"]


def test_same_input_same_output_whatever_the_order(trio):
    facts = dict((h, x.facts) for h, x in trio.items())
    first = json.dumps(_fleet_plan.fleet_plan(facts, TRIO_REQUESTS, labels=TRIO_LABELS))
    rng = random.Random(7)
    for _dummy in range(3):
        hosts = list(facts)
        rng.shuffle(hosts)
        shuffled = dict((h, json.loads(json.dumps(facts[h]))) for h in hosts)
        labels = dict((h, TRIO_LABELS[h]) for h in reversed(list(TRIO_LABELS)))
        assert json.dumps(_fleet_plan.fleet_plan(shuffled, TRIO_REQUESTS, labels=labels)) == first


def test_large_requests_still_fit_after_many_small_ones(host_tree):
    facts = Host(host_tree, "dgx2").facts
    fleet = dict(("dgx2-%02d" % i, facts) for i in range(4))
    # The 16-GPU request comes last; 48 one-GPU VMs must pack 3 hosts full to leave it one.
    requests = [{"name": "one-%02d" % k, "gpus": 1} for k in range(48)]
    requests.append({"name": "sixteen", "gpus": 16})
    out = _fleet_plan.fleet_plan(fleet, requests)
    assert out["unplaced"] == []
    assert sorted(len(v) for v in out["assignments"].values()) == [1, 16, 16, 16]
    assert all(h["free_gpus_after"] == 0 for h in out["hosts"].values())
    # Ones go to the fullest host that has room: first host 0 fills up, then host 1 ...
    assert out["by_name"]["sixteen"]["host"] == "dgx2-00"
    assert [out["by_name"]["one-%02d" % k]["host"] for k in (0, 15, 16, 47)] == \
        ["dgx2-01", "dgx2-01", "dgx2-02", "dgx2-03"]


def test_best_fit_fills_a_busy_host_before_an_empty_one(host_tree):
    busy = Host(host_tree, "dgx2", domains=domains_for(host_tree, "dgx2", [R("vm-a", 8)]))
    out = _fleet_plan.fleet_plan({"a-empty": Host(host_tree, "dgx2").facts, "b-busy": busy.facts},
                                 [{"name": "four", "gpus": 4}, {"name": "sixteen", "gpus": 16}])
    assert out["by_name"]["four"]["host"] == "b-busy"
    assert out["by_name"]["sixteen"]["host"] == "a-empty"


def test_where_uses_labels_and_facts(trio):
    facts = dict((h, x.facts) for h, x in trio.items())
    requests = [
        {"name": "rack", "gpus": 1, "where": "labels.rack == 'r2'"},
        {"name": "rack2", "gpus": 1, "where": "labels.rack == 'r2'"},
        {"name": "models", "gpus": 1, "where": "contains(gpu_models, 'A100-SXM4-80GB')"},
        {"name": "big-node", "gpus": 1, "where": "numa_nodes[?free_cpus > `50`] | length(@) > `0`"},
        {"name": "lots-free", "gpus": 2,
         "where": "largest_free_block >= `16` && free_memory_mb > `100000`"},
    ]
    labels = {"pcie-01": {"rack": "r2"}, "dgx2-01": {"rack": "r1"}}
    out = _fleet_plan.fleet_plan(facts, requests, labels=labels)
    where = dict((n, e["host"]) for n, e in out["by_name"].items())
    assert where == {"rack": "pcie-01", "rack2": "pcie-01", "models": "a100-01",
                     "big-node": "pcie-01", "lots-free": "dgx2-01"}


def test_where_document_fields(trio):
    builder = _fleet_plan.StateBuilder()
    facts = trio["a100-01"].facts
    doc = _fleet_plan.where_document("a100-01", builder.state("a100-01", facts), facts,
                                     {"rack": "r1"})
    assert set(doc) == {"host", "platform", "fabric", "gpu_models", "gpus", "healthy_gpus",
                        "free_gpus", "free_blocks", "largest_free_block", "allowed_sizes",
                        "nvswitches", "cpus", "free_cpus", "memory_mb", "free_memory_mb",
                        "numa_nodes", "vms", "ready", "labels", "rail_nics", "free_rail_nics"}
    assert doc["platform"] == "dgx-a100" and doc["gpus"] == 8 and doc["free_gpus"] == 5
    assert doc["free_blocks"] == {"4": 1, "1": 1} and doc["largest_free_block"] == 4
    assert doc["vms"] == ["old-a", "old-b"] and doc["labels"] == {"rack": "r1"}
    assert len(doc["numa_nodes"]) == 8
    assert sum(n["free_gpus"] for n in doc["numa_nodes"]) == 5
    json.dumps(doc)


def test_a_bad_where_names_the_request_and_the_expression(trio):
    facts = dict((h, x.facts) for h, x in trio.items())
    with pytest.raises(_fleet_plan.FleetError) as err:
        _fleet_plan.fleet_plan(facts, [{"name": "ok", "gpus": 1},
                                       {"name": "typo", "gpus": 1, "where": "platform == 'dgx2"}])
    assert "requests[1] (typo)" in str(err.value)
    assert "where \"platform == 'dgx2\" is not a valid JMESPath expression" in str(err.value)
    with pytest.raises(_fleet_plan.FleetError,
                       match=r"requests\[0\] \(x\): where .* fails on host 'a100-01'"):
        _fleet_plan.fleet_plan(facts, [{"name": "x", "gpus": 1,
                                        "where": "contains(free_gpus, 'a')"}])


def test_unplaced_say_why(trio):
    facts = dict((h, x.facts) for h, x in trio.items())
    out = _fleet_plan.fleet_plan(facts, [
        {"name": "nowhere", "gpus": 1, "where": "labels.rack == 'r9'"},
        {"name": "pinned-out", "gpus": 1, "host": "dgx2-01", "where": "platform == 'generic'"},
        {"name": "ghost", "gpus": 1, "host": "dgx2-99"},
        {"name": "gone", "gpus": 1, "host": "down-01"},
        {"name": "bad-size", "gpus": 3, "host": "dgx2-01"},
        {"name": "moved", "gpus": 2, "host": "dgx2-01"},  # old-b is on a100-01: 1 GPU
        {"name": "old-b", "gpus": 1, "host": "pcie-01"},
        {"name": "thirty-two", "gpus": 32},
    ], skipped={"down-01": "unreachable: ssh timeout"})
    why = dict((u["name"], u["reason"]) for u in out["unplaced"])
    assert why["nowhere"] == "where \"labels.rack == 'r9'\" matches no host (of 3)"
    assert why["pinned-out"] == "host 'dgx2-01' does not match its where \"platform == 'generic'\""
    assert why["ghost"] == "host 'dgx2-99' is not in the fleet (hosts: 3)"
    assert why["gone"] == "host 'down-01' has no usable facts: unreachable: ssh timeout"
    assert "places only 1/2/4/8/16-GPU VMs" in why["bad-size"]
    assert "already defined on 'a100-01'" in why["old-b"]
    assert "no host of 3 has a free 32-GPU block (most free GPUs on one host: 16)" \
        in why["thirty-two"]
    assert "moved" not in why
    # A defined VM stays in its host's share even when its request cannot be met there.
    assert "old-b" in [e["name"] for e in out["assignments"]["a100-01"]]
    assert out["by_name"]["old-b"]["host"] == "a100-01"
    assert out["skipped_hosts"] == [{"host": "down-01", "reason": "unreachable: ssh timeout"}]


# --- rail NICs ----------------------------------------------------------------------------------

def _local_plan_matches(hosts, out):
    """Each host, planning its share alone (gpu_topology's plan, as kvm_layout plans), gives
    every VM the GPUs and the rail NICs the controller gave it."""
    for host, share in out["assignments"].items():
        for entry in hosts[host].result(plan_requests(share))["plan"]:
            planned = dict(out["by_name"][entry["name"]])
            assert planned.pop("host") == host
            assert planned == entry


def test_rails_decide_the_host_and_travel_with_the_plan(host_tree):
    hosts = {"pcie-01": Host(host_tree, "pcie-4gpu"), "h100-01": Host(host_tree, "dgx-h100")}
    facts = dict((h, x.facts) for h, x in hosts.items())
    out = _fleet_plan.fleet_plan(facts, [
        {"name": "plain", "gpus": 1},
        {"name": "rail-a", "gpus": 1, "nics": "auto"},
        {"name": "rail-b", "gpus": 2, "nics": 2},
        {"name": "fewer", "gpus": 1, "nics": "auto", "nics_allow_fewer": True},
        {"name": "too-many", "gpus": 2, "nics": 3},
        {"name": "pinned", "gpus": 1, "nics": 1, "host": "pcie-01"},
    ])
    where = dict((n, e.get("host")) for n, e in out["by_name"].items())
    # The empty PCIe host is the best fit for 1-GPU VMs, but it has no rails.
    assert where["plain"] == "pcie-01" and where["fewer"] == "pcie-01"
    assert where["rail-a"] == where["rail-b"] == "h100-01"
    assert len(out["by_name"]["rail-a"]["nics"]) == 1 and len(out["by_name"]["rail-b"]["nics"]) == 2
    assert out["by_name"]["fewer"]["nics"] == []
    why = dict((u["name"], u["reason"]) for u in out["unplaced"])
    assert set(why) == {"too-many", "pinned"}
    assert "nics: 3 asked, but GPU(s)" in why["too-many"]
    assert "have 2 rail NIC(s)" in why["too-many"]
    assert "this host has no rail NIC to offer" in why["pinned"]
    _local_plan_matches(hosts, out)
    h100 = out["hosts"]["h100-01"]
    assert (h100["rail_nics"], h100["free_rail_nics_before"], h100["free_rail_nics_after"]) == \
        (8, 8, 5)
    assert out["hosts"]["pcie-01"]["rail_nics"] == 0


def test_no_rail_function_or_vf_goes_twice_over_a_fleet(host_tree):
    # DGX-2: 8 rails of 2 GPUs with 2 VFs each; a 1-GPU VM gets a VF of its pair's rail.
    held = domains_for(host_tree, "dgx2", [R("old-pair", 2, nics="auto"),
                                           R("old-one", 1, nics="auto")])
    hosts = {"dgx2-a": Host(host_tree, "dgx2", domains=held), "dgx2-b": Host(host_tree, "dgx2")}
    facts = dict((h, x.facts) for h, x in hosts.items())
    requests = [{"name": "one-%02d" % i, "gpus": 1, "nics": "auto"} for i in range(24)]
    out = _fleet_plan.fleet_plan(facts, requests)
    assert out["summary"]["placed"] == 24
    taken = {}
    for name, entry in out["by_name"].items():
        assert len(entry["nics"]) == 1, entry
        key = (entry["host"], entry["nics"][0])
        assert key not in taken, "%s and %s both get %s" % (taken.get(key), name, key)
        taken[key] = name
    held_a = [a for a in facts["dgx2-a"]["allocations"] if a["nics"]]
    assert len(held_a) == 2
    for alloc in held_a:
        for nic in alloc["nics"]:
            assert ("dgx2-a", nic) not in taken
    assert all(nic.endswith((".1", ".2")) for _host, nic in taken)  # VFs, never a whole PF
    _local_plan_matches(hosts, out)


def test_where_sees_the_rails(host_tree):
    held = domains_for(host_tree, "dgx-h100", [R("vm-a", 2, nics="auto")])
    host = Host(host_tree, "dgx-h100", domains=held)
    doc = _fleet_plan.where_document("h", _fleet_plan.StateBuilder().state("h", host.facts),
                                     host.facts, {})
    assert (doc["rail_nics"], doc["free_rail_nics"]) == (8, 6)
    out = _fleet_plan.fleet_plan({"h": host.facts, "p": Host(host_tree, "pcie-4gpu").facts},
                                 [{"name": "x", "gpus": 1, "where": "free_rail_nics > `0`"}])
    assert out["by_name"]["x"]["host"] == "h"


def test_facts_without_rails_are_refused(host_tree):
    old = json.loads(json.dumps(Host(host_tree, "dgx-h100").facts))
    old["placement_state"]["format"] = 1
    del old["placement_state"]["nics"]
    with pytest.raises(_fleet_plan.FleetError, match="format 1, this collection reads format 2"):
        _fleet_plan.fleet_plan({"h": old}, [])
    broken = json.loads(json.dumps(Host(host_tree, "dgx-h100").facts))
    del broken["placement_state"]["nics"][0]["bdf"]
    with pytest.raises(_fleet_plan.FleetError, match="'h'.*malformed"):
        _fleet_plan.fleet_plan({"h": broken}, [])


def test_pinned_host_wins_over_best_fit(host_tree):
    busy = Host(host_tree, "dgx2", domains=domains_for(host_tree, "dgx2", [R("vm-a", 8)]))
    out = _fleet_plan.fleet_plan({"a": Host(host_tree, "dgx2").facts, "b": busy.facts},
                                 [{"name": "x", "gpus": 2, "host": "a"}, {"name": "y", "gpus": 2}])
    assert out["by_name"]["x"]["host"] == "a"
    assert out["by_name"]["y"]["host"] == "b"


def test_absent_and_exclusive_free_what_kvm_layout_would_remove(host_tree):
    held = domains_for(host_tree, "dgx2", [R("keep", 8), R("drop", 4), R("tagged", 2),
                                           R("other", 1)])
    held = [replace(d, metadata={"owner_tag": "team-a"}) if d.name in ("drop", "tagged")
            else d for d in held]
    held[-1] = replace(held[-1], managed=False)  # not the collection's: never removed
    facts = {"h": Host(host_tree, "dgx2", domains=held).facts}
    requests = [{"name": "keep", "gpus": 8}, {"name": "drop", "state": "absent"},
                {"name": "never-was", "state": "absent"}, {"name": "new", "gpus": 4}]
    out = _fleet_plan.fleet_plan(facts, requests)
    assert out["by_name"]["drop"] == {"name": "drop", "host": "h", "state": "absent"}
    assert out["by_name"]["never-was"]["host"] is None
    assert out["by_name"]["new"]["gpu_indexes"] == [8, 9, 10, 11]  # drop's GPUs, freed first
    assert [e["name"] for e in out["assignments"]["h"]] == ["keep", "drop", "new"]
    # Only GPU 15 is free until exclusive removes drop and tagged (not other: unmanaged).
    out = _fleet_plan.fleet_plan(facts, [{"name": "keep", "gpus": 8}, {"name": "four", "gpus": 4}])
    assert out["hosts"]["h"]["removed"] == [] and out["unplaced"][0]["name"] == "four"
    out = _fleet_plan.fleet_plan(facts, [{"name": "keep", "gpus": 8}, {"name": "four", "gpus": 4}],
                                 exclusive=True)
    assert out["hosts"]["h"]["removed"] == ["drop", "tagged"]
    assert out["by_name"]["four"]["gpu_indexes"] == [8, 9, 10, 11]
    out = _fleet_plan.fleet_plan(facts, [{"name": "keep", "gpus": 8}], exclusive=True,
                                 owner_tag="team-a")
    assert out["hosts"]["h"]["removed"] == ["drop", "tagged"]
    out = _fleet_plan.fleet_plan(facts, [{"name": "keep", "gpus": 8}], exclusive=True,
                                 owner_tag="team-b")
    assert out["hosts"]["h"]["removed"] == []


def test_a_vm_on_two_hosts_is_warned_about(host_tree):
    held = domains_for(host_tree, "dgx2", [R("twin", 1)])
    facts = Host(host_tree, "dgx2", domains=held).facts
    out = _fleet_plan.fleet_plan({"a": facts, "b": facts}, [{"name": "twin", "gpus": 1}])
    assert out["warnings"] == ["VM 'twin' is defined on 'a' and on 'b'; a request for it goes "
                               "to 'b'"]
    assert out["by_name"]["twin"]["host"] == "b"


@pytest.mark.parametrize("entries, match", [
    ({"name": "x"}, "expected a list"),
    ("x", "expected a list"),
    (["x"], r"requests\[0\]: expected a dict"),
    ([{"gpus": 1}], r"requests\[0\].name"),
    ([{"name": "a"}, {"name": "a"}], r"requests\[1\] \(a\): the name 'a' is used by requests\[0\]"),
    ([{"name": "a", "gpus": "two"}], r"requests\[0\] \(a\): argument 'gpus' is of type str"),
    ([{"name": "a", "gpus": -1}], r"gpus: -1; give 0 or more"),
    ([{"name": "a", "gpus": True}], "is not a number"),
    ([{"name": "a", "gpu_index": 3}], "gpu_index: set, but gpus is not given"),
    ([{"name": "a", "gpu_index": 3, "gpus": 0}], "gpu_index: set, but gpus is 0"),
    ([{"name": "a", "memory": "lots"}], "memory: 'lots' is not a size"),
    ([{"name": "a", "vcpus": 0}], "vcpus: 0; give 1 or more"),
    ([{"name": "a", "cpu_policy": "spread"}], "value of cpu_policy must be one of"),
    ([{"name": "a", "hugepages": "perhaps"}], "argument 'hugepages' is of type str"),
    ([{"name": "a", "host": 7}], "host: 7"),
    ([{"name": "a", "where": ["platform"]}], "where: .* JMESPath expression as a string"),
])
def test_bad_requests_fail_the_whole_call(entries, match):
    with pytest.raises(_fleet_plan.FleetError, match=match):
        _fleet_plan.requests_from_entries(entries)


def test_numbers_as_strings_are_accepted():
    (fr,) = _fleet_plan.requests_from_entries([{"name": "a", "gpus": "2", "vcpus": "8",
                                                "memory": "32GiB"}])
    assert (fr.request.gpus, fr.request.vcpus, fr.request.memory_mb) == (2, 8, 32768)
    assert fr.entry == {"name": "a", "gpus": "2", "vcpus": "8", "memory": "32GiB"}


def test_without_jmespath_only_where_fails(trio, monkeypatch):
    facts = dict((h, x.facts) for h, x in trio.items())
    monkeypatch.setitem(sys.modules, "jmespath", None)
    assert _fleet_plan.fleet_plan(facts, [{"name": "a", "gpus": 1}])["summary"]["placed"] == 1
    with pytest.raises(_fleet_plan.FleetError, match="needs the Python library jmespath"):
        _fleet_plan.fleet_plan(facts, [{"name": "a", "gpus": 1, "where": "gpus > `1`"}])


def test_jmespath_truth():
    assert [_fleet_plan._truthy(v) for v in (None, False, "", [], {}, 0, "x", [0], True)] == \
        [False, False, False, False, False, True, True, True, True]


# --- Fleet with allowed host sets ----------------------------------------------------------------

def _dgx2_base(host_tree):
    return _fleet_plan.StateBuilder().state("h", Host(host_tree, "dgx2").facts)


def _summary(result):
    if isinstance(result, PlacementError):
        return ("error",)
    host, placement = result
    return (host, placement.gpu_indexes, placement.cpus)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from([1, 1, 2, 4, 8, 16, -1]),
                              st.sampled_from(["odd", "low", "all"])), max_size=60))
def test_an_allowed_set_places_as_a_fleet_of_only_those_hosts(host_tree, ops):
    """With one constraint throughout, the big fleet does what a fleet of the allowed hosts
    does; with several, every index stays equal to one rebuilt from scratch."""
    base = _dgx2_base(host_tree)
    names = ["h%d" % i for i in range(8)]
    subsets = {"odd": frozenset(names[1::2]), "low": frozenset(names[:3]), "all": None}
    for which in ("odd", "low"):
        big = Fleet([(n, base.derive()) for n in names])
        small = Fleet([(n, base.derive()) for n in sorted(subsets[which])])
        for k, (size, _ignored) in enumerate(ops):
            if size < 0:
                assert big.release("vm%d" % (k - 1)) == small.release("vm%d" % (k - 1))
                continue
            req = R("vm%d" % k, size)
            got = []
            for fleet, allowed in ((big, subsets[which]), (small, None)):
                try:
                    got.append(_summary(fleet.place(req, allowed=allowed)))
                except PlacementError:
                    got.append(("error",))
            assert got[0] == got[1]
    fleet = Fleet([(n, base.derive()) for n in names])
    for k, (size, which) in enumerate(ops):
        if size < 0:
            fleet.release("vm%d" % (k - 1))
            continue
        try:
            host, _placement = fleet.place(R("vm%d" % k, size), allowed=subsets[which])
        except PlacementError:
            continue
        assert subsets[which] is None or host in subsets[which]
    for allowed, idx in fleet._subsets.items():
        fresh = fleet._index_for(set(allowed))  # a set is not cached: built from scratch
        assert idx.buckets == fresh.buckets and idx.order == fresh.order


def test_allowed_edges(host_tree):
    base = _dgx2_base(host_tree)
    fleet = Fleet([("a", base.derive()), ("b", base.derive())])
    with pytest.raises(PlacementError, match="no host is allowed for it"):
        fleet.place(R("x", 1), allowed=frozenset())
    with pytest.raises(PlacementError, match="names host 'a', which is not among the hosts "
                                             "allowed"):
        fleet.place(R("x", 1, host="a"), allowed=frozenset(["b"]))
    assert fleet.place(R("x", 1), allowed=frozenset(["b", "zz"]))[0] == "b"
    with pytest.raises(PlacementError, match="already defined on 'b', which is not among"):
        fleet.place(R("x", 1), allowed=frozenset(["a"]))
    with pytest.raises(PlacementError, match=r"no allowed host \(1 of 2\) has a free 16-GPU"):
        fleet.place(R("y", 16), allowed=frozenset(["b"]))
    plan = fleet.plan([R("x", 1)], allowed=[frozenset(["a"])])
    assert "already defined on 'b', which is not among" in plan.unplaced[0][1]
    with pytest.raises(PlacementError, match="1 entries for 2 requests"):
        fleet.plan([R("p", 1), R("q", 1)], allowed=[None])


def test_fleet_plan_orders_like_a_host_plan(host_tree):
    """Defined VMs first, resized ones give their GPUs back first and stay on their host."""
    base = _dgx2_base(host_tree)
    a, b = base.derive(), base.derive()
    a.place(R("grow", 4, gpu_index=0))
    a.place(R("stay", 8, gpu_index=8))
    plan = place_on_fleet([("a", a), ("b", b)], [R("new", 4), R("grow", 8), R("stay", 8)])
    where = dict((x.request.name, (x.host, x.placement.gpu_indexes)) for x in plan.assignments)
    assert where["stay"] == ("a", tuple(range(8, 16)))
    assert where["grow"] == ("a", tuple(range(0, 8)))  # its own 4 freed first: 0-7 fits
    assert where["new"][0] == "b"
    # A resize that cannot fit keeps the old GPUs, and says so.
    a, b = base.derive(), base.derive()
    a.place(R("grow", 4, gpu_index=0))
    a.place(R("stay", 8, gpu_index=8))
    plan = place_on_fleet([("a", a), ("b", b)], [R("grow", 16)])
    assert "grow keeps its current 4 GPU(s) on a" in plan.unplaced[0][1]
    assert a.allocations["grow"].gpus == base.model.gpu_bdfs[:4]
    plan = place_on_fleet([("a", a)], [R("x", 1), R("x", 2)])
    assert "appears twice" in plan.unplaced[0][1]

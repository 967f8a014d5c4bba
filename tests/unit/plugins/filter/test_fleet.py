# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""The fleet_plan filter: its inputs (a dict of results, or hostvars with key=) and its errors."""

import json

import pytest
from ansible.errors import AnsibleFilterError
from jinja2 import Undefined

from ansible_collections.gpuvirt.kvm.plugins.filter.fleet import FilterModule
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_facts import build
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platform_file import get_platform
from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_host
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_request import plan_requests

fleet_plan = FilterModule().filters()["fleet_plan"]


def topology_result(host_tree, name, requests=()):
    """What gpu_topology registers on a fixture host (as JSON, the way facts travel)."""
    topology = read_host(*host_tree(name))
    platform = get_platform("auto", topology)
    return json.loads(json.dumps(build(topology, platform, "test", [], list(requests))))


@pytest.fixture
def results(host_tree):
    return {"dgx2-01": topology_result(host_tree, "dgx2"),
            "a100-01": topology_result(host_tree, "dgx-a100"),
            "pcie-01": topology_result(host_tree, "pcie-4gpu")}


TENANTS = [
    {"name": "train", "gpus": 16, "image": "dgx-os"},
    {"name": "eight", "gpus": 8, "where": "labels.pool == 'train'"},
    {"name": "dev", "gpus": 2, "where": "labels.rack == 'r2'"},
    {"name": "one", "gpus": 1},
]


def test_a_dict_of_results(results, host_tree):
    plan = fleet_plan(results, TENANTS, labels={"a100-01": {"pool": "train"},
                                                "pcie-01": {"rack": "r2"}})
    assert plan["assignments"] == {
        "a100-01": [{"name": "eight", "gpus": 8}],
        "dgx2-01": [{"name": "train", "gpus": 16, "image": "dgx-os"}],
        "pcie-01": [{"name": "dev", "gpus": 2}, {"name": "one", "gpus": 1}],
    }
    assert plan["unplaced"] == [] and plan["skipped_hosts"] == []
    # What gpu_topology would plan on that host for its share (kvm_layout places the same way).
    local = build(read_host(*host_tree("pcie-4gpu")), get_platform("auto", read_host(
        *host_tree("pcie-4gpu"))), "test", [], plan_requests(
            plan["assignments"]["pcie-01"]))["plan"]
    assert [e["gpu_indexes"] for e in local] == \
        [plan["by_name"][n]["gpu_indexes"] for n in ("dev", "one")]


def test_hostvars_with_key_and_label_vars(results):
    hostvars = {
        "dgx2-01": {"topo": results["dgx2-01"], "pool": "train", "rack": "r1"},
        "a100-01": {"topo": results["a100-01"], "pool": "train"},
        "pcie-01": {"topo": results["pcie-01"], "rack": "r2", "pool": Undefined()},
        "web-01": {"ansible_host": "10.0.0.9"},  # not a GPU host: no topo
        "dead-01": {"topo": {"unreachable": True, "msg": "ssh: timeout"}},
        "bad-01": {"topo": {"failed": True, "msg": "sysfs_root is not sysfs"}},
        "skip-01": {"topo": {"skipped": True, "changed": False}},
    }
    plan = fleet_plan(hostvars, TENANTS, key="topo", label_vars=["pool", "rack"])
    assert sorted(plan["assignments"]) == ["a100-01", "dgx2-01", "pcie-01"]
    assert plan["by_name"]["eight"]["host"] in ("a100-01", "dgx2-01")
    assert plan["by_name"]["dev"]["host"] == "pcie-01"
    assert plan["skipped_hosts"] == [
        {"host": "bad-01", "reason": "gpu_topology failed: sysfs_root is not sysfs"},
        {"host": "dead-01", "reason": "unreachable: ssh: timeout"},
        {"host": "skip-01", "reason": "gpu_topology was skipped on it"},
        {"host": "web-01", "reason": "has no variable 'topo' (gpu_topology did not run there)"},
    ]
    # hosts= narrows the fleet (ansible_play_hosts); labels= overrides label_vars.
    plan = fleet_plan(hostvars, TENANTS, key="topo", hosts=["pcie-01", "a100-01", "gone-01"],
                      label_vars="pool", labels={"pcie-01": {"rack": "r2"}})
    assert sorted(plan["assignments"]) == ["a100-01", "pcie-01"]
    assert plan["skipped_hosts"] == [{"host": "gone-01", "reason": "not in the input"}]
    assert plan["by_name"]["train"]["error"].startswith("request 'train' (16 GPUs): no host of 2")


def test_a_request_pinned_to_a_skipped_host_says_so(results):
    hostvars = {"dgx2-01": {"topo": results["dgx2-01"]},
                "dead-01": {"topo": {"unreachable": True, "msg": "ssh: timeout"}}}
    plan = fleet_plan(hostvars, [{"name": "x", "gpus": 1, "host": "dead-01"}], key="topo")
    assert plan["unplaced"] == [{"name": "x", "gpus": 1, "reason": "host 'dead-01' has no "
                                 "usable facts: unreachable: ssh: timeout"}]


def test_bad_where_is_a_filter_error_naming_request_and_expression(results):
    with pytest.raises(AnsibleFilterError) as err:
        fleet_plan(results, [{"name": "vm-7", "gpus": 1, "where": "gpus >"}])
    assert "fleet_plan: requests[0] (vm-7): where 'gpus >' is not a valid JMESPath" in \
        str(err.value)


@pytest.mark.parametrize("call, match", [
    (lambda r: fleet_plan(None, []), "the input must be a dict host"),
    (lambda r: fleet_plan(Undefined(), []), "the input must be a dict host"),
    (lambda r: fleet_plan(r, Undefined()), "requests is undefined"),
    (lambda r: fleet_plan(r, [{"name": "a", "gpus": "x"}]),
     r"requests\[0\] \(a\): argument 'gpus'"),
    (lambda r: fleet_plan(r, [], label_vars=["rack"]), "label_vars reads inventory variables"),
    (lambda r: fleet_plan(r, [], labels=["rack"]), "labels must be a dict host"),
    (lambda r: fleet_plan(r, [], labels={"pcie-01": "r2"}), r"labels\['pcie-01'\] must be a"),
    (lambda r: fleet_plan({"h": {"changed": False}}, []), "'h'.*placement_state"),
])
def test_input_errors(results, call, match):
    with pytest.raises(AnsibleFilterError, match=match):
        call(results)


def test_output_is_plain_json_and_stable(results):
    labels = {"a100-01": {"pool": "train"}, "pcie-01": {"rack": "r2"}}
    one = json.dumps(fleet_plan(results, TENANTS, labels=labels))
    backwards = dict(reversed(list(results.items())))
    assert json.dumps(fleet_plan(backwards, TENANTS, labels=labels)) == one

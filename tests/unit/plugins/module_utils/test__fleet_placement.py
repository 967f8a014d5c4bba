# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""The fleet's index of hosts (_fleet_placement) on hosts that look alike but are not."""

import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils._fleet_placement import Fleet
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement import HostState
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import Request
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import PLATFORMS
from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_host


@pytest.fixture(scope="module")
def generic_pair(host_tree):
    """Two generic hosts with 8 free GPUs each: five models on one, eight H100 on the other."""
    mixed = HostState(read_host(*host_tree("pcie-mixed")), PLATFORMS["generic"],
                      reserved_cpus="0,64,32,96")
    h100 = HostState(read_host(*host_tree("dgx-h100")), PLATFORMS["generic"],
                     reserved_cpus="0,112,56,168")
    return mixed, h100


def test_a_host_of_one_model_is_found_behind_a_mixed_one_with_as_many_free_gpus(generic_pair):
    mixed, h100 = generic_pair
    assert mixed.free_gpus == h100.free_gpus == 8
    fleet = Fleet([("a-mixed", mixed.copy()), ("b-h100", h100.copy())])
    plan = fleet.plan([Request("four", gpus=4, vcpus=2, memory_mb=1024)])
    assert [(a.request.name, a.host) for a in plan.assignments] == [("four", "b-h100")]
    assert plan.unplaced == []


def test_a_mix_asked_for_may_go_to_the_mixed_host(generic_pair):
    mixed, _h100 = generic_pair
    fleet = Fleet([("a-mixed", mixed.copy())])
    plan = fleet.plan([Request("eight", gpus=8, vcpus=2, memory_mb=1024, gpu_model="any")])
    assert [a.host for a in plan.assignments] == ["a-mixed"]
    refused = Fleet([("a-mixed", mixed.copy())]).plan(
        [Request("eight", gpus=8, vcpus=2, memory_mb=1024)])
    assert refused.assignments == [] and "no host of 1 has a free 8-GPU block" in \
        refused.unplaced[0][1]

# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""ArgumentSpec: Ansible's typing, the constraints in our words, and secrets."""

import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils._argspec import (
    ArgSpecError,
    ArgumentSpec,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_request import (
    LAYOUT_ENTRY,
    NIC_OPTIONS,
    PLAN_ENTRY,
)

SPEC = ArgumentSpec(
    dict(name=dict(type="str", required=True), gpus=dict(type="int"),
         gpu_index=dict(type="int"), policy=dict(type="str", choices=["a", "b"], default="a"),
         flag=dict(type="bool", default=False), size=dict(type="raw"),
         secret=dict(type="str", no_log=True),
         nics=dict(type="list", elements="dict", options=NIC_OPTIONS)),
    required_by={"gpu_index": "gpus"}, reasons={"gpu_index": "the first GPU of a block"})


@pytest.mark.parametrize("params", [
    {"name": "x"},
    {"name": "x", "gpus": 2, "policy": "b", "flag": True, "size": "64GiB"},
    {"name": "x", "gpus": 0, "size": 12},
])
def test_values_already_typed_come_back_as_ansible_returns_them(params):
    fast = SPEC.typed(params, "here")
    SPEC._typed_already = lambda _params: False  # force Ansible's validator
    try:
        assert SPEC.typed(params, "here") == fast
    finally:
        del SPEC._typed_already


@pytest.mark.parametrize("params, typed", [
    ({"name": "x", "gpus": "2", "flag": "yes"}, {"gpus": 2, "flag": True}),
    ({"name": "x", "gpus": 2.0}, {"gpus": 2}),
    ({"name": "x", "nics": [{"user": "true"}]}, {"nics": [{"user": True, "network": None,
                                                           "bridge": None, "mac": None}]}),
])
def test_values_to_convert_are_converted_as_ansible_converts_them(params, typed):
    result = SPEC.typed(params, "here")
    assert {k: result[k] for k in typed} == typed


@pytest.mark.parametrize("params, words", [
    ({"gpus": 1}, "here: missing required arguments: name"),
    ({"name": "x", "gpus": "two"}, "here: argument 'gpus' is of type str"),
    ({"name": "x", "policy": "c"}, "here: value of policy must be one of: a, b, got: c"),
    ({"name": "x", "colour": "red"}, "here: unknown option colour"),
])
def test_what_ansible_refuses_names_where(params, words):
    with pytest.raises(ArgSpecError) as err:
        SPEC.typed(params, "here")
    assert words in str(err.value)


@pytest.mark.parametrize("params, words", [
    ({"name": "x", "gpu_index": 2}, "vms[1].gpu_index: set, but gpus is not given; give gpus too "
                                    "(the first GPU of a block)"),
    ({"name": "x", "nics": [{"user": True}, {"network": "n", "bridge": "b"}]},
     "vms[1].nics[1]: give exactly one of network (a libvirt network), bridge (a host bridge) or "
     "user: true, got network, bridge"),
    ({"name": "x", "nics": [{"user": False}]},
     "vms[1].nics[0]: give exactly one of network (a libvirt network), bridge (a host bridge) or "
     "user: true, got none"),
])
def test_constraints_say_where_in_our_words(params, words):
    with pytest.raises(ArgSpecError) as err:
        SPEC.check(params, "vms[1]")
    assert str(err.value) == words


def test_secrets_are_found_in_nested_options_before_typing():
    assert SPEC.secrets({"name": "x", "secret": "s3"}) == {"s3"}
    assert LAYOUT_ENTRY.secrets({"name": "x", "cloud_init": {"password_hash": "$6$h"}}) == {"$6$h"}
    assert LAYOUT_ENTRY.secrets({"name": "x", "cloud_init": "not a dict"}) == set()


def test_one_spec_serves_plan_entries_with_their_defaults():
    assert set(PLAN_ENTRY.options) == {"name", "gpus", "gpu_index", "gpu_model", "vcpus", "memory",
                                       "cpu_policy", "hugepages", "nics", "nic_mode",
                                       "nics_allow_fewer"}
    typed = PLAN_ENTRY.typed({"name": "a"}, "plan[0]")
    assert (typed["gpus"], typed["cpu_policy"], typed["hugepages"]) == (0, "dedicated", False)
    assert (typed["nics"], typed["nic_mode"], typed["nics_allow_fewer"]) == (0, "auto", False)
    assert PLAN_ENTRY.required_by == {"gpu_index": "gpus"}

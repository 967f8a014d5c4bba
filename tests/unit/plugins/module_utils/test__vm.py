# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""kvm_vm's backend: option validation, and plans against libvirt's test driver.

The libvirt test driver (test:///default) is a real libvirt connection with an in-memory
hypervisor: define/start/undefine work on it, so the planner and applier run unmodified.
"""

import os
import time

import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils import _images
from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
    LibvirtGateway,
    has_libvirt,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import get_platform
from ansible_collections.gpuvirt.kvm.plugins.module_utils._topology import read_host
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm import (
    HostContext,
    Planner,
    VmError,
    converge,
    request_from_params,
)


@pytest.mark.parametrize("params, words", [
    ({"name": "../x"}, "name: '../x' is not a valid VM name"),
    ({"name": ""}, "is not a valid VM name"),
    ({"name": "a" * 65}, "is not a valid VM name"),
    ({"name": "has space"}, "is not a valid VM name"),
    ({"name": "ok", "state": "gone"}, "state: 'gone' is not one of"),
    ({"name": "ok", "remove_data": True}, "remove_data: only valid with state: absent"),
    ({"name": "ok", "gpus": -1}, "gpus: -1"),
    ({"name": "ok", "gpu_index": 2}, "gpu_index: set, but gpus is 0"),
    ({"name": "ok", "memory": "lots"}, "memory: 'lots' is not a size"),
    ({"name": "ok", "data_disk_size": "1.5GiB"}, "data_disk_size"),
    ({"name": "ok", "vcpus": 0}, "vcpus: 0"),
    ({"name": "ok", "networks": [{"network": "a", "bridge": "b"}]}, "exactly one of"),
    ({"name": "ok", "networks": [{}]}, "exactly one of"),
    ({"name": "ok", "timeout": -1}, "timeout: -1"),
])
def test_bad_options_name_the_option(params, words):
    with pytest.raises(VmError) as err:
        request_from_params(params, where="vms[3]" if params.get("name") == "ok" else "")
    assert words in str(err.value)


def test_options_normalised():
    req = request_from_params({"name": "vm-1", "memory": "2GiB", "data_disk_size": 10,
                               "os_disk_size": "20GiB", "networks": [{"user": True}]})
    assert (req.memory_mb, req.data_disk_gb, req.os_disk_gb) == (2048, 10, 20)
    assert req.networks[0].type == "user" and req.networks[0].source is None
    assert request_from_params({"name": "x"}).networks[0].source == "default"


@pytest.fixture
def dgx2_ctx(host_tree, tmp_path):
    sysfs, proc = host_tree("dgx2")
    topo = read_host(sysfs, proc)
    return HostContext(topology=topo, platform=get_platform("auto", topo),
                       store=_images.ImageStore(str(tmp_path / "store")),
                       disk_dir=str(tmp_path / "disks"))


@pytest.fixture
def test_driver():
    if not has_libvirt():
        pytest.skip("libvirt-python is not installed")
    gw = LibvirtGateway("test:///default")  # a private in-memory hypervisor per connection
    yield gw
    gw.close()


def req(name, **kw):
    kw.setdefault("networks", [{"network": "default"}])
    return request_from_params(dict(kw, name=name))


def test_plan_then_apply_on_the_test_driver(dgx2_ctx, test_driver):
    requests = [req("big", gpus=8, state="present"), req("small", gpus=1, state="present")]
    check = converge(test_driver, dgx2_ctx, requests, check_mode=True)
    assert [r["changed"] for r in check] == [True, True]
    assert not test_driver.exists("big")  # check mode defined nothing
    done = converge(test_driver, dgx2_ctx, requests)
    assert [r["actions"] for r in done] == [["define big"], ["define small"]]
    assert set(done[0]["vm"]["gpus"]).isdisjoint(done[1]["vm"]["gpus"])
    assert len(done[0]["vm"]["nvswitches"]) == 6
    again = converge(test_driver, dgx2_ctx, requests)
    assert [r["changed"] for r in again] == [False, False]
    assert again[0]["vm"]["gpus"] == done[0]["vm"]["gpus"]  # sticky


def test_gpu_count_change_on_running_vm_needs_recreate(dgx2_ctx, test_driver):
    converge(test_driver, dgx2_ctx, [req("vm", gpus=1)])
    assert test_driver.state("vm") == "running"
    out = converge(test_driver, dgx2_ctx, [req("vm", gpus=2)])[0]
    assert "recreate: true" in out["error"] and not out["changed"]
    out = converge(test_driver, dgx2_ctx, [req("vm", gpus=2, recreate=True)])[0]
    assert out["error"] is None
    assert out["actions"] == ["redefine vm", "stop vm", "start vm"]
    assert len(out["vm"]["gpus"]) == 2


def test_unknown_network_is_a_per_vm_error(dgx2_ctx, test_driver):
    out = converge(test_driver, dgx2_ctx, [req("a", networks=[{"network": "nope"}]),
                                           req("b", state="present")])
    assert "networks[0].network: libvirt has no network 'nope'" in out[0]["error"]
    assert out[1]["error"] is None and test_driver.exists("b")


def test_foreign_domain_is_never_adopted(dgx2_ctx, test_driver):
    # test:///default ships a domain called "test" that gpuvirt did not create.
    with pytest.raises(VmError, match="was not created by gpuvirt.kvm"):
        Planner(test_driver, dgx2_ctx).plan([req("test")])


def test_absent_keeps_the_data_disk(dgx2_ctx, test_driver):
    os.makedirs(dgx2_ctx.disk_dir)
    converge(test_driver, dgx2_ctx, [req("d", state="present", data_disk_size=1)])
    data = os.path.join(dgx2_ctx.disk_dir, "d-data.qcow2")
    assert os.path.exists(data)
    out = converge(test_driver, dgx2_ctx, [req("d", state="absent")])[0]
    assert out["actions"] == ["undefine d"] and out["kept_data_disks"] == [data]
    assert os.path.exists(data) and not test_driver.exists("d")
    converge(test_driver, dgx2_ctx, [req("d", state="present", data_disk_size=1)])
    out = converge(test_driver, dgx2_ctx, [req("d", state="absent", remove_data=True)])[0]
    assert out["actions"] == ["undefine d", "remove %s" % data] and not os.path.exists(data)


class _Module:
    """What layout_requests needs of an AnsibleModule: a place for secrets to hide."""

    def __init__(self):
        self.no_log_values = set()


def test_exclusive_keeps_to_the_owner_tag(dgx2_ctx, test_driver):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm import layout_requests

    converge(test_driver, dgx2_ctx, [req("mine", state="present", owner_tag="team-a"),
                                     req("theirs", state="present", owner_tag="team-b"),
                                     req("untagged", state="present")])
    params = {"vms": [], "exclusive": True, "defaults": {"owner_tag": "team-a"}}
    requests, removed = layout_requests(_Module(), test_driver, params)
    assert removed == ["mine"] and [(r.name, r.state) for r in requests] == [("mine", "absent")]
    # Without a tag every managed VM is in scope; "test" (not gpuvirt's) never is.
    requests, removed = layout_requests(_Module(), test_driver, dict(params, defaults={}))
    assert removed == ["mine", "theirs", "untagged"]


def test_layout_secrets_are_hidden():
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm import layout_requests

    module = _Module()
    with pytest.raises(VmError, match="listed twice"):
        layout_requests(module, None, {"vms": [
            {"name": "a", "cloud_init": {"password_hash": "$6$secret"}}, {"name": "a"}]})
    assert "$6$secret" in module.no_log_values


class _RecordingGateway(LibvirtGateway):
    """The test driver, recording when stops end and starts begin (stops made slow)."""

    def __init__(self, uri):
        super().__init__(uri)
        self.events = []

    def shutdown(self, name, timeout, force=False):
        time.sleep(0.2)
        result = super().shutdown(name, timeout, force=force)
        self.events.append(("stopped", name))
        return result

    def start(self, name):
        self.events.append(("start", name))
        return super().start(name)


def test_removals_stop_before_new_vms_start(dgx2_ctx):
    # Night: the day VMs go (exclusive) and a 16-GPU VM takes their GPUs in the same run. It
    # must not start while a day VM still runs on those GPUs, however many workers there are.
    if not has_libvirt():
        pytest.skip("libvirt-python is not installed")
    gw = _RecordingGateway("test:///default")
    try:
        day = [req("day-a", gpus=8), req("day-b", gpus=8)]
        converge(gw, dgx2_ctx, day, workers=4)
        assert gw.state("day-a") == "running" and gw.state("day-b") == "running"
        gw.events = []
        night = [req("day-a", state="absent", force=True, timeout=0),
                 req("night", gpus=16),
                 req("day-b", state="absent", force=True, timeout=0)]
        out = converge(gw, dgx2_ctx, night, workers=4)
        assert [r["error"] for r in out] == [None, None, None]
        assert gw.events[-1] == ("start", "night")
        assert sorted(gw.events[:2]) == [("stopped", "day-a"), ("stopped", "day-b")]
        assert len(out[1]["vm"]["gpus"]) == 16
    finally:
        gw.close()

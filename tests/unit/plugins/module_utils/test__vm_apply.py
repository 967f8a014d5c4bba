# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""kvm_vm's backend: option validation, and plans against libvirt's test driver.

The libvirt test driver (test:///default) is a real libvirt connection with an in-memory
hypervisor: define/start/undefine work on it, so the planner and applier run unmodified.
"""

import os
import time

import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils import _image_store, _qemu_img
from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import read_domains
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_context import HostContext
from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
    LibvirtGateway,
    has_libvirt,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platform_file import get_platform
from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_host
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_apply import converge, plan_vms
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_request import (
    VmError,
    exclusive_removals,
    layout_requests,
    request_from_params,
    resolve,
)


@pytest.mark.parametrize("params, words", [
    ({"name": "../x"}, "name: '../x' is not a valid VM name"),
    ({"name": ""}, "is not a valid VM name"),
    ({"name": "a" * 65}, "is not a valid VM name"),
    ({"name": "has space"}, "is not a valid VM name"),
    ({"name": "ok", "state": "gone"}, "state: 'gone' is not one of"),
    ({"name": "ok", "remove_data": True}, "remove_data: only valid with state: absent"),
    ({"name": "ok", "gpus": -1}, "gpus: -1"),
    ({"name": "ok", "gpu_index": 2}, "gpu_index: set, but gpus is not given"),
    ({"name": "ok", "gpu_index": 2, "gpus": 0}, "gpu_index: set, but gpus is 0"),
    ({"name": "ok", "os_disk_size": 0}, "os_disk_size: 0; give a size of 1 GiB or more"),
    ({"name": "ok", "data_disk_size": -5}, "data_disk_size: -5; give a size of 1 GiB or more"),
    ({"name": "ok", "data_disk_size": "0GiB"}, "data_disk_size: '0GiB' must be larger than zero"),
    ({"name": "ok", "memory": "lots"}, "memory: 'lots' is not a size"),
    ({"name": "ok", "data_disk_size": "1.5GiB"}, "data_disk_size"),
    ({"name": "ok", "vcpus": 0}, "vcpus: 0"),
    ({"name": "ok", "networks": [{"network": "a", "bridge": "b"}]}, "exactly one of"),
    ({"name": "ok", "networks": [{}]}, "exactly one of"),
    ({"name": "ok", "timeout": -1}, "timeout: -1"),
    ({"name": "ok", "gpus": 1, "gpu_model": "L50"}, "gpu_model: 'L50' is neither a GPU model"),
    ({"name": "ok", "gpus": True}, "gpus: True is not a number"),
    ({"name": "ok", "cloud_init": {"user_data": "#cloud-config\n[:"}},
     "vms[3].cloud_init.user_data: not valid YAML"),
    ({"name": "ok", "cloud_init": {"data_disk_mount": "/da ta"}},
     "vms[3].cloud_init.data_disk_mount: '/da ta' is not an absolute path"),
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
    # Left out: None, so that an existing VM keeps its NICs; a new VM gets the default network.
    assert request_from_params({"name": "x"}).networks is None
    assert resolve(request_from_params({"name": "x"})).networks[0].source == "default"
    assert request_from_params({"name": "x", "networks": []}).networks == ()


@pytest.fixture
def dgx2_ctx(host_tree, tmp_path):
    sysfs, proc = host_tree("dgx2")
    topo = read_host(sysfs, proc)
    return HostContext(topology=topo, platform=get_platform("auto", topo),
                       store=_image_store.ImageStore(str(tmp_path / "store")),
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
        plan_vms(test_driver, dgx2_ctx, [req("test")])


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
    """What kvm_layout hands layout_requests of its AnsibleModule: a place for secrets to hide."""

    def __init__(self):
        self.no_log_values = set()


def layout(module, gateway, params):
    """kvm_layout's requests, with what exclusive removes (what converge adds under the lock):
    (requests, removed names)."""
    requests, exclusive = layout_requests(params, secrets=module.no_log_values)
    removals = []
    if gateway is not None:
        removals = exclusive_removals(read_domains(gateway.list_domains()), exclusive)
    return requests + removals, [r.name for r in removals]


def test_exclusive_keeps_to_the_owner_tag(dgx2_ctx, test_driver):
    converge(test_driver, dgx2_ctx, [req("mine", state="present", owner_tag="team-a"),
                                     req("theirs", state="present", owner_tag="team-b"),
                                     req("untagged", state="present")])
    params = {"vms": [], "exclusive": True, "defaults": {"owner_tag": "team-a"}}
    requests, removed = layout(_Module(), test_driver, params)
    assert removed == ["mine"] and [(r.name, r.state) for r in requests] == [("mine", "absent")]
    # Without a tag every managed VM is in scope; "test" (not gpuvirt's) never is.
    requests, removed = layout(_Module(), test_driver, dict(params, defaults={}))
    assert removed == ["mine", "theirs", "untagged"]


def test_layout_secrets_are_hidden():
    module = _Module()
    with pytest.raises(VmError, match="listed twice"):
        layout(module, None, {"vms": [
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


# --- options left out, moved GPUs, disk sizes, files that are not ours -----------------------

def test_left_out_options_keep_what_the_vm_has(dgx2_ctx, test_driver):
    # Created with non-default options; then only name + state, as an admin stops a VM.
    from ansible_collections.gpuvirt.kvm.plugins.module_utils import _seed

    seed = {"cloud_init": {"user": "ops", "ssh_authorized_keys": ["ssh-ed25519 AAAA k"]}} \
        if _seed.iso_tool() else {}
    made = converge(test_driver, dgx2_ctx, [req(
        "keep", gpus=2, cpu_policy="shared", firmware="ovmf", cpu_mode="host-model",
        cpu_disable_features=["x2apic"], owner_tag="team-a", data_disk_size=1,
        networks=[{"network": "default", "mac": "52:54:00:aa:bb:cc"}, {"user": True}],
        **seed)])[0]
    assert made["error"] is None and test_driver.state("keep") == "running"
    assert len(made["vm"]["disks"]) == 1 + len(seed)
    spec = made["vm"]["spec"]
    stop = converge(test_driver, dgx2_ctx, [request_from_params(
        {"name": "keep", "state": "stopped", "force": True, "timeout": 0})])[0]
    assert stop["error"] is None and stop["actions"] == ["stop keep"], stop["diff"]
    assert stop["vm"]["spec"] == spec and stop["diff"] == {"before": {}, "after": {}}
    # Stopped, the same call changes nothing: its GPUs are not freed, it is not redefined.
    again = converge(test_driver, dgx2_ctx, [request_from_params(
        {"name": "keep", "state": "stopped"})])[0]
    assert again["changed"] is False and again["vm"]["gpus"] == made["vm"]["gpus"]
    start = converge(test_driver, dgx2_ctx, [request_from_params({"name": "keep"})])[0]
    assert start["actions"] == ["start keep"] and start["vm"]["spec"] == spec
    # What is given still wins.
    shared_off = converge(test_driver, dgx2_ctx, [request_from_params(
        {"name": "keep", "state": "stopped", "force": True, "timeout": 0, "firmware": "bios"})])[0]
    assert shared_off["actions"] == ["redefine keep", "stop keep"]
    assert shared_off["vm"]["spec"]["firmware"] == "bios"
    assert shared_off["vm"]["gpus"] == made["vm"]["gpus"]


def test_moving_a_running_vms_gpus_needs_recreate(dgx2_ctx, test_driver):
    first = converge(test_driver, dgx2_ctx, [req("mover", gpus=2, gpu_index=0)])[0]
    assert first["vm"]["gpu_indexes"] == [0, 1]
    out = converge(test_driver, dgx2_ctx, [req("mover", gpus=2, gpu_index=4)])[0]
    assert "gpu_index is 4 but the running VM holds GPU(s) 0, 1" in out["error"]
    assert "recreate: true" in out["error"] and out["changed"] is False
    held = read_domains(test_driver.list_domains())["mover"].hostdevs
    assert set(first["vm"]["gpus"]) <= set(held)  # libvirt's definition still names them
    # Nobody else may take them meanwhile.
    other = converge(test_driver, dgx2_ctx, [req("other", gpus=2, gpu_index=0)])[0]
    assert other["error"] is not None and not test_driver.exists("other")
    moved = converge(test_driver, dgx2_ctx, [req("mover", gpus=2, gpu_index=4,
                                                 recreate=True)])[0]
    assert moved["error"] is None and moved["vm"]["gpu_indexes"] == [4, 5]
    assert moved["actions"] == ["redefine mover", "stop mover", "start mover"]
    # Stopped, a VM may move without recreate (nothing holds its GPUs).
    converge(test_driver, dgx2_ctx, [req("mover", gpus=2, state="stopped", force=True,
                                         timeout=0)])
    back = converge(test_driver, dgx2_ctx, [req("mover", gpus=2, gpu_index=0,
                                                state="stopped")])[0]
    assert back["error"] is None and back["vm"]["gpu_indexes"] == [0, 1]


def _virtual_gib(path):
    return _qemu_img.info(path, backing_chain=False).virtual_size / _qemu_img.GIB


def test_data_disk_grows_and_is_never_shrunk(dgx2_ctx, test_driver):
    os.makedirs(dgx2_ctx.disk_dir)
    data = os.path.join(dgx2_ctx.disk_dir, "g-data.qcow2")
    converge(test_driver, dgx2_ctx, [req("g", state="stopped", data_disk_size=1)])
    assert _virtual_gib(data) == 1
    grown = converge(test_driver, dgx2_ctx, [req("g", state="stopped", data_disk_size=3)])[0]
    assert grown["error"] is None
    assert grown["actions"] == ["redefine g", "grow disk %s from 1.0 to 3 GiB" % data]
    assert _virtual_gib(data) == 3
    assert [d["size_gb"] for d in grown["vm"]["disks"] if d["role"] == "data"] == [3]
    again = converge(test_driver, dgx2_ctx, [req("g", state="stopped", data_disk_size=3)])[0]
    assert again["changed"] is False
    shrink = converge(test_driver, dgx2_ctx, [req("g", state="stopped", data_disk_size=2)])[0]
    assert "data_disk_size: 2 GiB is smaller than %s (3.0 GiB); disks are never shrunk" % data \
        in shrink["error"]
    assert shrink["changed"] is False and _virtual_gib(data) == 3
    # A kept data disk (state: absent) comes back with its size; asking for less is refused.
    converge(test_driver, dgx2_ctx, [req("g", state="absent")])
    refused = converge(test_driver, dgx2_ctx, [req("g", state="stopped", data_disk_size=1)])[0]
    assert "disks are never shrunk" in refused["error"] and not test_driver.exists("g")
    back = converge(test_driver, dgx2_ctx, [req("g", state="stopped", data_disk_size=4)])[0]
    assert back["actions"] == ["define g", "grow disk %s from 3.0 to 4 GiB" % data]
    assert _virtual_gib(data) == 4


def test_a_failed_run_shrinks_back_what_it_grew(dgx2_ctx, test_driver, monkeypatch):
    os.makedirs(dgx2_ctx.disk_dir)
    data = os.path.join(dgx2_ctx.disk_dir, "f-data.qcow2")
    converge(test_driver, dgx2_ctx, [req("f", state="stopped", data_disk_size=1)])

    def refuse(*_args, **_kw):
        from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
            LibvirtGatewayError,
        )
        raise LibvirtGatewayError("cannot start f: no")

    monkeypatch.setattr(test_driver, "start", refuse)
    out = converge(test_driver, dgx2_ctx, [req("f", data_disk_size=2)])[0]
    assert "cannot start f: no" in out["error"] and "shrink" in out["error"]
    assert out["changed"] is False  # everything it did was undone: the host is as it was
    assert _virtual_gib(data) == 1
    planned = plan_vms(test_driver, dgx2_ctx, [req("f", state="stopped")])[0]
    assert [d.size_gb for d in planned.actual.disks if d.role == "data"] == [1]


def test_absent_never_removes_a_file_it_did_not_make(dgx2_ctx, test_driver, tmp_path):
    import xml.etree.ElementTree as ET

    os.makedirs(dgx2_ctx.disk_dir)
    converge(test_driver, dgx2_ctx, [req("h", state="stopped", data_disk_size=1)])
    data = os.path.join(dgx2_ctx.disk_dir, "h-data.qcow2")
    # An admin attaches an installer ISO and a scratch disk by hand (virsh attach-disk).
    iso, scratch = tmp_path / "installer.iso", tmp_path / "scratch.qcow2"
    iso.write_bytes(b"iso")
    _qemu_img.create_disk(str(scratch), 1)
    root = ET.fromstring(test_driver.domain_xml("h"))
    devices = root.find("devices")
    for kind, path, dev in (("cdrom", iso, "sdz"), ("disk", scratch, "vdz")):
        disk = ET.SubElement(devices, "disk", type="file", device=kind)
        ET.SubElement(disk, "driver", name="qemu", type="raw" if kind == "cdrom" else "qcow2")
        ET.SubElement(disk, "source", file=str(path))
        ET.SubElement(disk, "target", dev=dev, bus="sata" if kind == "cdrom" else "virtio")
    test_driver.define(ET.tostring(root, encoding="unicode"))
    out = converge(test_driver, dgx2_ctx, [req("h", state="absent", remove_data=True)])[0]
    assert out["error"] is None and out["actions"] == ["undefine h", "remove %s" % data]
    assert iso.exists() and scratch.exists() and not os.path.exists(data)


def test_layout_entries_are_typed_like_kvm_vm_options(test_driver):
    module = _Module()
    requests, _removed = layout(module, test_driver, {"vms": [
        {"name": "a", "gpus": "2", "vcpus": "4", "timeout": "60"},
        # "false" from a template: false, not a truthy string that would delete the data disk
        {"name": "b", "state": "absent", "remove_data": "false", "force": "yes"},
        {"name": "c", "cloud_init": {"password_hash": "$6$hidden", "ssh_authorized_keys":
                                     ["ssh-ed25519 AAAA key"]}},
    ], "defaults": {"recreate": "no"}})
    a, b, c = requests
    assert (a.gpus, a.vcpus, a.timeout, a.recreate) == (2, 4, 60, False)
    assert (b.remove_data, b.force) == (False, True)
    assert c.cloud_init["ssh_authorized_keys"] == ["ssh-ed25519 AAAA key"]
    assert "$6$hidden" in module.no_log_values
    for vms, defaults, words in (
            ([{"name": "a", "gpus": "two"}], {}, "vms[0]: argument 'gpus' is of type"),
            ([{"name": "a", "remove_data": "perhaps"}], {}, "vms[0]: argument 'remove_data'"),
            ([{"name": "a", "networks": [{"bridge": "br0", "vlan": 3}]}], {},
             "vms[0]: unknown option networks.vlan. Supported parameters include: bridge, mac"),
            ([{"name": "a"}], {"timeout": "soon"}, "defaults: argument 'timeout'"),
            ([{"name": "a", "cpu_policy": "greedy"}], {}, "vms[0]: value of cpu_policy must be")):
        with pytest.raises(VmError) as err:
            layout(_Module(), test_driver, {"vms": vms, "defaults": defaults})
        assert words in str(err.value), str(err.value)


def test_a_disk_the_running_qemu_has_not_opened_is_grown_with_qemu_img(dgx2_ctx, test_driver):
    # A data disk kept from an earlier state: absent comes back to a running VM by a redefine
    # (until its reboot QEMU does not have it open), then a second run asks for more.
    os.makedirs(dgx2_ctx.disk_dir)
    data = os.path.join(dgx2_ctx.disk_dir, "k-data.qcow2")
    _qemu_img.create_disk(data, 1)
    converge(test_driver, dgx2_ctx, [req("k")])
    assert test_driver.state("k") == "running"
    added = converge(test_driver, dgx2_ctx, [req("k", data_disk_size=2)])[0]
    assert added["error"] is None, added["error"]
    assert added["actions"] == ["redefine k", "grow disk %s from 1.0 to 2 GiB" % data]
    assert added["reboot_required"] is True and _virtual_gib(data) == 2
    again = converge(test_driver, dgx2_ctx, [req("k", data_disk_size=3)])[0]
    assert again["error"] is None and _virtual_gib(data) == 3
    assert again["actions"] == ["redefine k", "grow disk %s from 2.0 to 3 GiB" % data]


def test_a_new_domain_type_takes_its_own_cpu_mode(dgx2_ctx, test_driver):
    made = converge(test_driver, dgx2_ctx, [req("t", state="stopped")])[0]
    assert made["vm"]["spec"]["cpu_mode"] == "host-passthrough"
    tcg = converge(test_driver, dgx2_ctx, [request_from_params(
        {"name": "t", "state": "stopped", "domain_type": "qemu"})])[0]
    assert tcg["error"] is None, tcg["error"]
    assert (tcg["vm"]["spec"]["domain_type"], tcg["vm"]["spec"]["cpu_mode"]) == ("qemu", "maximum")
    back = converge(test_driver, dgx2_ctx, [request_from_params(
        {"name": "t", "state": "stopped", "domain_type": "kvm"})])[0]
    assert back["vm"]["spec"]["cpu_mode"] == "host-passthrough"
    bare = request_from_params({"name": "t", "state": "stopped"})
    kept = converge(test_driver, dgx2_ctx, [bare])[0]
    assert kept["changed"] is False


def test_a_failed_undo_step_does_not_stop_the_others(dgx2_ctx, test_driver, monkeypatch):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
        LibvirtGatewayError,
    )

    os.makedirs(dgx2_ctx.disk_dir)
    converge(test_driver, dgx2_ctx, [req("u", state="stopped", data_disk_size=1)])
    before = test_driver.domain_xml("u")

    def no_start(*_args, **_kw):
        raise LibvirtGatewayError("cannot start u: no")

    def no_shrink(*_args, **_kw):
        raise _qemu_img.ImagesError("qemu-img: cannot shrink")

    monkeypatch.setattr(test_driver, "start", no_start)
    monkeypatch.setattr(_qemu_img, "undo_grow", no_shrink)
    out = converge(test_driver, dgx2_ctx, [req("u", data_disk_size=2)])[0]
    assert "FAILED, clean up by hand" in out["error"]
    assert "restore_definition u" in out["error"] and out["changed"] is True
    assert test_driver.domain_xml("u") == before  # the definition was still put back


# --- kvm_layout's outcome: applied whole, partial, a failure while applying -------------------

def _layout(gw, ctx, requests, whole=True):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_apply import layout_outcome

    return layout_outcome(converge(gw, ctx, requests, whole=whole), {r.name for r in requests})


def test_a_layout_held_whole_says_nothing_was_changed_and_names_what_could_be(dgx2_ctx,
                                                                              test_driver):
    os.makedirs(dgx2_ctx.disk_dir)
    converge(test_driver, dgx2_ctx, [req("old", state="present", data_disk_size=1)])
    layout = [req("big", gpus=8, state="present"), req("huge", gpus=32, state="present"),
              req("old", state="absent")]
    outcome, msg = _layout(test_driver, dgx2_ctx, layout)
    assert "set gpus to 16 or fewer" in msg
    assert msg.endswith("nothing was changed: the layout is applied whole or not at all (set "
                        "partial: true to apply what can be: big, old)")
    assert outcome["applied"] == [] and outcome["actions"] == [] and not outcome["changed"]
    held = {r["vm"]["name"]: r for r in outcome["vms"]}
    # Reported as they are: old still holds its data disk, big has nothing and no XML.
    assert held["old"]["vm"]["state"] == "shutoff" and held["old"]["kept_data_disks"] == []
    assert held["big"]["vm"] == {"name": "big", "state": "absent"}
    assert test_driver.exists("old") and not test_driver.exists("big")
    partial, msg = _layout(test_driver, dgx2_ctx, layout, whole=False)
    assert sorted(partial["applied"]) == ["big", "old"] and partial["not_applied"] == ["huge"]
    assert "nothing was changed" not in msg and test_driver.exists("big")


def test_a_failure_while_applying_does_not_claim_nothing_changed(
        dgx2_ctx, test_driver, monkeypatch):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
        LibvirtGatewayError,
    )

    def refuse(*_args, **_kw):
        raise LibvirtGatewayError("cannot start x: no")

    monkeypatch.setattr(test_driver, "start", refuse)
    outcome, msg = _layout(test_driver, dgx2_ctx, [req("x")])
    assert "cannot start x: no" in msg and "rolled back" in msg
    assert "nothing was changed" not in msg and outcome["not_applied"] == ["x"]

# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""plan(): requests and an observed snapshot -> steps, with no libvirt, qemu-img or files.

Every case builds the Snapshot by hand - the domains as libvirt would return them (made with the
collection's own domain builder), which files exist, what size a disk has - and checks the steps,
the diff and the refusals. converge() on the libvirt test driver is test__vm_apply.py's.
"""

from dataclasses import replace

import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain_builder import build_domain
from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import read_domain
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_context import HostContext
from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_store import Image
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import PLATFORMS
from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_host
from ansible_collections.gpuvirt.kvm.plugins.module_utils._units import GIB
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_observe import Snapshot
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_plan import disk_paths, plan
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_request import (
    VmError,
    request_from_params,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_spec import VmSpec

DISKS = "/d"
BASE = "/store/os-1.qcow2"
IMAGE = Image(name="os", version="1", format="qcow2", path=BASE, virtual_size=GIB)
BASE2 = "/store/os-2.qcow2"
IMAGE2 = Image(name="os", version="2", format="qcow2", path=BASE2, virtual_size=2 * GIB)


@pytest.fixture(scope="module")
def ctx(host_tree):
    topology = read_host(*host_tree("dgx2"))
    return HostContext(topology=topology, platform=PLATFORMS["dgx2"], disk_dir=DISKS,
                       reserved_cpus="0,24,48,72", bridges=("br0",))


def req(name="vm", **kw):
    kw.setdefault("networks", [{"network": "default"}])
    kw.setdefault("vcpus", 2)
    kw.setdefault("memory", 1024)
    return request_from_params(dict(kw, name=name))


def snapshot(*vms, files=(), sizes=None, live=None):
    """A host holding these VMs ((request, active) pairs, defined as a first run would)."""
    snap = Snapshot(networks={"default": True, "down": False},
                    images={"os": (IMAGE, BASE), "os-1": (IMAGE, BASE), "os-2": (IMAGE2, BASE2),
                            "os-9": "image: 'os-9' is not installed; the store has os-1, os-2"},
                    sizes=dict(sizes or {}), live_disks=dict(live or {}))
    for path in files:
        snap.paths[path] = True
    return snap, list(vms)


def observed(ctx, snap, vms, requests):
    """Fill the snapshot as observe() would: the VMs defined, every file path looked at."""
    for request, active in vms:
        empty = Snapshot(networks=snap.networks, images=snap.images)
        _own_files(empty, ctx, [request])
        (vp,) = plan([request], empty, ctx)
        assert vp.error is None, vp.error
        xml = build_domain(vp.desired, ctx.topology, uuid="u-" + request.name).to_xml()
        snap.domains[request.name] = read_domain(xml, active)
        snap.specs[request.name] = VmSpec.from_domain(snap.domains[request.name].domain)
    _own_files(snap, ctx, requests)
    return snap


def _own_files(snap, ctx, requests):
    for r in requests:
        for path in disk_paths(DISKS, r.name).values():
            snap.paths.setdefault(path, False)


def run(ctx, requests, *vms, whole=False, **kw):
    snap, defined = snapshot(*vms, **kw)
    return plan(requests, observed(ctx, snap, defined, requests), ctx, whole=whole)


P = disk_paths(DISKS, "vm")


@pytest.mark.parametrize("case, request_kw, vms, files, steps", [
    ("new, running", {"image": "os"}, [], [],
     [("create_overlay", P["os"]), ("define", "vm"), ("start", "vm")]),
    ("new, present, a data disk", {"image": "os", "state": "present", "data_disk_size": 2}, [],
     [], [("create_overlay", P["os"]), ("create_data_disk", P["data"]), ("define", "vm")]),
    ("running, as asked", {"image": "os"}, [({"image": "os"}, True)], [P["os"]], []),
    ("stopped, to run", {"image": "os"}, [({"image": "os"}, False)], [P["os"]],
     [("start", "vm")]),
    ("running, to stop", {"state": "stopped"}, [({"image": "os"}, True)], [P["os"]],
     [("stop", "vm")]),
    ("running, removed", {"state": "absent"}, [({"image": "os"}, True)], [P["os"], P["data"]],
     [("stop", "vm"), ("undefine", "vm"), ("remove_file", P["os"])]),
    ("removed with its data", {"state": "absent", "remove_data": True},
     [({"image": "os"}, False)], [P["os"], P["data"]],
     [("undefine", "vm"), ("remove_file", P["os"]), ("remove_file", P["data"])]),
    ("absent, nothing there", {"state": "absent"}, [], [], []),
    ("stopped, new firmware", {"state": "stopped", "firmware": "ovmf"},
     [({"image": "os", "state": "stopped"}, False)], [P["os"]], [("redefine", "vm")]),
])
def test_steps(ctx, case, request_kw, vms, files, steps):
    request_kw = {k: v for k, v in request_kw.items() if v is not None}
    defined = [(req(**kw), active) for kw, active in vms]
    (vp,) = run(ctx, [req(**request_kw)], *defined, files=files)
    assert vp.error is None, (case, vp.error)
    assert vp.steps == steps, case
    assert vp.changed == bool(steps)


def test_a_kept_data_disk_comes_back_as_it_is_or_grown(ctx):
    again = run(ctx, [req(state="present", data_disk_size=1)], files=[P["data"]],
                sizes={P["data"]: GIB})[0]
    assert again.steps == [("define", "vm")]
    assert [d.path for d in again.desired.disks] == [P["data"]]
    grown = run(ctx, [req(state="present", data_disk_size=2)], files=[P["data"]],
                sizes={P["data"]: GIB})[0]
    assert grown.steps == [("define", "vm"), ("grow_disk", P["data"])]


def test_absent_keeps_the_data_disk_and_says_so(ctx):
    (vp,) = run(ctx, [req(state="absent")], (req(image="os"), False), files=[P["os"], P["data"]])
    assert vp.kept == [P["data"]] and vp.diff["name"] == {"before": "vm", "after": None}


def test_a_disk_grows_offline_or_live_and_never_shrinks(ctx):
    made = req(image="os", data_disk_size=1)
    stopped = run(ctx, [req(state="stopped", data_disk_size=3)], (made, False),
                  files=[P["os"], P["data"]], sizes={P["data"]: GIB})[0]
    assert stopped.steps == [("redefine", "vm"), ("grow_disk", P["data"])]
    assert stopped.grow == [(P["data"], 3, GIB, False)] and not stopped.reboot_required
    live = run(ctx, [req(data_disk_size=3)], (made, True), files=[P["os"], P["data"]],
               sizes={P["data"]: GIB}, live={"vm": frozenset([P["data"]])})[0]
    assert live.grow == [(P["data"], 3, GIB, True)] and not live.reboot_required
    shrink = run(ctx, [req(data_disk_size=2)], (made, True), files=[P["os"], P["data"]],
                 sizes={P["data"]: 3 * GIB})[0]
    assert "2 GiB is smaller than %s (3.0 GiB); disks are never shrunk" % P["data"] \
        in shrink.error and shrink.steps == []
    unreadable = run(ctx, [req(data_disk_size=2)], (made, True), files=[P["os"], P["data"]],
                     sizes={P["data"]: "qemu-img: no such file"})[0]
    assert "cannot read the size of %s: qemu-img: no such file" % P["data"] in unreadable.error


@pytest.mark.parametrize("request_kw, words", [
    ({"image": "nope"}, "image: 'nope' is not installed"),
    ({"image": "os", "networks": [{"network": "gone"}]}, "libvirt has no network 'gone'"),
    ({"image": "os", "networks": [{"network": "down"}]}, "'down' is not active"),
    ({"image": "os", "networks": [{"bridge": "br9"}]}, "the host has no bridge 'br9'"),
    ({"image": "os", "gpus": 3}, "dgx2 places only 1/2/4/8/16-GPU VMs"),
    ({"image": "os", "os_disk_size": 0.5}, None),
])
def test_refusals_name_the_option(ctx, request_kw, words):
    if words is None:  # a half GiB is refused before planning, by the request
        with pytest.raises(VmError, match="os_disk_size"):
            req(**request_kw)
        return
    snap, _defined = snapshot()
    snap.images["nope"] = "image: 'nope' is not installed; the store has os"
    (vp,) = plan([req(**request_kw)], observed(ctx, snap, [], [req(**request_kw)]), ctx)
    assert words in vp.error and vp.steps == []


def test_a_data_disk_mount_needs_a_data_disk(ctx):
    (vp,) = run(ctx, [req(image="os", cloud_init={"data_disk_mount": "/data"})])
    assert "cloud_init.data_disk_mount: /data asks for the data disk, and the VM has none; set " \
        "data_disk_size" in vp.error and vp.steps == []
    (vp,) = run(ctx, [req(image="os", data_disk_size=1, cloud_init={"data_disk_mount": "/data"})])
    assert vp.error is None and ("create_data_disk", P["data"]) in vp.steps
    assert "LABEL=gpuvirt-data" in vp.seed_files["user-data"]


def test_a_running_vm_is_not_moved_without_recreate(ctx):
    held = req(image="os", gpus=2, gpu_index=0)
    (vp,) = run(ctx, [req(image="os", gpus=2, gpu_index=4)], (held, True), files=[P["os"]])
    assert "gpu_index is 4 but the running VM holds GPU(s) 0, 1" in vp.error
    (vp,) = run(ctx, [req(image="os", gpus=2, gpu_index=4, recreate=True)], (held, True),
                files=[P["os"]])
    assert vp.steps == [("redefine", "vm"), ("stop", "vm"), ("start", "vm")]


def test_a_layout_applied_whole_holds_every_entry_when_one_fails(ctx):
    requests = [req("a", image="os", gpus=8), req("b", image="os", gpus=8),
                req("c", image="os", gpus=8), req("d", state="absent")]
    defined = [(req("d", image="os"), True)]
    plans = run(ctx, requests, *defined, files=disk_paths(DISKS, "d").values())
    assert [vp.error is not None for vp in plans] == [False, False, True, False]
    assert [vp.steps != [] for vp in plans] == [True, True, False, True]
    held = run(ctx, requests, *defined, files=disk_paths(DISKS, "d").values(), whole=True)
    assert "no free 8-GPU block" in held[2].error
    assert [vp.held for vp in held] == [True, True, False, True]
    assert all(vp.steps == [] and not vp.changed for vp in held)


def test_a_domain_the_collection_did_not_make_is_refused(ctx):
    snap, _defined = snapshot()
    foreign = read_domain("<domain type='kvm'><name>vm</name><memory>65536</memory>"
                          "<vcpu>1</vcpu><os><type>hvm</type></os><devices/></domain>")
    snap.domains["vm"] = foreign
    with pytest.raises(VmError, match="not created by gpuvirt.kvm"):
        plan([req(image="os")], observed(ctx, snap, [], [req(image="os")]), ctx)


@pytest.fixture(scope="module")
def mixed_ctx(host_tree):
    topology = read_host(*host_tree("pcie-mixed"))
    return HostContext(topology=topology, platform=PLATFORMS["generic"], disk_dir=DISKS,
                       reserved_cpus="0,64,32,96")


def test_a_running_vm_is_not_moved_to_another_gpu_model_without_recreate(mixed_ctx):
    held = req(image="os", gpus=2, gpu_model="L40S")
    (vp,) = run(mixed_ctx, [req(image="os", gpus=2, gpu_model="L4")], (held, True),
                files=[P["os"]])
    assert "gpu_model is L4 but the running VM holds GPU(s) of model L40S" in vp.error
    # Its QEMU holds the L40S pair: nobody else gets them in the same run.
    plans = run(mixed_ctx, [req(image="os", gpus=2, gpu_model="L4"),
                            req("b", image="os", gpus=2, gpu_model="L40S", state="present")],
                (held, True), files=[P["os"]])
    assert plans[0].error is not None and plans[1].steps == []
    assert "no free 2-GPU block is of gpu_model L40S" in plans[1].error
    (moved,) = run(mixed_ctx, [req(image="os", gpus=2, gpu_model="L4", recreate=True)],
                   (held, True), files=[P["os"]])
    assert moved.steps == [("redefine", "vm"), ("stop", "vm"), ("start", "vm")]
    # The same model, or none named, keeps the VM as it is.
    for same in (req(image="os", gpus=2, gpu_model="l40s"), req(image="os", gpus=2)):
        (kept,) = run(mixed_ctx, [same], (held, True), files=[P["os"]])
        assert kept.error is None and kept.steps == []


def test_fabric_manager_unreachable_stops_new_gpu_placements_only(ctx):
    """fabric_manager set but FM cannot answer: VMs that keep the GPUs they hold, and VMs
    without GPUs, are converged; a VM that needs a placement from FM's list is refused."""
    down = replace(ctx, fabric_error="fabric_manager: cannot reach Fabric Manager at 10.0.0.5")
    requests = [req("old", image="os", gpus=2, state="stopped"), req("cpu", image="os"),
                req("new", image="os", gpus=2)]
    snap, defined = snapshot((req("old", image="os", gpus=2, gpu_index=0), True),
                             files=[disk_paths(DISKS, "old")["os"]])
    plans = plan(requests, observed(ctx, snap, defined, requests), down)
    assert [vp.error for vp in plans[:2]] == [None, None]
    assert plans[0].steps == [("stop", "old")]
    assert plans[2].error == "new: fabric_manager: cannot reach Fabric Manager at 10.0.0.5"
    assert plans[2].steps == []
    # A stopped VM asked onto other GPUs of the same count needs FM's list too.
    requests = [req("old", image="os", gpus=2, gpu_index=4, state="stopped")]
    snap, defined = snapshot((req("old", image="os", gpus=2, gpu_index=0), False),
                             files=[disk_paths(DISKS, "old")["os"]])
    (vp,) = plan(requests, observed(ctx, snap, defined, requests), down)
    assert vp.error == "old: fabric_manager: cannot reach Fabric Manager at 10.0.0.5"
    assert vp.steps == []


# --- image moves -------------------------------------------------------------------------------

MADE = {"image": "os", "data_disk_size": 1, "networks": [{"network": "default"}]}


def _moved(ctx, active, **kw):
    (vp,) = run(ctx, [req(**dict(MADE, **kw))], (req(**MADE), active),
                files=[P["os"], P["data"]])
    return vp


def test_a_stopped_vm_moves_to_a_new_overlay_and_drops_the_old_once_started(ctx):
    vp = _moved(ctx, False, image="os-2")
    assert vp.error is None
    assert vp.steps == [("create_overlay", P["os_alt"]), ("redefine", "vm"), ("start", "vm"),
                        ("remove_file", P["os"])]
    disks = {d.role: d for d in vp.desired.disks}
    assert (disks["os"].path, disks["os"].backing) == (P["os_alt"], BASE2)
    assert disks["data"].path == P["data"]  # the data disk stays
    assert (vp.desired.image, vp.desired.image_version) == ("os", "2")
    assert vp.desired.networks == vp.actual.networks  # MACs included
    assert vp.desired.gpus == vp.actual.gpus
    assert set(vp.diff) >= {"disks", "image_version"}


def test_a_move_that_does_not_start_keeps_the_old_overlay(ctx):
    vp = _moved(ctx, False, image="os-2", state="stopped")
    assert vp.steps == [("create_overlay", P["os_alt"]), ("redefine", "vm")]


def test_a_running_vm_moves_only_with_recreate(ctx):
    vp = _moved(ctx, True, image="os-2")
    assert "vm: image: moving the running VM from os-1 to os-2 needs it stopped" in vp.error
    assert vp.steps == []
    vp = _moved(ctx, True, image="os-2", recreate=True)
    assert vp.error is None
    assert vp.steps == [("create_overlay", P["os_alt"]), ("redefine", "vm"), ("stop", "vm"),
                        ("start", "vm"), ("remove_file", P["os"])]


def test_a_running_vm_asked_to_stop_moves_without_recreate(ctx):
    vp = _moved(ctx, True, image="os-2", state="stopped")
    assert vp.error is None
    assert vp.steps == [("create_overlay", P["os_alt"]), ("redefine", "vm"), ("stop", "vm")]


def test_a_second_move_never_replaces_the_disk_the_guest_last_ran_on(ctx):
    # Moved to os-2 while stopped (on -os-alt now, -os kept); asked onto another image again.
    snap, _defined = snapshot(files=[P["os"], P["os_alt"], P["data"]])
    request = req(**{**MADE, "image": "os-1"})
    empty = Snapshot(networks=snap.networks, images=snap.images)
    _own_files(empty, ctx, [request])
    (first,) = plan([req(**MADE)], empty, ctx)
    spec = replace(first.desired, disks=tuple(
        replace(d, path=P["os_alt"], backing=BASE2) if d.role == "os" else d
        for d in first.desired.disks), image_version="2")
    xml = build_domain(spec, ctx.topology, uuid="u-vm").to_xml()
    snap.domains["vm"] = read_domain(xml, False)
    snap.specs["vm"] = VmSpec.from_domain(snap.domains["vm"].domain)
    _own_files(snap, ctx, [request])
    (vp,) = plan([request], snap, ctx)
    assert "vm: image: %s still holds the OS disk the VM last ran on" % P["os"] in vp.error
    assert vp.steps == []


def test_the_name_alone_keeps_the_version_a_vm_is_on(ctx):
    # "os" resolves to the default version; a VM on os-1 stays there.
    assert _moved(ctx, True).steps == []
    assert _moved(ctx, True, image="os-1").steps == []


def test_a_move_to_a_version_not_installed_is_refused(ctx):
    vp = _moved(ctx, False, image="os-9")
    assert vp.error == "vm: image: 'os-9' is not installed; the store has os-1, os-2"
    assert vp.steps == []


def test_a_move_keeps_a_larger_os_disk_and_refuses_a_smaller_one(ctx):
    vp = _moved(ctx, False, image="os-2", os_disk_size=1)
    assert "os_disk_size: 1 GiB is smaller than the image os-2" in vp.error


def test_absent_removes_an_overlay_a_move_kept(ctx):
    (vp,) = run(ctx, [req(state="absent")], (req(**MADE), False),
                files=[P["os"], P["os_alt"], P["data"]])
    assert vp.steps == [("undefine", "vm"), ("remove_file", P["os"]),
                        ("remove_file", P["os_alt"])]
    assert vp.kept == [P["data"]]


# --- rail NICs ------------------------------------------------------------------------------------

def test_rails_are_placed_recorded_and_kept_when_the_option_is_left_out(ctx):
    asked = req(image="os", gpus=2, nics="auto")
    (vp,) = run(ctx, [asked])
    assert vp.error is None and ("define", "vm") in vp.steps
    assert vp.desired.nics == ("0000:35:00.1",)  # the DGX-2 pair's NIC has VFs: a VF
    assert "0000:35:00.1" in vp.desired.hostdevs
    # defined with its VF: the same request, or one without nics, changes nothing
    for again in (asked, req(image="os", gpus=2), req(image="os", gpus=2, nics=0)):
        (vp2,) = run(ctx, [again], (asked, True), files=[P["os"]])
        assert vp2.error is None and vp2.steps == [], vp2.steps
        assert vp2.desired.nics == ("0000:35:00.1",)


@pytest.mark.parametrize("request_kw, words", [
    ({"gpus": 0, "nics": "auto"}, "nics: auto, but gpus is 0"),
    ({"gpus": 2, "nics": "two"}, "nics: 'two'; give auto"),
    ({"gpus": 2, "nics": True}, "nics: True; give auto"),
])
def test_bad_nics_are_refused_before_planning(request_kw, words):
    with pytest.raises(VmError, match=words):
        req(image="os", **request_kw)


def test_more_rails_than_the_gpus_have_is_refused_naming_the_option(ctx):
    (vp,) = run(ctx, [req(image="os", gpus=2, nics=2)])
    assert "nics: 2 asked, but GPU(s) 0000:34:00.0, 0000:36:00.0 have 1 rail NIC(s)" in vp.error
    assert vp.steps == []


def test_a_vm_holding_a_failed_gpu_is_not_started_and_the_error_names_it(ctx):
    """A stopped VM on GPUs 0-1 whose GPU 0 failed its health check (_health) is not started;
    stopping it, or a VM on healthy GPUs, goes ahead; recreate re-places it on healthy GPUs."""
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._health import (
        DeviceHealth,
        Signal,
    )

    bad = ctx.topology and sorted(b for b, d in ctx.topology.pci.items()
                                  if d.vendor == 0x10DE and d.pci_class == 0x0302)[0]
    sick = replace(ctx, unhealthy_gpus=(bad,), health={bad: DeviceHealth(bad, (Signal(
        "aer", "failed", "%s: 1 fatal uncorrectable PCIe error since boot (DLP 1)" % bad),))})
    old = req("old", image="os", gpus=2, gpu_index=0)
    requests = [req("old", image="os", gpus=2), req("ok", image="os", gpus=2, gpu_index=4)]
    snap, defined = snapshot((old, False), files=[disk_paths(DISKS, "old")["os"]])
    plans = plan(requests, observed(ctx, snap, defined, requests), sick)
    assert plans[0].error == (
        "old: not started: it holds GPU %s, which failed its health check (%s: 1 fatal "
        "uncorrectable PCIe error since boot (DLP 1)); remove the VM, or set recreate: true "
        "to re-place it on healthy devices, or repair the device (then reboot the host, or "
        "clear it with gpu_health action=clear or gpuvirt-health clear) (docs/health.md)"
        % (bad, bad))
    assert plans[1].error is None and ("start", "ok") in plans[1].steps
    (stop,) = plan([req("old", image="os", gpus=2, state="stopped")],
                   observed(ctx, *snapshot((old, True), files=[disk_paths(DISKS, "old")["os"]]),
                            [req("old", image="os", gpus=2, state="stopped")]), sick)
    assert stop.error is None and stop.steps == [("stop", "old")]
    (moved,) = plan([req("old", image="os", gpus=2, recreate=True)],
                    observed(ctx, *snapshot((old, False), files=[disk_paths(DISKS, "old")["os"]]),
                             [req("old", image="os", gpus=2, recreate=True)]), sick)
    assert moved.error is None and bad not in moved.desired.gpus
    assert ("start", "old") in moved.steps
    # recreate with state stopped keeps what it holds; a manual unhealthy_gpus GPU does not
    # stop a start (only a failed health check does)
    (kept,) = plan([req("old", image="os", gpus=2, recreate=True, state="stopped")],
                   observed(ctx, *snapshot((old, True), files=[disk_paths(DISKS, "old")["os"]]),
                            [req("old", image="os", gpus=2, recreate=True, state="stopped")]),
                   sick)
    assert kept.error is None and kept.steps == [("stop", "old")]
    marked = replace(ctx, unhealthy_gpus=(bad,))
    (manual,) = plan([req("old", image="os", gpus=2)],
                     observed(ctx, *snapshot((old, False), files=[disk_paths(DISKS, "old")["os"]]),
                              [req("old", image="os", gpus=2)]), marked)
    assert manual.error is None and manual.steps == [("start", "old")]


def test_recreate_keeps_a_vm_on_its_failed_gpu_when_no_healthy_block_is_free(ctx):
    """16 GPUs held, one failed: nowhere to go. Stopping still works; starting is refused."""
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._health import (
        DeviceHealth,
        Signal,
    )

    bad = sorted(b for b, d in ctx.topology.pci.items()
                 if d.vendor == 0x10DE and d.pci_class == 0x0302)[0]
    sick = replace(ctx, unhealthy_gpus=(bad,), health={bad: DeviceHealth(bad, (Signal(
        "power", "failed", "the kernel reports %s's power state as error" % bad),))})
    big = req("big", image="os", gpus=16, vcpus=16)
    files = [disk_paths(DISKS, "big")["os"]]
    for state, active, steps in (("stopped", True, [("stop", "big")]), ("running", False, [])):
        want = req("big", image="os", gpus=16, vcpus=16, recreate=True, state=state)
        (vp,) = plan([want], observed(ctx, *snapshot((big, active), files=files), [want]), sick)
        assert vp.steps == steps, state
        if state == "running":
            assert vp.error.startswith("big: not started: it holds GPU %s" % bad)
        else:
            assert vp.error is None

# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""The libvirt qemu hook (roles/kvm_host/files/gpuvirt-qemu-hook, _fabric_hook), run as libvirt
runs it: a program with the domain, operation and sub-operation as arguments and the domain XML
on stdin, on the host's own Python (without Ansible where the machine has one), against the
stand-in fmpm and Fabric Manager (tests/fixtures/fabric)."""

import itertools
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import FMPM  # the stand-in fmpm (fm_state, the stand-in FM, is conftest's)
from conftest import host_lib as make_host_lib

import ansible_collections.gpuvirt.kvm.plugins.module_utils._fabric_hook as fabric_hook
from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import Domain, GpuvirtMetadata

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(fabric_hook.__file__)))))))
HOOK = os.path.join(ROOT, "ansible_collections", "gpuvirt", "kvm", "roles", "kvm_host", "files",
                    "gpuvirt-qemu-hook")
# libvirt runs hooks with a short PATH: python3 is the distribution's, which has no Ansible here.
SYSTEM_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
HOOK_PATH = "%s:/usr/bin:/bin" % os.path.dirname(SYSTEM_PYTHON) if SYSTEM_PYTHON == \
    sys.executable else "/usr/bin:/bin"

NS = "https://gpuvirt.invalid/xmlns/kvm/1"


def _xml(name, partition=None, ours=True):
    """Domain XML as libvirt hands it to a hook (trimmed to what matters)."""
    meta = ""
    if ours:
        attr = ' fm_partition="%d"' % partition if partition is not None else ""
        meta = ('<metadata><gpuvirt:allocation xmlns:gpuvirt="%s" owner="gpuvirt.kvm"%s>'
                '<gpuvirt:gpus>0000:9d:00.0,0000:c3:00.0</gpuvirt:gpus></gpuvirt:allocation>'
                '</metadata>' % (NS, attr))
    return ("<domain type='kvm'><name>%s</name><memory unit='KiB'>1048576</memory>%s"
            "<vcpu>2</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"
            % (name, meta))


@pytest.fixture
def host_lib(tmp_path):
    """A folder with only the files the docs tell an admin to copy (fabric_hook.HOST_FILES)."""
    return make_host_lib(tmp_path, fabric_hook.HOST_FILES)


@pytest.fixture
def hook(fm_state, tmp_path, host_lib):
    """hook(domain, op, sub, xml) runs the hook script; returns (status, stderr)."""
    config = tmp_path / "fabric.json"
    config.write_text(json.dumps({"fmpm": FMPM, "starting_wait": 1}))
    env = {"PATH": HOOK_PATH, "LC_ALL": "C", "GPUVIRT_HOOK_LIB": host_lib,
           "GPUVIRT_HOOK_CONFIG": str(config), "GPUVIRT_HOOK_STATE": str(tmp_path / "run"),
           "FMPM_STATE": fm_state.path,
           # the start check's command (gpuvirt-health vet): none, unless a test gives one
           "GPUVIRT_HEALTH": str(tmp_path / "no-gpuvirt-health")}

    def call(domain, op, sub, xml):
        proc = subprocess.run([HOOK, domain, op, sub, "-"], input=xml.encode(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                              timeout=60, check=False)
        return proc.returncode, proc.stderr.decode()

    call.state_dir = tmp_path / "run"
    call.env = env
    return call


def _active(fm):
    return sorted(p.id for p in fm.partitions().active)


def test_start_activates_and_release_deactivates(fm_state, hook):
    fm = fm_state("h100")
    xml = _xml("pair-a", 3)
    assert hook("pair-a", "prepare", "begin", xml) == (0, "")
    assert _active(fm) == [3]
    assert (hook.state_dir / "partition-3").read_text() == "pair-a\n"
    for op, sub in (("start", "begin"), ("started", "begin"), ("stopped", "end")):
        assert hook("pair-a", op, sub, xml) == (0, "")
        assert _active(fm) == [3]
    assert hook("pair-a", "release", "end", xml) == (0, "")
    assert _active(fm) == []
    assert not (hook.state_dir / "partition-3").exists()
    assert hook("pair-a", "release", "end", xml) == (0, "")  # released twice: nothing to do


def test_the_start_check_comes_first_and_a_refusal_activates_nothing(fm_state, hook, tmp_path):
    """At "prepare begin" the hook runs gpuvirt-health vet on the definition before it
    activates anything: a VM refused for a failed device gets no partition (docs/health.md)."""
    fm = fm_state("h100")
    seen = tmp_path / "vet-stdin.xml"
    vet = tmp_path / "gpuvirt-health"
    vet.write_text("#!/bin/sh\ncat > %s\necho 'gpuvirt-health: pair-a: not started: it holds "
                   "GPU 0000:9d:00.0, which failed its health check' >&2\nexit 1\n" % seen)
    vet.chmod(0o755)
    hook.env["GPUVIRT_HEALTH"] = str(vet)
    xml = _xml("pair-a", 3)
    status, err = hook("pair-a", "prepare", "begin", xml)
    assert status == 1 and "GPU 0000:9d:00.0, which failed its health check" in err
    assert _active(fm) == [] and not (hook.state_dir / "partition-3").exists()
    assert seen.read_text().strip() == xml.strip()
    # a VM the check lets go gets its partition as before; the definition reaches both
    vet.write_text("#!/bin/sh\ncat > %s\n" % seen)
    assert hook("pair-a", "prepare", "begin", xml) == (0, "")
    assert _active(fm) == [3] and seen.read_text().strip() == xml.strip()
    assert hook("pair-a", "release", "end", xml) == (0, "")
    assert _active(fm) == []


def test_domains_without_a_partition_are_left_alone(fm_state, hook):
    fm = fm_state("h100")
    assert hook("cpu-only", "prepare", "begin", _xml("cpu-only")) == (0, "")
    assert hook("theirs", "prepare", "begin", _xml("theirs", ours=False)) == (0, "")
    assert _active(fm) == [] and not hook.state_dir.exists()


def test_an_overlapping_active_partition_fails_the_start_and_names_its_domain(fm_state, hook):
    fm = fm_state("h100")
    assert hook("quad", "prepare", "begin", _xml("quad", 1))[0] == 0  # modules 1-4
    status, err = hook("pair-a", "prepare", "begin", _xml("pair-a", 3))  # modules 1, 3
    assert status == 1
    assert "pair-a (start, Fabric Manager partition 3)" in err
    assert "in use (fmReturn -7 IN_USE) by partition 1 (GPU modules 1-4), held by domain " \
           "'quad'" in err and "the VM does not start" in err
    # libvirt releases a domain whose start failed: quad keeps its partition.
    assert hook("pair-a", "release", "end", _xml("pair-a", 3)) == (0, "")
    assert _active(fm) == [1]


def test_a_partition_active_for_another_domain_is_not_taken(fm_state, hook):
    fm = fm_state("h100")
    assert hook("a", "prepare", "begin", _xml("a", 4))[0] == 0
    status, err = hook("b", "prepare", "begin", _xml("b", 4))
    assert status == 1 and "held by domain 'a'" in err
    # libvirt releases b after its failed start: a's partition stays active.
    assert hook("b", "release", "end", _xml("b", 4)) == (0, "")
    assert _active(fm) == [4]
    assert hook("a", "prepare", "begin", _xml("a", 4)) == (0, "")  # a restart of a keeps it
    assert _active(fm) == [4]


def test_an_active_partition_nobody_recorded_is_not_claimed(fm_state, hook):
    fm = fm_state("h100")
    fm.activate(4)  # by hand, or by a domain started before the hook was installed
    status, err = hook("b", "prepare", "begin", _xml("b", 4))
    assert status == 1 and "held by no domain of this collection" in err and "fmpm -d 4" in err
    assert hook("b", "release", "end", _xml("b", 4)) == (0, "")
    assert _active(fm) == [4]


def test_no_activation_without_its_record(fm_state, hook, tmp_path):
    fm = fm_state("h100")
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    hook.env["GPUVIRT_HOOK_STATE"] = str(blocked)
    status, err = hook("a", "prepare", "begin", _xml("a", 3))
    assert status == 1 and "the VM does not start" in err
    assert _active(fm) == []


def test_calls_other_than_start_and_release_never_start_python(fm_state, hook):
    fm_state("h100")
    hook.env["GPUVIRT_HOOK_LIB"] = "/nonexistent"  # an import would fail
    for op, sub in (("reconnect", "begin"), ("migrate", "begin"), ("restore", "begin"),
                    ("attach", "begin"), ("started", "begin"), ("stopped", "end")):
        assert hook("a", op, sub, _xml("a", 3)) == (0, "")
    assert hook("a", "prepare", "begin", _xml("a", 3))[0] == 1


def test_fabric_manager_down_fails_the_start_with_its_address(fm_state, hook):
    fm_state("h100")
    fm_state.control("stop")
    status, err = hook("pair-a", "prepare", "begin", _xml("pair-a", 3))
    assert status == 1
    assert "cannot reach Fabric Manager at 127.0.0.1" in err and "the VM does not start" in err
    assert not (hook.state_dir / "partition-3").exists()


def test_a_release_that_cannot_reach_fm_keeps_the_record_and_says_so(fm_state, hook):
    fm_state("h100")
    assert hook("pair-a", "prepare", "begin", _xml("pair-a", 5))[0] == 0
    fm_state.control("stop")
    status, err = hook("pair-a", "release", "end", _xml("pair-a", 5))
    assert status == 1 and "fmpm -d 5" in err
    assert (hook.state_dir / "partition-5").read_text() == "pair-a\n"


def test_a_partition_fm_does_not_list_fails_the_start(fm_state, hook):
    fm = fm_state("b200")  # B200 has no partition 0
    status, err = hook("all8", "prepare", "begin", _xml("all8", 0))
    assert status == 1 and "lists no partition 0" in err and "recreate" in err
    assert _active(fm) == []


def test_unreadable_settings_fail_the_start(fm_state, hook, tmp_path):
    fm_state("h100")
    (tmp_path / "fabric.json").write_text("{not json")
    status, err = hook("pair-a", "prepare", "begin", _xml("pair-a", 3))
    assert status == 1 and "cannot read the hook's settings" in err


@pytest.mark.skipif(SYSTEM_PYTHON == sys.executable, reason="no separate system Python here")
def test_the_hook_runs_without_ansible(fm_state, hook):
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import ansible"], stderr=subprocess.PIPE,
                           check=False)
    assert probe.returncode != 0  # so the runs above used no Ansible
    fm_state("h100")
    assert hook("x", "prepare", "begin", _xml("x", 7)) == (0, "")


def test_the_partition_is_recorded_in_the_metadata_the_builder_writes():
    meta = GpuvirtMetadata(owner="gpuvirt.kvm", fm_partition=6, gpus=("0000:52:00.0",))
    dom = Domain.from_xml(_xml("x", 6))
    assert dom.gpuvirt.fm_partition == 6
    dom.metadata = [meta]
    again = Domain.from_xml(dom.to_xml())
    assert again.gpuvirt.fm_partition == 6
    assert fabric_hook.decide(["x", "prepare", "begin", "-"], dom.to_xml()) == ("activate", 6)
    assert fabric_hook.decide(["x", "release", "end", "-"], dom.to_xml()) == ("deactivate", 6)
    assert fabric_hook.decide(["x", "start", "begin", "-"], dom.to_xml()) == (None, None)


def test_eight_parallel_starts_never_activate_overlapping_partitions(fm_state, hook):
    fm = fm_state("h100")
    wanted = {"all8": 0, "quad-a": 1, "quad-b": 2, "p13": 3, "p24": 4, "p57": 5, "p68": 6,
              "one": 7}
    with ThreadPoolExecutor(8) as pool:
        futures = {name: pool.submit(hook, name, "prepare", "begin", _xml(name, pid))
                   for name, pid in wanted.items()}
    results = {name: future.result() for name, future in futures.items()}
    listing = fm.partitions()
    for a, b in itertools.combinations(listing.active, 2):
        assert not a.overlaps(b), (a.id, b.id)
    started = sorted(n for n, (status, _err) in results.items() if status == 0)
    assert started and sorted(wanted[n] for n in started) == sorted(p.id for p in listing.active)
    for name, (status, err) in results.items():
        if status:
            assert "IN_USE" in err and "held by domain '" in err, (name, err)
    records = {int(f.name[10:]): f.read_text().strip() for f in hook.state_dir.iterdir()
               if f.name.startswith("partition-")}
    assert records == {wanted[n]: n for n in started}


@pytest.mark.libvirt
def test_after_a_restart_the_running_tenants_partitions_are_declared_again(fm_state, tmp_path):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._fabric import PartitionHolders
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import LibvirtGateway

    pytest.importorskip("libvirt")
    fm = fm_state("h100")
    tenants = {"gvt-rd-a": (3, True), "gvt-rd-b": (6, True), "gvt-rd-off": (4, False),
               "gvt-rd-plain": (None, True)}
    with LibvirtGateway("test:///default") as gateway:
        try:
            for name, (pid, running) in tenants.items():
                xml = _xml(name, pid, ours=pid is not None).replace("type='kvm'", "type='test'")
                dom = gateway.conn.defineXML(xml)
                if running:
                    dom.create()
            fm.activate(3)
            fm.activate(6)
            holders = PartitionHolders(str(tmp_path / "run"))
            with holders:
                holders.record(5, "gvt-rd-gone")  # a record from before that nothing runs now
            assert fabric_hook.redeclare(gateway, fm, holders) is None  # FM is not waiting
            fm_state.control("restart")  # FM came back with --restart: it waits for the list
            held = fabric_hook.redeclare(gateway, fm, holders)
            with holders:
                records = holders.all()
        finally:
            for name in tenants:
                dom = gateway.conn.lookupByName(name)
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
    assert held == {3: "gvt-rd-a", 6: "gvt-rd-b"}
    assert sorted(p.id for p in fm.partitions().active) == [3, 6]
    assert fm_state.state()["restart_deadline"] is None
    assert records == held
    asked = [c[1] for c in fm_state.state()["calls"]]
    assert asked[asked.index(["--set-activated-list", 3, 6]) + 1] == ["-l"]  # read back


def test_two_running_domains_with_one_partition_are_refused():
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import DomainXml

    doms = [DomainXml(name=n, active=True, xml=_xml(n, 3), live_xml=_xml(n, 3)) for n in "ab"]
    with pytest.raises(ValueError, match="running domains a and b both record Fabric Manager "
                                         "partition 3"):
        fabric_hook.running_partitions(doms)
    doms[1] = DomainXml(name="b", active=False, xml=_xml("b", 3))
    assert fabric_hook.running_partitions(doms) == {3: "a"}


REDECLARE = os.path.join(os.path.dirname(HOOK), "gpuvirt-fabric-redeclare")


@pytest.mark.libvirt
@pytest.mark.parametrize("fm", ["restarted", "fresh", "starting", "down"])
def test_the_redeclare_script_as_its_unit_runs_it(fm_state, tmp_path, host_lib, fm):
    """The script on the host's python3 (with python3-libvirt, without Ansible), against a fresh
    test:///default (one running domain that records no partition)."""
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import libvirt"], check=False,
                           stderr=subprocess.PIPE)
    if probe.returncode:
        pytest.skip("the host's python3 has no libvirt-python (python3-libvirt)")
    if fm == "starting":
        fm_state("h100", "--starting-for", "1.5")  # a boot: FM still initialising
    else:
        fm_state("h100")
    if fm in ("restarted", "down"):
        fm_state.control("restart" if fm == "restarted" else "stop")
    config = tmp_path / "fabric.json"
    config.write_text(json.dumps({"fmpm": FMPM, "starting_wait": 10}))
    env = {"PATH": HOOK_PATH, "LC_ALL": "C", "GPUVIRT_HOOK_LIB": host_lib,
           "GPUVIRT_HOOK_CONFIG": str(config), "GPUVIRT_HOOK_STATE": str(tmp_path / "run"),
           "GPUVIRT_LIBVIRT_URI": "test:///default", "FMPM_STATE": fm_state.path}
    proc = subprocess.run([REDECLARE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=60, check=False)
    if fm == "restarted":
        assert (proc.returncode, proc.stdout.decode()) == (
            0, "declared no active partition (no running tenant records one)\n")
        assert ["--set-activated-list"] in [c[1] for c in fm_state.state()["calls"]]
        assert fm_state.state()["restart_deadline"] is None  # FM got its answer in time
    elif fm in ("fresh", "starting"):  # a boot, or FM started without --restart
        assert (proc.returncode, proc.stdout.decode()) == (
            0, "Fabric Manager is not waiting for a list of active partitions; nothing "
               "declared\n")
        if fm == "fresh":  # FM answered the first look; a starting one is asked and says no
            assert ["--set-activated-list"] not in [c[1] for c in fm_state.state()["calls"]]
    else:
        assert proc.returncode == 1
        assert "cannot reach Fabric Manager at 127.0.0.1" in proc.stderr.decode()
        assert "may have no NVLink" in proc.stderr.decode()


# --- Fabric Manager in a service VM ---------------------------------------------------------------

def test_only_the_service_vms_start_reaches_python(fm_state, hook, tmp_path):
    fm_state("h100")
    config = tmp_path / "fabric.json"
    config.write_text(json.dumps({"fmpm": FMPM, "address": "192.0.2.10", "service_vm": "fm-vm"}))
    hook.env["GPUVIRT_HOOK_LIB"] = "/nonexistent"  # an import would fail
    assert hook("tenant", "started", "begin", _xml("tenant", 3)) == (0, "")
    assert hook("fm-vmx", "started", "begin", _xml("fm-vmx")) == (0, "")
    status, err = hook("fm-vm", "started", "begin", _xml("fm-vm", ours=False))
    assert status == 1 and "No module named" in err  # Python was started for it


def test_the_service_vms_start_spawns_the_redeclaration_and_never_fails(tmp_path):
    spawned = []
    config = tmp_path / "fabric.json"
    config.write_text(json.dumps({"address": "192.0.2.10", "service_vm": "fm-vm"}))
    run = dict(config_path=str(config), state_dir=str(tmp_path / "run"))
    for name in ("fm-vm", "tenant"):
        status = fabric_hook.main([name, "started", "begin", "-"], stdin=None,
                                  spawn=lambda cfg, state: spawned.append((cfg, state)), **run)
        assert status == 0
    assert [cfg["service_vm"] for cfg, _state in spawned] == ["fm-vm"]

    def broken(_cfg, _state):
        raise OSError("no such file")

    class Err:
        text = ""

        def write(self, text):
            Err.text += text

    assert fabric_hook.main(["fm-vm", "started", "begin", "-"], stdin=None, stderr=Err(),
                            spawn=broken, **run) == 0
    assert "could not be started (no such file); run it by hand" in Err.text


@pytest.mark.libvirt
def test_a_redeclaration_waits_for_the_service_vms_fabric_manager(fm_state, tmp_path):
    import threading

    pytest.importorskip("libvirt")
    fm_state("h100")
    fm_state.control("stop")  # the service VM has just started: its FM does not listen yet
    config = tmp_path / "fabric.json"
    config.write_text(json.dumps({"fmpm": FMPM, "starting_wait": 5}))
    os.environ["FMPM_STATE"] = fm_state.path
    timer = threading.Timer(1.0, fm_state.control, ("restart",))  # FM up, waiting for the list
    timer.start()
    out = []

    class Out:
        def write(self, text):
            out.append(text)

    try:
        status = fabric_hook.redeclare_main(
            ["--wait", "30"], stdout=Out(), stderr=Out(), uri="test:///default",
            config_path=str(config), state_dir=str(tmp_path / "run"), retry_interval=0.2)
    finally:
        timer.cancel()
        del os.environ["FMPM_STATE"]
    assert (status, "".join(out)) == (
        0, "declared no active partition (no running tenant records one)\n")
    assert fm_state.state()["restart_deadline"] is None


def test_a_redeclaration_that_never_reaches_fm_gives_up_when_the_wait_is_over(
        fm_state, tmp_path):
    pytest.importorskip("libvirt")
    fm_state("h100")
    fm_state.control("stop")
    config = tmp_path / "fabric.json"
    config.write_text(json.dumps({"fmpm": FMPM}))
    now = [0.0]
    err = []

    class Err:
        def write(self, text):
            err.append(text)

    os.environ["FMPM_STATE"] = fm_state.path
    try:
        status = fabric_hook.redeclare_main(
            ["--wait", "10"], stdout=Err(), stderr=Err(), uri="test:///default",
            config_path=str(config), state_dir=str(tmp_path / "run"),
            sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    finally:
        del os.environ["FMPM_STATE"]
    assert status == 1 and "cannot reach Fabric Manager at 127.0.0.1" in "".join(err)
    assert 9.0 <= now[0] <= 10.0  # tried every 2 s for the 10 s it was given
    assert fabric_hook.redeclare_main(["--wait"], stderr=Err()) == 2
    assert "usage: gpuvirt-fabric-redeclare [--wait SECONDS]" in "".join(err)


@pytest.mark.libvirt
def test_the_hook_declares_through_a_detached_run_at_the_service_vms_start(
        fm_state, hook, tmp_path, host_lib):
    """The scripts as a host has them: the hook returns at once; the detached
    gpuvirt-fabric-redeclare --wait declares once the restarted FM waits for its list."""
    import time

    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import libvirt"], check=False,
                           stderr=subprocess.PIPE)
    if probe.returncode:
        pytest.skip("the host's python3 has no libvirt-python (python3-libvirt)")
    fm_state("h100")
    fm_state.control("stop")  # the service VM starts; FM in it does not listen yet
    shutil.copy(REDECLARE, host_lib)
    config = tmp_path / "fabric.json"
    config.write_text(json.dumps({"fmpm": FMPM, "service_vm": "fm-vm", "service_vm_wait": 20}))
    hook.env.update(GPUVIRT_HOOK_CONFIG=str(config), GPUVIRT_LIBVIRT_URI="test:///default")
    assert hook("fm-vm", "started", "begin", _xml("fm-vm", ours=False)) == (0, "")
    log = hook.state_dir / "redeclare.log"
    # The hook returned while FM could not be reached: it did not wait for the declaration.
    assert "declared" not in (log.read_text() if log.exists() else "")
    fm_state.control("restart")  # FM comes up with --restart and waits for the list
    for _attempt in range(150):
        if "declared" in (log.read_text() if log.exists() else ""):
            break
        time.sleep(0.2)
    text = log.read_text()
    assert "fm-vm started; waiting up to 20 s for Fabric Manager" in text
    assert "declared no active partition (no running tenant records one)" in text
    assert fm_state.state()["restart_deadline"] is None


def test_gpu_topology_names_what_a_service_vm_gets_besides_the_switches(host_tree):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_facts import build
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import detect
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_host

    topo = read_host(*host_tree("dgx-h100"))
    platform, reason = detect(topo)
    facts = build(topo, platform, reason, [], [])
    # the Switchtec management endpoint (class 0580), not the switch's ports of the same ID
    assert [(d["bdf"], d["id"], d["driver"]) for d in facts["fabric_devices"]] == [
        ("0000:05:00.1", "11f8:4128", "vfio-pci")]
    assert "service VM" in facts["fabric_devices"][0]["why"]
    assert build(read_host(*host_tree("dgx2")), *detect(read_host(*host_tree("dgx2"))), [],
                 [])["fabric_devices"] == []


def test_the_service_vm_gets_every_switch_and_the_fabric_devices(host_tree):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement import HostState
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import (
        PlacementError,
        Request,
    )
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import detect
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_host
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_spec import make_spec

    topo = read_host(*host_tree("dgx-h100"))
    platform, _reason = detect(topo)
    state = HostState(topo, platform, [])
    fm = state.place(Request("fm-vm", vcpus=2, memory_mb=4096, fabric_service=True))
    assert fm.gpus == () and len(fm.nvswitches) == 4 and fm.fabric_devices == ("0000:05:00.1",)
    spec = make_spec(fm, topo)
    assert spec.nvswitches == fm.nvswitches and spec.extra_hostdevs[0] == "0000:05:00.1"
    # tenants still get GPUs (their partitions), never a switch
    pair = state.place(Request("pair", gpus=2))
    assert len(pair.gpus) == 2 and pair.nvswitches == ()
    # sticky; a second service VM finds every switch held
    assert state.place(Request("fm-vm", vcpus=2, memory_mb=4096, fabric_service=True)) == fm
    with pytest.raises(PlacementError, match=r"fabric_manager_vm: it gets every NVSwitch, and "
                                             r"VMs hold 0000:07:00.0 \(fm-vm\)"):
        state.place(Request("fm-2", vcpus=1, memory_mb=1024, fabric_service=True))
    with pytest.raises(PlacementError, match="ask gpus: 0 and nics: 0"):
        state.place(Request("fm-3", gpus=1, fabric_service=True))
    dgx2 = read_host(*host_tree("dgx2"))
    with pytest.raises(PlacementError, match="platform dgx2 does not share its NVSwitches"):
        HostState(dgx2, detect(dgx2)[0], []).place(
            Request("fm-vm", vcpus=1, memory_mb=1024, fabric_service=True))

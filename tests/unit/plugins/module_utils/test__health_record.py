# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The health record (issue 17, point 3): checks, an admin's marks and clears, what placement
makes of them, and records that are refused rather than reset."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from xml.etree import ElementTree

import pytest
from conftest import host_lib

import ansible_collections.gpuvirt.kvm.plugins.module_utils._health_check as health_check
import sysfs_builder
from ansible_collections.gpuvirt.kvm.plugins.module_utils._health import (
    HEALTH_DEGRADED,
    HEALTH_FAILED,
    HEALTH_OK,
    DeviceHealth,
    Signal,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._health_record import (
    HISTORY_KEEP,
    HealthRecordError,
    checked,
    cleared,
    effective,
    empty,
    marked,
    summary,
    validate,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._health_store import (
    read_record,
    render,
    write_record,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_context import (
    host_context,
)

GPU_A, GPU_B, SWITCH = "0000:34:00.0", "0000:36:00.0", "0000:61:00.0"
KINDS = {GPU_A: "gpu", GPU_B: "gpu", SWITCH: "nvswitch"}
FATAL = Signal("aer", HEALTH_FAILED, "0000:34:00.0: 1 fatal uncorrectable PCIe error since boot")
FATAL_MORE = Signal("aer", HEALTH_FAILED,
                    "0000:34:00.0: 2 fatal uncorrectable PCIe errors since boot")
NARROW = Signal("link", HEALTH_DEGRADED, "0000:36:00.0's link trained at x8 of x16")


def _live(**signals):
    """{address: DeviceHealth}: every device of KINDS healthy but those given."""
    named = {GPU_A: signals.get("a", ()), GPU_B: signals.get("b", ()),
             SWITCH: signals.get("s", ())}
    return {b: DeviceHealth(b, tuple(s)) for b, s in named.items()}


def test_a_check_records_every_device_with_its_state_reason_source_and_time():
    record = checked(empty(), _live(a=[FATAL], b=[NARROW]), KINDS, "T1")
    devices = record["devices"]
    assert devices[GPU_A]["state"] == HEALTH_FAILED
    assert devices[GPU_A]["reason"] == FATAL.reason
    assert devices[GPU_A]["source"] == "aer"
    assert devices[GPU_A]["since"] == "T1"
    assert devices[GPU_B]["state"] == HEALTH_DEGRADED and devices[GPU_B]["source"] == "link"
    assert devices[SWITCH] == dict(devices[SWITCH], kind="nvswitch", state=HEALTH_OK, reason="",
                                   signals=[])
    assert summary(record, KINDS) == {"failed": [GPU_A], "degraded": [GPU_B]}
    validate(json.loads(render(record)), "health.json")  # what is written reads back


def test_a_check_that_finds_the_same_keeps_since_and_history():
    first = checked(empty(), _live(a=[FATAL]), KINDS, "T1")
    again = checked(first, _live(a=[FATAL]), KINDS, "T2")
    assert render(again) == render(first)
    # more of the same errors: the reason says so, but it is the same finding (since and
    # history stay: a marginal link must not push the admins' events out)
    worse = checked(first, _live(a=[FATAL_MORE]), KINDS, "T3")
    assert worse["devices"][GPU_A]["reason"] == FATAL_MORE.reason
    assert worse["devices"][GPU_A]["since"] == "T1"
    assert [e["at"] for e in worse["devices"][GPU_A]["history"]] == ["T1"]
    # a new kind of finding is a change
    narrower = Signal("link", HEALTH_DEGRADED, "0000:34:00.0's link trained at x8 of x16")
    other = checked(worse, _live(a=[FATAL_MORE, narrower]), KINDS, "T4")
    assert other["devices"][GPU_A]["since"] == "T4"
    assert [e["at"] for e in other["devices"][GPU_A]["history"]] == ["T1", "T4"]


def test_an_admin_mark_fails_a_healthy_device_until_it_is_cleared_and_the_reasons_are_kept():
    record = checked(empty(), _live(), KINDS, "T1")
    record = marked(record, [GPU_B], "XID 79 seen by the tenant (OPS-1)", _live(), KINDS, "T2")
    entry = record["devices"][GPU_B]
    assert entry["state"] == HEALTH_FAILED and entry["source"] == "admin"
    assert entry["mark"] == {"state": "failed", "reason": "XID 79 seen by the tenant (OPS-1)",
                             "since": "T2"}
    assert "marked failed by an admin: XID 79" in entry["reason"]
    # a later check keeps the mark
    assert checked(record, _live(), KINDS, "T3")["devices"][GPU_B]["state"] == HEALTH_FAILED
    # marking again for the same reason changes nothing
    assert render(marked(record, [GPU_B], "XID 79 seen by the tenant (OPS-1)", _live(), KINDS,
                         "T4")) == render(record)
    record = cleared(record, [GPU_B], "reseated (OPS-1)", _live(), KINDS, "T5")
    entry = record["devices"][GPU_B]
    assert entry["state"] == HEALTH_OK and "mark" not in entry
    reasons = [e["reason"] for e in entry["history"]]
    assert "XID 79 seen by the tenant (OPS-1)" in reasons and "reseated (OPS-1)" in reasons


def test_a_clear_hides_the_signals_shown_then_and_not_new_ones():
    record = checked(empty(), _live(a=[FATAL]), KINDS, "T1")
    record = cleared(record, [GPU_A], "a one-off on a cable since replaced", _live(a=[FATAL]),
                     KINDS, "T2")
    assert record["devices"][GPU_A]["state"] == HEALTH_OK
    assert record["devices"][GPU_A]["cleared"]["signals"] == [FATAL.reason]
    assert effective(GPU_A, _live(a=[FATAL])[GPU_A], record["devices"][GPU_A]).state == HEALTH_OK
    # the count grows: failed again
    worse = checked(record, _live(a=[FATAL_MORE]), KINDS, "T3")
    assert worse["devices"][GPU_A]["state"] == HEALTH_FAILED
    # the host rebooted (the count is gone): the clear has nothing left to hide and is dropped
    rebooted = checked(record, _live(), KINDS, "T4")
    assert "cleared" not in rebooted["devices"][GPU_A]
    assert rebooted["devices"][GPU_A]["state"] == HEALTH_OK
    # clearing a device with nothing to clear changes nothing
    assert render(cleared(rebooted, [GPU_B], "why not", _live(), KINDS, "T5")) == \
        render(rebooted)


def test_a_clear_forgets_what_went_away_so_that_it_counts_when_it_comes_back():
    narrow = Signal("link", HEALTH_DEGRADED, "0000:34:00.0's link trained at x8 of x16")
    record = checked(empty(), _live(a=[FATAL, narrow]), KINDS, "T1")
    record = cleared(record, [GPU_A], "known", _live(a=[FATAL, narrow]), KINDS, "T2")
    assert record["devices"][GPU_A]["state"] == HEALTH_OK
    # a reboot: the fatal count is gone, the narrow link stays
    record = checked(record, _live(a=[narrow]), KINDS, "T3")
    assert record["devices"][GPU_A]["cleared"]["signals"] == [narrow.reason]
    # the same fatal error again: not hidden
    record = checked(record, _live(a=[FATAL, narrow]), KINDS, "T4")
    assert record["devices"][GPU_A]["state"] == HEALTH_FAILED


def test_a_device_the_host_no_longer_has_can_be_cleared_and_is_not_counted():
    record = marked(checked(empty(), _live(), KINDS, "T1"), [GPU_B], "bad", _live(), KINDS, "T2")
    # a baseboard swap: GPU_B is gone, its entry stays
    kinds = {GPU_A: "gpu", SWITCH: "nvswitch"}
    live = {b: h for b, h in _live().items() if b in kinds}
    record = checked(record, live, kinds, "T3")
    assert record["devices"][GPU_B]["state"] == HEALTH_FAILED
    assert summary(record, kinds) == {"failed": [], "degraded": []}
    with pytest.raises(HealthRecordError, match="is not a GPU or NVSwitch of this host"):
        marked(record, [GPU_B], "again", live, kinds, "T4")
    record = cleared(record, [GPU_B], "board returned", live, kinds, "T4")
    assert record["devices"][GPU_B]["state"] == HEALTH_OK and "mark" not in \
        record["devices"][GPU_B]


def test_history_keeps_the_last_events_only():
    record = checked(empty(), _live(), KINDS, "T0")
    for n in range(HISTORY_KEEP + 5):
        record = marked(record, [GPU_A], "reason %d" % n, _live(), KINDS, "T%d" % (n + 1))
    history = record["devices"][GPU_A]["history"]
    assert len(history) == HISTORY_KEEP
    assert history[-1]["reason"].endswith("reason %d" % (HISTORY_KEEP + 4))


def test_marking_or_clearing_a_device_the_host_does_not_have_is_refused_naming_it():
    record = checked(empty(), _live(), KINDS, "T1")
    for change in (marked, cleared):
        with pytest.raises(HealthRecordError, match=r"devices: 0000:99:00.0 is not a GPU or "
                                                    r"NVSwitch of this host; its GPUs and "
                                                    r"NVSwitches are 0000:34:00.0, "):
            change(record, [GPU_A, "0000:99:00.0"], "r", _live(), KINDS, "T2")


@pytest.mark.parametrize("data, what", [
    ([], "it holds a list, not a JSON object"),
    ({"format": True, "devices": {}}, "its format is True"),
    ({"format": 1, "devices": {GPU_A: {"kind": "gpu", "state": "ok", "since": "T",
                                       "cleared": {"reason": "r", "signals": []}}}},
     r"devices\[0000:34:00.0\].cleared is not"),
    ({"format": 2, "devices": {}}, "its format is 2; this collection reads format 1"),
    ({"format": 1}, "it has no devices object"),
    ({"format": 1, "devices": {GPU_A: {"kind": "gpu", "state": "sick", "since": "T"}}},
     r"devices\[0000:34:00.0\].state is 'sick'"),
    ({"format": 1, "devices": {GPU_A: {"kind": "tpu", "state": "ok", "since": "T"}}},
     r"devices\[0000:34:00.0\].kind is 'tpu'"),
    ({"format": 1, "devices": {GPU_A: {"kind": "gpu", "state": "ok", "since": "T",
                                       "mark": {"state": "failed"}}}},
     r"devices\[0000:34:00.0\].mark is not"),
    ({"format": 1, "devices": {GPU_A: {"kind": "gpu", "state": "ok", "since": "T",
                                       "signals": [{"source": "aer"}]}}},
     r"devices\[0000:34:00.0\].signals\[0\] is not"),
])
def test_a_record_that_is_not_one_is_refused_saying_what_is_wrong(data, what):
    with pytest.raises(HealthRecordError, match="health_record: /x/health.json is not a health "
                                                "record gpuvirt.kvm writes: " + what):
        validate(data, "/x/health.json")


def test_the_file_is_written_whole_and_read_back(tmp_path):
    path = str(tmp_path / "lib" / "health.json")
    assert read_record(path) is None
    record = checked(empty(), _live(a=[FATAL]), KINDS, "T1")
    write_record(path, record)
    assert read_record(path) == record
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    assert os.listdir(tmp_path / "lib") == ["health.json"]  # no temporary file left


@pytest.mark.parametrize("content", [b"{not json", b'{"format": 1, "devices": {"\xff": 1}}'])
def test_a_file_that_is_not_json_is_refused_and_left_as_it_is(tmp_path, content):
    path = tmp_path / "health.json"
    path.write_bytes(content)
    with pytest.raises(HealthRecordError, match="is not JSON .*it is never reset"):
        read_record(str(path))
    assert path.read_bytes() == content


# --- what every run that places VMs makes of the record ----------------------------------------

def _tree(name, root):
    return sysfs_builder.build(copy.deepcopy(sysfs_builder.load_host(name)), str(root))


def _params(sysfs_root, proc_root, record):
    return {"sysfs_root": sysfs_root, "proc_root": proc_root, "platform": "auto",
            "nvidia_smi_topo": None, "unhealthy_gpus": [], "reserved_cpus": None,
            "reserved_memory_mb": None, "fabric_manager": None,
            "host_record": "/nonexistent/kvm_host.json", "aer_correctable_threshold": 100,
            "health_record": record}


def test_placement_obeys_an_admins_mark_on_a_gpu_and_a_switch(tmp_path):
    sysfs_root, proc_root = _tree("dgx2", tmp_path / "dgx2")
    path = str(tmp_path / "health.json")
    p = _params(sysfs_root, proc_root, path)
    ctx = host_context(p, bridges=False)
    kinds = dict([(b, "gpu") for b in ctx.gpu_bdfs] + [(b, "nvswitch") for b in ctx.switch_bdfs])
    gpu, switch = ctx.gpu_bdfs[3], ctx.switch_bdfs[0]
    write_record(path, marked(checked(empty(), ctx.live_health, kinds, "T1"), [gpu, switch],
                              "burn-in failed", ctx.live_health, kinds, "T2"))
    ctx = host_context(p, bridges=False)
    assert gpu in ctx.unhealthy_gpus and ctx.failed_switches == (switch,)
    assert ctx.live_health[gpu].state == HEALTH_OK  # sysfs alone finds nothing
    assert any("GPU %s failed its health check: marked failed by an admin: burn-in failed" % gpu
               in w for w in ctx.warnings)


def test_a_broken_record_is_reported_and_not_touched(tmp_path):
    sysfs_root, proc_root = _tree("dgx-h100", tmp_path / "h100")
    path = tmp_path / "health.json"
    path.write_text('{"format": 1, "devices": []}')
    # the run goes on (stopping, removing, reverting need no record); _vm_plan refuses to
    # place or start a GPU VM, and gpu_health to write
    ctx = host_context(_params(sysfs_root, proc_root, str(path)), bridges=False)
    assert "it has no devices object" in ctx.health_record_error
    assert any("no GPU VM is placed or started" in w for w in ctx.warnings)
    assert path.read_text() == '{"format": 1, "devices": []}'


# --- gpuvirt-health, the command a converted host runs (roles/kvm_host/files/gpuvirt-health) --

HEALTH_CMD = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))))), "roles", "kvm_host", "files", "gpuvirt-health")
# The host's python3 runs it, without Ansible where the machine has one apart.
SYSTEM_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


@pytest.fixture
def health_cmd(tmp_path):
    """health_cmd(*args) runs gpuvirt-health from a folder with only _health_check.HOST_FILES
    (what kvm_host installs) on a DGX-2 fixture tree; returns (status, stdout, stderr)."""
    lib = host_lib(tmp_path, health_check.HOST_FILES)
    sysfs_root, proc_root = _tree("dgx2", tmp_path / "dgx2")
    env = {"PATH": "%s:/usr/bin:/bin" % os.path.dirname(SYSTEM_PYTHON), "LC_ALL": "C",
           "GPUVIRT_HEALTH_LIB": str(lib)}

    def run(*args, stdin=b""):
        proc = subprocess.run(
            [HEALTH_CMD] + run.options + list(args), input=stdin,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120, check=False,
            env=dict(env, **{k: v for k, v in os.environ.items()
                             if k.startswith("GPUVIRT_SMI_")}))  # the stand-in nvidia-smi's
        return proc.returncode, proc.stdout.decode(), proc.stderr.decode()

    run.options = ["--fabric-config", str(tmp_path / "no-fabric.json"),
                   "--record", str(tmp_path / "health.json"), "--sysfs", sysfs_root,
                   "--proc", proc_root, "--host-record", str(tmp_path / "none.json"),
                   "--lock", str(tmp_path / "alloc.lock"), "--uri", "test:///default"]
    run.env = env
    run.record = tmp_path / "health.json"
    return run


def test_the_command_checks_marks_shows_and_clears_with_only_the_files_kvm_host_installs(
        health_cmd):
    status, out, err = health_cmd("check")
    assert status == 0, err
    assert out.splitlines()[0].split() == ["GPU0", "0000:34:00.0", "ok"]
    assert len(out.splitlines()) == 28
    assert "health.json written" in err
    status, out, err = health_cmd("mark", "--reason", "XID 48 (OPS-7)", "36:00.0")
    assert status == 0, err
    line = out.splitlines()[1]
    assert line.startswith("GPU1") and "FAILED (marked failed by an admin: XID 48 (OPS-7)" in line
    status, out, err = health_cmd("--json", "show")
    rows = json.loads(out)
    assert rows[1]["mark"]["reason"] == "XID 48 (OPS-7)" and rows[1]["source"] == "admin"
    assert "written" not in err and "unchanged" not in err
    status, out, err = health_cmd("clear", "--reason", "reseated (OPS-7)", "0000:36:00.0")
    assert status == 0 and "GPU1" in out and "FAILED" not in out
    status, _out, err = health_cmd("check")
    assert status == 0 and "health.json unchanged" in err
    record = json.loads(health_cmd.record.read_text())
    reasons = [e["reason"] for e in record["devices"]["0000:36:00.0"]["history"]]
    assert "XID 48 (OPS-7)" in reasons and "reseated (OPS-7)" in reasons


def test_the_command_refuses_bad_input_and_leaves_the_record(health_cmd):
    assert health_cmd("check")[0] == 0
    before = health_cmd.record.read_text()
    status, _out, err = health_cmd("clear", "--reason", "x", "0000:99:00.0")
    assert status == 1
    assert "gpuvirt-health: devices: 0000:99:00.0 is not a GPU or NVSwitch of this host" in err
    status, _out, err = health_cmd("mark", "--reason", " ", "0000:34:00.0")
    assert status == 1 and "--reason must say why" in err
    assert health_cmd.record.read_text() == before
    health_cmd.record.write_text("[]")
    status, _out, err = health_cmd("check")
    assert status == 1 and "it holds a list, not a JSON object" in err
    assert health_cmd.record.read_text() == "[]"


def test_show_takes_no_lock(health_cmd, tmp_path):
    assert health_cmd("check")[0] == 0
    # a lock path no one could create: reading alone never needs it
    status, out, err = health_cmd("--lock", "/proc/gpuvirt-none/alloc.lock", "show")
    assert status == 0 and len(out.splitlines()) == 28, err


def test_the_command_takes_the_platform_kvm_host_converted_the_host_with(health_cmd, tmp_path):
    # what kvm_host keeps in its record: a name or, on the lab, its platform file
    (tmp_path / "none.json").write_text(json.dumps({"platform": "nonesuch"}))
    status, _out, err = health_cmd("show")
    assert status == 1 and "nonesuch" in err
    status, out, err = health_cmd("--platform", "dgx2", "show")
    assert status == 0 and len(out.splitlines()) == 28, err


# --- the start check: gpuvirt-health vet, which libvirt's hook runs at each VM start -----------

HEALTH_HOOK = os.path.join(os.path.dirname(HEALTH_CMD), "gpuvirt-health-hook")
FABRIC_HOOK = os.path.join(os.path.dirname(HEALTH_CMD), "gpuvirt-qemu-hook")


def held_domain_xml():
    """vm-a's definition (it holds GPU0, 0000:34:00.0, of the DGX-2 fixture), as libvirt hands a
    hook the domain it starts."""
    node = ElementTree.parse(os.path.join(os.path.dirname(HEALTH_CMD), "..", "..", "..", "tests",
                                          "fixtures", "libvirt", "dgx2-gpu0-held.xml"))
    return ElementTree.tostring(node.getroot().find("domain"))


def test_vet_refuses_the_start_of_a_vm_that_holds_a_failed_gpu_and_names_it(health_cmd):
    xml = held_domain_xml()
    assert health_cmd("vet", stdin=xml) == (0, "", "")
    assert health_cmd("mark", "--reason", "XID 79 (OPS-9)", "34:00.0")[0] == 0
    status, out, err = health_cmd("vet", stdin=xml)
    assert (status, out) == (1, "")
    assert err.startswith("gpuvirt-health: vm-a: not started: it holds GPU 0000:34:00.0, which "
                          "failed its health check (marked failed by an admin: XID 79 (OPS-9)")
    assert "gpuvirt-health clear --reason WHY ADDRESS" in err
    # another GPU's mark does not concern vm-a; a clear lets it start again
    assert health_cmd("clear", "--reason", "reseated", "34:00.0")[0] == 0
    assert health_cmd("mark", "--reason", "XID 79", "36:00.0")[0] == 0
    assert health_cmd("vet", stdin=xml) == (0, "", "")
    before = health_cmd.record.read_text()
    # a broken record refuses a VM with a GPU, and is left as it is; a VM without one starts
    health_cmd.record.write_text("[]")
    status, _out, err = health_cmd("vet", stdin=xml)
    assert status == 1 and "vm-a: not started:" in err and "it holds a list" in err
    cpu_only = b"<domain type='kvm'><name>cpu-a</name><memory>65536</memory></domain>"
    assert health_cmd("vet", stdin=cpu_only) == (0, "", "")
    assert health_cmd.record.read_text() == "[]"
    health_cmd.record.write_text(before)
    # a host whose devices cannot be judged refuses a VM with host devices, naming why
    status, _out, err = health_cmd("--platform", "nonesuch", "vet", stdin=xml)
    assert status == 1 and "vm-a: not started: the health of the devices it holds cannot be " \
        "judged" in err and "nonesuch" in err
    assert health_cmd("--platform", "nonesuch", "vet", stdin=cpu_only)[0] == 0
    # ... but not a VM that holds only a NIC's function (not NVIDIA's): that one starts
    nic_only = (b"<domain type='kvm'><name>nic-a</name><memory>65536</memory><devices>"
                b"<hostdev mode='subsystem' type='pci' managed='yes'><source><address "
                b"domain='0x0000' bus='0x35' slot='0x00' function='0x0'/></source></hostdev>"
                b"</devices></domain>")
    assert health_cmd("--platform", "nonesuch", "vet", stdin=nic_only) == (0, "", "")
    assert health_cmd("--platform", "nonesuch", "vet", stdin=b"<domain><hostdev")[0] == 1
    assert health_cmd("--platform", "nonesuch", "vet", stdin=b"not xml")[0] == 0


def test_the_qemu_d_hook_runs_vet_at_prepare_begin_only(health_cmd, tmp_path):
    """roles/kvm_host/files/gpuvirt-health-hook as libvirt runs it: the command it calls is a
    wrapper that logs each call and runs gpuvirt-health on the fixture."""
    log = tmp_path / "calls.log"
    wrapper = tmp_path / "gpuvirt-health"
    wrapper.write_text("#!/bin/sh\necho \"$@\" >> %s\nexec %s %s \"$@\"\n" % (
        log, HEALTH_CMD, " ".join(health_cmd.options)))
    wrapper.chmod(0o755)
    env = dict(health_cmd.env, GPUVIRT_HEALTH=str(wrapper),
               GPUVIRT_HOOK_MAIN=str(tmp_path / "no-qemu-hook"))

    def hook(op, sub, main=None):
        proc = subprocess.run(
            [HEALTH_HOOK, "vm-a", op, sub, "-"], input=held_domain_xml(), capture_output=True,
            timeout=120, check=False, env=dict(env, GPUVIRT_HOOK_MAIN=main) if main else env)
        return proc.returncode, proc.stderr.decode()

    assert health_cmd("mark", "--reason", "XID 79", "0000:34:00.0")[0] == 0
    status, err = hook("prepare", "begin")
    assert status == 1 and "vm-a: not started: it holds GPU 0000:34:00.0" in err
    assert log.read_text() == "vet\n"
    for op, sub in (("start", "begin"), ("started", "begin"), ("release", "end"),
                    ("reconnect", "begin")):
        assert hook(op, sub) == (0, "")
    assert log.read_text() == "vet\n"
    # where the main hook is gpuvirt.kvm's (a shared-NVSwitch host), that one has checked
    assert hook("prepare", "begin", main=FABRIC_HOOK) == (0, "")
    assert log.read_text() == "vet\n"
    # ... unless libvirt does not run it (not executable): then this one checks
    idle = tmp_path / "qemu"
    idle.write_text(open(FABRIC_HOOK, encoding="utf-8").read())
    assert hook("prepare", "begin", main=str(idle))[0] == 1
    assert log.read_text() == "vet\nvet\n"
    # a host without the command (kvm_host_state=absent under way) has nothing to check with
    env["GPUVIRT_HEALTH"] = str(tmp_path / "gone")
    assert hook("prepare", "begin") == (0, "")


# --- the deep check (issue 17, point 2), against the stand-in nvidia-smi ------------------------

STANDIN = os.path.join(os.path.dirname(HEALTH_CMD), "..", "..", "..", "tests", "fixtures",
                       "nvidia-smi", "nvidia-smi-standin")
HELD = os.path.join(os.path.dirname(STANDIN), "..", "libvirt", "dgx2-gpu0-held.xml")


def test_the_deep_check_reads_each_free_gpu_and_never_one_a_vm_holds(health_cmd, tmp_path,
                                                                     monkeypatch):
    """The fixture's GPUs sit on vfio-pci; with vfio-pci as the check's driver none has to move
    (the bind and the bind-back are checked on the lab's real kernel: tests/e2e/lab_short.yml),
    so this is the choice of GPUs, nvidia-smi's reading and the record."""
    log = tmp_path / "smi.log"
    monkeypatch.setenv("GPUVIRT_SMI_LOG", str(log))
    monkeypatch.setenv("GPUVIRT_SMI_DRIVER", "vfio-pci")
    monkeypatch.setenv("GPUVIRT_SMI_FAULTY", "0000:36:00.0")
    monkeypatch.setenv("GPUVIRT_SMI_SYSFS", str(tmp_path / "dgx2" / "sys"))
    status, out, err = health_cmd("--uri", "test://" + os.path.abspath(HELD), "check",
                                  "--deep", "--deep-driver", "vfio-pci", "--nvidia-smi", STANDIN)
    assert status == 0, err
    calls = [line.split()[:2] for line in log.read_text().splitlines()]
    assert len(calls) == 15 and "0000:34:00.0" not in [call[0] for call in calls]
    assert {call[1] for call in calls} == {"vfio-pci"}
    assert "0000:34:00.0 skipped (held by VM" in err
    record = json.loads(health_cmd.record.read_text())["devices"]
    gpu1 = record["0000:36:00.0"]
    assert gpu1["state"] == HEALTH_FAILED and gpu1["source"] == "nvidia-smi"
    assert "3 DRAM uncorrectable ECC errors since the driver loaded" in gpu1["reason"]
    assert gpu1["deep"]["driver"] == "vfio-pci"
    assert record["0000:39:00.0"]["state"] == HEALTH_OK and record["0000:39:00.0"]["deep"]
    assert "deep" not in record["0000:34:00.0"]
    # the finding stays until the next deep check; a plain check keeps it
    assert health_cmd("--uri", "test:///default", "check")[0] == 0
    assert json.loads(health_cmd.record.read_text())["devices"]["0000:36:00.0"]["state"] == \
        HEALTH_FAILED


def test_a_gpu_nvidia_smi_cannot_see_fails_the_deep_check(health_cmd, tmp_path, monkeypatch):
    monkeypatch.setenv("GPUVIRT_SMI_SYSFS", str(tmp_path / "dgx2" / "sys"))
    monkeypatch.setenv("GPUVIRT_SMI_DRIVER", "nvidia")  # never true here: "No devices were found"
    status, _out, err = health_cmd("check", "--deep", "--deep-driver", "vfio-pci",
                                   "--nvidia-smi", STANDIN)
    assert status == 0, err
    gpu = json.loads(health_cmd.record.read_text())["devices"]["0000:34:00.0"]
    assert gpu["state"] == HEALTH_FAILED
    assert "nvidia-smi -q could not read it on the vfio-pci driver (exit status 6: No devices " \
           "were found)" in gpu["reason"]


@pytest.mark.parametrize("args, message", [
    (["--deep-driver", "nvidia"], "deep_check: the nvidia driver is not loaded"),
    (["--deep-driver", "vfio-pci", "--nvidia-smi", "/nonexistent/nvidia-smi"],
     "deep_check: /nonexistent/nvidia-smi is not found or not executable"),
])
def test_the_deep_check_refuses_before_touching_anything(health_cmd, args, message):
    status, _out, err = health_cmd("check", "--deep", *args)
    assert status == 1 and message in err
    assert not health_cmd.record.exists()


def test_the_deep_check_needs_libvirt_to_know_the_holders(health_cmd):
    status, _out, err = health_cmd("--uri", "qemu+unix:///system?socket=/nonexistent", "check",
                                   "--deep", "--deep-driver", "vfio-pci", "--nvidia-smi", STANDIN)
    assert status == 1
    assert "deep_check: the VMs' devices cannot be read from libvirt" in err
    assert not health_cmd.record.exists()


def test_the_policy_stop_stops_only_the_vm_that_holds_a_failed_gpu(health_cmd):
    """libvirt's test driver runs vm-a, which holds GPU0 of the DGX-2 fixture."""
    uri = "test://" + os.path.abspath(HELD)
    status, _out, err = health_cmd("--uri", uri, "mark", "--reason", "XID 79", "0000:34:00.0")
    assert status == 0 and "VM vm-a holds failed 0000:34:00.0: it is not started again" in err
    # a mark alone reports; the policy stop stops it
    status, _out, err = health_cmd("--uri", uri, "check", "--stop-affected",
                                   "--stop-timeout", "5")
    assert status == 0, err
    assert "VM vm-a holds failed 0000:34:00.0; stopped by policy (ACPI shutdown)" in err
    # nothing failed: nothing stopped
    assert health_cmd("--uri", uri, "clear", "--reason", "fine", "0000:34:00.0")[0] == 0
    status, _out, err = health_cmd("--uri", uri, "check", "--stop-affected")
    assert status == 0 and "vm-a" not in err


def test_a_host_wide_nvidia_smi_failure_records_nothing(health_cmd, tmp_path, monkeypatch):
    """A driver upgraded without a reboot says nothing about the GPUs: no GPU is failed for it."""
    monkeypatch.setenv("GPUVIRT_SMI_MISMATCH", "1")
    status, _out, err = health_cmd("check", "--deep", "--deep-driver", "vfio-pci",
                                   "--nvidia-smi", STANDIN)
    assert status == 1
    assert "cannot read GPUs on this host (exit status 18: Failed to initialize NVML: " \
           "Driver/library version mismatch)" in err
    # the sysfs check is recorded; no deep finding, and no GPU failed for it
    devices = json.loads(health_cmd.record.read_text())["devices"]
    assert [b for b, e in devices.items() if "deep" in e or e["state"] != "ok"] == []


def test_the_deep_check_leaves_a_gpu_whose_iommu_group_a_vm_holds(tmp_path):
    import dataclasses

    sysfs_root, proc_root = _tree("dgx2", tmp_path / "dgx2")
    ctx = host_context(_params(sysfs_root, proc_root, str(tmp_path / "h.json")), bridges=False)
    gpu0, gpu1 = ctx.gpu_bdfs[:2]
    assert health_check._untouchable(ctx, gpu1, {}) is None
    assert health_check._untouchable(ctx, gpu0, {gpu0: ("vm-a", True)}) == "held by VM vm-a"
    # another function in GPU1's IOMMU group, held by a VM (kvm_host_allow_shared_groups)
    group = ctx.topology.pci[gpu1].iommu_group
    nic = next(b for b, d in ctx.topology.pci.items() if b not in ctx.gpu_bdfs
               and d.iommu_group is not None and d.iommu_group != group)
    ctx.topology.pci[nic] = dataclasses.replace(ctx.topology.pci[nic], iommu_group=group)
    assert health_check._untouchable(ctx, gpu1, {nic: ("vm-b", True)}) == \
        "its IOMMU group or slot shares %s, held by VM vm-b" % nic


def test_the_policy_stop_needs_to_know_the_holders(health_cmd):
    status, _out, err = health_cmd("--uri", "qemu+unix:///system?socket=/nonexistent", "check",
                                   "--stop-affected")
    assert status == 1 and "--stop-affected: no VM was stopped" in err


# --- SXid lines in the record: a clear holds while the line stays in the kernel log -----------

SXID_07 = ("3,1044,5312345690,-;nvidia-nvswitch0: SXid (PCI:0000:07:00.0): 24007, Fatal, "
           "Link 30 sourcetrack timeout error")
SXID_07_AGAIN = ("3,2210,7400000123,-;nvidia-nvswitch0: SXid (PCI:0000:07:00.0): 24007, Fatal, "
                 "Link 30 sourcetrack timeout error")


def h100_with_kmsg(root, *lines):
    desc = copy.deepcopy(sysfs_builder.load_host("dgx-h100"))
    desc["kernel_log"] = list(lines)
    return sysfs_builder.build(desc, str(root))


def sxid_host(tmp_path):
    """(apply's options, the kernel log, switch()) of a DGX H100 tree whose kernel log holds
    SXID_07; switch() reads NVSwitch 0000:07:00.0's entry of the record."""
    sysfs_root, proc_root = h100_with_kmsg(tmp_path / "h100", SXID_07)
    path = str(tmp_path / "health.json")
    p = dict(_params(sysfs_root, proc_root, path), lock_path=str(tmp_path / "alloc.lock"),
             lock_timeout=5, uri="test:///default")

    def switch():
        return read_record(path)["devices"]["0000:07:00.0"]

    return p, os.path.join(os.path.dirname(sysfs_root), "dev", "kmsg"), switch


def test_a_cleared_sxid_stays_cleared_while_its_line_stays_and_a_new_line_counts(tmp_path):
    p, kmsg, switch = sxid_host(tmp_path)
    path = p["health_record"]
    health_check.apply(p, health_check.CHECK, [], "")
    entry = switch()
    assert (entry["state"], entry["source"]) == (HEALTH_FAILED, "sxid")
    assert entry["reason"] == ("0000:07:00.0: fatal SXid 24007 in the kernel log at "
                               "[5312.345690]: Link 30 sourcetrack timeout error")
    health_check.apply(p, health_check.CLEAR, ["0000:07:00.0"], "fabric reset, OPS-77")
    assert switch()["state"] == HEALTH_OK
    # The line is still in the ring buffer: the next checks find it, and it stays hidden.
    with open(path, encoding="utf-8") as handle:
        before = handle.read()
    for _run in range(2):
        ctx, _before, after, _report = health_check.apply(p, health_check.CHECK, [], "")
        assert after["devices"]["0000:07:00.0"]["state"] == HEALTH_OK
        assert ctx.health["0000:07:00.0"].state == HEALTH_OK
        assert ctx.failed_switches == ()
    with open(path, encoding="utf-8") as handle:
        assert handle.read() == before  # nothing changed, nothing written
    # Other lines before it dropping out of the buffer, or more unrelated lines, change nothing.
    with open(kmsg, "w", encoding="utf-8") as handle:
        handle.write("6,2000,7000000000,-;EXT4-fs (nvme0n1p2): re-mounted.\n" + SXID_07 + "\n")
    health_check.apply(p, health_check.CHECK, [], "")
    assert switch()["state"] == HEALTH_OK
    # The same SXid logged again is a new line: it counts.
    with open(kmsg, "a", encoding="utf-8") as handle:
        handle.write(SXID_07_AGAIN + "\n")
    ctx, _before, after, _report = health_check.apply(p, health_check.CHECK, [], "")
    entry = after["devices"]["0000:07:00.0"]
    assert entry["state"] == HEALTH_FAILED and "[7400.000123]" in entry["reason"]
    assert ctx.failed_switches == ("0000:07:00.0",)
    # Its clear no longer hides anything that shows: it is gone from the entry.
    assert "cleared" not in entry


def test_the_command_reports_an_sxid_of_a_shared_nvswitch_host(health_cmd, tmp_path):
    sysfs_root, proc_root = h100_with_kmsg(tmp_path / "h100sx", SXID_07)
    status, out, err = health_cmd("--sysfs", sysfs_root, "--proc", proc_root, "check")
    assert status == 0, err
    line = [row for row in out.splitlines() if "0000:07:00.0" in row][0]
    assert line.split()[:3] == ["NVSwitch0", "0000:07:00.0", "FAILED"]
    assert "fatal SXid 24007 in the kernel log at [5312.345690]" in line
    devices = json.loads(health_cmd.record.read_text())["devices"]
    assert devices["0000:07:00.0"]["signals"][0]["source"] == "sxid"


# --- sources a run cannot read: the record's word on them stands (carried) ---------------------

def test_a_run_that_cannot_read_the_kernel_log_keeps_the_sxid_and_its_clear(tmp_path):
    """A check without the kernel log (dmesg_restrict without root, a container) neither
    forgets the SXid it recorded nor undoes an admin's clear of it: the next run that reads the
    log judges them again."""
    p, kmsg, switch = sxid_host(tmp_path)
    health_check.apply(p, health_check.CHECK, [], "")
    assert switch()["state"] == HEALTH_FAILED
    os.rename(kmsg, kmsg + ".away")
    ctx, _before, after, _report = health_check.apply(p, health_check.CHECK, [], "")
    assert after["devices"]["0000:07:00.0"]["state"] == HEALTH_FAILED  # still: not read
    assert ctx.failed_switches == ("0000:07:00.0",)
    assert any("the health record's last word on them stands" in w for w in ctx.warnings)
    # cleared while the log cannot be read: the clear holds through runs without it...
    health_check.apply(p, health_check.CLEAR, ["0000:07:00.0"], "fabric reset, OPS-78")
    health_check.apply(p, health_check.CHECK, [], "")
    assert switch()["state"] == HEALTH_OK and switch()["cleared"]["signals"]
    # ... and with it, while the line is the same
    os.rename(kmsg + ".away", kmsg)
    health_check.apply(p, health_check.CHECK, [], "")
    assert switch()["state"] == HEALTH_OK and "cleared" in switch()
    # the same SXid logged again is a new line: it counts
    with open(kmsg, "a", encoding="utf-8") as handle:
        handle.write(SXID_07_AGAIN + "\n")
    health_check.apply(p, health_check.CHECK, [], "")
    assert switch()["state"] == HEALTH_FAILED and "[7400.000123]" in switch()["reason"]


def test_fabric_managers_signals_reach_the_record_and_stand_while_it_is_not_asked(
        host_tree, fm_state, tmp_path, monkeypatch):
    from test__health import fm_options

    sysfs_root, proc_root = host_tree("dgx-h100")
    gpus = list(host_context(_params(sysfs_root, proc_root, str(tmp_path / "none.json")),
                             bridges=False).gpu_bdfs)
    over = fm_options(fm_state, tmp_path, monkeypatch, gpus, failed_gpus=[
        {"uuid": "GPU-8f1e", "pciBusId": "00000000:DF:00.0", "portNum": [3, 7]}])
    path = str(tmp_path / "health.json")
    p = dict(_params(sysfs_root, proc_root, path), lock_path=str(tmp_path / "alloc.lock"),
             lock_timeout=5, uri="test:///default", **over)
    health_check.apply(p, health_check.CHECK, [], "")
    entry = read_record(path)["devices"]["0000:df:00.0"]
    assert (entry["state"], entry["source"]) == (HEALTH_DEGRADED, "fabric-manager")
    assert "ports 3, 7" in entry["reason"]
    # the timer's run without Fabric Manager, and one while it does not answer: it stands
    for fabric in (None, dict(over["fabric_manager"], fmpm=str(tmp_path / "no-fmpm"))):
        ctx, _before, after, _report = health_check.apply(
            dict(p, fabric_manager=fabric), health_check.CHECK, [], "")
        assert after["devices"]["0000:df:00.0"]["state"] == HEALTH_DEGRADED
        assert ctx.health["0000:df:00.0"].state == HEALTH_DEGRADED
    # Fabric Manager answers again without the failure: gone
    state = fm_state.state()
    state["failed_gpus"] = []
    with open(fm_state.path, "w", encoding="utf-8") as handle:
        json.dump(state, handle)
    health_check.apply(p, health_check.CHECK, [], "")
    assert read_record(path)["devices"]["0000:df:00.0"]["state"] == HEALTH_OK


def test_carried_adds_only_the_unread_sources_signals_once():
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._health_record import carried

    record = {"format": 1, "devices": {"0000:07:00.0": {
        "kind": "nvswitch", "state": "failed", "since": "t",
        "signals": [{"source": "sxid", "state": "failed", "reason": "fatal SXid 24007"},
                    {"source": "aer", "state": "failed", "reason": "1 fatal"}],
        "cleared": {"reason": "r", "since": "t", "signals": ["non-fatal SXid 20009"],
                    "found": [{"source": "sxid", "state": "degraded",
                               "reason": "non-fatal SXid 20009"}]}}}}
    live = {"0000:07:00.0": DeviceHealth("0000:07:00.0"), "0000:08:00.0": DeviceHealth("x")}
    out = carried(live, record, {"sxid"})
    assert [(s.source, s.reason) for s in out["0000:07:00.0"].signals] == [
        ("sxid", "fatal SXid 24007"), ("sxid", "non-fatal SXid 20009")]
    assert out["0000:08:00.0"] is live["0000:08:00.0"]
    assert carried(live, record, set()) is live
    assert carried(out, record, {"sxid"})["0000:07:00.0"].signals == \
        out["0000:07:00.0"].signals  # not twice


def test_the_command_asks_the_fabric_manager_of_the_hook_settings_and_says_when_it_cannot(
        health_cmd, fm_state, tmp_path):
    """gpuvirt-health --fabric-config: kvm_host's hook settings name Fabric Manager (``{}``:
    on this host); FM's NVLink failures reach the record; FM not answering is said, and the
    record's word stands."""
    from conftest import FMPM

    sysfs_root, proc_root = h100_with_kmsg(tmp_path / "h100fm")
    gpus = sorted(health_check.host_context(
        _params(sysfs_root, proc_root, str(tmp_path / "x.json")), bridges=False).gpu_bdfs)
    fm_state("h100")
    state = fm_state.state()
    state["failed_gpus"] = [{"uuid": "GPU-8f1e", "pciBusId": "00000000:DF:00.0",
                             "portNum": [3]}]
    with open(fm_state.path, "w", encoding="utf-8") as handle:
        json.dump(state, handle)
    (tmp_path / "none.json").write_text(json.dumps(
        {"fabric": {"module_ids": {b: i + 1 for i, b in enumerate(gpus)}}}))
    fmpm = tmp_path / "fmpm"
    fmpm.write_text("#!/bin/sh\nFMPM_STATE=%s exec %s \"$@\"\n" % (fm_state.path, FMPM))
    fmpm.chmod(0o755)
    config = tmp_path / "fabric.json"
    tree = ["--sysfs", sysfs_root, "--proc", proc_root, "--fabric-config", str(config)]
    config.write_text(json.dumps({"fmpm": str(fmpm), "starting_wait": 0}))
    status, out, err = health_cmd(*tree, "check")
    assert status == 0, err
    line = [row for row in out.splitlines() if "0000:df:00.0" in row][0]
    assert "degraded" in line and "reports failed NVLinks on GPU 0000:df:00.0" in line
    assert "not read" not in err
    # FM not answering: said, and the record's word stands
    config.write_text(json.dumps({"fmpm": str(tmp_path / "gone"), "starting_wait": 0}))
    status, out, err = health_cmd(*tree, "check")
    assert status == 0 and "Fabric Manager not read (fabric_manager: " in err
    assert "degraded" in [row for row in out.splitlines() if "0000:df:00.0" in row][0]
    # settings it cannot use: said, not asked
    config.write_text(json.dumps({"starting_wait": "120"}))
    status, _out, err = health_cmd(*tree, "check")
    assert status == 0 and "starting_wait is '120', not a number of seconds" in err
    # an empty file is kvm_host's default (FM on this host): asked, with fmpm from PATH
    assert health_check.fabric_settings(str(tmp_path / "nothing.json")) == (None, None)
    config.write_text("{}")
    assert health_check.fabric_settings(str(config)) == ({
        "address": None, "fmpm": None, "starting_wait": 60, "service_vm": None}, None)


def test_vet_says_in_one_line_when_the_host_cannot_be_read_mid_way(tmp_path, monkeypatch):
    import io

    def gone(*args, **kwargs):
        raise OSError(19, "No such device", "/sys/bus/pci/devices/0000:34:00.0/config")

    monkeypatch.setattr(health_check, "host_context", gone)
    err = io.StringIO()
    status = health_check.main(
        ["--fabric-config", "", "--platform", "dgx2", "--record", str(tmp_path / "h.json"),
         "vet"], stdout=io.StringIO(), stderr=err, stdin=io.StringIO(held_domain_xml().decode()))
    assert status == 1
    assert err.getvalue() == (
        "gpuvirt-health: not started: the start check could not read the host: OSError: "
        "[Errno 19] No such device: '/sys/bus/pci/devices/0000:34:00.0/config'\n")

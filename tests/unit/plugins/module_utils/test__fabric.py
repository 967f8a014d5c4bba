# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""The Fabric Manager gateway (_fabric) against the stand-in fmpm, run as a real program.

The stand-in (tests/fixtures/fabric) prints what fmpm 1.0.1 prints, byte for byte where it can be
checked: its JSON writer is compared here with jsoncpp's own output (the .styled files).
"""

import glob
import itertools
import json
import os
import stat
import subprocess
import sys
import threading

import pytest
from conftest import FABRIC, FMPM  # the stand-in fmpm and its FM (fm_state is conftest's)

from ansible_collections.gpuvirt.kvm.plugins.module_utils._fabric_model import (
    FM_BADPARAM,
    FM_IN_USE,
    FM_NOT_CONFIGURED,
    FM_NOT_SUPPORTED,
    FM_NVLINK_ERROR,
    FabricError,
    describe_modules,
    failure_code,
    parse_partition_list,
)

sys.path.insert(0, FABRIC)
import fake_fm  # noqa: E402  pylint: disable=wrong-import-position

# ----------------------------------------------------------------------------- the stand-in


@pytest.mark.parametrize("doc", sorted(glob.glob(os.path.join(FABRIC, "jsoncpp", "*.json"))),
                         ids=os.path.basename)
def test_the_stand_in_writes_json_as_jsoncpp_does(doc):
    with open(doc, encoding="utf-8") as handle:
        value = json.load(handle)
    with open(doc[:-5] + ".styled", encoding="utf-8") as handle:
        assert fake_fm.styled(value) == handle.read()


def _fmpm(state_path, *args):
    proc = subprocess.run([FMPM] + list(args), env=dict(os.environ, FMPM_STATE=state_path),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False, timeout=30)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def test_the_stand_in_answers_as_fmpm_1_0_1(fm_state):
    fm_state("h100")
    path = fm_state.path
    assert _fmpm(path, "-v") == (0, "1.0.1\n", "")
    assert _fmpm(path)[1].startswith("-l : List partitions\n")
    assert _fmpm(path, "-a", "64") == (255, "Invalid Partition ID.\n", "")
    assert _fmpm(path, "--frobnicate") == (255, "", "Invalid argument.\n\n")
    assert _fmpm(path, "-a") == (1, "", "Error: -a option requires partition ID.\n")
    assert _fmpm(path, "-d") == (255, "", "Error: -d option requires partition ID.\n")
    rc, _out, err = _fmpm(path, "-a", "three")  # std::stoul throws: fmpm aborts
    assert rc == -6 and "std::invalid_argument" in err
    assert _fmpm(path, "-d", "3") == (252, "Failed to deactivate partition. fmReturn: -4\n", "")
    assert _fmpm(path, "-a", "3") == (0, "", "")
    assert _fmpm(path, "-a", "1") == (249, "Failed to activate partition. fmReturn: -7\n", "")
    assert _fmpm(path, "--set-activated-list", "3,99") == (
        255, "Invalid partition Id 99 was given.\n", "")
    assert _fmpm(path, "--hostname", "10.1.1.1", "-l") == (
        247, "Failed to connect to Fabric Manager instance.\n", "")
    assert _fmpm(path, "--hostname", "127.0.0.1") == (0, "", "")  # no operation: nothing to do


def test_fm_not_running(tmp_path):
    assert _fmpm(str(tmp_path / "none.json"), "-l") == (
        247, "Failed to connect to Fabric Manager instance.\n", "")


# ----------------------------------------------------------------------------- reading


def test_h100_partitions_as_fm_lists_them(fm_state):
    listing = fm_state("h100").partitions()
    assert listing.max_partitions == 15
    assert [p.id for p in listing.partitions] == list(range(15))
    assert listing.get(3).modules == (1, 3) and listing.get(6).modules == (6, 8)
    assert listing.get(0).modules == tuple(range(1, 9))
    assert listing.get(9).modules == (3,)
    assert all(g.nvlinks == 18 for g in listing.get(3).gpus)
    assert all(g.nvlinks == 0 and g.max_nvlinks == 0 for g in listing.get(9).gpus)
    assert all(g.uuid == "" and g.pci_bus_id == "" for p in listing.partitions for g in p.gpus)
    assert listing.exactly([3, 1]).id == 3 and listing.exactly([1, 2]) is None
    assert listing.active == ()


def test_b200_has_no_partition_0_and_other_pairs(fm_state):
    listing = fm_state("b200").partitions()
    assert [p.id for p in listing.partitions] == list(range(1, 16))
    assert listing.get(0) is None
    assert listing.exactly([1, 2]).id == 4 and listing.exactly([1, 3]) is None
    assert listing.exactly(range(1, 9)).id == 1
    assert listing.get(15).modules == (8,)


def test_nvlink_failures_and_unsupported_partitions(fm_state):
    fm = fm_state("h100")
    assert not fm.nvlink_failures()
    assert fm.unsupported_partitions() == {}
    with open(fm_state.path, encoding="utf-8") as handle:
        state = json.load(handle)
    state["failed_switches"] = [{"uuid": "", "pciBusId": "00000000:05:00.0", "portNum": [4, 5]}]
    state["unsupported"] = [{"partitionId": 4, "gpuPhysicalIds": [4, 2]}]
    with open(fm_state.path, "w", encoding="utf-8") as handle:
        json.dump(state, handle)
    failures = fm.nvlink_failures()
    assert failures and failures.gpus == ()
    assert [(d.kind, d.pci_bus_id, d.ports) for d in failures.switches] == [
        ("switch", "00000000:05:00.0", (4, 5))]
    assert fm.unsupported_partitions() == {4: (2, 4)}


def test_a_degraded_gpu_shows_in_the_list_and_fails_activation(fm_state):
    fm = fm_state("h100")
    fm_state.control("degrade", 2, 12)
    listing = fm.partitions()
    assert [g.degraded for g in listing.get(4).gpus] == [True, False]
    assert not any(g.degraded for g in listing.get(8).gpus)  # a single GPU has no NVLinks
    with pytest.raises(FabricError) as err:
        fm.activate(4)
    assert err.value.code == FM_NVLINK_ERROR
    assert "--get-nvlink-failed-devices" in err.value.message
    fm.activate(8)


# ----------------------------------------------------------------------------- activation


def test_activate_and_deactivate(fm_state):
    fm = fm_state("h100")
    fm.activate(3)
    assert [p.id for p in fm.partitions().active] == [3]
    assert fm.deactivate(3) is True
    assert fm.deactivate(3) is False  # UNINITIALIZED: not active any more, not an error
    assert fm.partitions().active == ()


def test_in_use_names_the_active_partition_and_its_domain(fm_state):
    fm = fm_state("h100")
    fm.activate(1)  # modules 1-4
    with pytest.raises(FabricError) as err:
        fm.activate(3, holders={1: "tenant-a"})
    assert err.value.code == FM_IN_USE
    assert err.value.message == (
        "Fabric Manager at 127.0.0.1 cannot activate partition 3 (GPU modules 1, 3): in use "
        "(fmReturn -7 IN_USE) by partition 1 (GPU modules 1-4), held by domain 'tenant-a'")
    with pytest.raises(FabricError) as err:
        fm.activate(1, holders={})
    assert ("partition 1 (GPU modules 1-4), held by no domain of this collection"
            in err.value.message)
    assert "`fmpm -d 1` frees it" in err.value.message
    assert [p.id for p in fm.partitions().active] == [1]  # FM unchanged


def test_unknown_partition(fm_state):
    fm = fm_state("b200")
    with pytest.raises(FabricError) as err:
        fm.activate(0)  # B200 has no partition 0
    assert err.value.code == FM_BADPARAM
    assert "knows no partition 0" in err.value.message and "fmpm -l" in err.value.message
    with pytest.raises(FabricError, match="not a Fabric Manager partition ID"):
        fm.activate(64)
    with pytest.raises(FabricError, match="not a Fabric Manager partition ID"):
        fm.deactivate(True)


def test_fm_not_in_shared_mode(fm_state):
    fm = fm_state("h100", "--fabric-mode", "0")
    with pytest.raises(FabricError) as err:
        fm.partitions()
    assert err.value.code == FM_NOT_SUPPORTED
    assert "not in shared NVSwitch mode" in err.value.message
    assert "FABRIC_MODE=1" in err.value.message


def test_connection_failures_name_the_address(fm_state):
    fm_state("h100")
    with pytest.raises(FabricError) as err:
        fm_state.make(address="10.20.0.7").partitions()
    assert "cannot reach Fabric Manager at 10.20.0.7" in err.value.message
    assert "FM_CMD_BIND_INTERFACE" in err.value.message
    fm_state.control("stop")
    with pytest.raises(FabricError, match="cannot reach Fabric Manager at 127.0.0.1"):
        fm_state.make().activate(3)


def test_a_service_vm_address(fm_state):
    fm = fm_state("h100", "--address", "192.168.122.50", address="192.168.122.50")
    fm.activate(5)
    assert [p.id for p in fm.partitions().active] == [5]


def test_fmpm_missing_or_hanging(fm_state, tmp_path):
    with pytest.raises(FabricError, match="fmpm was not found at '/nonexistent/fmpm'"):
        fm_state.make(fmpm="/nonexistent/fmpm").partitions()
    slow = tmp_path / "slow-fmpm"
    slow.write_text("#!/bin/sh\nsleep 10\n")
    slow.chmod(slow.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(FabricError, match="got no answer from Fabric Manager at 127.0.0.1"):
        fm_state.make(fmpm=str(slow), call_timeout=0.5).partitions()


def test_not_configured_is_retried_until_fm_is_up(fm_state):
    fm = fm_state("h100", "--starting-for", "1.5", starting_wait=20)
    assert len(fm.partitions().partitions) == 15
    calls = fm_state.state()["calls"]
    assert calls[-1][2] == 0 and any(c[2] == FM_NOT_CONFIGURED for c in calls)


def test_not_configured_past_the_wait(fm_state):
    fm = fm_state("h100", "--starting-for", "60", starting_wait=0.3)
    with pytest.raises(FabricError) as err:
        fm.activate(3)
    assert err.value.code == FM_NOT_CONFIGURED
    assert "still starting" in err.value.message


def test_unexpected_failure_output(fm_state, tmp_path):
    odd = tmp_path / "odd-fmpm"
    odd.write_text("#!/bin/sh\necho 'segmentation fault' >&2\nexit 3\n")
    odd.chmod(odd.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(FabricError, match="fmpm -l failed with status 3: segmentation fault"):
        fm_state.make(fmpm=str(odd)).partitions()


# ----------------------------------------------------------------------------- FM restart


def test_declare_after_a_restart(fm_state):
    fm = fm_state("h100")
    fm.activate(3)
    fm.activate(6)
    fm_state.control("restart")
    with pytest.raises(FabricError) as err:
        fm.partitions()  # FM waits for the list: everything else is NOT_CONFIGURED
    assert err.value.code == FM_NOT_CONFIGURED
    assert fm.declare_active([6, 3, 6]) == (3, 6)
    assert fm_state.state()["calls"][-2][1] == ["--set-activated-list", 3, 6]  # no repeats
    assert [p.id for p in fm.partitions().active] == [3, 6]


def test_declare_none(fm_state):
    fm = fm_state("b200")
    fm_state.control("restart")
    assert fm.declare_active([]) == ()
    assert fm.partitions().active == ()


def test_declare_with_an_fmpm_that_drops_the_list(fm_state):
    fm = fm_state("h100")
    fm.activate(3)
    fm_state.control("restart")
    state = fm_state.state()
    state["fmpm_drops_activated_list"] = True
    with open(fm_state.path, "w", encoding="utf-8") as handle:
        json.dump(state, handle)
    with pytest.raises(FabricError, match="partitions 3 are not active.*944a949"):
        fm.declare_active([3])


def test_declare_outside_a_restart(fm_state):
    with pytest.raises(FabricError) as err:
        fm_state("h100").declare_active([3])
    assert err.value.code == FM_NOT_SUPPORTED


def test_fm_gives_up_when_nobody_declares(fm_state):
    fm = fm_state("h100")
    fm.activate(3)
    fm_state.control("restart", "--window", "0")
    with pytest.raises(FabricError, match="cannot reach Fabric Manager"):
        fm.declare_active([3])


# ----------------------------------------------------------------------------- concurrency


def test_parallel_activations_never_overlap(fm_state):
    fm = fm_state("h100")
    listing = fm.partitions()
    results = []

    def worker(pids):
        for pid in pids:
            try:
                fm.activate(pid)
                results.append(pid)
            except FabricError as exc:
                assert exc.code == FM_IN_USE

    threads = [threading.Thread(target=worker, args=([p, (p + 5) % 15],)) for p in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    active = [listing.get(p) for p in sorted(set(results))]
    assert active
    for a, b in itertools.combinations(active, 2):
        assert not a.overlaps(b), (a.id, b.id)
    assert sorted(p.id for p in fm.partitions().active) == sorted(set(results))


# ----------------------------------------------------------------------------- pure parts


def test_failure_code_from_text_or_status():
    assert failure_code("Failed to activate partition. fmReturn: -7\n", 249) == -7
    assert failure_code("", 248) == -8
    assert failure_code("", 1) is None


def test_describe_modules():
    assert describe_modules((4, 3, 2, 1)) == "1-4"
    assert describe_modules((1, 3)) == "1, 3"
    assert describe_modules((1, 2)) == "1, 2"


def test_parse_rejects_what_fmpm_never_prints():
    with pytest.raises(FabricError, match="not JSON"):
        parse_partition_list("Connected to Fabric Manager instance.")
    with pytest.raises(FabricError, match="'partitionId' is not a count"):
        parse_partition_list('{"partitionInfo": [{"partitionId": -1, "isActive": 0}]}')


def test_the_host_record_gives_its_fabric_section(tmp_path):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._fabric import read_fabric_record

    path = tmp_path / "kvm_host.json"
    assert read_fabric_record(str(path)) == {}  # no record: nothing learned yet
    path.write_text(json.dumps({"version": 1, "files": []}))
    assert read_fabric_record(str(path)) == {}
    path.write_text(json.dumps({"fabric": {"module_ids": {"0000:1b:00.0": 5}}}))
    assert read_fabric_record(str(path)) == {"module_ids": {"0000:1b:00.0": 5}}
    for text in ("{not json", "[1, 2]"):
        path.write_text(text)
        with pytest.raises(FabricError, match="host_record: the host record .*point host_record"):
            read_fabric_record(str(path))


# ----------------------------------------------------------------------------- the lab's daemon


def _daemon(tmp_path, state_path, settings):
    cfg = tmp_path / "fabricmanager.cfg"
    cfg.write_text(settings)
    pid_file = tmp_path / "fm.pid"
    subprocess.run([sys.executable, os.path.join(FABRIC, "fake_fm.py"), "--state", state_path,
                    "daemon", "-c", str(cfg), "--board", "lab", "--pid-file", str(pid_file)],
                   check=True, stdout=subprocess.PIPE, timeout=30)
    return int(pid_file.read_text())


def _stop(pid):
    os.kill(pid, 15)
    for _attempt in range(100):
        try:
            os.kill(pid, 0)
        except OSError:
            return
        threading.Event().wait(0.05)
    raise AssertionError("the stand-in FM daemon did not stop")


def test_the_lab_daemon_runs_as_its_settings_say(fm_state, tmp_path):
    """nv-fabricmanager's stand-in (the lab's package): FABRIC_MODE from the settings file, the
    lab's table, stopped by SIGTERM, and in restart mode after a restart with
    FABRIC_MODE_RESTART=1, where the running tenants' partitions are declared again."""
    path = fm_state.path
    pid = _daemon(tmp_path, path, "# as shipped\nFABRIC_MODE=0\nFABRIC_MODE_RESTART=0\n")
    try:
        fm = fm_state.make()
        with pytest.raises(FabricError) as err:
            fm.activate(1)
        assert err.value.code == FM_NOT_SUPPORTED  # bare-metal mode: no partitions to activate
    finally:
        _stop(pid)
    assert _fmpm(path, "-l")[0] == 247  # stopped: fmpm cannot connect

    settings = "FABRIC_MODE=1\nFABRIC_MODE_RESTART=1\n"
    pid = _daemon(tmp_path, path, settings)
    try:
        listing = fm.partitions()
        assert listing.max_partitions == 7
        assert [p.modules for p in listing.partitions] == [
            (1, 2, 3, 4), (1, 3), (2, 4), (1,), (2,), (3,), (4,)]
        fm.activate(1)
        fm.activate(4)  # module 2 alone; 5 (module 3) overlaps 1
    finally:
        _stop(pid)
    pid = _daemon(tmp_path, path, settings)  # systemctl restart: FM resumes, waits for the list
    try:
        with pytest.raises(FabricError) as err:
            fm.partitions()
        assert err.value.code == FM_NOT_CONFIGURED
        assert fm.declare_active([1, 4]) == (1, 4)
        assert [p.id for p in fm.partitions().active] == [1, 4]
    finally:
        _stop(pid)
    pid = _daemon(tmp_path, path, "FABRIC_MODE=1\nFABRIC_MODE_RESTART=0\n")
    try:  # without restart mode FM starts afresh: nothing active, nothing to declare
        assert fm.partitions().active == ()
    finally:
        _stop(pid)

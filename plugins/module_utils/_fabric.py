# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The gateway to NVIDIA Fabric Manager: the collection's only caller of ``fmpm``.

FM keeps the NVSwitches of a shared-NVSwitch host (HGX A100, H100/H200, B200) and activates a
tenant's GPU partition before the VM starts. fmpm (NVIDIA/Fabric-Manager-Client) is its command
line: ``-l``, ``-a``, ``-d``, ``--set-activated-list``, ``--get-nvlink-failed-devices``,
``--list-unsupported-partitions``, ``--hostname``. :class:`FabricManager` runs it with a timeout,
reads its JSON (``_fabric_model``) and turns every fmReturn into a FabricError a user can act on:
IN_USE names the active partition in the way and the domain holding it, NOT_CONFIGURED (FM still
starting) is retried until a deadline, NOT_SUPPORTED says FM is not in shared mode, and a
connection failure names the address.

Runs without Ansible (the libvirt hook uses it on the host's own Python): standard library only.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from ansible_collections.gpuvirt.kvm.plugins.module_utils._fabric_model import (
    CONNECT_FAILED,
    FM_IN_USE,
    FM_NOT_CONFIGURED,
    FM_UNINITIALIZED,
    INVALID_PARTITION_ID,
    LIB_INIT_FAILED,
    MAX_PARTITION_ID,
    FabricError,
    failure_code,
    failure_message,
    in_use_message,
    parse_failed_devices,
    parse_partition_list,
    parse_unsupported,
)

DEFAULT_FMPM = "fmpm"
DEFAULT_ADDRESS = "127.0.0.1"  # fmpm's own default (FM_CMD_BIND_INTERFACE)
DEFAULT_CALL_TIMEOUT = 30.0  # one fmpm run; FM itself gives up on a connect after 1 s
DEFAULT_STARTING_WAIT = 120.0  # how long NOT_CONFIGURED (FM still starting) is retried
RETRY_INTERVAL = 2.0


class FabricManager:
    """One FM instance, reached through fmpm.

    ``address``: FM's TCP address (``--hostname``; FM on this host: None, fmpm's 127.0.0.1).
    ``fmpm``: the program (a name on PATH or a path). ``starting_wait``: seconds to keep
    retrying while FM answers NOT_CONFIGURED. ``runner``/``sleep``/``clock`` are seams for tests
    of the retry timing; the tests of every answer run the stand-in fmpm for real.
    """

    def __init__(self, address=None, fmpm=DEFAULT_FMPM, call_timeout=DEFAULT_CALL_TIMEOUT,
                 starting_wait=DEFAULT_STARTING_WAIT, retry_interval=RETRY_INTERVAL,
                 env=None, sleep=time.sleep, clock=time.monotonic):
        self.address = address or DEFAULT_ADDRESS
        self._hostname = address
        self.fmpm = fmpm or DEFAULT_FMPM
        self.call_timeout = call_timeout
        self.starting_wait = starting_wait
        self.retry_interval = retry_interval
        self._env = env
        self._sleep = sleep
        self._clock = clock

    # ------------------------------------------------------------------ running fmpm

    def _argv(self, args):
        argv = [self.fmpm] + list(args)
        if self._hostname:
            argv += ["--hostname", self._hostname]
        return argv

    def _run_once(self, args):
        env = dict(os.environ if self._env is None else self._env)
        env.update(LANG="C", LC_ALL="C")
        try:
            proc = subprocess.run(  # pylint: disable=ansible-bad-function
                self._argv(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                timeout=self.call_timeout, check=False)
        except FileNotFoundError:
            raise FabricError(
                "fmpm was not found at %r: install NVIDIA Fabric-Manager-Client's fmpm on the "
                "host, or give its path" % self.fmpm,
                address=self.address) from None
        except PermissionError:
            raise FabricError("fmpm at %r is not executable" % self.fmpm,
                              address=self.address) from None
        except subprocess.TimeoutExpired:
            raise FabricError(
                "fmpm %s got no answer from Fabric Manager at %s within %g s: is "
                "nvidia-fabricmanager running, and is FM_CMD_BIND_INTERFACE set to that address?"
                % (" ".join(args), self.address, self.call_timeout),
                address=self.address) from None
        return (proc.returncode, proc.stdout.decode("utf-8", "replace"),
                proc.stderr.decode("utf-8", "replace").strip())

    def _call(self, args, action, pid=None, wait=True):
        """Run fmpm until FM answers something other than NOT_CONFIGURED (or the wait is over;
        once without ``wait``); return its stdout, or raise FabricError with what to do."""
        deadline = self._clock() + self.starting_wait
        while True:
            rc, out, err = self._run_once(args)
            if rc == 0:
                return out
            if CONNECT_FAILED in out:
                raise FabricError(
                    "cannot reach Fabric Manager at %s to %s (fmpm: %s). Is "
                    "nvidia-fabricmanager running there in shared NVSwitch mode, and does its "
                    "FM_CMD_BIND_INTERFACE name %s?" % (self.address, action, CONNECT_FAILED,
                                                        self.address),
                    code=failure_code("", rc), address=self.address, unreachable=True)
            if LIB_INIT_FAILED in out:
                raise FabricError("fmpm could not load the Fabric Manager API library "
                                  "(libnvfm): install the nvidia-fabricmanager-dev package of "
                                  "the FM version the host runs", address=self.address)
            if INVALID_PARTITION_ID in out:
                raise FabricError("partition %s is not a Fabric Manager partition ID (0-%d)"
                                  % (pid, MAX_PARTITION_ID), address=self.address)
            code = failure_code(out, rc)
            if code is None:
                raise FabricError("fmpm %s failed with status %d: %s" % (
                    " ".join(args), rc, (err or out).strip() or "no output"),
                    address=self.address)
            if code == FM_NOT_CONFIGURED and wait and \
                    self._clock() + self.retry_interval < deadline:
                self._sleep(self.retry_interval)
                continue
            raise _Failed(code, out)

    # ------------------------------------------------------------------ operations

    def _query(self, args, action, parse, wait=True):
        """Run a listing fmpm call and parse its JSON, or FabricError saying what to do."""
        try:
            return parse(self._call(args, action, wait=wait))
        except _Failed as failed:
            raise self._error(failed, action) from None

    def partitions(self, wait=True):
        """``fmpm -l``: the partitions FM knows, with their state (FmPartitionList). Without
        ``wait``, a FM still starting (or restarted and waiting for the list of active
        partitions) is a FabricError with code NOT_CONFIGURED at once."""
        return self._query(["-l"], "list its partitions", parse_partition_list, wait)

    def activate(self, pid, holders=None):
        """``fmpm -a``. ``holders`` maps active partition IDs to the domains that hold them
        (named in the IN_USE message)."""
        pid = _partition_id(pid)
        action = "activate partition %d" % pid
        try:
            self._call(["-a", str(pid)], action, pid)
        except _Failed as failed:
            if failed.code == FM_IN_USE:
                listing = self._listing_or_none()
                raise FabricError(in_use_message(self.address, listing, pid, holders),
                                  code=FM_IN_USE, address=self.address) from None
            raise self._error(failed, action, pid) from None

    def deactivate(self, pid):
        """``fmpm -d``. Returns False when the partition was not active (FM's UNINITIALIZED):
        releasing twice is not an error."""
        pid = _partition_id(pid)
        action = "deactivate partition %d" % pid
        try:
            self._call(["-d", str(pid)], action, pid)
        except _Failed as failed:
            if failed.code == FM_UNINITIALIZED:
                return False
            raise self._error(failed, action, pid) from None
        return True

    def declare_active(self, pids):
        """``fmpm --set-activated-list``: after FM restarted (FABRIC_MODE_RESTART=1), tell it
        which partitions the running tenants hold (none is a valid answer). Then read the list
        back: an fmpm built before NVIDIA/Fabric-Manager-Client 944a949 sends an empty list
        whatever it is given (its parser moved a pointer instead of counting), and a tenant
        would lose its NVLinks without a word."""
        ids = sorted({_partition_id(p) for p in pids})  # fmpm 1.0.1 loops forever on a repeat
        action = "take the list of active partitions"
        try:
            self._call(["--set-activated-list", ",".join(str(p) for p in ids)], action)
        except _Failed as failed:
            raise self._error(failed, action) from None
        if not ids:
            return ()
        listing = self.partitions()
        missing = [p for p in ids if listing.get(p) is None or not listing.get(p).active]
        if missing:
            raise FabricError(
                "Fabric Manager at %s took the list of active partitions, but partitions %s are "
                "not active in `fmpm -l` afterwards: this fmpm drops the list (fmpm 1.0.1 built "
                "before NVIDIA/Fabric-Manager-Client commit 944a949). Build fmpm from a newer "
                "commit; until then the tenants of those partitions have no NVLink"
                % (self.address, ", ".join(str(p) for p in missing)), address=self.address)
        return tuple(ids)

    def nvlink_failures(self):
        """``fmpm --get-nvlink-failed-devices`` (NvlinkFailures; empty on H100 and later)."""
        return self._query(["--get-nvlink-failed-devices"], "list its NVLink-failed devices",
                           parse_failed_devices)

    def unsupported_partitions(self):
        """``fmpm --list-unsupported-partitions``: {partition id: module IDs}."""
        return self._query(["--list-unsupported-partitions"], "list its unsupported partitions",
                           parse_unsupported)

    # ------------------------------------------------------------------ helpers

    def _listing_or_none(self):
        try:
            return self.partitions()
        except FabricError:
            return None

    def _error(self, failed, action, pid=None):
        return FabricError(failure_message(failed.code, action, self.address, pid),
                           code=failed.code, address=self.address)


DEFAULT_HOST_RECORD = "/etc/gpuvirt/kvm_host.json"
DEFAULT_HOOK_CONFIG = "/etc/gpuvirt/fabric.json"
DEFAULT_HOOK_STATE = "/run/gpuvirt/fabric"


def _json_file(path, what, fix=""):
    """The JSON object in a file (``{}`` when there is no file); FabricError naming ``what``
    when it cannot be read or is no object."""
    try:
        with open(path, "r", encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise FabricError("cannot read %s %s: %s%s" % (what, path, exc, fix)) from None
    if not isinstance(data, dict):
        raise FabricError("%s %s must hold a JSON object%s" % (what, path, fix))
    return data


def _record_section(path, name):
    """A section of the host record ``kvm_host`` keeps (``{}`` when there is no record, or no
    such section); FabricError naming the record when it cannot be read."""
    data = _json_file(path, "host_record: the host record",
                      "; fix the file, or point host_record at the record kvm_host keeps")
    section = data.get(name)
    return section if isinstance(section, dict) else {}


def read_record_slots(path):
    """The ``slots`` section of the host record: the GPUs and NVSwitches ``kvm_host`` saw at
    conversion, by address."""
    return _record_section(path, "slots")


def read_record_platform(path):
    """The ``platform`` the host was converted with (``kvm_host_platform``: auto, a name or a
    platform file), or None when the record does not say."""
    value = _json_file(path, "host_record: the host record",
                       "; fix the file, or point host_record at the record kvm_host keeps"
                       ).get("platform")
    return value if isinstance(value, str) and value else None


def read_fabric_record(path):
    """The ``fabric`` section of the host record ``kvm_host`` keeps (``{}`` when there is no
    record, or no such section): ``module_ids`` (GPU address -> FM module ID). A record that
    cannot be read is a FabricError naming it."""
    return _record_section(path, "fabric")


def start_detached(argv, log, env):
    """Start a program in a session of its own, without stdin, its output to ``log`` (an open
    file), and return at once (the Popen): the libvirt hook's way to have work done after it
    returns (a hook must not wait on what waits on libvirt)."""
    return subprocess.Popen(  # pylint: disable=consider-using-with,ansible-bad-function
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        start_new_session=True, close_fds=True)


def read_hook_config(path):
    """The libvirt hook's settings: ``{"address", "fmpm", "starting_wait"}`` from a JSON file
    (``{}`` when there is none: FM on this host, fmpm on PATH)."""
    return _json_file(path, "the hook's settings")


class PartitionHolders:
    """Which domain had the hook activate which partition: a file per partition under
    ``state_dir`` (``/run``: gone after a reboot, as FM's partitions are), written under a lock
    that serialises the hook's runs. The hook cannot ask libvirt (a hook that calls libvirt
    deadlocks it); these files let IN_USE name the domain in the way, and keep a failed start
    from deactivating a partition another domain holds."""

    def __init__(self, state_dir=DEFAULT_HOOK_STATE):
        self.dir = state_dir
        self._lock = None

    def __enter__(self):
        import fcntl

        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self._lock = open(os.path.join(self.dir, ".lock"), "a+", encoding="utf-8")  # pylint: disable=consider-using-with
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self._lock.close()
        self._lock = None

    def _path(self, pid):
        return os.path.join(self.dir, "partition-%d" % _partition_id(pid))

    def all(self):
        """{partition ID: domain name}."""
        found = {}
        for name in os.listdir(self.dir) if os.path.isdir(self.dir) else ():
            if name.startswith("partition-") and name[10:].isdigit():
                with open(os.path.join(self.dir, name), encoding="utf-8") as handle:
                    found[int(name[10:])] = handle.read().strip()
        return found

    def record(self, pid, domain):
        tmp = self._path(pid) + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(domain + "\n")
        os.replace(tmp, self._path(pid))

    def forget(self, pid):
        try:
            os.unlink(self._path(pid))
        except FileNotFoundError:
            pass


class _Failed(Exception):
    """fmpm reached FM and FM said no: the fmReturn, for the caller to word."""

    def __init__(self, code, out):
        super().__init__(code)
        self.code = code
        self.out = out


def _partition_id(pid):
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid <= MAX_PARTITION_ID:
        raise FabricError("partition %r is not a Fabric Manager partition ID (0-%d)"
                          % (pid, MAX_PARTITION_ID))
    return pid

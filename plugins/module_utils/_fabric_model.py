# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Fabric Manager's answers as data: what ``fmpm`` prints, read, and what each fmReturn means.

Pure: no I/O. ``_fabric`` (the one gateway to FM) runs fmpm and hands its output here; the
libvirt hook and the placement read the results. Formats are those of NVIDIA's
Fabric-Manager-Client ``fmpm.cpp`` 1.0.1 (jsoncpp's styled JSON on stdout; on failure one line
``Failed to <what>. fmReturn: <n>`` on stdout and the exit status n, which a shell sees as 256+n)
and the fmReturn values of ``nv_fm_types.h``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# nv_fm_types.h, fmReturn_t.
FM_SUCCESS = 0
FM_BADPARAM = -1
FM_GENERIC_ERROR = -2
FM_NOT_SUPPORTED = -3
FM_UNINITIALIZED = -4
FM_TIMEOUT = -5
FM_VERSION_MISMATCH = -6
FM_IN_USE = -7
FM_NOT_CONFIGURED = -8
FM_CONNECTION_NOT_VALID = -9
FM_NVLINK_ERROR = -10
FM_RETURN_NAMES = {
    FM_SUCCESS: "SUCCESS", FM_BADPARAM: "BADPARAM", FM_GENERIC_ERROR: "GENERIC_ERROR",
    FM_NOT_SUPPORTED: "NOT_SUPPORTED", FM_UNINITIALIZED: "UNINITIALIZED", FM_TIMEOUT: "TIMEOUT",
    FM_VERSION_MISMATCH: "VERSION_MISMATCH", FM_IN_USE: "IN_USE",
    FM_NOT_CONFIGURED: "NOT_CONFIGURED", FM_CONNECTION_NOT_VALID: "CONNECTION_NOT_VALID",
    FM_NVLINK_ERROR: "NVLINK_ERROR",
}
# FM_MAX_FABRIC_PARTITIONS: fmpm refuses `-a` with an ID at or above it ("Invalid Partition ID.").
MAX_PARTITION_ID = 63

# The lines fmpm prints (fmpm.cpp), by what it was doing.
_FAILED_RE = re.compile(r"^Failed to (?P<what>.+?)\. fmReturn: (?P<code>-?\d+)\s*$", re.M)
CONNECT_FAILED = "Failed to connect to Fabric Manager instance."
LIB_INIT_FAILED = "Failed to initialize Fabric Manager API interface library."
INVALID_PARTITION_ID = "Invalid Partition ID."


class FabricError(Exception):
    """FM refused or could not be reached. ``code`` is the fmReturn (None when fmpm did not get
    as far as FM); ``message`` says what to do."""

    def __init__(self, message, code=None, address=None, unreachable=False):
        super().__init__(message)
        self.message = message
        self.code = code
        self.address = address
        self.unreachable = unreachable  # fmpm could not connect to FM at all

    @property
    def code_name(self):
        return FM_RETURN_NAMES.get(self.code, "") if self.code is not None else ""


@dataclass(frozen=True)
class FmGpu:
    """One GPU of a partition as FM lists it. ``module`` is fmpm's ``physicalId``: the GPU's
    module ID on H100 and later (where uuid and pci_bus_id are empty)."""

    module: int
    uuid: str = ""
    pci_bus_id: str = ""
    nvlinks: int = 0  # numNvLinksAvailable
    max_nvlinks: int = 0  # maxNumNvLinks
    line_rate_mbps: int = 0  # nvlinkLineRateMBps

    @property
    def degraded(self):
        """Fewer NVLinks than the GPU has: FM lost some of them."""
        return self.nvlinks < self.max_nvlinks


@dataclass(frozen=True)
class FmPartition:
    id: int
    active: bool
    gpus: tuple  # FmGpu, in FM's order

    @property
    def modules(self):
        return tuple(sorted(g.module for g in self.gpus))

    def overlaps(self, other):
        return bool(set(self.modules) & set(other.modules))


@dataclass(frozen=True)
class FmPartitionList:
    partitions: tuple  # FmPartition, in FM's order
    max_partitions: int = 0  # the board's partition count (maxNumPartitions)

    def get(self, pid):
        for p in self.partitions:
            if p.id == pid:
                return p
        return None

    @property
    def active(self):
        return tuple(p for p in self.partitions if p.active)

    def blocking(self, pid):
        """The active partitions that keep ``pid`` from being activated: itself when it is
        active, and every active one that shares a GPU with it."""
        wanted = self.get(pid)
        if wanted is None:
            return ()
        return tuple(p for p in self.active if p.id == pid or p.overlaps(wanted))

    def exactly(self, modules):
        """The partition whose GPUs are exactly these module IDs, or None."""
        wanted = tuple(sorted(modules))
        for p in self.partitions:
            if p.modules == wanted:
                return p
        return None


@dataclass(frozen=True)
class FailedDevice:
    kind: str  # "gpu" | "switch"
    uuid: str
    pci_bus_id: str
    ports: tuple


@dataclass(frozen=True)
class NvlinkFailures:
    gpus: tuple = ()  # FailedDevice
    switches: tuple = ()  # FailedDevice

    def __bool__(self):
        return bool(self.gpus or self.switches)


def _json(text, what):
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise FabricError("fmpm %s printed something that is not JSON (%s): %r"
                          % (what, exc, text[:200])) from None
    if not isinstance(data, dict):
        raise FabricError("fmpm %s printed JSON that is not an object: %r" % (what, text[:200]))
    return data


def _uint(entry, key, what):
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FabricError("fmpm %s: %r is not a count in %r" % (what, key, entry))
    return value


def parse_partition_list(text):
    """``fmpm -l`` -> FmPartitionList."""
    data = _json(text, "-l")
    parts = []
    for entry in data.get("partitionInfo") or []:
        gpus = tuple(
            FmGpu(module=_uint(g, "physicalId", "-l"), uuid=str(g.get("uuid", "")),
                  pci_bus_id=str(g.get("pciBusId", "")),
                  nvlinks=_uint(g, "numNvLinksAvailable", "-l"),
                  max_nvlinks=_uint(g, "maxNumNvLinks", "-l"),
                  line_rate_mbps=_uint(g, "nvlinkLineRateMBps", "-l"))
            for g in entry.get("gpuInfo") or [])
        parts.append(FmPartition(id=_uint(entry, "partitionId", "-l"),
                                 active=bool(_uint(entry, "isActive", "-l")), gpus=gpus))
    return FmPartitionList(tuple(parts), int(data.get("maxNumPartitions") or 0))


def parse_failed_devices(text):
    """``fmpm --get-nvlink-failed-devices`` -> NvlinkFailures."""
    data = _json(text, "--get-nvlink-failed-devices")

    def devices(key, kind):
        return tuple(FailedDevice(kind, str(d.get("uuid", "")), str(d.get("pciBusId", "")),
                                  tuple(d.get("portNum") or ()))
                     for d in data.get(key) or [])
    return NvlinkFailures(devices("gpuInfo", "gpu"), devices("switchInfo", "switch"))


def parse_unsupported(text):
    """``fmpm --list-unsupported-partitions`` -> {partition id: module IDs}."""
    data = _json(text, "--list-unsupported-partitions")
    return {_uint(p, "partitionId", "--list-unsupported-partitions"):
            tuple(sorted(p.get("gpuPhysicalIds") or ()))
            for p in data.get("partitionInfo") or []}


def failure_code(stdout, rc):
    """The fmReturn of a failed fmpm run: from its ``fmReturn: n`` line, else from the exit
    status (fmpm returns fmReturn from main, so -7 reaches the shell as 249)."""
    match = _FAILED_RE.search(stdout or "")
    if match:
        return int(match.group("code"))
    if rc is not None and rc > 128:
        return rc - 256
    return None


def describe_modules(modules):
    """(1, 2, 3, 4) -> "1-4"; (1, 3) -> "1, 3"."""
    modules = sorted(modules)
    if len(modules) > 2 and modules == list(range(modules[0], modules[-1] + 1)):
        return "%d-%d" % (modules[0], modules[-1])
    return ", ".join(str(m) for m in modules)


def describe_partition(partition, holders=None):
    """'partition 3 (GPU modules 1, 3), held by domain 'a''."""
    text = "partition %d (GPU modules %s)" % (partition.id, describe_modules(partition.modules))
    if holders is not None:
        holder = holders.get(partition.id)
        text += (", held by domain '%s'" % holder if holder
                 else ", held by no domain of this collection (if nothing uses it, "
                      "`fmpm -d %d` frees it)" % partition.id)
    return text


_ADVICE = {
    FM_NOT_SUPPORTED:
        "%(where)s cannot %(action)s: it is not in shared NVSwitch mode (%(fm)s). Set "
        "FABRIC_MODE=1 in /usr/share/nvidia/nvswitch/fabricmanager.cfg on the FM host and "
        "restart nvidia-fabricmanager (docs/fabric.md)",
    FM_BADPARAM:
        "%(where)s knows no partition %(pid)s (%(fm)s): `fmpm -l` lists the partitions it has; "
        "a platform table that names other IDs is out of date",
    FM_UNINITIALIZED: "%(where)s cannot %(action)s: the partition is not active (%(fm)s)",
    FM_NOT_CONFIGURED:
        "%(where)s is still starting (%(fm)s) and did not finish in time; check `systemctl "
        "status nvidia-fabricmanager` and /var/log/fabricmanager.log",
    FM_NVLINK_ERROR:
        "%(where)s could not %(action)s: NVLink training failed (%(fm)s). `fmpm "
        "--get-nvlink-failed-devices` names the devices; dmesg shows their SXid/Xid errors",
    FM_VERSION_MISMATCH:
        "%(where)s could not %(action)s: fmpm and FM speak different API versions (%(fm)s): "
        "build fmpm against the FM version the host runs",
    FM_CONNECTION_NOT_VALID:
        "%(where)s could not %(action)s: the connection failed or timed out (%(fm)s); retry, "
        "and check /var/log/fabricmanager.log",
}
_ADVICE[FM_TIMEOUT] = _ADVICE[FM_CONNECTION_NOT_VALID]


def failure_message(code, action, address, pid=None):
    """What a user can do about an fmReturn; ``action`` is e.g. 'activate partition 3'."""
    template = _ADVICE.get(code, "%(where)s could not %(action)s (%(fm)s); "
                                 "/var/log/fabricmanager.log on the FM host says why")
    return template % {
        "where": "Fabric Manager at %s" % address, "action": action,
        "fm": "fmReturn %d %s" % (code, FM_RETURN_NAMES.get(code, str(code))),
        "pid": pid if pid is not None else "of that ID"}


def in_use_message(address, partitions, pid, holders):
    """IN_USE on activation: name the active partition(s) in the way, and who holds them."""
    wanted = partitions.get(pid) if partitions is not None else None
    blocking = partitions.blocking(pid) if partitions is not None else ()
    head = "Fabric Manager at %s cannot activate %s" % (
        address, describe_partition(wanted) if wanted else "partition %d" % pid)
    if not blocking:
        return ("%s: it is in use (fmReturn %d IN_USE), and no active partition overlaps it now; "
                "retry" % (head, FM_IN_USE))
    return "%s: in use (fmReturn %d IN_USE) by %s" % (
        head, FM_IN_USE, "; ".join(describe_partition(p, holders or {}) for p in blocking))

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Device health judged from what a KVM host can read while its GPUs and NVSwitches sit on
vfio-pci. Private to this collection.

The files come through the sysfs gateway (``_sysfs.read_pci_health``; ``_host_context`` reads
them), laid out and worded as
the kernel writes them: ``current_link_speed`` and its kin (drivers/pci/pci-sysfs.c),
``power_state`` (``pci_power_name``), and ``aer_dev_correctable``, ``aer_dev_nonfatal`` and
``aer_dev_fatal`` (drivers/pci/pcie/aer.c: one ``NAME COUNT`` line per error bit, unnamed bits
as ``FIELD_bit[N] COUNT``, then ``TOTAL_ERR_COR``, ``TOTAL_ERR_NONFATAL`` or
``TOTAL_ERR_FATAL``; kernels before 5.x spell the names out, "Receiver Error 2").

A ``failed`` device is never given to a VM; a ``degraded`` one still is, and is reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HEALTH_OK = "ok"
HEALTH_DEGRADED = "degraded"
HEALTH_FAILED = "failed"
# Sources a run may not read (the kernel log, Fabric Manager): the record's word on them stands.
SOURCE_SXID = "sxid"
SOURCE_FABRIC_MANAGER = "fabric-manager"
# Correctable errors since boot above which a device is reported degraded (a link that retrains
# or replays now and then counts a few; a bad riser or cable counts thousands).
DEFAULT_CORRECTABLE_THRESHOLD = 100

_SPEED_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*GT/s")
_ALL_ONES = b"\xff\xff\xff\xff"


@dataclass(frozen=True)
class Signal:
    """One finding: where it comes from (``pci``, ``power``, ``aer``, ``link``, ``sxid``,
    ``fabric-manager``), how bad it is (``degraded`` or ``failed``) and what it means."""

    source: str
    state: str
    reason: str

    def to_dict(self):
        return {"source": self.source, "state": self.state, "reason": self.reason}


@dataclass(frozen=True)
class DeviceHealth:
    """A PCI function's health: ``ok`` without signals, else the worst of them."""

    bdf: str
    signals: tuple = ()

    @property
    def state(self):
        states = {s.state for s in self.signals}
        if HEALTH_FAILED in states:
            return HEALTH_FAILED
        return HEALTH_DEGRADED if states else HEALTH_OK

    @property
    def failed(self):
        return self.state == HEALTH_FAILED

    @property
    def reason(self):
        """The failed signals' reasons (all signals' when none failed), joined."""
        worst = [s for s in self.signals if s.state == self.state] or list(self.signals)
        return "; ".join(s.reason for s in worst)

    def to_dict(self):
        return {"state": self.state, "signals": [s.to_dict() for s in self.signals]}


def parse_aer(text):
    """``(total, {name: count})`` from an ``aer_dev_*`` file; total None when the file has no
    ``TOTAL_`` line. Names may hold spaces (older kernels); the count is the last word."""
    total, counts = None, {}
    for line in (text or "").splitlines():
        words = line.split()
        if len(words) < 2 or not words[-1].isdigit():
            continue
        name, count = " ".join(words[:-1]), int(words[-1])
        if name.startswith("TOTAL_"):
            total = count
        else:
            counts[name] = count
    return total, counts


def parse_link_speed(text):
    """GT/s from ``current_link_speed`` / ``max_link_speed`` ("16.0 GT/s PCIe", older kernels
    "8 GT/s"); None for "Unknown" or anything else."""
    m = _SPEED_RE.match(text or "")
    return float(m.group(1)) if m else None


def _width(text):
    try:
        return int((text or "").strip())
    except ValueError:
        return None


def _counted(counts):
    named = ["%s %d" % (name, n) for name, n in counts.items() if n]
    return " (%s)" % ", ".join(named) if named else ""


def _plural(n, word):
    return "%d %s%s" % (n, word, "" if n == 1 else "s")


def judge(bdf, files, correctable_threshold=DEFAULT_CORRECTABLE_THRESHOLD):
    """The DeviceHealth of a function from its health files (``_sysfs.read_pci_health``; None:
    the function is not on the bus)."""
    if files is None:
        return DeviceHealth(bdf, (Signal(
            "pci", HEALTH_FAILED, "%s is missing from the PCI bus (it fell off, or was removed): "
            "check lspci, the slot and the BMC's event log" % bdf),))
    signals = []
    power = (files.get("power_state") or "").strip()
    if files.get("config_head") == _ALL_ONES:
        signals.append(Signal(
            "pci", HEALTH_FAILED, "%s's config space reads as all ones%s: it no longer answers "
            "on the bus (link down, surprise removal or a fatal error); a reset or a reboot may "
            "bring it back" % (bdf, " in power state D3cold" if power == "D3cold" else "")))
    elif power == "error":
        signals.append(Signal("power", HEALTH_FAILED,
                              "the kernel reports %s's power state as error" % bdf))
    for name, word, state in (("aer_dev_fatal", "fatal uncorrectable", HEALTH_FAILED),
                              ("aer_dev_nonfatal", "non-fatal uncorrectable", HEALTH_DEGRADED)):
        total, counts = parse_aer(files.get(name))
        if total:
            signals.append(Signal("aer", state, "%s: %s since boot%s" % (
                bdf, _plural(total, word + " PCIe error"), _counted(counts))))
    total, counts = parse_aer(files.get("aer_dev_correctable"))
    if total is not None and total > correctable_threshold:
        signals.append(Signal("aer", HEALTH_DEGRADED, "%s: %s since boot%s, over the threshold "
                              "of %d (a marginal link: check the riser or cable)" % (
                                  bdf, _plural(total, "correctable PCIe error"), _counted(counts),
                                  correctable_threshold)))
    # A link trains to what both ends can: the device's maximum, capped by its port's.
    width = _width(files.get("current_link_width"))
    max_width = _lowest(_width(files.get("max_link_width")),
                        _width(files.get("port_max_link_width")))
    if width == 0 and max_width:
        signals.append(Signal("link", HEALTH_FAILED, "%s's link is down (x0 of x%d)" % (
            bdf, max_width)))
    elif width and max_width and width < max_width:
        signals.append(Signal("link", HEALTH_DEGRADED, "%s's link trained at x%d of x%d" % (
            bdf, width, max_width)))
    # Speed only where nothing drives the device: a GPU lowers its link speed while idle under a
    # driver (a guest's: vfio-pci has it enabled), and in a low-power state.
    speed = parse_link_speed(files.get("current_link_speed"))
    max_speed = _lowest(parse_link_speed(files.get("max_link_speed")),
                        parse_link_speed(files.get("port_max_link_speed")))
    idle_d0 = power in ("", "D0") and (files.get("enable") or "0").strip() == "0"
    if idle_d0 and width and speed and max_speed and speed < max_speed:
        signals.append(Signal("link", HEALTH_DEGRADED, "%s's link runs at %g GT/s of %g GT/s"
                              % (bdf, speed, max_speed)))
    return DeviceHealth(bdf, tuple(signals))


def _lowest(*values):
    known = [v for v in values if v]
    return min(known) if known else None


# --- SXid lines of the kernel log (NVSwitches that the nvidia-nvswitch driver runs) ------------

# The nvswitch driver prints "nvidia-%s: SXid (PCI:%04x:%02x:%02x.%x): %05d, " then its
# message, which starts with "Fatal" or "Non-fatal" (NVSWITCH_PRINT_SXID, NVIDIA's
# open-gpu-kernel-modules src/common/nvswitch). /dev/kmsg prefixes each record with
# "PRIORITY,SEQUENCE,TIMESTAMP,FLAGS;" (TIMESTAMP in microseconds since boot), dmesg with
# "[ seconds.micros]".
_SXID_RE = re.compile(
    r"nvidia-nvswitch\d+: SXid \(PCI:([0-9A-Fa-f]{4}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7])\): "
    r"(\d+), (?:(Fatal|Non-fatal)(?:, (.*))?|(.*))$")
# What the driver prints after an error's SXid line, with the same code (nvswitch_record_error ->
# _nvswitch_dump_error_entry, NVSWITCH_PRINT_SXID_NO_BBX): more about that error, no error itself.
_SXID_MORE_RE = re.compile(r"^(?:Severity \d+ Engine instance|Data \{)")
_KMSG_PREFIX_RE = re.compile(r"^\s*\d+,(\d+),(\d+),[^;]*;")
_DMESG_PREFIX_RE = re.compile(r"^\s*\[\s*(\d+)\.(\d{1,6})\]")


@dataclass(frozen=True)
class SxidEvent:
    """One SXid line: its code, whether it is fatal, the driver's words after the severity, and
    when it was logged (microseconds since boot; None where the line does not say)."""

    code: int
    fatal: bool
    what: str
    usec: int | None = None

    @property
    def logged(self):
        """When, as dmesg prints it ("[5312.345678]"), or "" when not known."""
        return "" if self.usec is None else "[%d.%06d]" % divmod(self.usec, 1000000)


def _usec(line):
    m = _KMSG_PREFIX_RE.match(line)
    if m:
        return int(m.group(2))
    m = _DMESG_PREFIX_RE.match(line)
    if m:
        return int(m.group(1)) * 1000000 + int(m.group(2).ljust(6, "0"))
    return None


def parse_sxid(text):
    """{NVSwitch address: [SxidEvent, ...]} from kernel log text (``/dev/kmsg`` records,
    ``dmesg`` lines, or lines without a prefix), in the order logged. An SXid line the driver
    prints without a severity (NVSWITCH_ERR_HW_HOST_IO_FAILURE's "IO failure", the thermal
    warnings) is a non-fatal one; the lines the driver prints after an error's line, with its
    code ("Severity N Engine instance ...", "Data {...}"), are part of that error. Lines that are
    not SXid lines, or that are cut short, are passed over."""
    found = {}
    for line in (text or "").splitlines():
        m = _SXID_RE.search(line.rstrip())
        if m is None:
            continue
        # A line without a severity ("IO failure", a temperature warning) counts as non-fatal.
        bdf, code, severity, what, other = m.groups()
        if other is not None and _SXID_MORE_RE.match(other.strip()):
            continue
        found.setdefault(bdf.lower(), []).append(
            SxidEvent(int(code), severity == "Fatal", (what or other or "").strip(),
                      _usec(line)))
    return found


def sxid_signals(bdf, events):
    """The Signals of an NVSwitch's SXid events still in the kernel log: a fatal one fails it
    (Fabric Manager must reset the fabric, or the host rebooted), non-fatal ones degrade it
    (reported only). One signal for each, and its reason names the newest such event alone:

    - the kernel keeps a line until its ring buffer wraps, so the same line is found on every
      run; the reason is the same each time, and an admin's clear (which hides the reasons
      showing then) keeps hiding it;
    - a new SXid line is logged at another time: the reason changes, and it counts again;
    - older lines that the ring buffer drops change nothing (a count of the lines would: a clear
      would come undone when the oldest line goes).
    """
    signals = []
    for fatal, state, word in ((True, HEALTH_FAILED, "fatal"),
                               (False, HEALTH_DEGRADED, "non-fatal")):
        group = [e for e in events if e.fatal is fatal]
        if not group:
            continue
        last = group[-1]
        signals.append(Signal(SOURCE_SXID, state, "%s: %s SXid %05d in the kernel log%s%s" % (
            bdf, word, last.code, " at %s" % last.logged if last.logged else "",
            ": %s" % last.what if last.what else "")))
    return tuple(signals)

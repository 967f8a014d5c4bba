# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""A health check, mark or clear, from the host's options to the record written: what the
``gpu_health`` module and the ``gpuvirt-health`` command a converted host runs (at boot, nightly,
and by hand) share. Private to this collection.

The command runs on the host's python3 without Ansible: the collection files it imports sit
under ``GPUVIRT_HEALTH_LIB`` (``kvm_host`` installs the ones in HOST_FILES there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from ansible_collections.gpuvirt.kvm.plugins.module_utils._bdf import normalize_bdf
from ansible_collections.gpuvirt.kvm.plugins.module_utils._deep_check import (
    DEFAULT_DRIVER,
    DEFAULT_NVIDIA_SMI,
    DEFAULT_TIMEOUT,
    DeepCheckError,
    bind,
    driver_loaded,
    driver_of,
    find_nvidia_smi,
    override_of,
    query,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import DomainXmlError
from ansible_collections.gpuvirt.kvm.plugins.module_utils._fabric import (
    DEFAULT_HOOK_CONFIG,
    DEFAULT_HOST_RECORD,
    read_hook_config,
    read_record_platform,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._fabric_model import FabricError
from ansible_collections.gpuvirt.kvm.plugins.module_utils._health import (
    DEFAULT_CORRECTABLE_THRESHOLD,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._health_record import (
    HealthRecordError,
    checked,
    cleared,
    deep_checked,
    empty,
    marked,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._health_store import (
    DEFAULT_HEALTH_RECORD,
    render,
    write_record,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import read_domain
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_context import (
    HostContextError,
    host_context,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
    DEFAULT_URI,
    LibvirtGateway,
    LibvirtGatewayError,
    has_libvirt,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._lock import (
    DEFAULT_LOCK_PATH,
    DEFAULT_LOCK_TIMEOUT,
    HostLock,
    HostLockError,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._nvidia_smi import (
    NvidiaSmiQueryError,
    parse_memory_health,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_pci_vendor

# What the command imports (and they import), and so what a host needs of the collection under
# /usr/local/lib/gpuvirt/health/ansible_collections/gpuvirt/kvm/plugins/module_utils/.
HOST_FILES = ("_health_check", "_bdf", "_deep_check", "_domain", "_fabric", "_fabric_model",
              "_fabric_placement", "_health", "_health_record", "_health_store", "_holdings",
              "_host_context", "_kmsg", "_libvirt", "_lock", "_nics", "_nvidia_smi",
              "_placement_model", "_platform_data", "_platform_file", "_platforms", "_ranges",
              "_sysfs", "_topology", "_units")
CHECK, MARK, CLEAR, SHOW, VET = "check", "mark", "clear", "show", "vet"
NVIDIA_VENDOR = 0x10de

HealthError = (HostContextError, HealthRecordError, HostLockError, DeepCheckError)


def now_utc():
    """The time as the record keeps it: UTC, ISO 8601, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def apply(p, action, bdfs, reason, write=True, deep=None):
    """Check the host (``p``: the host options, with ``health_record``, ``lock_path``,
    ``lock_timeout`` and ``uri``), and mark or clear ``bdfs`` for ``reason``; with ``deep``
    ({driver, nvidia_smi, timeout}), run the deep check of every GPU no VM holds first. Write
    the record when it changes and ``write``. Returns (the HostContext, the record before (None:
    there was none), the record after, the deep check's report or None). Raises one of
    HealthError."""
    bdfs = [normalize_bdf(b) for b in bdfs]
    # Reading alone takes no lock: it changes nothing, and must not create the lock's folder.
    lock = HostLock(p["lock_path"], p["lock_timeout"], owner="gpu health %s" % action) \
        if write or deep is not None else contextlib.nullcontext()
    with lock:
        # With fabric_manager (a shared-NVSwitch host), Fabric Manager's NVLink-failed devices
        # are signals; FM not answering keeps no check from being recorded (the record's last
        # word on them stands: _health_record.carried).
        ctx = host_context(p, bridges=False)
        if ctx.health_record_error:
            raise HealthRecordError(ctx.health_record_error)
        before = ctx.health_record
        record = before or empty()
        kinds = dict([(b, "gpu") for b in ctx.gpu_bdfs]
                     + [(b, "nvswitch") for b in ctx.switch_bdfs])
        now = now_utc()
        report = None
        if deep is not None:
            # Inside the lock: no run of the collection places a VM on a GPU while it is away.
            results, report = deep_check(p, ctx, deep)
            # A record deep_checked returns is judged already: a check would change nothing.
            record = deep_checked(record, results, deep["driver"], ctx.live_health, kinds, now)
        error = (report or {}).get("error")
        if error or (deep is not None and action == CHECK):
            # A deep check that stopped keeps what it found, and a GPU it stranded.
            after = record
        elif action == MARK:
            after = marked(record, bdfs, reason, ctx.live_health, kinds, now)
        elif action == CLEAR:
            after = cleared(record, bdfs, reason, ctx.live_health, kinds, now)
        else:
            after = checked(record, ctx.live_health, kinds, now)
        if write and changed(before, after):
            write_record(p["health_record"] or DEFAULT_HEALTH_RECORD, after)
        if error:
            raise error
    return ctx, before, after, report


def vet(p, domain_xml, platform_of=None):
    """The start check of libvirt's hook (``gpuvirt-health vet`` at "prepare begin", before
    libvirt takes the devices): why the domain defined by ``domain_xml`` must not start, or
    None. It must not when it holds a GPU or NVSwitch of the platform whose health failed (read
    now from sysfs with the health record's marks and clears, as kvm_vm judges a start), when it
    holds one and the health record is broken, or when its devices' health cannot be judged.
    A domain without PCI host devices is let go at once. ``platform_of``: when ``p`` names no
    platform, what reads the one kvm_host converted the host with (only for a domain with host
    devices). Reads only: no lock, no write."""
    try:
        dom = read_domain(domain_xml)
    except DomainXmlError as exc:
        if "<hostdev" not in domain_xml:
            return None  # nothing it could hold
        return "the domain definition libvirt gave cannot be read: %s" % exc
    if not dom.hostdevs:
        return None
    try:
        if not p.get("platform") and platform_of is not None:
            p = dict(p, platform=platform_of() or "auto")
        # Fabric Manager is not asked at a VM's start: its signals only degrade (the record's
        # word on them stands), and the hook must not wait on it.
        ctx = host_context(dict(p, fabric_manager=None), bridges=False)
    except (HostContextError, FabricError) as exc:
        # Only a VM that may hold a GPU or NVSwitch (an NVIDIA function, or one not on the bus
        # to tell) waits for the host to be readable; a NIC's VF alone does not.
        vendors = [read_pci_vendor(p["sysfs_root"], b) for b in dom.hostdevs]
        if all(v is not None and v != NVIDIA_VENDOR for v in vendors):
            return None
        return ("%s: not started: the health of the devices it holds cannot be judged: %s"
                % (dom.name, getattr(exc, "message", None) or exc))
    kinds = dict([(b, "GPU") for b in ctx.gpu_bdfs] + [(b, "NVSwitch") for b in ctx.switch_bdfs])
    mine = [b for b in dom.hostdevs if b in kinds]
    if mine and ctx.health_record_error:
        return "%s: not started: %s" % (dom.name, ctx.health_record_error)
    bad = [b for b in mine if b in ctx.health and ctx.health[b].failed]
    if not bad:
        return None
    return ("%s: not started: it holds %s; remove the VM, or re-place it on healthy devices "
            "(kvm_vm recreate: true), or repair the device (then reboot the host, or clear it "
            "with gpuvirt-health clear --reason WHY ADDRESS) (docs/health.md)" % (
                dom.name, "; ".join("%s %s, which failed its health check (%s)" % (
                    kinds[b], b, ctx.health[b].reason) for b in bad)))


def deep_check(p, ctx, deep):
    """The deep check: every GPU that no defined VM holds and that is on the bus goes to the
    NVIDIA driver (``deep["driver"]``), ``nvidia-smi -q`` reads its ECC, retired pages and
    remapped rows, and it goes back to the driver it had, with its ``driver_override``. Returns
    ({address: ((state, reason), ...)} of each GPU checked, the report: {checked: [...],
    skipped: {address: why}}). A GPU that cannot be put back stops the run (DeepCheckError
    naming it)."""
    sysfs, driver = p["sysfs_root"], deep["driver"]
    if not driver_loaded(sysfs, driver):
        raise DeepCheckError(
            "deep_check: the %s driver is not loaded (%s/bus/pci/drivers/%s is missing): load it "
            "(modprobe %s), or leave the deep check out; no GPU was touched"
            % (driver, sysfs, driver, driver))
    nvidia_smi = find_nvidia_smi(deep["nvidia_smi"])
    held, why = holders(p.get("uri") or DEFAULT_URI)
    if why:
        raise DeepCheckError(
            "deep_check: the VMs' devices cannot be read from libvirt (%s): the deep check "
            "touches no GPU it cannot be sure no VM holds; no GPU was touched" % why)
    if not deep.get("timeout") or deep["timeout"] < 1:
        raise DeepCheckError("deep_check.timeout must be 1 second or more; got %r"
                             % (deep.get("timeout"),))
    results, report = {}, {"checked": [], "skipped": {}}
    for bdf in ctx.gpu_bdfs:
        why = _untouchable(ctx, bdf, held)
        if why:
            report["skipped"][bdf] = why
            continue
        try:
            results[bdf] = _deep_one(sysfs, bdf, driver, nvidia_smi, deep["timeout"])
        except DeepCheckError as exc:
            # What was found so far is kept (the caller writes it, then raises this).
            if exc.stranded:
                results[bdf] = (("failed", "left off its driver by the deep check: %s" % exc),)
            report["error"] = exc
            break
        report["checked"].append(bdf)
    return results, report


def _untouchable(ctx, bdf, held):
    """Why the deep check must leave a GPU alone, or None: a VM holds it, or another function
    of its IOMMU group or slot (vfio-pci refuses a driver beside a group in use, and kernels
    before 5.19 crash), or it failed its sysfs check."""
    if bdf in held:
        return "held by VM %s" % held[bdf][0]
    dev = ctx.topology.pci[bdf]
    if dev.missing or ctx.live_health[bdf].failed:
        return "failed: %s" % ctx.live_health[bdf].reason
    slot = bdf.rsplit(".", 1)[0]
    for other, odev in sorted(ctx.topology.pci.items()):
        if other == bdf or other not in held:
            continue
        if (dev.iommu_group is not None and odev.iommu_group == dev.iommu_group) \
                or other.rsplit(".", 1)[0] == slot:
            return "its IOMMU group or slot shares %s, held by VM %s" % (other, held[other][0])
    return None


# nvidia-smi's exit statuses that say nothing about the GPU (nvidia-smi(1)): bad arguments,
# not supported, no permission, the driver not loaded, NVML missing, not implemented; and its
# words for a driver and library of different versions.
HOST_WIDE = {2, 3, 4, 9, 12, 13}
HOST_WIDE_WORDS = ("Failed to initialize NVML", "Driver/library version mismatch",
                   "couldn't communicate with the NVIDIA driver")


def _deep_one(sysfs, bdf, driver, nvidia_smi, timeout):
    was, override = driver_of(sysfs, bdf), override_of(sysfs, bdf)
    moved = was != driver
    try:
        if moved:
            try:
                bind(sysfs, bdf, driver)
            except DeepCheckError as exc:
                return (("failed", "the %s driver did not take it for the deep check: %s"
                         % (driver, exc)),)
        status, out, err = query(nvidia_smi, bdf, timeout)
    finally:
        if moved:
            try:
                bind(sysfs, bdf, was, override=override)
            except DeepCheckError as exc:
                raise DeepCheckError(
                    "deep_check: GPU %s could not be put back on %s after its deep check (%s); "
                    "the run stopped there. Bind it back (gpuvirt-vfio-bind bind %s), or "
                    "reboot the host" % (bdf, was or "no driver", exc, bdf),
                    stranded=True) from None
    said = (err.strip() or out.strip() or "no output").splitlines()[-1]
    if status in HOST_WIDE or any(w in out + err for w in HOST_WIDE_WORDS):
        raise DeepCheckError(
            "deep_check: %s cannot read GPUs on this host (exit status %s: %s): fix the NVIDIA "
            "driver and its utilities (a driver upgrade needs a reboot); no finding was "
            "recorded for %s" % (nvidia_smi, status, said, bdf))
    if status != 0:
        return (("failed", "nvidia-smi -q could not read it on the %s driver (exit status %s: "
                 "%s)" % (driver, status, said)),)
    try:
        found = parse_memory_health(out)
    except NvidiaSmiQueryError as exc:
        return (("failed", "nvidia-smi -q did not report it: %s" % exc),)
    if bdf not in found:
        return (("failed", "nvidia-smi -q did not list it (it listed %s)"
                 % ", ".join(sorted(found))),)
    return found[bdf]


def changed(before, after):
    """Whether writing ``after`` changes the record."""
    return before is None or render(after) != render(before)


def holders(uri):
    """({address: (domain name, running)} of every defined domain's PCI hostdevs, None), or
    ({}, why) when libvirt cannot be read."""
    if not has_libvirt():
        return {}, "libvirt-python is missing"
    try:
        with LibvirtGateway(uri) as gateway:
            listing = gateway.list_domains(live=True)
        held = {}
        for entry in listing:
            # A running domain's live XML too: a device attached with --live is only there.
            xmls = [entry.xml] + ([entry.live_xml] if entry.live_xml else [])
            for xml in xmls:
                for bdf in read_domain(xml, entry.active).hostdevs:
                    held[bdf] = (entry.name, entry.active)
    except (LibvirtGatewayError, DomainXmlError) as exc:
        return {}, str(exc)
    return held, None


def rows(ctx, record, held):
    """Every GPU and NVSwitch of the platform, in index order, as the record holds it, with its
    holder (``held``: from ``holders``)."""
    entries = record.get("devices") or {}
    missing = {b for b, d in ctx.topology.pci.items() if d.missing}
    out = []
    for kind, bdfs in (("gpu", ctx.gpu_bdfs), ("nvswitch", ctx.switch_bdfs)):
        for index, bdf in enumerate(bdfs):
            holder = held.get(bdf)
            out.append(dict(entries.get(bdf) or {}, address=bdf, kind=kind, index=index,
                            held_by=holder[0] if holder else None, missing=bdf in missing))
    return out


def affected(device_rows, held):
    """The domains that hold a failed device: [{name, running, devices}], by name."""
    vms = {}
    for row in device_rows:
        holder = held.get(row["address"])
        if row.get("state") == "failed" and holder:
            vm = vms.setdefault(holder[0], {"name": holder[0], "running": holder[1],
                                            "devices": []})
            vm["devices"].append(row["address"])
    return sorted(vms.values(), key=lambda v: v["name"])


def stop_affected(uri, vms, timeout):
    """The policy stop: each running VM of ``vms`` (``affected``'s) gets an ACPI shutdown and,
    after ``timeout`` seconds, is powered off; the others keep running. Sets each VM's
    ``stopped`` (``shutdown``, ``destroyed``, or null when it was not running) or ``error``."""
    if timeout < 0:
        raise DeepCheckError("stop_timeout must be 0 or more seconds; got %d" % timeout)
    running = [vm for vm in vms if vm["running"]]
    for vm in vms:
        vm["stopped"] = None
    if not running:
        return vms
    try:
        with LibvirtGateway(uri) as gateway:
            for vm in running:
                try:
                    vm["stopped"] = gateway.shutdown(vm["name"], timeout, force=True)
                    vm["running"] = False
                except LibvirtGatewayError as exc:
                    vm["error"] = str(exc)
    except LibvirtGatewayError as exc:
        for vm in running:
            vm["error"] = str(exc)
    return vms


def affected_message(vm):
    """The warning for a VM that holds failed devices (and what the policy stop did)."""
    done = ""
    if vm.get("error"):
        done = "; stopping it failed: %s" % vm["error"]
    elif vm.get("stopped"):
        done = "; stopped by policy (%s)" % (
            "ACPI shutdown" if vm["stopped"] == "shutdown" else "powered off")
    return ("VM %s holds failed %s%s: it is not started again until %s cleared or it is "
            "re-placed (docs/health.md)" % (
                vm["name"], ", ".join(vm["devices"]), done,
                "it is" if len(vm["devices"]) == 1 else "they are"))


def _parser():
    parser = argparse.ArgumentParser(
        prog="gpuvirt-health",
        description="Check this host's GPUs and NVSwitches into the health record, or mark or "
                    "clear a device (gpuvirt.kvm, docs/health.md).")
    parser.add_argument("--record", default=DEFAULT_HEALTH_RECORD, help="the health record")
    parser.add_argument("--sysfs", default="/sys")
    parser.add_argument("--proc", default="/proc")
    parser.add_argument("--host-record", default=DEFAULT_HOST_RECORD,
                        help="kvm_host's record (slots of a degraded host)")
    parser.add_argument("--platform", help="auto, a platform name or a platform file; by "
                        "default the one kvm_host converted the host with (its record)")
    parser.add_argument("--aer-correctable-threshold", type=int,
                        default=DEFAULT_CORRECTABLE_THRESHOLD)
    parser.add_argument("--uri", default=DEFAULT_URI, help="libvirt, to name the holders")
    parser.add_argument("--lock", default=DEFAULT_LOCK_PATH, help="the host lock")
    parser.add_argument("--lock-timeout", type=int, default=DEFAULT_LOCK_TIMEOUT)
    parser.add_argument("--json", action="store_true", help="print the devices as JSON")
    parser.add_argument("--fabric-config", default=DEFAULT_HOOK_CONFIG, metavar="FILE",
                        help="where a shared-NVSwitch host's Fabric Manager is (the settings "
                             "kvm_host writes for its hook); its NVLink-failed devices are "
                             "signals; \"\" not to ask it")
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser(CHECK, help="read every device's health and record it")
    check.add_argument("--deep", action="store_true",
                       help="also the deep check: each GPU no VM holds goes to the NVIDIA driver "
                            "for nvidia-smi -q (ECC, retired pages, remapped rows) and back")
    check.add_argument("--deep-driver", default=DEFAULT_DRIVER)
    check.add_argument("--nvidia-smi", default=DEFAULT_NVIDIA_SMI)
    check.add_argument("--deep-timeout", type=int, default=DEFAULT_TIMEOUT)
    check.add_argument("--stop-affected", action="store_true",
                       help="stop (ACPI shutdown, then power off) each running VM that holds a "
                            "failed device; the others keep running")
    check.add_argument("--stop-timeout", type=int, default=60,
                       help="seconds of ACPI shutdown before the power is cut")
    sub.add_parser(SHOW, help="read and print, without writing")
    one = sub.add_parser(VET, help="libvirt's hook at a VM's start: exit 1, saying why, when "
                                   "the domain on stdin holds a failed GPU or NVSwitch")
    one.add_argument("--domain-xml", default="-", metavar="FILE",
                     help="the domain's definition (default: stdin, as libvirt gives it)")
    for name, what in ((MARK, "mark devices failed"), (CLEAR, "clear devices")):
        one = sub.add_parser(name, help=what)
        one.add_argument("--reason", required=True, help="kept in the record")
        one.add_argument("devices", nargs="+", metavar="ADDRESS")
    return parser


def fabric_settings(path):
    """(the fabric_manager mapping, None) from the settings kvm_host writes for its libvirt hook
    on a shared-NVSwitch host (``{}``: Fabric Manager on this host, fmpm on PATH), or (None,
    None) when there is no such file, or (None, why) when it cannot be used."""
    if not os.path.exists(path):
        return None, None
    try:
        found = read_hook_config(path)
    except FabricError as exc:
        return None, exc.message
    wait = found.get("starting_wait", 60)
    if isinstance(wait, bool) or not isinstance(wait, int) or wait < 0:
        return None, "%s: starting_wait is %r, not a number of seconds" % (path, wait)
    return {"address": found.get("address"), "fmpm": found.get("fmpm"),
            "starting_wait": wait, "service_vm": found.get("service_vm")}, None


def unread_lines(ctx):
    """What a health command says of the sources a check could not read."""
    return ["%s not read (%s); the health record's last word on it stands" % (
        "Fabric Manager" if source == "fabric-manager" else "the kernel log's SXid lines", why)
        for source, why in sorted(ctx.unread_sources.items())]


def _line(row):
    what = "%s%d %s" % ("GPU" if row["kind"] == "gpu" else "NVSwitch", row["index"],
                        row["address"])
    state = row.get("state", "ok")
    tail = " (%s, since %s)" % (row["reason"], row.get("since")) if state != "ok" else ""
    holder = " -> %s" % row["held_by"] if row.get("held_by") else ""
    return "%-28s %s%s%s" % (what, state.upper() if state == "failed" else state, tail, holder)


def main(argv=None, stdout=None, stderr=None, stdin=None):
    """``gpuvirt-health``: 0 when done (whatever the devices' health), 1 when it cannot be;
    ``vet``: 0 when the VM may start, 1 when it may not."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    args = _parser().parse_args(argv)
    p = {"sysfs_root": args.sysfs, "proc_root": args.proc, "platform": args.platform,
         "nvidia_smi_topo": None, "unhealthy_gpus": [], "reserved_cpus": None,
         "reserved_memory_mb": None, "fabric_manager": None, "host_record": args.host_record,
         "aer_correctable_threshold": args.aer_correctable_threshold,
         "health_record": args.record, "lock_path": args.lock, "lock_timeout": args.lock_timeout,
         "uri": args.uri}
    deep = None
    if args.action not in (VET, SHOW) and args.fabric_config:
        p["fabric_manager"], why = fabric_settings(args.fabric_config)
        if why:
            stderr.write("gpuvirt-health: %s: Fabric Manager is not asked this run\n" % why)
    if getattr(args, "deep", False):
        deep = {"driver": args.deep_driver, "nvidia_smi": args.nvidia_smi,
                "timeout": args.deep_timeout}
    reason = (getattr(args, "reason", "") or "").strip()
    if args.action == VET:
        try:
            if args.domain_xml == "-":
                xml = sys.stdin.read() if stdin is None else stdin.read()
            else:
                with open(args.domain_xml, encoding="utf-8") as f:
                    xml = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            stderr.write("gpuvirt-health: vet: cannot read %s: %s\n" % (args.domain_xml, exc))
            return 1
        try:
            why = vet(p, xml, platform_of=lambda: read_record_platform(args.host_record))
        except (OSError, ValueError) as exc:
            # A sysfs or record file that cannot be read mid-way (a device gone from the bus):
            # libvirt shows this text, a reason rather than a traceback, and the VM does not
            # start.
            why = "not started: the start check could not read the host: %s: %s" % (
                type(exc).__name__, exc)
        if why:
            stderr.write("gpuvirt-health: %s\n" % why)
        return 1 if why else 0
    if not args.platform:
        try:
            p["platform"] = read_record_platform(args.host_record) or "auto"
        except FabricError as exc:
            stderr.write("gpuvirt-health: %s\n" % exc.message)
            return 1
    if args.action in (MARK, CLEAR) and not reason:
        stderr.write("gpuvirt-health: --reason must say why (it is kept in the record)\n")
        return 1
    try:
        ctx, before, after, report = apply(p, args.action, getattr(args, "devices", []), reason,
                                           write=args.action != SHOW, deep=deep)
    except HealthError as exc:
        stderr.write("gpuvirt-health: %s\n" % exc)
        return 1
    if args.action != SHOW and (p["fabric_manager"] or "sxid" in ctx.unread_sources):
        for line in unread_lines(ctx):
            stderr.write("gpuvirt-health: %s\n" % line)
    held, why = holders(args.uri)
    if why:
        stderr.write("gpuvirt-health: holders not read: %s\n" % why)
        if getattr(args, "stop_affected", False):
            stderr.write("gpuvirt-health: --stop-affected: no VM was stopped: which VMs hold a "
                         "failed device is not known\n")
            return 1
    device_rows = rows(ctx, after, held)
    if args.json:
        stdout.write(json.dumps(device_rows, indent=2, sort_keys=True) + "\n")
    else:
        for row in device_rows:
            stdout.write(_line(row) + "\n")
    vms = affected(device_rows, held)
    if getattr(args, "stop_affected", False):
        try:
            stop_affected(args.uri, vms, args.stop_timeout)
        except DeepCheckError as exc:
            stderr.write("gpuvirt-health: %s\n" % exc)
            return 1
    for vm in vms:
        stderr.write("gpuvirt-health: %s\n" % affected_message(vm))
    if report:
        stderr.write("gpuvirt-health: deep check: %s checked; %s\n" % (
            ", ".join(report["checked"]) or "no GPU",
            "; ".join("%s skipped (%s)" % item for item in sorted(report["skipped"].items()))
            or "none skipped"))
    if args.action != SHOW:
        stderr.write("gpuvirt-health: %s %s\n" % (
            args.record, "written" if changed(before, after) else "unchanged"))
    return 1 if any(vm.get("error") for vm in vms) else 0

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What one run knows about the host, read once from the host options; its libvirt. Private.

``gpu_topology``, ``kvm_vm`` and ``kvm_layout`` share it: the topology (through the sysfs
gateway), the platform (auto-detected, named, or a platform file) and why, the NVLink counts
when ``nvidia_smi_topo`` is given, the host's bridges, the host-wide placement settings
(reserved CPUs and memory, unhealthy GPUs), and the GPUs' and NVSwitches' health (sysfs; on a
shared-NVSwitch host also the SXid lines of the kernel log and, with ``fabric_manager``, Fabric
Manager's NVLink-failed devices) with the health record's marks and clears; and the connection
to libvirt that the ``uri`` option names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ansible_collections.gpuvirt.kvm.plugins.module_utils._fabric import (
    DEFAULT_HOST_RECORD,
    FabricManager,
    read_fabric_record,
    read_record_slots,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._fabric_model import FabricError
from ansible_collections.gpuvirt.kvm.plugins.module_utils._fabric_placement import (
    FabricPlacementError,
    fabric_view,
    fm_bus_ids,
    module_map,
    nvlink_signals,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._health import (
    DEFAULT_CORRECTABLE_THRESHOLD,
    SOURCE_FABRIC_MANAGER,
    SOURCE_SXID,
    DeviceHealth,
    judge,
    parse_sxid,
    sxid_signals,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._health_record import (
    HealthRecordError,
    carried,
    effective,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._health_store import (
    DEFAULT_HEALTH_RECORD,
    read_record,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._kmsg import (
    KernelLogError,
    kernel_log_path,
    read_kernel_log,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
    DEFAULT_URI,
    LibvirtGateway,
    LibvirtGatewayError,
    has_libvirt,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._nvidia_smi import (
    NvidiaSmiTopoError,
    nvlinks_for_host,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platform_file import get_platform
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
    FABRIC_SHARED_NVSWITCH,
    PlatformError,
    detect,
    detect_degraded,
    platform_gpus,
    platform_nvswitches,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import (
    read_bridges,
    read_host,
    read_pci_health,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._topology import (
    TopologyError,
    with_missing,
)

DEFAULT_DISK_DIR = "/var/lib/gpuvirt/disks"


class HostContextError(Exception):
    """The host options do not describe a usable host; the message names the option."""


@dataclass
class HostContext:
    """What one run knows about the host: read once, shared by every VM of a layout."""

    topology: object
    platform: object
    store: object = None  # _image_store.ImageStore (kvm_vm, kvm_layout)
    disk_dir: str = DEFAULT_DISK_DIR
    reserved_cpus: object = None
    reserved_memory_mb: object = None
    unhealthy_gpus: tuple = ()
    nvlinks: dict | None = None
    bridges: tuple = ()  # host bridges (from sysfs)
    platform_reason: str = ""
    busy_gpus: dict = field(default_factory=dict)  # address -> why (active FM partitions)
    fabric: dict | None = None  # shared NVSwitch with fabric_manager: FM's partitions, reported
    fabric_error: str | None = None  # fabric_manager set, but FM or the module map failed
    health: dict = field(default_factory=dict)  # address -> _health.DeviceHealth (GPUs, switches)
    live_health: dict = field(default_factory=dict)  # the same read now, before the record
    health_record: dict | None = None  # the health record read (None: there is none)
    health_record_error: str | None = None  # it could not be read: nothing is placed or started
    failed_switches: tuple = ()  # NVSwitches whose health failed: no block that needs one
    # Health sources this run did not read (a shared-NVSwitch host's kernel log, Fabric
    # Manager): {source: why}; their signals are the health record's (carried).
    unread_sources: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    _bdfs: dict = field(default_factory=dict, repr=False)

    @property
    def gpu_bdfs(self):
        """The platform's GPUs on this host, in index (PCI bus) order."""
        if "gpus" not in self._bdfs:
            self._bdfs["gpus"] = [d.bdf for d in platform_gpus(self.topology, self.platform)]
        return self._bdfs["gpus"]

    @property
    def switch_bdfs(self):
        """The platform's NVSwitches on this host, in index order."""
        if "switches" not in self._bdfs:
            self._bdfs["switches"] = [d.bdf for d in platform_nvswitches(self.topology,
                                                                         self.platform)]
        return self._bdfs["switches"]


def host_context(p, store=None, bridges=True):
    """Read the host once for a run from the host options (the gpuvirt.kvm.host fragment).

    ``store``: the image store of the run, if it has one; ``bridges``: read the host's network
    bridges too (a VM's NICs may name one).
    """
    try:
        topology = read_host(p["sysfs_root"], p["proc_root"])
        if p.get("platform") in (None, "auto"):
            platform, reason = detect(topology)
            if platform.name == "generic":
                topology, platform, reason = _degraded(p, topology, platform, reason)
        else:
            platform, reason = get_platform(p["platform"], topology), "named by the platform option"
        nvlinks = None
        if p.get("nvidia_smi_topo"):
            nvlinks = nvlinks_for_host(p["nvidia_smi_topo"],
                                       len(platform_gpus(topology, platform)), p["sysfs_root"])
    except (TopologyError, PlatformError, NvidiaSmiTopoError) as exc:
        raise HostContextError(str(exc)) from exc
    busy, fabric, fabric_error, warnings, found = {}, None, None, [], {}
    if platform.fabric == FABRIC_SHARED_NVSWITCH and p.get("fabric_manager"):
        try:
            platform, busy, fabric, found = live_fabric(p, platform, topology)
        except HostContextError as exc:
            # Stopping, removing or keeping VMs needs no FM; placing GPUs does (_vm_plan).
            fabric_error = str(exc)
    elif platform.fabric == FABRIC_SHARED_NVSWITCH:
        warnings.append(
            "platform %s: fabric_manager is not set, so partitions come from the built-in table "
            "with module IDs assumed to follow PCI order, and VMs record no partition for the "
            "collection's libvirt hook to activate: multi-GPU VMs get no NVLink. Set "
            "fabric_manager and install the hook (docs/fabric.md)" % platform.name)
    unread = {}  # sources this run did not read, and why: the record's word on them stands
    if platform.fabric == FABRIC_SHARED_NVSWITCH:
        if fabric is None:
            unread[SOURCE_FABRIC_MANAGER] = fabric_error or "fabric_manager is not set"
        before = len(warnings)
        sxid = kernel_log_health(
            p, [d.bdf for d in platform_nvswitches(topology, platform)], warnings)
        if sxid is None:
            unread[SOURCE_SXID] = warnings[before] if len(warnings) > before else "not read"
        found = _joined(found, sxid or {})
    live, record, record_error = live_health(p, topology, platform, found), None, None
    try:
        record = read_health_record(p)
    except HostContextError as exc:
        # Stopping and removing VMs, and reverting the host, need no record; placing and
        # starting do (_vm_plan), and gpu_health refuses to write over it.
        record_error = str(exc)
        warnings.append("%s; until it is, no GPU VM is placed or started (stopping and "
                        "removing go ahead)" % record_error)
    live = carried(live, record, unread)
    health, failed_gpus, failed_switches = device_health(
        live, record, {d.bdf for d in platform_gpus(topology, platform)}, platform, warnings)
    manual = tuple(p.get("unhealthy_gpus") or ())
    return HostContext(
        topology=topology, platform=platform, platform_reason=reason, store=store,
        disk_dir=p.get("disk_dir") or DEFAULT_DISK_DIR, reserved_cpus=p.get("reserved_cpus"),
        reserved_memory_mb=p.get("reserved_memory_mb"),
        unhealthy_gpus=manual + tuple(b for b in failed_gpus if b not in manual),
        nvlinks=nvlinks, bridges=read_bridges(p["sysfs_root"]) if bridges else (),
        busy_gpus=busy, fabric=fabric, fabric_error=fabric_error, health=health,
        live_health=live, health_record=record, health_record_error=record_error,
        failed_switches=tuple(failed_switches), unread_sources=unread,
        warnings=warnings)


def _degraded(p, topology, platform, reason):
    """A host detected as generic that the host record says was a known platform, with GPUs or
    NVSwitches gone since: that platform, its missing devices kept in their slots."""
    try:
        slots = read_record_slots(p.get("host_record") or DEFAULT_HOST_RECORD)
    except FabricError:
        return topology, platform, reason  # the record is read again, and refused, elsewhere
    try:
        found = detect_degraded(topology, slots)
        if found is None:
            return topology, platform, reason
        known, _missing, why = found
        anchored = with_missing(topology, slots)
    except (KeyError, ValueError, TypeError, AttributeError):
        return topology, platform, reason  # slots not as kvm_host writes them: not used
    # Every recorded slot must now hold one of the platform's GPUs or NVSwitches (found, or a
    # stand-in), or the indexes would not line up with its partitions.
    if (len(platform_gpus(anchored, known)) != known.gpu_count
            or len(platform_nvswitches(anchored, known)) != known.nvswitch_count):
        return topology, platform, reason
    return anchored, known, why


def _joined(*maps):
    joined = {}
    for signals in maps:
        for bdf, more in signals.items():
            joined[bdf] = joined.get(bdf, ()) + tuple(more)
    return joined


def live_health(p, topology, platform, found=None):
    """The platform's GPUs' and NVSwitches' health read from sysfs now
    (``aer_correctable_threshold``), with the signals of other sources (``found``: {address:
    (Signal, ...)}: SXid lines, Fabric Manager's NVLink failures): {address: DeviceHealth},
    GPUs first."""
    threshold = p.get("aer_correctable_threshold")
    if threshold is None:
        threshold = DEFAULT_CORRECTABLE_THRESHOLD
    if threshold < 0:
        raise HostContextError(
            "aer_correctable_threshold must be a number of errors, 0 or more; got %d" % threshold)
    found = found or {}
    health = {}
    for d in list(platform_gpus(topology, platform)) + list(platform_nvswitches(topology,
                                                                                platform)):
        health[d.bdf] = judge(d.bdf, read_pci_health(p["sysfs_root"], d.bdf), threshold)
        if found.get(d.bdf):
            health[d.bdf] = DeviceHealth(d.bdf, health[d.bdf].signals + tuple(found[d.bdf]))
    return health


def kernel_log_health(p, switch_bdfs, warnings):
    """{NVSwitch address: (Signal, ...)} of the SXid lines in the kernel log (``dev/kmsg``
    beside ``sysfs_root``), for a shared-NVSwitch host, whose switches the nvidia-nvswitch
    driver runs where Fabric Manager runs on the host. Each line names its switch by PCI
    address. A log that cannot be read gives a warning and None (the run goes on, with what the
    health record says of them); lines naming no switch of the platform give a warning."""
    path = kernel_log_path(p["sysfs_root"])
    try:
        lines = read_kernel_log(path, contains="SXid")
    except KernelLogError as exc:
        warnings.append("%s: the NVSwitches' SXid errors are not read this run; the health "
                        "record's last word on them stands (docs/health.md)" % exc)
        return None
    events = parse_sxid("\n".join(lines))
    others = sorted(b for b in events if b not in switch_bdfs)
    if others:
        warnings.append("the kernel log %s has SXid lines of %s, which %s not an NVSwitch of "
                        "this platform; they are not counted" % (
                            path, ", ".join(others), "is" if len(others) == 1 else "are"))
    return {b: sxid_signals(b, events[b]) for b in switch_bdfs if events.get(b)}


def read_health_record(p):
    """The health record the ``health_record`` option names (None when there is none);
    HostContextError when it cannot be read or is not one."""
    try:
        return read_record(p.get("health_record") or DEFAULT_HEALTH_RECORD)
    except HealthRecordError as exc:
        raise HostContextError(str(exc)) from None


def device_health(live, record, gpu_bdfs, platform, warnings):
    """{address: DeviceHealth} as placement obeys it (``live`` with the health record's marks
    and clears; ``gpu_bdfs``: which of them are GPUs), the GPUs that failed and the NVSwitches
    that failed. Each failed device gets a warning."""
    entries = (record or {}).get("devices") or {}
    health = {b: effective(b, h, entries.get(b)) for b, h in live.items()}
    gpus = [b for b in live if b in gpu_bdfs]
    switches = [b for b in live if b not in gpu_bdfs]
    failed = [b for b in gpus if health[b].failed]
    for bdf in failed:
        warnings.append("GPU %s failed its health check: %s; no VM is given it (docs/health.md)"
                        % (bdf, health[bdf].reason))
    failed_switches = [b for b in switches if health[b].failed]
    for bdf in failed_switches:
        warnings.append("NVSwitch %s failed its health check: %s; %s (docs/health.md)" % (
            bdf, health[bdf].reason,
            "Fabric Manager uses it for the partitions it serves (shared NVSwitch): check them "
            "with fmpm, and a Fabric Manager service VM that holds it is not started"
            if platform.fabric == FABRIC_SHARED_NVSWITCH
            else "no VM is given a block that needs it"))
    return health, failed, failed_switches


def fabric_manager(p):
    """The FabricManager that the ``fabric_manager`` option names."""
    opts = p["fabric_manager"]
    return FabricManager(address=opts.get("address"), fmpm=opts.get("fmpm"),
                         starting_wait=opts.get("starting_wait", 120))


def module_id_sources(platform, listing, record, service_vm=None):
    """The module maps in precedence order, for ``module_map``. A platform file overrides; FM's
    own pciBusId (DGX-2, A100) comes before what the host record learned (``record``: (label,
    map)); H100 and later give no address, so the record's map serves there. FM in a service VM
    (``service_vm``) names the addresses the GPUs have inside that VM, not the host's: its
    pciBusId is never read then."""
    return [("platform file %s" % platform.source, platform.module_ids),
            ("Fabric Manager's pciBusId", {} if service_vm else fm_bus_ids(listing)),
            record]


def live_fabric(p, platform, topology):
    """A shared-NVSwitch host with ``fabric_manager``: (the platform with FM's live partitions,
    busy GPUs {address: why}, the fabric report, the health signals of the GPUs and NVSwitches
    FM reports NVLink failures on {address: (Signal, ...)}). Raises HostContextError when a
    GPU has no module ID or FM cannot answer."""
    gpus = [d.bdf for d in platform_gpus(topology, platform)]
    switches = [d.bdf for d in platform_nvswitches(topology, platform)]
    try:
        record = read_fabric_record(p.get("host_record") or DEFAULT_HOST_RECORD)
        fm = fabric_manager(p)
        listing = fm.partitions()
        # FM in a service VM: the option, else what kvm_host recorded (a hand-written
        # fabric_manager mapping may leave it out).
        service_vm = p["fabric_manager"].get("service_vm") or record.get("service_vm")
        ids = module_map(gpus, module_id_sources(
            platform, listing, ("host record %s" % p.get("host_record"),
                                record.get("module_ids") or {}),
            service_vm=service_vm))
        failures = fm.nvlink_failures()
        view = fabric_view(listing, ids, gpus, failures,
                           fm.unsupported_partitions(), by_address=not service_vm)
    except FabricPlacementError as exc:
        raise HostContextError(str(exc)) from exc
    except FabricError as exc:
        raise HostContextError("fabric_manager: %s" % exc.message) from exc
    source = "%s, partitions from Fabric Manager at %s" % (platform.source, fm.address)
    live = replace(view.platform(platform), source=source)
    report = dict(view.report(gpus), address=fm.address)
    signals = nvlink_signals(failures, gpus + switches, fm.address, by_address=not service_vm)
    return live, view.busy_gpus(gpus), report, signals


def resolve_uri(uri):
    """The URI to use: the option (or LIBVIRT_DEFAULT_URI), else qemu:///system."""
    return uri or DEFAULT_URI


def connect_or_fail(module):
    """A LibvirtGateway for the module's uri option, or fail_json saying what is missing."""
    from ansible.module_utils.basic import missing_required_lib

    if not has_libvirt():
        module.fail_json(msg=missing_required_lib("libvirt-python"))
    try:
        return LibvirtGateway(resolve_uri(module.params["uri"]))
    except LibvirtGatewayError as exc:
        module.fail_json(msg="uri: %s" % exc)

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Desired VMs against the host as observed -> what must happen to each. Private, pure.

:func:`plan` is a function of the requests, a ``_vm_observe.Snapshot`` and the host context:
it places the VMs that need devices (``_placement``), builds each one's desired ``VmSpec``,
compares it with the VM libvirt holds, and lists the steps that take one to the other
(``create_overlay``, ``define``, ``start``, ...). ``_vm_apply`` carries the steps out.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ansible_collections.gpuvirt.kvm.plugins.module_utils._cloud_init import digest, render
from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import holdings
from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import nic_functions
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement import HostState
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import PlacementError
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
    gpu_model_ids,
    gpu_model_name,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._units import GIB
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_request import (
    VmError,
    placement_request,
    resolve,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_spec import (
    DiskSpec,
    SpecError,
    make_spec,
    spec_diff,
)

PREPARE = "prepare"  # files and definitions: done under the host lock, one VM after another
POWER = "power"  # start, stop, undefine, remove: outside the lock, VMs in parallel


@dataclass
class VmPlan:
    """What converging one VM means: the comparison, and the steps that follow from it."""

    request: object  # _vm_request.VmRequest, resolved
    exists: bool = False
    active: bool = False
    uuid: str | None = None
    actual: object = None  # VmSpec of the VM libvirt holds
    desired: object = None  # VmSpec it is to have
    previous_xml: str | None = None  # its definition as found (a failed redefine restores it)
    diff: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)  # ("create_overlay", path), ... in order
    files_to_remove: list = field(default_factory=list)
    kept: list = field(default_factory=list)  # data disks left in place on absent
    reboot_required: bool = False
    seed_files: dict | None = None
    grow: list = field(default_factory=list)  # (path, GiB, bytes now, live): disks to grow
    error: str | None = None
    held: bool = False  # not applied: a layout applied whole, and another entry failed
    irreversible: bool = False  # a step was done that has no undo (a stop, a removal, ...)
    undone: bool = False  # failed, and everything the run had done was undone
    undo: list = field(default_factory=list)  # what this run did, to undo on failure

    @property
    def changed(self):
        return bool(self.steps)


def disk_paths(disk_dir, name):
    """Where a VM's own files live (named after the VM, so a rerun finds them)."""
    base = disk_dir.rstrip("/") or "/"
    join = "%s%s" if base.endswith("/") else "%s/%s"
    return {
        "os": join % (base, "%s-os.qcow2" % name),
        # An image move builds the new OS overlay here (or back at "os", when the VM is on
        # this one), so that the old one stays until the VM has started on the new.
        "os_alt": join % (base, "%s-os-alt.qcow2" % name),
        "data": join % (base, "%s-data.qcow2" % name),
        "seed": join % (base, "%s-seed.iso" % name),
    }


def own_disks(spec):
    """The VM's disks that gpuvirt made: recorded in its metadata, named after the VM."""
    own = disk_paths("", spec.name)
    names = {role: {own[role].rsplit("/", 1)[-1]} for role in ("os", "data", "seed")}
    names["os"].add(own["os_alt"].rsplit("/", 1)[-1])
    return [d for d in spec.disks if d.recorded and d.role in names
            and (d.path or "").rsplit("/", 1)[-1] in names[d.role]]


def os_path(spec, own=False):
    """The path of a spec's OS disk (with ``own``, only one gpuvirt made), or None."""
    disks = own_disks(spec) if own else spec.disks
    return next((d.path for d in disks if d.role == "os"), None)


def other_os_path(paths, current):
    """The OS overlay path a move builds on: the one of "os" and "os_alt" the VM is not on."""
    return paths["os_alt"] if current == paths["os"] else paths["os"]


def image_move(req, actual):
    """Whether ``req.image`` moves an existing VM to another image (name, or name-version).

    The image's name alone keeps the version the VM is on: a new default version of the name
    moves no VM; name-version or another name does."""
    if not req.image or actual is None or not actual.image:
        return False
    return req.image not in (actual.image, "%s-%s" % (actual.image, actual.image_version))


def plan(requests, snap, ctx, whole=False):
    """[VmPlan] in request order. An entry that cannot be converged gets .error and the others
    still plan; with ``whole`` (a layout applied whole or not at all) they are then held."""
    domains = snap.domains
    for req in requests:
        dom = domains.get(req.name)
        if dom is not None and not dom.managed:
            raise VmError(
                "%s: a domain of that name exists and was not created by gpuvirt.kvm (it has "
                "no gpuvirt metadata); it is left alone - choose another name" % req.name)
    try:
        state = HostState(
            ctx.topology, ctx.platform,
            holdings(list(domains.values()), ctx.gpu_bdfs, ctx.switch_bdfs,
                     nic_functions(ctx.topology, ctx.platform)),
            reserved_cpus=ctx.reserved_cpus, reserved_memory_mb=ctx.reserved_memory_mb,
            unhealthy_gpus=ctx.unhealthy_gpus, nvlinks=ctx.nvlinks, busy_gpus=ctx.busy_gpus,
            failed_switches=ctx.failed_switches)
    except PlacementError as exc:  # host-wide options (reserved_cpus, ...) are bad
        raise VmError(str(exc)) from exc
    plans = []
    placing = []
    for req in requests:
        vp = VmPlan(request=req)
        dom = domains.get(req.name)
        if dom is not None:
            vp.exists, vp.active, vp.uuid = True, dom.active, dom.uuid
            vp.actual = snap.specs[req.name]
            vp.previous_xml = dom.xml
        # NICs a VM already has are not checked again: stopping a VM whose network was
        # deleted since must still work.
        check_networks = req.networks is not None or vp.actual is None
        vp.request = req = resolve(req, vp.actual)
        plans.append(vp)
        if req.state == "absent":
            state.release(req.name)  # what it frees is free for the others in this run
            continue
        vp.error = _refusal(vp, ctx) or (
            _network_problem(req, snap.networks, ctx.bridges) if check_networks else None)
        if vp.error is None:
            placing.append(vp)
    outcomes = state.plan([placement_request(vp.request) for vp in placing])
    for vp, (_req, outcome) in zip(placing, outcomes):
        if isinstance(outcome, PlacementError):
            vp.error = str(outcome)
            continue
        if ctx.fabric_error and outcome.gpus and sorted(outcome.gpus) != sorted(
                vp.actual.gpus if vp.actual is not None else ()):
            # New GPUs (a move, a model change, an unhealthy GPU) need FM's live list.
            vp.error = "%s: %s" % (vp.request.name, ctx.fabric_error)
            continue
        try:
            _desired(vp, outcome, snap, ctx)
        except (VmError, SpecError) as exc:
            vp.error = str(exc)
            continue
        if _moves_devices(vp) and vp.active and not vp.request.recreate:
            # Caught before placing (gpu_index, count); kept as a guard: the running QEMU
            # holds the old devices, which must never look free to a later run.
            vp.error = (
                "%s: the running VM holds GPU(s) %s%s and would be re-placed on %s%s; set "
                "recreate: true to stop, re-place and restart it" % (
                    vp.request.name, ", ".join(vp.actual.gpus) or "none",
                    " and rail NIC(s) %s" % ", ".join(vp.actual.nics) if vp.actual.nics else "",
                    ", ".join(vp.desired.gpus) or "none",
                    " and rail NIC(s) %s" % ", ".join(vp.desired.nics) if vp.desired.nics
                    else ""))
    for vp in plans:
        if vp.error is None:
            _steps(vp, snap, ctx)
        if vp.error is None:
            vp.error = _failed_devices(vp, ctx)
            if vp.error is not None:  # refused whole: nothing of it is done
                vp.steps, vp.grow, vp.reboot_required = [], [], False
                vp.kept, vp.files_to_remove = [], []
    if whole and any(vp.error is not None for vp in plans):
        for vp in plans:
            if vp.error is None:
                vp.held, vp.steps, vp.grow, vp.reboot_required = True, [], [], False
                vp.kept, vp.files_to_remove = [], []
    return plans


def _failed_devices(vp, ctx):
    """A VM this run would start that holds a GPU or NVSwitch whose health failed is not
    started: the error names each device and why (docs/health.md). None when it may start."""
    if ("start", vp.request.name) not in vp.steps or vp.desired is None:
        return None
    held = (("GPU", vp.desired.gpus), ("NVSwitch", vp.desired.nvswitches))
    bad = [(kind, bdf, ctx.health[bdf]) for kind, bdfs in held
           for bdf in bdfs if bdf in ctx.health and ctx.health[bdf].failed]
    if not bad:
        return None
    fix = ("remove the VM, or set recreate: true to re-place it on healthy devices, or repair "
           "the device (then reboot the host, or clear it with gpu_health action=clear or "
           "gpuvirt-health clear)" if not vp.request.fabric_manager_vm
           else "repair the device (then reboot the host, or clear it with gpu_health "
           "action=clear or gpuvirt-health clear; the service VM needs every NVSwitch)")
    return "%s: not started: it holds %s; %s (docs/health.md)" % (
        vp.request.name, "; ".join("%s %s, which failed its health check (%s)" % (
            kind, bdf, health.reason) for kind, bdf, health in bad), fix)


# --- refusals before placing -------------------------------------------------------------------

def _refusal(vp, ctx):
    """Why a VM must not be re-placed as asked (its running QEMU holds the old devices)."""
    req = vp.request
    if ctx.health_record_error and req.gpus and req.state in ("running", "present"):
        # Placing GPUs, or starting a VM on them, needs the admins' marks; a VM that keeps what
        # it holds and is not started (running already, or present) does not.
        keeps = vp.actual is not None and len(vp.actual.gpus) == req.gpus
        if not keeps or (req.state == "running" and not vp.active):
            return "%s: %s" % (req.name, ctx.health_record_error)
    if ctx.fabric_error and req.gpus and not (vp.actual is not None
                                              and len(vp.actual.gpus) == req.gpus):
        # A VM that keeps the GPUs it holds needs no answer from FM; a new placement does (a
        # move to other GPUs of the same count is caught after placing, in plan()).
        return "%s: %s" % (req.name, ctx.fabric_error)
    if vp.exists and vp.actual is not None and len(vp.actual.gpus) != req.gpus \
            and vp.active and not req.recreate:
        return ("%s: gpus is %d but the running VM holds %d GPU(s); a GPU count change "
                "re-places the VM: set recreate: true to stop, re-place and restart it"
                % (req.name, req.gpus, len(vp.actual.gpus)))
    wanted = _models_named(req.gpu_model)
    if vp.active and not req.recreate and wanted is not None and vp.actual.gpus:
        held = sorted(set(ctx.topology.pci[b].id_pair for b in vp.actual.gpus
                          if b in ctx.topology.pci) - wanted)
        if held:
            # As a move: the running QEMU holds its GPUs, which must not look free.
            return ("%s: gpu_model is %s but the running VM holds GPU(s) of model %s; that "
                    "re-places the VM: set recreate: true to stop, re-place and restart it, or "
                    "leave gpu_model out to keep its GPUs" % (
                        req.name, req.gpu_model, ", ".join(gpu_model_name(m) for m in held)))
    if vp.active and not req.recreate and req.gpu_index is not None and vp.actual.gpus:
        index = {b: i for i, b in enumerate(ctx.gpu_bdfs)}
        held = sorted(index[b] for b in vp.actual.gpus if b in index)
        if held and held[0] != req.gpu_index:
            # The running QEMU still holds its GPUs: moving them now would let the next run
            # hand them out a second time.
            return ("%s: gpu_index is %d but the running VM holds GPU(s) %s; moving it "
                    "re-places the VM: set recreate: true to stop, re-place and restart it, "
                    "or leave gpu_index out to keep its GPUs" % (
                        req.name, req.gpu_index, ", ".join(str(i) for i in held)))
    return None


def _models_named(gpu_model):
    """The (vendor, device) pairs a request's gpu_model names; None for none or any."""
    if gpu_model is None:
        return None
    try:
        return gpu_model_ids(gpu_model)
    except ValueError:
        return None  # the request checked it; placement says why again


def _network_problem(req, networks, bridges):
    for n, net in enumerate(req.networks):
        if net.type == "network":
            if net.source not in networks:
                return ("%s: networks[%d].network: libvirt has no network %r (it has: %s); "
                        "create it or pick one of those" % (
                            req.name, n, net.source, ", ".join(sorted(networks)) or "none"))
            if not networks[net.source]:
                return ("%s: networks[%d].network: %r is not active; start it (virsh "
                        "net-start %s)" % (req.name, n, net.source, net.source))
        elif net.type == "bridge" and net.source not in bridges:
            return ("%s: networks[%d].bridge: the host has no bridge %r (bridges: %s)" % (
                req.name, n, net.source, ", ".join(bridges) or "none"))
    return None


# --- the desired VM ------------------------------------------------------------------------------

def _desired(vp, placement, snap, ctx):
    req = vp.request
    paths = disk_paths(ctx.disk_dir, req.name)
    actual_disks = {d.role: d for d in own_disks(vp.actual)} if vp.actual else {}
    disks = []
    image_name = image_version = None
    moving = "os" in actual_disks and image_move(req, vp.actual)
    if "os" in actual_disks and not moving:
        # An existing OS disk stays on the base it was made from: re-basing an overlay
        # would corrupt it. A move builds a new overlay instead (below).
        os_disk = actual_disks["os"]
        image_name, image_version = vp.actual.image, vp.actual.image_version
        disks.append(replace(os_disk, size_gb=_size(
            vp, snap, os_disk.path, req.os_disk_gb, os_disk.size_gb, "os_disk_size")))
    elif req.image:
        found = snap.images[req.image]
        if isinstance(found, str):
            raise VmError("%s: %s" % (req.name, found) if moving else found)
        image, real_path = found
        image_name, image_version = image.name, image.version
        size_gb = req.os_disk_gb
        if moving:
            if vp.active and not req.recreate and req.state != "stopped":
                raise VmError(
                    "%s: image: moving the running VM from %s-%s to %s needs it stopped: stop "
                    "it first (state: stopped), or set recreate: true to stop it, move it and "
                    "start it again" % (req.name, vp.actual.image, vp.actual.image_version,
                                        image.ref))
            # The new overlay keeps the OS disk's size where the image allows it.
            old_gb = actual_disks["os"].size_gb
            if size_gb is None and old_gb and old_gb * GIB >= (image.virtual_size or 0):
                size_gb = old_gb
        if size_gb is not None and image.virtual_size and size_gb * GIB < image.virtual_size:
            raise VmError(
                "%s: os_disk_size: %d GiB is smaller than the image %s (%.1f GiB); give "
                "%d GiB or more, or leave it out for the image's own size" % (
                    req.name, size_gb, image.ref, image.virtual_size / GIB,
                    -(-image.virtual_size // GIB)))
        path = other_os_path(paths, actual_disks["os"].path) if moving else paths["os"]
        if moving and snap.exists(path):
            # The overlay an earlier move kept: the disk the guest last ran on, since the VM has
            # not started on the new one yet. Never replaced by a run.
            raise VmError(
                "%s: image: %s still holds the OS disk the VM last ran on (kept by the move to "
                "%s-%s, on which it has not started yet); start the VM once on %s-%s (its old "
                "disk is then removed) before moving it again, or move that file away to "
                "discard it" % (req.name, path, vp.actual.image, vp.actual.image_version,
                                vp.actual.image, vp.actual.image_version))
        disks.append(DiskSpec(role="os", path=path, format="qcow2", size_gb=size_gb,
                              backing=real_path, backing_format=image.format))
    if req.data_disk_gb is not None or "data" in actual_disks:
        current = actual_disks.get("data")
        path = current.path if current else paths["data"]
        size = req.data_disk_gb
        if current is not None or snap.exists(path):
            # Attached, or kept by an earlier state: absent: grown when asked, never shrunk.
            size = _size(vp, snap, path, req.data_disk_gb,
                         current.size_gb if current else None, "data_disk_size")
        disks.append(DiskSpec(role="data", path=path, format="qcow2", size_gb=size))
    seed_digest = None
    if req.cloud_init and req.cloud_init.get("data_disk_mount") \
            and not any(d.role == "data" for d in disks):
        raise VmError("%s: cloud_init.data_disk_mount: %s asks for the data disk, and the VM "
                      "has none; set data_disk_size, or leave data_disk_mount out" % (
                          req.name, req.cloud_init["data_disk_mount"]))
    if req.cloud_init:
        vp.seed_files = render(req.name, req.cloud_init)
        seed_digest = digest(vp.seed_files)
        disks.append(DiskSpec(role="seed", path=paths["seed"], format="raw"))
    elif "seed" in actual_disks:
        # cloud_init left out: the VM keeps the seed it has, as it is.
        disks.append(actual_disks["seed"])
        seed_digest = vp.actual.seed_digest
    vp.desired = make_spec(
        placement, ctx.topology, disks=disks, networks=req.networks,
        domain_type=req.domain_type, cpu_mode=req.cpu_mode,
        cpu_disable_features=req.cpu_disable_features, firmware=req.firmware,
        template=str(req.gpus), image=image_name, image_version=image_version,
        owner_tag=req.owner_tag, seed_digest=seed_digest,
        fm_partition=_fm_partition(ctx, vp.actual, placement))
    actual = vp.actual
    if actual is not None and actual.cpu_policy == vp.desired.cpu_policy == "dedicated" \
            and sorted(actual.cpus) == sorted(vp.desired.cpus):
        # A sticky placement comes back from libvirt's allocation summary as a sorted CPU
        # set; keep the VM's own vCPU -> host CPU map (siblings paired), or every run would
        # redefine it with sorted pins that split the guest's SMT pairs.
        vp.desired = replace(vp.desired, cpus=actual.cpus)


def _fm_partition(ctx, actual, placement):
    """The Fabric Manager partition a VM records for the libvirt hook: with fabric_manager, the
    live one of its GPUs; without, what it recorded while its GPUs stay the same."""
    if ctx.fabric is not None:
        return placement.fm_partition
    if actual is not None and sorted(actual.gpus) == sorted(placement.gpus):
        return actual.fm_partition
    return None


def _size(vp, snap, path, wanted_gb, recorded_gb, option):
    """The size (GiB) an existing disk is to have; queues its growth in vp.grow.

    Left out or as recorded: as it is (observed without a qemu-img call). Otherwise the file's
    real size decides: larger grows it, smaller is refused (shrinking loses data).
    """
    if wanted_gb is None or wanted_gb == recorded_gb:
        return recorded_gb if wanted_gb is None else wanted_gb
    now = snap.sizes[path]
    if isinstance(now, str):
        raise VmError("%s: %s: cannot read the size of %s: %s" % (
            vp.request.name, option, path, now))
    wanted = wanted_gb * GIB
    if wanted < now:
        raise VmError(
            "%s: %s: %d GiB is smaller than %s (%.1f GiB); disks are never shrunk (it would "
            "lose data): give %d GiB or more" % (
                vp.request.name, option, wanted_gb, path, now / GIB, -(-now // GIB)))
    if wanted > now:
        vp.grow.append((path, wanted_gb, now, False))
    return wanted_gb


# --- steps ---------------------------------------------------------------------------------------

def _steps(vp, snap, ctx):
    req = vp.request
    name = req.name
    if req.state == "absent":
        if vp.exists:
            if vp.active:
                vp.steps.append(("stop", name))
            vp.steps.append(("undefine", name))
        own = disk_paths(ctx.disk_dir, name)
        # Only files this collection made for the VM: recorded in its metadata and named
        # as it names them. A disk or ISO someone attached by hand is never removed.
        disks = {d.role: d.path for d in own_disks(vp.actual)} if vp.actual else {}
        paths = [disks.get("os", own["os"]), other_os_path(own, disks.get("os", own["os"])),
                 disks.get("seed", own["seed"])]
        for path in paths:  # the OS overlay, an earlier one a move kept, the seed
            if snap.exists(path):
                vp.files_to_remove.append(path)
                vp.steps.append(("remove_file", path))
        data = disks.get("data", own["data"])
        if snap.exists(data):
            if req.remove_data:
                vp.files_to_remove.append(data)
                vp.steps.append(("remove_file", data))
            else:
                vp.kept.append(data)
        vp.diff = spec_diff(vp.actual, None) if vp.actual else {}
        return
    vp.diff = spec_diff(vp.actual, vp.desired)
    # A running VM whose GPUs change (recreate: true) is redefined first - libvirt keeps
    # the new definition for the next start - then stopped and started again.
    recreate = vp.active and (_moves_devices(vp) or _moves_image(vp))
    own = disk_paths(ctx.disk_dir, name)
    for disk in vp.desired.disks:
        # (a move's new overlay is never there: _desired refuses one whose path is taken)
        if disk.role == "os" and not snap.exists(disk.path):
            vp.steps.append(("create_overlay", disk.path))
        elif disk.role == "data" and not snap.exists(disk.path):
            vp.steps.append(("create_data_disk", disk.path))
        elif disk.role == "seed" and vp.seed_files is not None:
            current = vp.actual.seed_digest if vp.actual is not None else None
            if not snap.exists(disk.path) or current != vp.desired.seed_digest:
                vp.steps.append(("write_seed", disk.path))
    if not vp.exists:
        vp.steps.append(("define", name))
    elif vp.diff:
        vp.steps.append(("redefine", name))
        # A disk grown while the VM runs reaches the guest at once: no reboot for that.
        vp.reboot_required = vp.active and not recreate and _needs_reboot(vp.diff)
    if vp.grow and vp.active:
        # Grown through QEMU only where QEMU has the disk open (the live definition): a
        # disk attached by this run, or by one whose redefine awaits a reboot, is a file
        # no process holds, grown with qemu-img.
        live = snap.live_disks.get(name, frozenset())
        vp.grow = [(p, gb, now, p in live) for p, gb, now, _live in vp.grow]
    for path, _gb, _now, _live in vp.grow:
        vp.steps.append(("grow_disk", path))
    if recreate or (req.state == "stopped" and vp.active):
        vp.steps.append(("stop", name))
    if (recreate and req.state != "stopped") or (req.state == "running" and not vp.active):
        vp.steps.append(("start", name))
    # The overlay a move left behind goes once the VM runs on the new one.
    os_now = os_path(vp.desired)
    if os_now in (own["os"], own["os_alt"]):
        kept = other_os_path(own, os_now)
        # Started by this run, or running without the file open (its live definition, read
        # by observe when such a file exists, does not name it).
        live = snap.live_disks.get(name)
        runs = ("start", name) in vp.steps or (
            vp.active and not recreate and req.state != "stopped"
            and live is not None and kept not in live)
        if runs and snap.exists(kept):
            vp.steps.append(("remove_file", kept))


def _needs_reboot(diff):
    """Whether a running VM must restart for a change: any but disk sizes (grown live)."""
    for key, change in diff.items():
        if key != "disks":
            return True

        def shape(disks):
            return [{k: v for k, v in d.items() if k != "size_gb"} for d in disks or ()]

        if shape(change["before"]) != shape(change["after"]):
            return True
    return False


def _moves_image(vp):
    """Whether an existing VM gets a new OS overlay on another image."""
    if not vp.exists or vp.actual is None or vp.desired is None:
        return False
    before, after = os_path(vp.actual, own=True), os_path(vp.desired)
    return before is not None and after is not None and before != after


def _moves_devices(vp):
    """Whether an existing VM would get other GPUs, NVSwitches or rail NICs than it has."""
    if not vp.exists or vp.actual is None or vp.desired is None:
        return False
    return (sorted(vp.actual.gpus) != sorted(vp.desired.gpus)
            or sorted(vp.actual.nvswitches) != sorted(vp.desired.nvswitches)
            or sorted(vp.actual.nics) != sorted(vp.desired.nics))

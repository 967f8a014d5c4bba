# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Desired VMs vs the domains libvirt holds -> actions, and carrying them out. Private.

kvm_vm and kvm_layout are thin shells over this module: they parse options into VmRequest
values, hold the host lock while `Planner.plan()` reads allocations and places, and hand each
resulting `VmPlan` to `Applier.apply()`. Every side effect is guarded by check mode at the
point where it happens, and `changed`, the diff and the action list come from one comparison
(the plan), never from a second path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

from ansible_collections.gpuvirt.kvm.plugins.module_utils import _images, _seed
from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import Domain
from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import LibvirtGatewayError
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement import (
    HostState,
    PlacementError,
    Request,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._report import allocations_from_domains
from ansible_collections.gpuvirt.kvm.plugins.module_utils._units import parse_size_mb
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_spec import (
    DiskSpec,
    NetworkSpec,
    SpecError,
    VmSpec,
    build_domain,
    make_spec,
    spec_diff,
)

PREPARE = "prepare"  # files and definitions: done under the host lock, one VM after another
POWER = "power"  # start, stop, undefine, remove: outside the lock, VMs in parallel
PREPARE_STEPS = ("create_overlay", "create_data_disk", "write_seed", "define", "redefine",
                 "grow_disk")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STATES = ("present", "running", "stopped", "absent")
DEFAULT_DISK_DIR = "/var/lib/gpuvirt/disks"


class VmError(Exception):
    """A VM cannot be converged; the message names the VM, the option and the fix."""


@dataclass(frozen=True)
class VmRequest:
    """One VM as the user declared it (kvm_vm's options, or one entry of kvm_layout's vms)."""

    # None: not given. A new VM then gets CREATE_DEFAULTS; an existing VM keeps what it has
    # (resolve() fills these in once the domain has been read).
    name: str
    state: str = "running"
    gpus: int | None = None
    gpu_index: int | None = None
    image: str | None = None
    vcpus: int | None = None
    memory_mb: int | None = None
    os_disk_gb: int | None = None
    data_disk_gb: int | None = None
    networks: tuple | None = None  # NetworkSpec with mac possibly None
    cloud_init: dict | None = None
    cpu_policy: str | None = None
    hugepages: bool | None = None
    cpu_mode: str | None = None
    cpu_disable_features: tuple | None = None
    domain_type: str | None = None
    firmware: str | None = None
    force: bool = False
    timeout: int = 120
    remove_data: bool = False
    recreate: bool = False
    owner_tag: str | None = None


def _size_gb(value, option):
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        mib = value * 1024  # a bare number is GiB for disks
    else:
        text = str(value).strip()
        mib = parse_size_mb(int(text) * 1024 if text.isdigit() else text, option)
    if mib % 1024:
        raise VmError("%s: %r is not a whole number of GiB" % (option, value))
    return mib // 1024


def request_from_params(p, where=""):
    """Validate kvm_vm-style options (a dict) into a VmRequest. Raises VmError."""
    prefix = where + "." if where else ""
    name = p.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise VmError(
            "%sname: %r is not a valid VM name; use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit" % (prefix, name))
    state = p.get("state") or "running"
    if state not in STATES:
        raise VmError("%sstate: %r is not one of %s" % (prefix, state, ", ".join(STATES)))
    if p.get("remove_data") and state != "absent":
        raise VmError("%sremove_data: only valid with state: absent (the data disk of %s is "
                      "kept otherwise)" % (prefix, name))
    gpus = p.get("gpus")
    if gpus is not None and gpus < 0:
        raise VmError("%sgpus: %d; give 0 (CPU-only) or more" % (prefix, gpus))
    if p.get("gpu_index") is not None and not gpus:
        raise VmError("%sgpu_index: set, but gpus is %s; give gpus too (gpu_index is the first "
                      "GPU of a gpus-sized block)" % (prefix, "not given" if gpus is None else 0))
    memory_mb = None
    if p.get("memory") is not None:
        try:
            memory_mb = parse_size_mb(p["memory"], prefix + "memory")
        except ValueError as exc:
            raise VmError(str(exc)) from exc
    try:
        os_disk_gb = _size_gb(p.get("os_disk_size"), prefix + "os_disk_size")
        data_disk_gb = _size_gb(p.get("data_disk_size"), prefix + "data_disk_size")
    except ValueError as exc:
        raise VmError(str(exc)) from exc
    for option, size in (("os_disk_size", os_disk_gb), ("data_disk_size", data_disk_gb)):
        if size is not None and size < 1:
            raise VmError("%s%s: %r; give a size of 1 GiB or more (a number is GiB, or a "
                          "string with a unit such as 40GiB)" % (prefix, option, p.get(option)))
    if p.get("vcpus") is not None and p["vcpus"] < 1:
        raise VmError("%svcpus: %d; give 1 or more" % (prefix, p["vcpus"]))
    networks = None
    raw_networks = p.get("networks")
    for n, net in enumerate(raw_networks or ()):
        networks = networks or []
        kinds = [k for k in ("network", "bridge", "user") if net.get(k)]
        if len(kinds) != 1:
            raise VmError("%snetworks[%d]: give exactly one of network (a libvirt network), "
                          "bridge (a host bridge) or user: true, got %s" % (
                              prefix, n, ", ".join(sorted(k for k in net if net[k])) or "none"))
        kind = kinds[0]
        networks.append(NetworkSpec(type=kind, source=None if kind == "user" else net[kind],
                                    mac=net.get("mac")))
    if raw_networks is not None and networks is None:
        networks = []  # networks: [] - a VM without NICs
    timeout = p.get("timeout")
    timeout = 120 if timeout is None else timeout
    if timeout < 0:
        raise VmError("%stimeout: %d; give seconds >= 0" % (prefix, timeout))
    return VmRequest(
        name=name, state=state, gpus=gpus, gpu_index=p.get("gpu_index"), image=p.get("image"),
        vcpus=p.get("vcpus"), memory_mb=memory_mb, os_disk_gb=os_disk_gb,
        data_disk_gb=data_disk_gb, networks=None if networks is None else tuple(networks),
        cloud_init=p.get("cloud_init"), cpu_policy=p.get("cpu_policy"),
        hugepages=p.get("hugepages"), cpu_mode=p.get("cpu_mode"),
        cpu_disable_features=None if p.get("cpu_disable_features") is None
        else tuple(p["cpu_disable_features"]),
        domain_type=p.get("domain_type"), firmware=p.get("firmware"),
        force=bool(p.get("force")), timeout=timeout, remove_data=bool(p.get("remove_data")),
        recreate=bool(p.get("recreate")), owner_tag=p.get("owner_tag"),
    )


# What an option left out means for a VM that does not exist yet. An existing VM keeps its
# own value instead (sticky): `name` + `state: stopped` stops an 8-GPU OVMF VM on a bridge
# without touching its GPUs, firmware or NICs.
CREATE_DEFAULTS = {
    "gpus": 0,
    "cpu_policy": "dedicated",
    "hugepages": False,
    "networks": (NetworkSpec(type="network", source="default"),),
    "cpu_disable_features": (),
    "domain_type": "kvm",
    "firmware": "bios",
}


def resolve(req, actual=None):
    """The request with every option left out filled in: from the VM (`actual`) or defaults."""
    if actual is None:
        fill = dict(CREATE_DEFAULTS)
    else:
        fill = {
            "gpus": len(actual.gpus),
            "cpu_policy": actual.cpu_policy,
            "hugepages": bool(actual.hugepage_kb),
            # The NICs as they are, MACs included; queues are sized again from the vCPUs.
            "networks": tuple(replace(n, queues=None) for n in actual.networks),
            "cpu_mode": actual.cpu_mode,
            "cpu_disable_features": tuple(actual.cpu_disable_features),
            "domain_type": actual.domain_type,
            "firmware": actual.firmware,
            "owner_tag": actual.owner_tag,
        }
        if req.domain_type is not None and req.domain_type != actual.domain_type:
            # A new domain type takes its own default CPU mode (host-passthrough for kvm,
            # maximum for TCG) unless cpu_mode is given.
            del fill["cpu_mode"]
        if req.gpus is None or req.gpus == len(actual.gpus):
            # Same template: its size stays (a new GPU count takes the new template's).
            fill.update(vcpus=actual.vcpus, memory_mb=actual.memory_mb)
    return replace(req, **{k: v for k, v in fill.items() if getattr(req, k) is None})


@dataclass
class HostContext:
    """What one run knows about the host: read once, shared by every VM of a layout."""

    topology: object
    platform: object
    store: object  # _images.ImageStore
    disk_dir: str = DEFAULT_DISK_DIR
    reserved_cpus: object = None
    reserved_memory_mb: object = None
    unhealthy_gpus: tuple = ()
    nvlinks: dict | None = None
    bridges: tuple = ()  # host bridges (from sysfs)


@dataclass
class VmPlan:
    """What converging one VM means: the comparison, and the steps that follow from it."""

    request: VmRequest
    exists: bool = False
    active: bool = False
    uuid: str | None = None
    actual: VmSpec | None = None
    desired: VmSpec | None = None
    diff: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)  # ("create_overlay", ...), in order
    files_to_remove: list = field(default_factory=list)
    kept: list = field(default_factory=list)  # data disks left in place on absent
    reboot_required: bool = False
    seed_files: dict | None = None
    grow: list = field(default_factory=list)  # (path, GiB, bytes now, live): disks to grow
    error: str | None = None
    irreversible: bool = False  # a step was done that has no undo (a stop, a removal, ...)
    undone: bool = False  # failed, and everything the run had done was undone
    undo: list = field(default_factory=list)  # what this run did, to undo on failure

    @property
    def changed(self):
        return bool(self.steps)


def disk_paths(disk_dir, name):
    """Where a VM's own files live (named after the VM, so a rerun finds them)."""
    return {
        "os": os.path.join(disk_dir, "%s-os.qcow2" % name),
        "data": os.path.join(disk_dir, "%s-data.qcow2" % name),
        "seed": os.path.join(disk_dir, "%s-seed.iso" % name),
    }


class Planner:
    """Reads what libvirt holds and decides, for each requested VM, what must happen."""

    def __init__(self, gateway, ctx):
        self.gateway = gateway
        self.ctx = ctx

    def read_domains(self):
        return {d.name: d for d in self.gateway.allocations()}

    def plan(self, requests):
        """[VmPlan] in request order (an unplaceable VM gets .error, the others still plan)."""
        domains = self.read_domains()
        for req in requests:
            dom = domains.get(req.name)
            if dom is not None and not dom.managed:
                raise VmError(
                    "%s: a domain of that name exists and was not created by gpuvirt.kvm (it has "
                    "no gpuvirt metadata); it is left alone - choose another name" % req.name)
        try:
            state = HostState(
                self.ctx.topology, self.ctx.platform,
                allocations=allocations_from_domains(list(domains.values()),
                                                     _gpu_bdfs(self.ctx), _switch_bdfs(self.ctx)),
                reserved_cpus=self.ctx.reserved_cpus,
                reserved_memory_mb=self.ctx.reserved_memory_mb,
                unhealthy_gpus=self.ctx.unhealthy_gpus, nvlinks=self.ctx.nvlinks)
        except PlacementError as exc:  # host-wide options (reserved_cpus, ...) are bad
            raise VmError(str(exc)) from exc
        networks = None
        plans = []
        placing = []
        for req in requests:
            vp = VmPlan(request=req)
            dom = domains.get(req.name)
            if dom is not None:
                vp.exists, vp.active, vp.uuid = True, dom.active, dom.uuid
                vp.actual = VmSpec.from_domain(
                    Domain.from_xml(self.gateway.domain_xml(req.name)))
            # NICs a VM already has are not checked again: stopping a VM whose network was
            # deleted since must still work.
            check_networks = req.networks is not None or vp.actual is None
            vp.request = req = resolve(req, vp.actual)
            plans.append(vp)
            if req.state == "absent":
                state.release(req.name)  # what it frees is free for the others in this run
                continue
            if vp.exists and vp.actual is not None and len(vp.actual.gpus) != req.gpus \
                    and vp.active and not req.recreate:
                vp.error = (
                    "%s: gpus is %d but the running VM holds %d GPU(s); a GPU count change "
                    "re-places the VM: set recreate: true to stop, re-place and restart it"
                    % (req.name, req.gpus, len(vp.actual.gpus)))
                continue
            if vp.active and not req.recreate and req.gpu_index is not None and vp.actual.gpus:
                index = {b: i for i, b in enumerate(_gpu_bdfs(self.ctx))}
                held = sorted(index[b] for b in vp.actual.gpus if b in index)
                if held and held[0] != req.gpu_index:
                    # The running QEMU still holds its GPUs: moving them now would let the
                    # next run hand them out a second time.
                    vp.error = (
                        "%s: gpu_index is %d but the running VM holds GPU(s) %s; moving it "
                        "re-places the VM: set recreate: true to stop, re-place and restart it, "
                        "or leave gpu_index out to keep its GPUs" % (
                            req.name, req.gpu_index, ", ".join(str(i) for i in held)))
                    continue
            if check_networks:
                if networks is None:
                    networks = self.gateway.networks()
                try:
                    self._check_networks(req, networks)
                except VmError as exc:
                    vp.error = str(exc)
                    continue
            placing.append(vp)
        outcomes = state.plan([Request(
            name=vp.request.name, gpus=vp.request.gpus, gpu_index=vp.request.gpu_index,
            vcpus=vp.request.vcpus, memory_mb=vp.request.memory_mb,
            cpu_policy=vp.request.cpu_policy, hugepages=vp.request.hugepages)
            for vp in placing])
        for vp, (_req, outcome) in zip(placing, outcomes):
            if isinstance(outcome, PlacementError):
                vp.error = str(outcome)
                continue
            try:
                self._desired(vp, outcome)
            except (VmError, SpecError, _images.ImagesError) as exc:
                vp.error = str(exc)
                continue
            if _moves_devices(vp) and vp.active and not vp.request.recreate:
                # Caught before placing (gpu_index, count); kept as a guard: the running QEMU
                # holds the old devices, which must never look free to a later run.
                vp.error = (
                    "%s: the running VM holds GPU(s) %s and would be re-placed on %s; set "
                    "recreate: true to stop, re-place and restart it" % (
                        vp.request.name, ", ".join(vp.actual.gpus) or "none",
                        ", ".join(vp.desired.gpus) or "none"))
        for vp in plans:
            if vp.error is None:
                self._steps(vp)
        return plans

    # --- desired state ---------------------------------------------------------------------

    def _check_networks(self, req, networks):
        for n, net in enumerate(req.networks):
            if net.type == "network":
                if net.source not in networks:
                    raise VmError("%s: networks[%d].network: libvirt has no network %r (it has: "
                                  "%s); create it or pick one of those" % (
                                      req.name, n, net.source, ", ".join(sorted(networks))
                                      or "none"))
                if not networks[net.source]:
                    raise VmError("%s: networks[%d].network: %r is not active; start it "
                                  "(virsh net-start %s)" % (req.name, n, net.source, net.source))
            elif net.type == "bridge" and net.source not in self.ctx.bridges:
                raise VmError("%s: networks[%d].bridge: the host has no bridge %r (bridges: %s)"
                              % (req.name, n, net.source, ", ".join(self.ctx.bridges) or "none"))

    def _desired(self, vp, placement):
        req = vp.request
        paths = disk_paths(self.ctx.disk_dir, req.name)
        actual_disks = {d.role: d for d in _own_disks(vp.actual)} if vp.actual else {}
        disks = []
        image_name = image_version = None
        if "os" in actual_disks:
            # An existing OS disk stays on the base it was made from: re-basing an overlay
            # would corrupt it.
            os_disk = actual_disks["os"]
            image_name, image_version = vp.actual.image, vp.actual.image_version
            if req.image and vp.actual.image and req.image not in (
                    vp.actual.image, "%s-%s" % (vp.actual.image, vp.actual.image_version)):
                raise VmError(
                    "%s: image: the OS disk is an overlay on %s-%s; to move the VM to %s, remove "
                    "it (state: absent keeps the data disk) and create it again" % (
                        req.name, vp.actual.image, vp.actual.image_version, req.image))
            disks.append(replace(os_disk, size_gb=self._size(
                vp, os_disk.path, req.os_disk_gb, os_disk.size_gb, "os_disk_size")))
        elif req.image:
            image = self.ctx.store.resolve(req.image)
            image_name, image_version = image.name, image.version
            if req.os_disk_gb is not None and image.virtual_size \
                    and req.os_disk_gb * _images.GIB < image.virtual_size:
                raise VmError(
                    "%s: os_disk_size: %d GiB is smaller than the image %s (%.1f GiB); give "
                    "%d GiB or more, or leave it out for the image's own size" % (
                        req.name, req.os_disk_gb, image.ref, image.virtual_size / _images.GIB,
                        -(-image.virtual_size // _images.GIB)))
            disks.append(DiskSpec(role="os", path=paths["os"], format="qcow2",
                                  size_gb=req.os_disk_gb, backing=os.path.realpath(image.path),
                                  backing_format=image.format))
        if req.data_disk_gb is not None or "data" in actual_disks:
            current = actual_disks.get("data")
            path = current.path if current else paths["data"]
            size = req.data_disk_gb
            if current is not None or os.path.lexists(path):
                # Attached, or kept by an earlier state: absent: grown when asked, never shrunk.
                size = self._size(vp, path, req.data_disk_gb,
                                  current.size_gb if current else None, "data_disk_size")
            disks.append(DiskSpec(role="data", path=path, format="qcow2", size_gb=size))
        seed_digest = None
        if req.cloud_init:
            vp.seed_files = _seed.render(req.name, req.cloud_init)
            seed_digest = _seed.digest(vp.seed_files)
            disks.append(DiskSpec(role="seed", path=paths["seed"], format="raw"))
        elif "seed" in actual_disks:
            # cloud_init left out: the VM keeps the seed it has, as it is.
            disks.append(actual_disks["seed"])
            seed_digest = vp.actual.seed_digest
        vp.desired = make_spec(
            placement, self.ctx.topology, disks=disks, networks=req.networks,
            domain_type=req.domain_type, cpu_mode=req.cpu_mode,
            cpu_disable_features=req.cpu_disable_features, firmware=req.firmware,
            template=str(req.gpus), image=image_name, image_version=image_version,
            owner_tag=req.owner_tag,
            seed_digest=seed_digest)
        actual = vp.actual
        if actual is not None and actual.cpu_policy == vp.desired.cpu_policy == "dedicated" \
                and sorted(actual.cpus) == sorted(vp.desired.cpus):
            # A sticky placement comes back from libvirt's allocation summary as a sorted CPU
            # set; keep the VM's own vCPU -> host CPU map (siblings paired), or every run would
            # redefine it with sorted pins that split the guest's SMT pairs.
            vp.desired = replace(vp.desired, cpus=actual.cpus)

    @staticmethod
    def _size(vp, path, wanted_gb, recorded_gb, option):
        """The size (GiB) an existing disk is to have; queues its growth in vp.grow.

        Left out or as recorded: as it is (no qemu-img call on a no-op run). Otherwise the
        file's real size decides: larger grows it, smaller is refused (shrinking loses data).
        """
        if wanted_gb is None or wanted_gb == recorded_gb:
            return recorded_gb if wanted_gb is None else wanted_gb
        try:
            now = _images.info(path, backing_chain=False).virtual_size
        except _images.ImagesError as exc:
            raise VmError("%s: %s: cannot read the size of %s: %s" % (
                vp.request.name, option, path, exc)) from exc
        wanted = wanted_gb * _images.GIB
        if wanted < now:
            raise VmError(
                "%s: %s: %d GiB is smaller than %s (%.1f GiB); disks are never shrunk (it would "
                "lose data): give %d GiB or more" % (
                    vp.request.name, option, wanted_gb, path, now / _images.GIB,
                    -(-now // _images.GIB)))
        if wanted > now:
            vp.grow.append((path, wanted_gb, now, False))
        return wanted_gb

    # --- steps -----------------------------------------------------------------------------

    def _steps(self, vp):
        req = vp.request
        name = req.name
        if req.state == "absent":
            if vp.exists:
                if vp.active:
                    vp.steps.append(("stop", name))
                vp.steps.append(("undefine", name))
            own = disk_paths(self.ctx.disk_dir, name)
            # Only files this collection made for the VM: recorded in its metadata and named
            # as it names them. A disk or ISO someone attached by hand is never removed.
            disks = {d.role: d.path for d in _own_disks(vp.actual)} if vp.actual else {}
            for role in ("os", "seed"):
                path = disks.get(role, own[role])
                if os.path.lexists(path):
                    vp.files_to_remove.append(path)
                    vp.steps.append(("remove_file", path))
            data = disks.get("data", own["data"])
            if os.path.lexists(data):
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
        recreate = vp.active and _moves_devices(vp)
        for disk in vp.desired.disks:
            if disk.role == "os" and not os.path.lexists(disk.path):
                vp.steps.append(("create_overlay", disk.path))
            elif disk.role == "data" and not os.path.lexists(disk.path):
                vp.steps.append(("create_data_disk", disk.path))
            elif disk.role == "seed" and vp.seed_files is not None:
                current = vp.actual.seed_digest if vp.actual is not None else None
                if not os.path.lexists(disk.path) or current != vp.desired.seed_digest:
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
            live = {d.source for d in Domain.from_xml(
                self.gateway.domain_xml(name, inactive=False)).disks}
            vp.grow = [(p, gb, now, p in live) for p, gb, now, _live in vp.grow]
        for path, _gb, _now, _live in vp.grow:
            vp.steps.append(("grow_disk", path))
        if recreate or (req.state == "stopped" and vp.active):
            vp.steps.append(("stop", name))
        if (recreate and req.state != "stopped") or (req.state == "running" and not vp.active):
            vp.steps.append(("start", name))


def _own_disks(spec):
    """The VM's disks that gpuvirt made: recorded in its metadata, named after the VM."""
    own = disk_paths("", spec.name)
    return [d for d in spec.disks if d.recorded and d.role in own
            and os.path.basename(d.path or "") == own[d.role]]


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


def _moves_devices(vp):
    """Whether an existing VM would get other GPUs or NVSwitches than it has."""
    if not vp.exists or vp.actual is None or vp.desired is None:
        return False
    return (sorted(vp.actual.gpus) != sorted(vp.desired.gpus)
            or sorted(vp.actual.nvswitches) != sorted(vp.desired.nvswitches))


def _gpu_bdfs(ctx):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import platform_gpus

    return [d.bdf for d in platform_gpus(ctx.topology, ctx.platform)]


def _switch_bdfs(ctx):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
        platform_nvswitches,
    )

    return [d.bdf for d in platform_nvswitches(ctx.topology, ctx.platform)]


class Applier:
    """Carries out a VmPlan's steps; undoes a failed create in reverse and re-raises."""

    def __init__(self, gateway, ctx, check_mode=False):
        self.gateway = gateway
        self.ctx = ctx
        self.check_mode = check_mode

    def apply(self, vp, phase=None):
        """Run the plan's steps of one phase (PREPARE, POWER, or all); returns action lines.

        What a failed run had done in this call or an earlier phase is undone in reverse, and
        VmError carries the cause.
        """
        actions = []
        req = vp.request
        try:
            for step, target in vp.steps:
                if phase is not None and (step in PREPARE_STEPS) != (phase == PREPARE):
                    continue
                actions.append(self._describe(step, target, vp))
                if self.check_mode:
                    continue
                undoable = len(vp.undo)
                self._do(step, target, vp, vp.undo)
                if len(vp.undo) == undoable:
                    vp.irreversible = True
        except (LibvirtGatewayError, _images.ImagesError, _seed.SeedError, OSError) as exc:
            rolled, complete = self._rollback(vp.undo)
            vp.undo = []
            # Everything undone: the host is as it was, so the run changed nothing.
            vp.undone = complete and not vp.irreversible
            raise VmError("%s: %s failed: %s%s" % (
                req.name, actions[-1] if actions else "converge", exc,
                "; rolled back: %s" % ", ".join(rolled) if rolled else "")) from exc
        return actions

    def _describe(self, step, target, vp):
        words = {
            "create_overlay": "create OS disk overlay %s on %s" % (
                target, next((d.backing for d in vp.desired.disks if d.role == "os"), "?"))
            if vp.desired else "create OS disk overlay %s" % target,
            "create_data_disk": "create data disk %s" % target,
            "write_seed": "write cloud-init seed %s" % target,
            "define": "define %s" % target,
            "redefine": "redefine %s" % target,
            "start": "start %s" % target,
            "stop": "stop %s" % target,
            "undefine": "undefine %s" % target,
            "remove_file": "remove %s" % target,
        }
        if step == "grow_disk":
            _path, gb, now, live = next(g for g in vp.grow if g[0] == target)
            return "grow disk %s from %.1f to %d GiB%s" % (
                target, now / _images.GIB, gb, " (live)" if live else "")
        return words[step]

    def _do(self, step, target, vp, undo):
        req = vp.request
        if step in ("create_overlay", "create_data_disk", "write_seed"):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        if step == "create_overlay":
            disk = next(d for d in vp.desired.disks if d.role == "os")
            # The store verified the base's format at install: no need to probe it per VM.
            _images.create_overlay(disk.backing, disk.path, disk.size_gb,
                                   base_format=disk.backing_format, read_back=False)
            undo.append(("remove_file", disk.path))
        elif step == "create_data_disk":
            disk = next(d for d in vp.desired.disks if d.role == "data")
            _images.create_disk(disk.path, disk.size_gb)
            undo.append(("remove_file", disk.path))
        elif step == "write_seed":
            existed = os.path.lexists(target)
            _seed.write_iso(target, vp.seed_files)
            if not existed:
                undo.append(("remove_file", target))
        elif step in ("define", "redefine"):
            previous = self.gateway.domain_xml(target) if step == "redefine" else None
            domain = build_domain(vp.desired, self.ctx.topology, uuid=vp.uuid)
            self.gateway.define(domain.to_xml())
            if step == "define":
                undo.append(("undefine", target))
            else:
                undo.append(("restore_definition", (target, previous)))
        elif step == "grow_disk":
            _path, gb, now, live = next(g for g in vp.grow if g[0] == target)
            if live:
                # QEMU holds the image: it must do the resize. A live growth is not undone
                # (the guest may already use the new space).
                self.gateway.block_resize(req.name, target, gb * _images.GIB)
            else:
                _images.resize(target, gb)
                undo.append(("shrink", (target, now)))
        elif step == "start":
            self.gateway.start(target)
            undo.append(("destroy", target))
        elif step == "stop":
            self.gateway.shutdown(target, req.timeout, force=req.force)
            if ("start", target) in vp.steps:
                # A recreate (stop, start): undone last, once the old definition is back.
                undo.insert(0, ("start", target))
        elif step == "undefine":
            self.gateway.undefine(target)
        elif step == "remove_file":
            if os.path.lexists(target):
                os.unlink(target)

    def _rollback(self, undo):
        """Undo in reverse; (lines saying what was undone, whether all of it was)."""
        done, complete = [], True
        for step, target in reversed(undo):
            try:
                if step == "remove_file" and os.path.lexists(target):
                    os.unlink(target)
                elif step == "undefine" and self.gateway.exists(target):
                    self.gateway.destroy(target)
                    self.gateway.undefine(target)
                elif step == "destroy" and self.gateway.exists(target):
                    self.gateway.destroy(target)
                elif step == "restore_definition":
                    target, previous = target
                    self.gateway.define(previous)
                elif step == "shrink":
                    target, size = target
                    _images.undo_grow(target, size)
                elif step == "start" and self.gateway.state(target) == "shutoff":
                    self.gateway.start(target)
                done.append("%s %s" % (step, target))
            except (LibvirtGatewayError, _images.ImagesError, OSError):
                done.append("%s %s (FAILED, clean up by hand)" % (step, target))
                complete = False
        return done, complete


# --- the module-facing entry points ---------------------------------------------------------

def vm_argspec():
    """kvm_vm's own options (the host, libvirt and lock options come from their helpers)."""
    return dict(
        name=dict(type="str", required=True),
        state=dict(type="str", choices=list(STATES), default="running"),
        gpus=dict(type="int"),
        gpu_index=dict(type="int"),
        image=dict(type="str"),
        store=dict(type="path", default=_images.DEFAULT_STORE),
        disk_dir=dict(type="path", default=DEFAULT_DISK_DIR),
        vcpus=dict(type="int"),
        memory=dict(type="raw"),
        os_disk_size=dict(type="raw"),
        data_disk_size=dict(type="raw"),
        networks=dict(type="list", elements="dict", options=dict(
            network=dict(type="str"), bridge=dict(type="str"), user=dict(type="bool"),
            mac=dict(type="str"))),
        cloud_init=dict(type="dict", options=dict(
            hostname=dict(type="str"), user=dict(type="str"),
            ssh_authorized_keys=dict(type="list", elements="str", no_log=False),
            password_hash=dict(type="str", no_log=True))),
        cpu_policy=dict(type="str", choices=["dedicated", "shared"]),
        hugepages=dict(type="bool"),
        cpu_mode=dict(type="str", choices=["host-passthrough", "host-model", "maximum"]),
        cpu_disable_features=dict(type="list", elements="str"),
        domain_type=dict(type="str", choices=["kvm", "qemu"]),
        firmware=dict(type="str", choices=["bios", "ovmf"]),
        force=dict(type="bool", default=False),
        timeout=dict(type="int", default=120),
        remove_data=dict(type="bool", default=False),
        recreate=dict(type="bool", default=False),
        owner_tag=dict(type="str"),
    )


def host_context(p):
    """Read the host once for a run (topology, platform, NVLinks, bridges, image store)."""
    # Imported here so that _vm stays importable where only part of the stack is needed.
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._nvidia_smi import (
        NvidiaSmiTopoError,
        nvlinks_for_host,
    )
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
        PlatformError,
        get_platform,
        platform_gpus,
    )
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._topology import (
        TopologyError,
        read_bridges,
        read_host,
    )

    try:
        topology = read_host(p["sysfs_root"], p["proc_root"])
        platform = get_platform(p["platform"], topology)
        nvlinks = None
        if p.get("nvidia_smi_topo"):
            nvlinks = nvlinks_for_host(p["nvidia_smi_topo"],
                                       len(platform_gpus(topology, platform)), p["sysfs_root"])
    except (TopologyError, PlatformError, NvidiaSmiTopoError) as exc:
        raise VmError(str(exc)) from exc
    return HostContext(
        topology=topology, platform=platform, store=_images.ImageStore(p["store"]),
        disk_dir=p["disk_dir"], reserved_cpus=p.get("reserved_cpus"),
        reserved_memory_mb=p.get("reserved_memory_mb"),
        unhealthy_gpus=tuple(p.get("unhealthy_gpus") or ()), nvlinks=nvlinks,
        bridges=read_bridges(p["sysfs_root"]))


def _vm_result(gateway, ctx, vp, actions, check_mode):
    req = vp.request
    spec = vp.desired if req.state != "absent" else None
    if spec is None and req.state != "absent":
        spec = vp.actual
    if req.state == "absent":
        state = "absent"
    elif check_mode or gateway is None:
        state = {"running": "running", "stopped": "shutoff"}.get(
            req.state, "running" if vp.active else "shutoff")
    else:
        state = gateway.state(req.name) or "absent"
    vm = {"name": req.name, "state": state}
    if spec is not None:
        index = {b: i for i, b in enumerate(_gpu_bdfs(ctx))}
        vm.update({
            "gpus": list(spec.gpus),
            "gpu_indexes": [index[b] for b in spec.gpus if b in index],
            "nvswitches": list(spec.nvswitches),
            "cpus": list(spec.cpus), "emulator_cpus": list(spec.emulator_cpus),
            "numa_nodes": list(spec.numa_nodes), "vcpus": spec.vcpus,
            "memory_mb": spec.memory_mb, "disks": [d.to_dict() for d in spec.disks],
            "macs": [n.mac for n in spec.networks], "spec": spec.to_dict(),
        })
        if vp.desired is not None:
            # The definition this run would make (check mode) or made: what libvirt is given.
            vm["xml"] = build_domain(vp.desired, ctx.topology, uuid=vp.uuid).to_xml()
    before = {k: v["before"] for k, v in vp.diff.items()}
    after = {k: v["after"] for k, v in vp.diff.items()}
    if vp.steps and not vp.exists:
        before = {"state": "absent"}
    if req.state == "absent" and vp.exists:
        after = {"state": "absent"}
    return {
        "changed": vp.changed, "actions": actions, "vm": vm,
        "reboot_required": vp.reboot_required, "kept_data_disks": list(vp.kept),
        "diff": {"before": before, "after": after}, "error": vp.error,
    }


def converge(gateway, ctx, requests, check_mode=False, lock=None, workers=1):
    """Plan and apply; returns one result dict per request (errors in result['error']).

    Reading allocations, placing, creating files and defining domains happen under the host
    lock (serialised); starting and stopping happen after it is released, up to `workers`
    VMs at a time.
    """
    applier = Applier(gateway, ctx, check_mode)
    results = {}
    actions = {}
    # Check mode takes no lock: it changes nothing, and must not create the lock's folder.
    if lock is not None and not check_mode:
        lock.acquire()
    try:
        plans = Planner(gateway, ctx).plan(requests)
        for vp in plans:
            if vp.error is not None:
                continue
            try:
                actions[vp.request.name] = applier.apply(vp, PREPARE)
            except VmError as exc:
                vp.error = str(exc)
    finally:
        if lock is not None and lock.locked:
            lock.release()

    def power(vp, own_connection=False):
        try:
            if own_connection and any(s not in PREPARE_STEPS for s, _t in vp.steps):
                # libvirtd serves at most max_client_requests (default 5) calls of one
                # connection at a time: 16 starts over a shared connection queue in waves.
                with gateway.reopen() as own:
                    actions[vp.request.name] += Applier(own, ctx, check_mode).apply(vp, POWER)
            else:
                actions[vp.request.name] += applier.apply(vp, POWER)
        except (VmError, LibvirtGatewayError) as exc:
            vp.error = str(exc)

    todo = [vp for vp in plans if vp.error is None]
    # Two waves: VMs that only stop or go away first, then those that start. A night VM may
    # be given the GPUs of a day VM that this same run removes; QEMU cannot open them until
    # the day VM's QEMU has let go of them.
    releasing = [vp for vp in todo if not any(s == "start" for s, _t in vp.steps)]
    starting = [vp for vp in todo if any(s == "start" for s, _t in vp.steps)]
    # test:/// hypervisors are private to each connection: keep the shared one there.
    own = not gateway.uri.startswith("test:")
    for wave in (releasing, starting):
        if workers > 1 and len(wave) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(workers, len(wave))) as pool:
                list(pool.map(lambda vp: power(vp, own), wave))
        else:
            for vp in wave:
                power(vp)
    for vp in plans:
        results[vp.request.name] = _vm_result(
            gateway, ctx, vp, actions.get(vp.request.name, []), check_mode)
        if vp.error is not None:
            results[vp.request.name]["changed"] = bool(actions.get(vp.request.name)) and \
                not check_mode and not vp.undone
    return [results[r.name] for r in requests]


LAYOUT_VM_KEYS = tuple(k for k in vm_argspec() if k not in ("store", "disk_dir"))


def _validated(module, spec, params, where):
    """`params` typed and checked against `spec` as Ansible checks a module's own options.

    kvm_layout's entries are plain dicts: without this, "false" from a template would be true
    for remove_data, and "2" for gpus a traceback. Secrets (no_log) are masked in the output.
    """
    from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
    from ansible.module_utils.errors import UnsupportedError

    result = ArgumentSpecValidator(spec).validate(params)
    module.no_log_values.update(result._no_log_values)  # pylint: disable=protected-access
    if result.error_messages:
        raise VmError("%s: %s" % (where, "; ".join(
            ("unknown option %s" % e.error_message) if isinstance(e, UnsupportedError)
            else e.error_message for e in result.errors.errors)))
    return result.validated_parameters


def layout_requests(module, gateway, p):
    """kvm_layout's entries (defaults merged, validated like kvm_vm's) + exclusive removals."""
    defaults = dict(p.get("defaults") or {})
    bad = sorted(k for k in defaults if k not in LAYOUT_VM_KEYS or k == "name")
    if bad:
        raise VmError("defaults: unknown option(s) %s; accepted: %s" % (
            ", ".join(bad), ", ".join(k for k in LAYOUT_VM_KEYS if k != "name")))
    spec = {k: v for k, v in vm_argspec().items() if k in LAYOUT_VM_KEYS}
    # defaults: typed like an entry, but nothing filled in (an entry's own value still wins).
    _validated(module, {k: {kk: vv for kk, vv in v.items() if kk not in ("default", "required")}
                        for k, v in spec.items() if k != "name"}, defaults, "defaults")
    requests = []
    seen = {}
    for n, entry in enumerate(p["vms"]):
        where = "vms[%d]" % n
        if not isinstance(entry, dict):
            raise VmError("%s: expected a dict of kvm_vm options, got %r" % (where, entry))
        bad = sorted(k for k in entry if k not in LAYOUT_VM_KEYS)
        if bad:
            raise VmError("%s: unknown option(s) %s; accepted: %s" % (
                where, ", ".join(bad), ", ".join(LAYOUT_VM_KEYS)))
        merged = dict(defaults)
        merged.update(entry)
        secret = (merged.get("cloud_init") or {}).get("password_hash") \
            if isinstance(merged.get("cloud_init"), dict) else None
        if secret:
            module.no_log_values.add(secret)  # before validating: an error may quote it
        req = request_from_params(_validated(module, spec, merged, where), where)
        if req.name in seen:
            raise VmError("%s.name: %r is listed twice (also %s); names must be unique" % (
                where, req.name, seen[req.name]))
        seen[req.name] = where
        requests.append(req)
    removed = []
    if p.get("exclusive"):
        listed = {r.name for r in requests}
        # With an owner tag in defaults, exclusive keeps to the VMs carrying that tag: several
        # layouts (teams, a demo) can then share one host without removing each other's VMs.
        scope = defaults.get("owner_tag")
        for dom in gateway.allocations():
            if scope is not None and dom.metadata.get("owner_tag") != scope:
                continue
            if dom.managed and dom.name not in listed:
                merged = {k: v for k, v in defaults.items() if k in ("force", "timeout")}
                merged.update({"name": dom.name, "state": "absent"})
                requests.append(request_from_params(
                    _validated(module, spec, merged, "exclusive"), "exclusive"))
                removed.append(dom.name)
    return requests, removed

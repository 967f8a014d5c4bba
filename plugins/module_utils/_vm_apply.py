# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Converging VMs: observe, plan, then carry out each plan's steps, undoing a failed one. Private.

kvm_vm and kvm_layout are thin shells over :func:`converge`. Under the host lock it observes
the host (``_vm_observe``), plans every VM (``_vm_plan``, pure) and does the PREPARE steps
(files and definitions); after the lock it does the POWER steps (stop, start, undefine,
remove) of several VMs at once. Each step is one row of :data:`STEPS`: what it says it does,
what it does, and how it is undone when a later step of the same VM fails. Check mode stops at
the side effect; ``changed``, the diff and the action lines all come from the plan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ansible_collections.gpuvirt.kvm.plugins.module_utils import _qemu_img, _seed
from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import DomainXmlError
from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain_builder import build_domain
from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import read_domains
from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import LibvirtGatewayError
from ansible_collections.gpuvirt.kvm.plugins.module_utils._units import GIB
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_observe import observe
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_plan import POWER, PREPARE, plan
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_request import (
    VmError,
    exclusive_removals,
)

_FAILURES = (LibvirtGatewayError, _qemu_img.ImagesError, _seed.SeedError, OSError)


@dataclass(frozen=True)
class Step:
    """One kind of step: when it runs, what it says, what it does, and its undo.

    ``do(ap, vp, target)`` returns the argument of ``undo`` (an undo record) or None when the
    step cannot be undone (a stop, a removal): the run then counts as having changed the host
    even if it fails later. ``undo_last``: undone after everything else (a recreate's stop is
    undone by a start once the old definition is back).
    """

    phase: str
    describe: object
    do: object
    undo: str | None = None  # the UNDO action that reverses it
    undo_last: bool = False


def _backing(vp):
    return next((d.backing for d in vp.desired.disks if d.role == "os"), "?") \
        if vp.desired else None


def _disk(vp, role):
    return next(d for d in vp.desired.disks if d.role == role)


def _make_folder(target):
    os.makedirs(os.path.dirname(target), exist_ok=True)


def _create_overlay(ap, vp, target):
    _make_folder(target)
    disk = _disk(vp, "os")
    # The store verified the base's format at install: no need to probe it per VM.
    _qemu_img.create_overlay(disk.backing, disk.path, disk.size_gb,
                             base_format=disk.backing_format, read_back=False)
    return disk.path


def _create_data_disk(ap, vp, target):
    _make_folder(target)
    disk = _disk(vp, "data")
    _qemu_img.create_disk(disk.path, disk.size_gb)
    return disk.path


def _write_seed(ap, vp, target):
    _make_folder(target)
    existed = os.path.lexists(target)
    _seed.write_iso(target, vp.seed_files)
    return None if existed else target


def _define(ap, vp, target):
    ap.gateway.define(build_domain(vp.desired, ap.ctx.topology, uuid=vp.uuid).to_xml())
    return target


def _redefine(ap, vp, target):
    ap.gateway.define(build_domain(vp.desired, ap.ctx.topology, uuid=vp.uuid).to_xml())
    return (target, vp.previous_xml)


def _grow(vp, target):
    return next(g for g in vp.grow if g[0] == target)


def _grow_disk(ap, vp, target):
    _path, gb, now, live = _grow(vp, target)
    if live:
        # QEMU holds the image: it must do the resize. A live growth is not undone (the
        # guest may already use the new space).
        ap.gateway.block_resize(vp.request.name, target, gb * GIB)
        return None
    _qemu_img.resize(target, gb)
    return (target, now)


def _start(ap, vp, target):
    ap.gateway.start(target)
    return target


def _stop(ap, vp, target):
    ap.gateway.shutdown(target, vp.request.timeout, force=vp.request.force)
    # A recreate (stop, then start): its undo restarts the VM once the old definition is back.
    return target if ("start", target) in vp.steps else None


def _undefine(ap, vp, target):
    ap.gateway.undefine(target)


def _remove_file(ap, vp, target):
    if os.path.lexists(target):
        os.unlink(target)


def _describe_grow(vp, target):
    _path, gb, now, live = _grow(vp, target)
    return "grow disk %s from %.1f to %d GiB%s" % (target, now / GIB, gb,
                                                   " (live)" if live else "")


STEPS = {
    "create_overlay": Step(
        PREPARE, lambda vp, t: "create OS disk overlay %s on %s" % (t, _backing(vp))
        if vp.desired else "create OS disk overlay %s" % t, _create_overlay, "remove_file"),
    "create_data_disk": Step(PREPARE, lambda vp, t: "create data disk %s" % t,
                             _create_data_disk, "remove_file"),
    "write_seed": Step(PREPARE, lambda vp, t: "write cloud-init seed %s" % t, _write_seed,
                       "remove_file"),
    "define": Step(PREPARE, lambda vp, t: "define %s" % t, _define, "undefine"),
    "redefine": Step(PREPARE, lambda vp, t: "redefine %s" % t, _redefine, "restore_definition"),
    "grow_disk": Step(PREPARE, _describe_grow, _grow_disk, "shrink"),
    "start": Step(POWER, lambda vp, t: "start %s" % t, _start, "destroy"),
    "stop": Step(POWER, lambda vp, t: "stop %s" % t, _stop, "start", undo_last=True),
    "undefine": Step(POWER, lambda vp, t: "undefine %s" % t, _undefine),
    "remove_file": Step(POWER, lambda vp, t: "remove %s" % t, _remove_file),
}


def _undo_remove_file(ap, path):
    if os.path.lexists(path):
        os.unlink(path)
    return path


def _undo_undefine(ap, name):
    if ap.gateway.exists(name):
        ap.gateway.destroy(name)
        ap.gateway.undefine(name)
    return name


def _undo_destroy(ap, name):
    if ap.gateway.exists(name):
        ap.gateway.destroy(name)
    return name


def _undo_restore(ap, arg):
    name, previous = arg
    ap.gateway.define(previous)
    return name


def _undo_shrink(ap, arg):
    path, size = arg
    _qemu_img.undo_grow(path, size)
    return path


def _undo_start(ap, name):
    if ap.gateway.state(name) == "shutoff":
        ap.gateway.start(name)
    return name


# Undo action -> what it does; each returns what the rollback line names.
UNDO = {
    "remove_file": _undo_remove_file,
    "undefine": _undo_undefine,
    "destroy": _undo_destroy,
    "restore_definition": _undo_restore,
    "shrink": _undo_shrink,
    "start": _undo_start,
}


class Applier:
    """Carries out a VmPlan's steps; undoes a failed VM's steps in reverse and re-raises."""

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
        try:
            for name, target in vp.steps:
                step = STEPS[name]
                if phase is not None and step.phase != phase:
                    continue
                actions.append(step.describe(vp, target))
                if self.check_mode:
                    continue
                arg = step.do(self, vp, target)
                if arg is None or step.undo is None:
                    vp.irreversible = True
                    continue
                record = (step.undo, arg)
                if step.undo_last:
                    vp.undo.insert(0, record)
                else:
                    vp.undo.append(record)
        except _FAILURES as exc:
            rolled, complete = self.rollback(vp.undo)
            vp.undo = []
            # Everything undone: the host is as it was, so the run changed nothing.
            vp.undone = complete and not vp.irreversible
            raise VmError("%s: %s failed: %s%s" % (
                vp.request.name, actions[-1] if actions else "converge", exc,
                "; rolled back: %s" % ", ".join(rolled) if rolled else "")) from exc
        return actions

    def rollback(self, undo):
        """Undo in reverse; (lines saying what was undone, whether all of it was)."""
        done, complete = [], True
        for action, arg in reversed(undo):
            named = arg[0] if isinstance(arg, tuple) else arg
            try:
                named = UNDO[action](self, arg)
                done.append("%s %s" % (action, named))
            except _FAILURES:
                done.append("%s %s (FAILED, clean up by hand)" % (action, named))
                complete = False
        return done, complete


def plan_vms(gateway, ctx, requests, whole=False):
    """Observe the host and plan the requests ([VmPlan]); no side effect."""
    return plan(requests, observe(gateway, ctx, requests), ctx, whole=whole)


def converge(gateway, ctx, requests, check_mode=False, lock=None, workers=1, exclusive=None,
             whole=False):
    """Observe, plan and apply; one result dict per request (errors in result['error']).

    Observing, placing, creating files and defining domains happen under the host lock
    (serialised); starting and stopping after it is released, up to `workers` VMs at a time.
    ``exclusive`` (_vm_request.Exclusive): also remove the collection's VMs it does not keep;
    their results follow the requests'. ``whole``: when any VM cannot be converged, change
    none (each result says whether it was applied).
    """
    applier = Applier(gateway, ctx, check_mode)
    actions = {}
    requests = list(requests)
    # Check mode takes no lock: it changes nothing, and must not create the lock's folder.
    if lock is not None and not check_mode:
        lock.acquire()
    try:
        domains = read_domains(gateway.list_domains())
        requests += exclusive_removals(domains, exclusive)
        plans = plan(requests, observe(gateway, ctx, requests, domains=domains), ctx,
                     whole=whole)
        for vp in plans:
            if vp.error is not None or vp.held:
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
            if own_connection and any(STEPS[s].phase == POWER for s, _t in vp.steps):
                # libvirtd serves at most max_client_requests (default 5) calls of one
                # connection at a time: 16 starts over a shared connection queue in waves.
                with gateway.reopen() as own:
                    actions[vp.request.name] += Applier(own, ctx, check_mode).apply(vp, POWER)
            else:
                actions[vp.request.name] += applier.apply(vp, POWER)
        except (VmError, LibvirtGatewayError) as exc:
            vp.error = str(exc)

    todo = [vp for vp in plans if vp.error is None and not vp.held]
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
    results = []
    for vp in plans:
        result = vm_result(gateway, ctx, vp, actions.get(vp.request.name, []), check_mode)
        if vp.error is not None:
            result["changed"] = bool(actions.get(vp.request.name)) and not check_mode \
                and not vp.undone
        results.append(result)
    return results


def converge_module(module, requests, owner, **kwargs):
    """converge() for a module shell (kvm_vm, kvm_layout): the host's libvirt, the host read
    from the module's options, the host lock; a failure of any of them fails the module."""
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_context import (
        HostContextError,
        connect_or_fail,
        host_context,
    )
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_store import ImageStore
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._lock import (
        HostLock,
        HostLockError,
    )

    p = module.params
    gateway = connect_or_fail(module)
    try:
        with gateway:
            ctx = host_context(p, store=ImageStore(p["store"]))
            for warning in ctx.warnings:
                module.warn(warning)
            return converge(gateway, ctx, requests, check_mode=module.check_mode,
                            lock=HostLock(p["lock_path"], p["lock_timeout"], owner=owner),
                            **kwargs)
    except (VmError, HostContextError, HostLockError, LibvirtGatewayError, DomainXmlError,
            _qemu_img.ImagesError) as exc:
        module.fail_json(msg=str(exc), changed=False)


def vm_result(gateway, ctx, vp, actions, check_mode):
    """One VM's result: what it is (or would be), what was done, the diff, any error."""
    req = vp.request
    spec = vp.desired if req.state != "absent" else None
    if vp.held or (spec is None and req.state != "absent"):
        spec = vp.actual  # a held VM is reported as it is
    if vp.held:  # left as it was found
        state = ("running" if vp.active else "shutoff") if vp.exists else "absent"
    elif req.state == "absent":
        state = "absent"
    elif check_mode or gateway is None:
        state = {"running": "running", "stopped": "shutoff"}.get(
            req.state, "running" if vp.active else "shutoff")
    else:
        state = gateway.state(req.name) or "absent"
    vm = {"name": req.name, "state": state}
    if spec is not None:
        index = {b: i for i, b in enumerate(ctx.gpu_bdfs)}
        vm.update({
            "gpus": list(spec.gpus),
            "gpu_indexes": [index[b] for b in spec.gpus if b in index],
            "nvswitches": list(spec.nvswitches),
            "nics": list(spec.nics),
            "cpus": list(spec.cpus), "emulator_cpus": list(spec.emulator_cpus),
            "numa_nodes": list(spec.numa_nodes), "vcpus": spec.vcpus,
            "memory_mb": spec.memory_mb, "disks": [d.to_dict() for d in spec.disks],
            "macs": [n.mac for n in spec.networks], "spec": spec.to_dict(),
        })
        if ctx.fabric is not None:
            vm["fm_partition"] = _partition_state(ctx, vm["gpu_indexes"])
        if vp.desired is not None and not vp.held:
            # The definition this run would make (check mode) or made: what libvirt is given.
            vm["xml"] = build_domain(vp.desired, ctx.topology, uuid=vp.uuid).to_xml()
    before = {k: v["before"] for k, v in vp.diff.items()}
    after = {k: v["after"] for k, v in vp.diff.items()}
    if vp.steps and not vp.exists:
        before = {"state": "absent"}
    if req.state == "absent" and vp.exists and not vp.held:
        after = {"state": "absent"}
    if vp.held:
        before = after = {}
    return {
        "changed": vp.changed, "actions": actions, "vm": vm,
        "reboot_required": vp.reboot_required, "kept_data_disks": list(vp.kept),
        "diff": {"before": before, "after": after}, "error": vp.error,
        "applied": vp.error is None and not vp.held, "held": vp.held,
    }


def _partition_state(ctx, indexes):
    """The FM partition a VM's GPUs make on a shared-NVSwitch host, and whether FM has it
    active as this run found it: {id, active}; None for a VM without GPUs."""
    if not indexes:
        return None
    pid = ctx.platform.fm_partition_for(indexes)
    if pid is None:
        return {"id": None, "active": False,
                "why": "GPUs %s make no partition Fabric Manager lists (placed before "
                       "fabric_manager was set?): set recreate: true to re-place the VM on one, "
                       "or it runs without NVLink" % ", ".join(str(i) for i in indexes)}
    active = [row["active"] for row in ctx.fabric["partitions"] if row["id"] == pid]
    return {"id": pid, "active": bool(active and active[0])}


def layout_outcome(results, listed):
    """kvm_layout's result from converge()'s, and its failure message (None: it did not fail).

    ``listed``: the names the layout lists (the others are exclusive removals).
    """
    held = [r["vm"]["name"] for r in results if r.pop("held")]
    applied = [r["vm"]["name"] for r in results if r.pop("applied")]
    diff = {"before": {r["vm"]["name"]: r["diff"]["before"] for r in results if r["changed"]},
            "after": {r["vm"]["name"]: r["diff"]["after"] for r in results if r["changed"]}}
    for r in results:
        r.pop("diff")
    outcome = dict(
        changed=any(r["changed"] for r in results), vms=results, diff=diff, applied=applied,
        not_applied=[r["vm"]["name"] for r in results if r["vm"]["name"] not in applied],
        removed=[name for name in applied if name not in listed],
        actions=["%s: %s" % (r["vm"]["name"], a) for r in results for a in r["actions"]])
    errors = [r["error"] for r in results if r.get("error")]
    if not errors:
        return outcome, None
    msg = "; ".join(errors)
    if held:
        # Held at the plan: nothing of the layout was done.
        msg += ("; nothing was changed: the layout is applied whole or not at all (set partial: "
                "true to apply what can be: %s)" % ", ".join(held))
    return outcome, msg

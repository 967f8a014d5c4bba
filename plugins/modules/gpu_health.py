#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: gpu_health
short_description: Check GPU and NVSwitch health into the host's health record; mark or clear a device
version_added: 0.2.0
description:
  - Reads every GPU's and NVSwitch's health as the host sees it while they sit on vfio-pci (a
    function gone from the bus, config space reading as all ones, a power state of C(error),
    AER error counts, a link down or trained below what it can; see C(docs/health.md)) and
    writes it into the host's health record (O(health_record)) with its reason, its source and
    since when.
  - On a shared-NVSwitch host it also reads the NVSwitches' SXid lines in the kernel log and,
    with O(fabric_manager), Fabric Manager's NVLink-failed devices. A source it cannot read
    (the kernel log, Fabric Manager not answering or not set) keeps what the record says of it.
  - Lets an admin mark a device failed, or clear it, with a reason that the record keeps.
  - Every module that places VMs (M(gpuvirt.kvm.kvm_vm), M(gpuvirt.kvm.kvm_layout),
    M(gpuvirt.kvm.gpu_topology)) reads the record. A device marked failed is never given to a
    VM, and a VM that holds one is not started.
  - Optionally runs the deep check (O(deep_check)) of every GPU that no libvirt domain holds.
  - The record is written whole under the host lock, and only when it changes (a device's
    state, its findings, a mark or a clear). More of the same errors update the reason but not
    C(since). A record that is not one this collection writes is refused and left as it is.
author:
  - gpuvirt.kvm contributors (@gpuvirt)
extends_documentation_fragment:
  - gpuvirt.kvm.host
  - gpuvirt.kvm.host.LIBVIRT
  - gpuvirt.kvm.lock
attributes:
  check_mode:
    support: full
    description: Check mode reads every device and returns what would be written, and the
      record's diff, without writing it or taking the host lock. The deep check does not run.
  diff_mode:
    support: full
    description: The diff is the health record before and after, as JSON.
  idempotent:
    support: partial
    description: A check that finds the same, and a mark or clear made already, change nothing.
      A deep check records when it ran, and so always changes the record.
options:
  action:
    description:
      - V(check) reads every device's health and records it.
      - V(mark) marks O(devices) failed for O(reason); the mark stays until cleared.
      - V(clear) removes a mark from O(devices), and hides the signals each shows now (a fatal
        AER count lasts until the host reboots) until they change - more errors, or a new
        fault, count again. O(reason) is kept.
      - V(mark) and V(clear) check every device too.
    type: str
    choices: [check, mark, clear]
    default: check
  devices:
    description:
      - The GPUs and NVSwitches to mark or clear, by PCI address (C(0000:34:00.0) or
        C(34:00.0)). Each must be one of the host's platform GPUs or NVSwitches.
      - Required with O(action=mark) and O(action=clear).
    type: list
    elements: str
    default: []
  reason:
    description:
      - Why the devices are marked or cleared (a ticket, what was seen, what was repaired).
      - Required with O(action=mark) and O(action=clear).
    type: str
  stop_affected:
    description:
      - The policy stop. Each running VM that holds a failed device gets an ACPI shutdown and,
        after O(stop_timeout) seconds, is powered off. The other VMs keep running.
      - The VM stays defined with its disks. It is not started again while it holds the device
        (see M(gpuvirt.kvm.kvm_vm)'s C(recreate) to re-place it).
      - In check mode the VMs that would be stopped count as a change.
    type: bool
    default: false
  stop_timeout:
    description: Seconds of ACPI shutdown before a VM's power is cut (O(stop_affected)).
    type: int
    default: 60
  deep_check:
    description:
      - Also the deep check, as DGX-2 KVM ran it nightly. Every GPU that no defined libvirt
        domain holds (running or not, saved or live definition), whose IOMMU group and slot no
        domain holds a function of, and that passed its sysfs check now, is bound to
        O(deep_check.driver)
        through sysfs (C(driver_override), C(unbind), C(drivers_probe)). C(nvidia-smi -q -d
        ECC,PAGE_RETIREMENT,ROW_REMAPPER -i ADDRESS) reads it, and it goes back to the driver it
        had (vfio-pci), with its C(driver_override) as it was. All of it happens under the host
        lock, so no VM is placed on a GPU while it is away.
      - Uncorrectable ECC errors since the driver loaded, a failed row remap, or unrepairable
        memory make the GPU V(failed). A row remap, a repair or a retired page waiting for a
        reset make it V(degraded). A GPU the driver does not take, or that nvidia-smi cannot
        read, is V(failed). Findings have the source V(nvidia-smi), and they count until the
        next deep check of that GPU.
      - Refused, with no GPU touched, when the driver is not loaded, when nvidia-smi is
        missing, or when libvirt cannot be read (which GPUs VMs hold must be known). An answer
        of nvidia-smi that says nothing about the GPU (the driver not loaded, NVML missing, a
        driver/library version mismatch) stops the run, and no GPU is failed for it.
      - Each deep check records when it ran, so it always changes the record.
      - Not run in check mode, because it moves GPUs between drivers.
      - Give V({}) for the defaults.
    type: dict
    suboptions:
      driver:
        description: The PCI driver that nvidia-smi reads GPUs through.
        type: str
        default: nvidia
      nvidia_smi:
        description: The nvidia-smi command, a name on PATH or a path.
        type: str
        default: nvidia-smi
      timeout:
        description: Seconds to wait for nvidia-smi, per GPU.
        type: int
        default: 120
notes:
  - A converted host (M(gpuvirt.kvm.kvm_host)) runs the same check at boot and nightly, and
    has the C(gpuvirt-health) command for admins at the shell (C(docs/health.md)).
seealso:
  - module: gpuvirt.kvm.gpu_topology
"""

EXAMPLES = r"""
- name: Record every GPU's and NVSwitch's health now
  gpuvirt.kvm.gpu_health:
  register: health

- name: Take a GPU out of service
  gpuvirt.kvm.gpu_health:
    action: mark
    devices: [0000:34:00.0]
    reason: "XID 79 in the tenant's log, ticket OPS-1234"

- name: The nightly deep check of the GPUs no VM holds (a host with the NVIDIA driver loaded)
  gpuvirt.kvm.gpu_health:
    deep_check: {}

- name: Put it back after the reseat
  gpuvirt.kvm.gpu_health:
    action: clear
    devices: [0000:34:00.0]
    reason: "reseated, dcgmi diag -r 3 passed (OPS-1234)"
"""

RETURN = r"""
record:
  description: The health record's path.
  returned: always
  type: str
devices:
  description: Every GPU and NVSwitch of the platform, in index order, as the record holds it.
  returned: success
  type: list
  elements: dict
  contains:
    address:
      description: PCI address.
      type: str
    kind:
      description: V(gpu) or V(nvswitch).
      type: str
    index:
      description: Its index among the platform's GPUs or NVSwitches.
      type: int
    state:
      description: V(ok), V(degraded) (reported only) or V(failed) (never given to a VM).
      type: str
    reason:
      description: The worst signals' reasons, joined; empty when V(ok).
      type: str
    source:
      description: Where they come from (V(pci), V(power), V(aer), V(link), V(sxid),
        V(admin), V(nvidia-smi)).
      type: str
    since:
      description: When this state and reason began (UTC, ISO 8601).
      type: str
    signals:
      description: Each finding, C(source), C(state) and C(reason).
      type: list
      elements: dict
    mark:
      description: An admin's mark (C(state), C(reason), C(since)), when there is one.
      type: dict
    cleared:
      description: The last clear (C(reason), C(since), and the C(signals) it hides).
      type: dict
    deep:
      description: The last deep check of a GPU (C(at), C(driver), C(signals)), when there was
        one.
      type: dict
    history:
      description: The device's last 20 events (C(at), C(event), C(reason), C(state)).
      type: list
      elements: dict
    held_by:
      description: The libvirt domain that holds the device, or null.
      type: str
    missing:
      description: The device is gone from the slot the host record keeps for it.
      type: bool
failed_devices:
  description: Addresses of the failed devices.
  returned: success
  type: list
  elements: str
degraded_devices:
  description: Addresses of the degraded devices.
  returned: success
  type: list
  elements: str
deep_check:
  description:
    - What the deep check did. C(checked) lists the GPUs it read. C(skipped) maps each GPU it
      left alone to why (C(held by VM NAME), or C(failed) and the reason).
    - Null without O(deep_check), and in check mode.
  returned: success
  type: dict
affected_vms:
  description:
    - The domains that hold a failed device - the only VMs a fault touches - with C(name),
      C(running) and C(devices) (the failed addresses they hold).
    - With O(stop_affected), C(stopped) says how each was stopped (C(shutdown), C(destroyed),
      or null when it was not running), and C(error) why one could not be.
  returned: success
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule

# _bytecode first: it compiles the module_utils imported after it once per run (see there).
from ansible_collections.gpuvirt.kvm.plugins.module_utils import _bytecode  # noqa: F401 pylint: disable=unused-import
from ansible_collections.gpuvirt.kvm.plugins.module_utils._argspec import (
    host_argspec,
    libvirt_argspec,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._health_check import (
    HealthError,
    affected,
    affected_message,
    apply,
    changed,
    holders,
    rows,
    stop_affected,
    unread_lines,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._health_record import summary
from ansible_collections.gpuvirt.kvm.plugins.module_utils._health_store import (
    DEFAULT_HEALTH_RECORD,
    render,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_context import resolve_uri
from ansible_collections.gpuvirt.kvm.plugins.module_utils._lock import lock_argspec


def _validate(p):
    if p["action"] == "check":
        if p["devices"] or p["reason"]:
            return "devices and reason are for action=mark and action=clear; action=check " \
                   "checks every device: leave them out"
        return None
    if not p["devices"]:
        return "devices: action=%s needs the GPUs or NVSwitches to %s, by PCI address" % (
            p["action"], p["action"])
    if not (p["reason"] or "").strip():
        return "reason: action=%s needs a reason (it is kept in the health record)" % p["action"]
    return None


def main():
    argument_spec = dict(
        action=dict(type="str", choices=["check", "mark", "clear"], default="check"),
        devices=dict(type="list", elements="str", default=[]),
        reason=dict(type="str"),
        stop_affected=dict(type="bool", default=False),
        stop_timeout=dict(type="int", default=60),
        deep_check=dict(type="dict", options=dict(
            driver=dict(type="str", default="nvidia"),
            nvidia_smi=dict(type="str", default="nvidia-smi"),
            timeout=dict(type="int", default=120),
        )),
    )
    argument_spec.update(host_argspec())
    argument_spec.update(libvirt_argspec())
    argument_spec.update(lock_argspec())
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    p = module.params
    path = p["health_record"] or DEFAULT_HEALTH_RECORD
    problem = _validate(p)
    if problem:
        module.fail_json(msg=problem, record=path)
    deep = p["deep_check"]
    if deep is not None and module.check_mode:
        # It moves GPUs between drivers: check mode says what it would check, and does not.
        deep = None
        module.warn("deep_check: not run in check mode (it binds GPUs to the NVIDIA driver)")
    try:
        ctx, before, after, report = apply(
            p, p["action"], p["devices"], (p["reason"] or "").strip(),
            write=not module.check_mode, deep=deep)
    except HealthError as exc:
        module.fail_json(msg=str(exc), record=path)
    if p["fabric_manager"] or "sxid" in ctx.unread_sources:
        for line in unread_lines(ctx):
            module.warn(line)
    held, why = holders(resolve_uri(p["uri"]))
    if why:
        if p["stop_affected"]:
            module.fail_json(msg="stop_affected: no VM was stopped: which VMs hold a failed "
                             "device cannot be read from libvirt (%s)" % why, record=path)
        module.warn("holders not read: %s" % why)
    device_rows = rows(ctx, after, held)
    vms = affected(device_rows, held)
    if p["stop_affected"] and not module.check_mode:
        try:
            stop_affected(resolve_uri(p["uri"]), vms, p["stop_timeout"])
        except HealthError as exc:
            module.fail_json(msg=str(exc), record=path)
    for vm in vms:
        module.warn(affected_message(vm))
    stopped = [vm["name"] for vm in vms if vm.get("stopped")]
    errors = [vm for vm in vms if vm.get("error")]
    found = summary(after, {row["address"] for row in device_rows})
    would_stop = [vm["name"] for vm in vms if vm["running"]] \
        if p["stop_affected"] and module.check_mode else []
    result = dict(changed=changed(before, after) or bool(stopped or would_stop), record=path,
                  devices=device_rows,
                  affected_vms=vms, failed_devices=found["failed"],
                  degraded_devices=found["degraded"], deep_check=report)
    if module._diff:
        result["diff"] = {"before": render(before) if before else "",
                          "after": render(after), "before_header": path, "after_header": path}
    if errors:
        module.fail_json(msg="stop_affected: %s" % "; ".join(
            "%s: %s" % (vm["name"], vm["error"]) for vm in errors), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: layout_report
short_description: A host's layout report - desired vs actual, free blocks, degraded GPUs, changes
version_added: 0.2.0
description:
  - Joins what a layout asked for, what M(gpuvirt.kvm.kvm_layout) did and what
    M(gpuvirt.kvm.gpu_topology) reads afterwards into one JSON-ready report per host. The
    C(gpuvirt.kvm.gpu_vms) role ends with it; AWX shows it as an artifact.
positional: _input, result, topology
options:
  _input:
    description: The layout's VMs as given to M(gpuvirt.kvm.kvm_layout) (a list of dicts).
    type: list
    elements: dict
    required: true
  result:
    description: What M(gpuvirt.kvm.kvm_layout) returned (registered), failed or not.
    type: dict
    required: true
  topology:
    description: What M(gpuvirt.kvm.gpu_topology) returned after the converge.
    type: dict
    required: true
  host:
    description: The host's name in the report.
    type: str
    default: ""
  layout:
    description: The layout's name in the report.
    type: str
    default: ""
  check_mode:
    description:
      - The run was in check mode - nothing was changed, so desired and actual differ as
        planned; C(ok) then only says whether every VM could be placed and converged.
    type: bool
    default: false
author:
  - gpuvirt.kvm contributors (@gpuvirt)
"""

EXAMPLES = r"""
- name: Report
  ansible.builtin.set_fact:
    report: "{{ layout_vms | gpuvirt.kvm.layout_report(converged, topo, host=inventory_hostname, layout='day') }}"
"""

RETURN = r"""
_value:
  description: The report.
  type: dict
  contains:
    host: {description: The host., type: str}
    layout: {description: The layout's name., type: str}
    ok: {description: "Every desired VM is as asked and the converge did not fail (in check mode: no VM failed).", type: bool}
    check_mode: {description: The report is of a check-mode run., type: bool}
    desired:
      description: One entry per VM of the layout - C(name), C(gpus), C(state) asked, and
        C(actual) (C(running), C(stopped), C(absent)), C(matches), C(gpu_indexes), C(nics) (the
        rail NIC functions and VFs it holds), C(error).
      type: list
      elements: dict
    others:
      description: Domains on the host that the layout does not list (C(name), C(managed),
        C(active), C(gpus)).
      type: list
      elements: dict
    free_blocks: {description: Free healthy GPUs as placeable blocks by size., type: dict}
    nics:
      description:
        - The host's NICs as gpu_topology found them (docs/networking.md) - C(bdf), C(model),
          C(rail_gpu_indexes), C(offered), C(host_use), C(allocated_to), and C(vfs) with their
          holders.
      type: list
      elements: dict
    degraded_gpus:
      description: Unhealthy GPUs (C(bdf), C(index), C(allocated_to)).
      type: list
      elements: dict
    changed: {description: Whether the converge changed anything., type: bool}
    actions: {description: What the converge did, one line each., type: list, elements: str}
    removed: {description: VMs removed because the layout no longer lists them., type: list, elements: str}
    failed: {description: VMs that failed (C(name), C(error)) and the converge's own message., type: list, elements: dict}
    picture:
      description:
        - The host's picture (P(gpuvirt.kvm.host_picture#filter)) from the topology read after
          the converge, which P(gpuvirt.kvm.fleet_page#filter) draws; null when that read failed.
      type: dict
      version_added: 0.2.0
    versions:
      description: The host's stack (M(gpuvirt.kvm.gpu_topology)'s RV(gpuvirt.kvm.gpu_topology#module:versions)),
        or an empty dict.
      type: dict
      version_added: 0.2.0
"""

from ansible.errors import AnsibleFilterError

from ansible_collections.gpuvirt.kvm.plugins.module_utils._picture import picture_data


def _actual_state(alloc):
    if alloc is None:
        return "absent"
    return "running" if alloc.get("active") else "stopped"


def _matches(want_state, actual):
    if want_state == "absent":
        return actual == "absent"
    if want_state == "running":
        return actual == "running"
    if want_state == "stopped":
        return actual == "stopped"
    return actual != "absent"  # present: defined, either power state


def layout_report(vms, result, topology, host="", layout="", check_mode=False):
    if not isinstance(vms, list) or not all(isinstance(v, dict) and "name" in v for v in vms):
        raise AnsibleFilterError("layout_report: expected the layout's VMs (a list of dicts "
                                 "with name), got %r" % (vms,))
    if not isinstance(result, dict) or not isinstance(topology, dict):
        raise AnsibleFilterError("layout_report: result and topology must be the registered "
                                 "results of kvm_layout and gpu_topology")
    allocations = {a["name"]: a for a in topology.get("allocations") or []}
    index_of = {g["bdf"]: g.get("index") for g in topology.get("gpus") or []}
    results = {}
    for entry in result.get("vms") or []:
        vm = entry.get("vm") or {}
        if vm.get("name"):
            results[vm["name"]] = entry
    errors = {name: entry.get("error") for name, entry in results.items() if entry.get("error")}
    desired = []
    listed = set()
    for vm in vms:
        name = vm["name"]
        listed.add(name)
        alloc = allocations.get(name)
        actual = _actual_state(alloc)
        want = vm.get("state") or "running"
        gpus = (alloc or {}).get("gpus") or []
        desired.append({
            "name": name,
            "gpus": vm.get("gpus", 0),
            "state": want,
            "actual": actual,
            "gpu_indexes": sorted(index_of[b] for b in gpus if index_of.get(b) is not None),
            "nics": list((alloc or {}).get("nics") or []),
            "matches": _matches(want, actual) and name not in errors,
            "error": errors.get(name),
        })
    others = [{"name": a["name"], "managed": bool(a.get("managed")), "active": bool(a.get("active")),
               "gpus": len(a.get("gpus") or [])}
              for name, a in sorted(allocations.items()) if name not in listed]
    degraded = [{"bdf": g["bdf"], "index": g.get("index"), "allocated_to": g.get("allocated_to")}
                for g in topology.get("gpus") or [] if g.get("healthy") is False]
    failed = [{"name": d["name"], "error": d["error"]} for d in desired if d["error"]]
    failed += [{"name": name, "error": err} for name, err in sorted(errors.items())
               if name not in listed]
    # A registered result with failed_when: false has failed=false: a module-level failure
    # (bad option, libvirt unreachable) shows as a msg without vms.
    if not failed and (result.get("failed") or ("vms" not in result and result.get("msg"))):
        failed.append({"name": None, "error": result.get("msg") or "kvm_layout failed"})
    return {
        "host": host,
        "layout": layout,
        "ok": not failed and (bool(check_mode) or all(d["matches"] for d in desired)),
        "check_mode": bool(check_mode),
        "desired": desired,
        "others": others,
        "free_blocks": topology.get("free_blocks") or {},
        "nics": [{
            "bdf": n.get("bdf"), "model": n.get("model"),
            "rail_gpu_indexes": sorted(index_of[b] for b in n.get("rail_gpus") or []
                                       if index_of.get(b) is not None),
            "offered": bool(n.get("offered")), "host_use": n.get("host_use"),
            "allocated_to": n.get("allocated_to"),
            "vfs": [{"bdf": vf.get("bdf"), "allocated_to": vf.get("allocated_to")}
                    for vf in (n.get("sriov") or {}).get("vfs") or []],
        } for n in topology.get("nics") or []],
        "degraded_gpus": degraded,
        "changed": bool(result.get("changed")),
        "actions": list(result.get("actions") or []),
        "removed": list(result.get("removed") or []),
        "failed": failed,
        "versions": dict(topology.get("versions") or {}),
        # What fleet_page draws; none when gpu_topology failed.
        "picture": picture_data(topology) if isinstance(topology.get("gpus"), list) else None,
    }


class FilterModule:
    def filters(self):
        return {"layout_report": layout_report}

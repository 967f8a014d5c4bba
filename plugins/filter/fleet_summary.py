# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: fleet_summary
short_description: One entry per host from the gpu_vms role's reports, failed hosts included
version_added: 0.2.0
description:
  - Reads, for each host of O(hosts), the C(gpu_vms_report) fact the C(gpuvirt.kvm.gpu_vms)
    role leaves and the C(gpuvirt_host_error) fact the playbooks record when a host fails, and
    returns one entry per host, sorted by name, with a readable line. A host with neither was
    unreachable or failed before the role ran.
positional: _input, hosts
options:
  _input:
    description: C(hostvars), or any dict of host name -> that host's variables.
    type: dict
    required: true
  hosts:
    description: The hosts to summarise.
    type: list
    elements: str
    required: true
author:
  - gpuvirt.kvm contributors (@gpuvirt)
"""

EXAMPLES = r"""
- name: Summarise the fleet
  ansible.builtin.debug:
    msg: "{{ hostvars | gpuvirt.kvm.fleet_summary(ansible_play_hosts_all) | map(attribute='line') | list }}"
"""

RETURN = r"""
_value:
  description: One entry per host.
  type: list
  elements: dict
  contains:
    host: {description: The host., type: str}
    status:
      description: V(ok), V(failed) (C(errors) says why) or V(no report) (unreachable, or
        failed before the role ran).
      type: str
    layout: {description: The layout converged, when known., type: str}
    vms: {description: How many VMs the layout lists., type: int}
    changed: {description: Whether the host changed., type: bool}
    errors: {description: Why the host failed., type: list, elements: str}
    line:
      description: One line for humans. With rail NICs it ends with how many are free and, in
        brackets after C(held), each held function or VF and its VM - a NIC is free when no VM
        holds it or a VF of it.
      type: str
    nic_holders:
      description: Rail NIC function or VF -> the VM that holds it (empty unless the host is ok).
      type: dict
      version_added: 0.2.0
    versions:
      description: The host's stack as M(gpuvirt.kvm.gpu_topology) reported it
        (RV(gpuvirt.kvm.gpu_topology#module:versions)), or an empty dict when the host has no
        report.
      type: dict
      version_added: 0.2.0
    stack:
      description: RV(_value[].versions) as one line for humans (V(gpuvirt.kvm 0.1.0, kernel ...,
        libvirt ..., QEMU ..., OVMF ..., NVIDIA driver ..., Fabric Manager ...)), or an empty
        string.
      type: str
      version_added: 0.2.0
"""

from ansible.errors import AnsibleFilterError

from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_stack import stack_line


def _var(hostvars, host, name):
    try:
        return hostvars[host].get(name)
    except (KeyError, AttributeError, TypeError):
        return None


def _nic_holders(nics):
    """{function or VF: the VM that holds it} over a report's NICs, PCI order."""
    held = {}
    for nic in nics:
        if nic.get("allocated_to"):
            held[nic["bdf"]] = nic["allocated_to"]
        for vf in nic.get("vfs") or []:
            if vf.get("allocated_to"):
                held[vf["bdf"]] = vf["allocated_to"]
    return held


def fleet_summary(hostvars, hosts):
    if not hasattr(hostvars, "__getitem__") or not isinstance(hosts, (list, tuple)):
        raise AnsibleFilterError("fleet_summary: expected hostvars and a list of hosts, got %r "
                                 "and %r" % (type(hostvars).__name__, hosts))
    out = []
    for host in sorted(set(hosts)):
        held = {}
        report = _var(hostvars, host, "gpu_vms_report")
        error = _var(hostvars, host, "gpuvirt_host_error")
        if error and not (isinstance(report, dict) and report.get("failed")):
            report = {"ok": False, "layout": (report or {}).get("layout"),
                      "failed": [{"name": None, "error": str(error)}]}
        if not isinstance(report, dict):
            out.append({"host": host, "status": "no report", "layout": None, "vms": 0,
                        "changed": False, "errors": [], "versions": {}, "stack": "",
                        "nic_holders": {},
                        "line": "%-20s no report (unreachable, or failed before gpu_vms ran)"
                                % host})
            continue
        errors = [f.get("error") or "?" for f in report.get("failed") or []]
        desired = report.get("desired") or []
        status = "ok" if report.get("ok") else "failed"
        if status == "ok":
            text = "%d VM(s), %s" % (len(desired), "changed" if report.get("changed")
                                     else "no change")
            if report.get("removed"):
                text += ", removed %s" % ", ".join(report["removed"])
            blocks = report.get("free_blocks") or {}
            if blocks:
                text += ", free GPU blocks %s" % ", ".join(
                    "%s x %s" % (blocks[k], k) for k in sorted(blocks, key=int, reverse=True))
            rails = [n for n in report.get("nics") or [] if n.get("offered")]
            if rails:
                free = [n for n in rails if not n.get("allocated_to")
                        and not any(vf.get("allocated_to") for vf in n.get("vfs") or [])]
                text += ", rail NICs free %d of %d" % (len(free), len(rails))
                held = _nic_holders(rails)
                if held:
                    text += " (held: %s)" % ", ".join("%s %s" % kv for kv in held.items())
        else:
            mismatched = [d["name"] for d in desired if not d.get("matches") and not d.get("error")]
            text = "; ".join(errors + ["%s not as asked" % n for n in mismatched]) or "failed"
        versions = report.get("versions") if isinstance(report.get("versions"), dict) else {}
        out.append({"host": host, "status": status, "layout": report.get("layout"),
                    "vms": len(desired), "changed": bool(report.get("changed")),
                    "nic_holders": held,
                    "errors": errors, "versions": versions, "stack": stack_line(versions),
                    "line": "%-20s %-7s %-8s %s" % (host, status, report.get("layout") or "",
                                                    text)})
    return out


class FilterModule:
    def filters(self):
        return {"fleet_summary": fleet_summary}

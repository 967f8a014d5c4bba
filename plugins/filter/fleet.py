# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The fleet_plan filter (documented in fleet_plan.yml): a thin shell over _fleet_plan.

It only turns what a playbook has (a dict of gpu_topology results, or hostvars with the name of
the registered variable) into plain per-host facts and labels; the planning is
module_utils._fleet_plan.fleet_plan().
"""

from __future__ import annotations

from collections.abc import Mapping

from ansible.errors import AnsibleFilterError
from jinja2 import Undefined

from ansible_collections.gpuvirt.kvm.plugins.module_utils import _fleet_plan


def _missing(value):
    return value is None or isinstance(value, Undefined)


def _lookup(mapping, key):
    """mapping[key], or None when it is not there (hostvars answer undefined, dicts KeyError)."""
    try:
        if key not in mapping:
            return None
        value = mapping[key]
    except (KeyError, TypeError):
        return None
    return None if _missing(value) else value


def _why_unusable(result):
    """Why a host's gpu_topology result cannot be planned with, or None when it can."""
    if not isinstance(result, Mapping):
        return None  # let the planner say what it expected
    if result.get("unreachable"):
        return "unreachable: %s" % (result.get("msg") or "no message")
    if result.get("failed"):
        return "gpu_topology failed: %s" % (result.get("msg") or "no message")
    if result.get("skipped"):
        return "gpu_topology was skipped on it"
    return None


def collect(facts, key=None, hosts=None, labels=None, label_vars=None):
    """(facts by host, labels by host, skipped host -> why) from the filter's arguments."""
    if _missing(facts) or not isinstance(facts, Mapping):
        raise AnsibleFilterError(
            "fleet_plan: the input must be a dict host -> gpu_topology result, or hostvars with "
            "key= naming the registered variable; got %s" % type(facts).__name__)
    if label_vars and key is None:
        raise AnsibleFilterError("fleet_plan: label_vars reads inventory variables from hostvars;"
                                 " pass hostvars as the input with key= naming the registered "
                                 "gpu_topology variable, or give labels= instead")
    if labels is not None and not isinstance(labels, Mapping):
        raise AnsibleFilterError("fleet_plan: labels must be a dict host -> dict of labels, got %s"
                                 % type(labels).__name__)
    if isinstance(label_vars, str):
        label_vars = [label_vars]
    names = list(facts) if hosts is None else list(hosts)
    by_host = {}
    host_labels = {}
    skipped = {}
    for raw in names:
        host = "%s" % raw
        entry = _lookup(facts, raw)
        if entry is None:
            skipped[host] = "not in the input"
            continue
        result = entry
        if key is not None:
            result = _lookup(entry, key)
            if result is None:
                skipped[host] = "has no variable %r (gpu_topology did not run there)" % key
                continue
        why = _why_unusable(result)
        if why is not None:
            skipped[host] = why
            continue
        by_host[host] = result
        own = {}
        for var in label_vars or ():
            value = _lookup(entry, var)
            if value is not None:
                own[var] = value
        extra = _lookup(labels, raw) if labels is not None else None
        if extra is not None:
            if not isinstance(extra, Mapping):
                raise AnsibleFilterError("fleet_plan: labels[%r] must be a dict, got %s" % (
                    host, type(extra).__name__))
            own.update(extra)
        host_labels[host] = own
    return by_host, host_labels, skipped


def fleet_plan(facts, requests, key=None, hosts=None, labels=None, label_vars=None,
               exclusive=False, owner_tag=None):
    """Assign tenant requests to hosts from every host's gpu_topology result."""
    by_host, host_labels, skipped = collect(facts, key, hosts, labels, label_vars)
    if _missing(requests):
        raise AnsibleFilterError("fleet_plan: requests is undefined; give a list of VM dicts")
    try:
        return _fleet_plan.fleet_plan(by_host, requests, labels=host_labels,
                                      exclusive=bool(exclusive), owner_tag=owner_tag,
                                      skipped=skipped)
    except _fleet_plan.FleetError as exc:
        raise AnsibleFilterError("fleet_plan: %s" % exc) from None


class FilterModule:
    def filters(self):
        return {"fleet_plan": fleet_plan}

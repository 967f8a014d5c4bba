# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The fleet_plan filter's backend: tenants over a fleet, from gpu_topology's facts. Private.

No I/O. ``fleet_plan()`` takes each host's gpu_topology result and a list of kvm_vm-style
requests (typed and checked with kvm_vm's own spec, ``_vm_request``), rebuilds every host's
HostState from the facts (exactly the state gpu_topology and kvm_layout build on the host),
limits requests with a ``where`` JMESPath expression to the hosts it matches, and places them
with ``_fleet_placement.Fleet``.

Runs on the controller only (the filter imports it); ``jmespath`` is imported when a request
has a ``where``, so the rest works without it.
"""

from __future__ import annotations

import json

from ansible_collections.gpuvirt.kvm.plugins.module_utils._argspec import ArgSpecError
from ansible_collections.gpuvirt.kvm.plugins.module_utils._fleet_placement import Fleet
from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import holding_from_facts
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_facts import (
    PLACEMENT_STATE_FORMAT,
    placement_entry,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import nic_from_dict
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement import HostState
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import PlacementError
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platform_data import platform_from_dict
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
    PLATFORMS,
    PlatformError,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._ranges import parse_ranges
from ansible_collections.gpuvirt.kvm.plugins.module_utils._topology import (
    Cpu,
    HostTopology,
    NumaNode,
    PciDevice,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_request import (
    PLACEMENT_OPTIONS,
    VM_OPTIONS,
    VmError,
    placement_request,
    request_from_params,
    resolve,
)

# Request keys the planner reads (typed and checked with kvm_vm's own spec); every other key
# travels to kvm_layout untouched.
PLAN_KEYS = PLACEMENT_OPTIONS + ("state",)
_PLAN_ENTRY = VM_OPTIONS.subset(PLAN_KEYS).without_defaults()
# Keys only the planner uses: dropped from the entries handed to kvm_layout.
FLEET_KEYS = ("host", "where")


class FleetError(Exception):
    """The input cannot be planned at all (malformed request, facts or expression)."""


# --- requests ----------------------------------------------------------------------------------

class FleetRequest(object):
    """One request: what placement reads, where it may go, and the entry for kvm_layout."""

    __slots__ = ("request", "entry", "where", "absent", "position")

    def __init__(self, request, entry, where, absent, position):
        self.request = request
        self.entry = entry
        self.where = where
        self.absent = absent
        self.position = position


def requests_from_entries(entries):
    """Validate request dicts (kvm_vm options plus host and where) into FleetRequests."""
    if entries is None:
        return []
    if isinstance(entries, (str, bytes)) or not hasattr(entries, "__iter__") \
            or hasattr(entries, "keys"):
        raise FleetError("requests: expected a list of VM dicts (name, gpus, ...), got %s" % (
            type(entries).__name__))
    result = []
    seen = {}
    for n, entry in enumerate(entries):
        where = "requests[%d]" % n
        if not hasattr(entry, "keys"):
            raise FleetError("%s: expected a dict of kvm_vm options (name, gpus, ...), got %r" % (
                where, entry))
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise FleetError("%s.name: %r; give every VM a non-empty name" % (where, name))
        where = "requests[%d] (%s)" % (n, name)
        if name in seen:
            raise FleetError("%s: the name %r is used by requests[%d] too; names must be unique"
                             % (where, name, seen[name]))
        seen[name] = n
        try:
            typed = _PLAN_ENTRY.typed({k: entry[k] for k in PLAN_KEYS if k in entry}, where)
            vm = request_from_params(typed, where)
        except (ArgSpecError, VmError) as exc:
            raise FleetError(str(exc)) from exc
        host = entry.get("host")
        if host is not None and (not isinstance(host, str) or not host):
            raise FleetError("%s.host: %r; give an inventory host name, or leave it out" % (
                where, host))
        expression = entry.get("where")
        if expression is not None and (not isinstance(expression, str) or not expression.strip()):
            raise FleetError("%s.where: %r; give a JMESPath expression as a string, e.g. "
                             "\"platform == 'dgx2'\"" % (where, expression))
        request = placement_request(resolve(vm), host=None if host is None else str(host))
        passed = dict((k, v) for k, v in entry.items() if k not in FLEET_KEYS)
        result.append(FleetRequest(request, passed, None if expression is None
                                   else str(expression), vm.state == "absent", n))
    return result


# --- facts -> HostState ------------------------------------------------------------------------

def _check_facts(host, facts):
    """Raise FleetError unless facts look like a gpu_topology result with placement_state."""
    if not hasattr(facts, "get"):
        raise FleetError("host %r: expected its gpu_topology result (a dict), got %s" % (
            host, type(facts).__name__))
    state = facts.get("placement_state")
    missing = [k for k in ("platform", "gpus", "nvswitches", "numa_nodes", "allocations")
               if facts.get(k) is None]
    if state is None or missing:
        raise FleetError(
            "host %r: its facts are not a gpu_topology result with placement_state (missing: "
            "%s); register gpuvirt.kvm.gpu_topology's result on every host and pass that" % (
                host, ", ".join((["placement_state"] if state is None else []) + missing)))
    if state.get("format") != PLACEMENT_STATE_FORMAT:
        raise FleetError("host %r: placement_state format %r, this collection reads format %d; "
                         "gather the facts with this version of gpuvirt.kvm.gpu_topology" % (
                             host, state.get("format"), PLACEMENT_STATE_FORMAT))


def _devices(entries):
    return [[str(d["bdf"]), str(d["id"]), int(d["numa_node"]), str(d.get("host_bridge") or ""),
             [str(b) for b in d.get("pcie_path") or ()]] for d in entries]


def _static_facts(facts):
    """The parts of the facts that make the host model (shared by hosts that are built alike)."""
    ps = facts["placement_state"]
    return {
        "platform": facts["platform"]["name"] if ps.get("platform") is None else ps["platform"],
        "gpus": _devices(facts["gpus"]),
        "nvswitches": _devices(facts["nvswitches"]),
        "numa_nodes": [[int(n["id"]), str(n["cpus"]), str(n.get("reserved_cpus") or ""),
                        int(n["memory_mb"]),
                        sorted([int(size), int(v.get("total", 0))]
                               for size, v in (n.get("hugepages") or {}).items())]
                       for n in facts["numa_nodes"]],
        "cpu_siblings": [str(c) for c in ps.get("cpu_siblings") or ()],
        "reserved_memory_mb": sorted([int(k), int(v)] for k, v in
                                     (ps.get("reserved_memory_mb") or {}).items()),
        "nvlinks": sorted([int(a), int(b), int(c)] for a, b, c in ps.get("nvlinks") or ()),
        "nics": [nic_from_dict(n).to_dict() for n in ps.get("nics") or ()],
        "gpu_group_nics": sorted([str(g), [str(m) for m in mates]]
                                 for g, mates in (ps.get("gpu_group_nics") or {}).items()),
    }


class StateBuilder(object):
    """facts -> HostState; hosts with the same static facts share one host model."""

    def __init__(self):
        self._bases = {}
        self._platforms = {}

    def platform(self, host, spec):
        if isinstance(spec, str):
            if spec not in PLATFORMS:
                raise FleetError(
                    "host %r: platform %r is not built into this collection and its facts carry "
                    "no platform data; gather them with this version of gpuvirt.kvm.gpu_topology"
                    % (host, spec))
            return PLATFORMS[spec]
        key = json.dumps(spec, sort_keys=True)
        plat = self._platforms.get(key)
        if plat is None:
            try:
                plat = platform_from_dict(dict(spec), source="facts of %s" % host)
            except PlatformError as exc:
                raise FleetError("host %r: the platform data in its facts: %s" % (host, exc)) \
                    from exc
            self._platforms[key] = plat
        return plat

    def base(self, host, static):
        key = json.dumps(static, sort_keys=True)
        base = self._bases.get(key)
        if base is None:
            base = self._build(host, static)
            self._bases[key] = base
        return base

    def _build(self, host, static):
        platform = self.platform(host, static["platform"])
        gpu_class = platform.gpu_classes[0] << 8
        switch_class = platform.nvswitch_classes[0] << 8
        pci = {}
        for devices, cls in ((static["gpus"], gpu_class), (static["nvswitches"], switch_class)):
            for bdf, ident, node, bridge, path in devices:
                vendor, _sep, device = ident.partition(":")
                # Discovery kept exactly these devices for this platform, so give them the
                # platform's class: platform_gpus() then finds the same devices, in BDF order.
                pci[bdf] = PciDevice(bdf=bdf, vendor=int(vendor, 16), device=int(device, 16),
                                     class_code=cls, driver=None, numa_node=node,
                                     iommu_group=None, path=tuple(path) + (bdf,),
                                     host_bridge=bridge)
        siblings = {}
        for group in static["cpu_siblings"]:
            cpus = parse_ranges(group)
            for cpu in cpus:
                siblings[cpu] = cpus
        cpus = {}
        nodes = []
        reserved = set()
        for node_id, cpulist, reserved_list, memory_mb, pools in static["numa_nodes"]:
            node_cpus = parse_ranges(cpulist)
            reserved.update(parse_ranges(reserved_list))
            for cpu in node_cpus:
                sib = siblings.get(cpu, (cpu,))
                cpus[cpu] = Cpu(id=cpu, socket=-1, core=min(sib), node=node_id, siblings=sib)
            nodes.append(NumaNode(
                id=node_id, cpus=node_cpus, memory_total_kb=memory_mb * 1024, memory_free_kb=0,
                hugepages=dict((size, {"total": total, "free": total}) for size, total in pools)))
        topology = HostTopology(pci=pci, cpus=cpus, numa_nodes=tuple(nodes), cmdline="",
                                iommu_groups=0, sysfs_root="", proc_root="")
        try:
            return HostState(topology, platform, reserved_cpus=sorted(reserved),
                             reserved_memory_mb=dict(static["reserved_memory_mb"]),
                             nvlinks=dict(((a, b), c) for a, b, c in static["nvlinks"]),
                             nics=[nic_from_dict(n) for n in static["nics"]],
                             gpu_group_nics=dict((g, tuple(mates))
                                                 for g, mates in static["gpu_group_nics"]))
        except PlacementError as exc:
            raise FleetError("host %r: its facts do not make a host state: %s" % (host, exc)) \
                from exc

    def state(self, host, facts):
        """The host's HostState as gpu_topology built it: devices, CPUs, allocations, health."""
        _check_facts(host, facts)
        try:
            static = _static_facts(facts)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FleetError("host %r: its gpu_topology facts are incomplete or malformed (%s: "
                             "%s); pass gpuvirt.kvm.gpu_topology's result unchanged" % (
                                 host, type(exc).__name__, exc)) from exc
        base = self.base(host, static)
        try:
            allocations = [holding_from_facts(a) for a in facts["allocations"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise FleetError("host %r: an allocation in its facts is malformed (%s: %s)" % (
                host, type(exc).__name__, exc)) from exc
        unhealthy = [g["bdf"] for g in facts["gpus"] if g.get("healthy", True) is False]
        busy = {g["bdf"]: g["busy"] for g in facts["gpus"] if g.get("busy")}
        failed = [s["bdf"] for s in facts.get("nvswitches") or ()
                  if s.get("healthy", True) is False]
        return base.derive(allocations, unhealthy, busy, failed)


# --- where -------------------------------------------------------------------------------------

def rail_counts(state):
    """(free, offered) rail NICs of a host: free is neither held whole nor any VF of it held
    (the fleet report's "rail NICs free F of N")."""
    offered = [n for n in state.model.nics if n.offered]
    free = [n for n in offered if n.bdf not in state.nic_holder
            and not any(vf in state.nic_holder for vf in n.vfs)]
    return len(free), len(offered)


def where_document(host, state, facts, labels):
    """What a request's `where` expression sees of a host (plain JSON data, see docs/fleet.md)."""
    m = state.model
    free_blocks = state.free_blocks()
    nodes = []
    for node in m.topology.numa_nodes:
        gpus = [i for i in range(m.gpu_count) if m.gpu_node[i] == node.id]
        nodes.append({
            "id": node.id,
            "cpus": len(node.cpus),
            "free_cpus": state.node_free.get(node.id, 0),
            "memory_mb": node.memory_mb,
            "free_memory_mb": m.mem_capacity.get(node.id, 0) - state.mem_used.get(node.id, 0),
            "gpus": len(gpus),
            "free_gpus": sum(1 for i in gpus if state.free_mask >> i & 1),
        })
    readiness = facts.get("readiness") or {}
    free_rails, rails = rail_counts(state)
    return {
        "host": host,
        "platform": m.platform.name,
        "fabric": m.platform.fabric,
        "gpu_models": sorted(set(str(g.get("model", "unknown")) for g in facts["gpus"])),
        "gpus": m.gpu_count,
        "healthy_gpus": m.gpu_count - len(state.unhealthy),
        "free_gpus": state.free_gpus,
        "free_blocks": dict((str(k), v) for k, v in free_blocks.items()),
        "largest_free_block": max(free_blocks) if free_blocks else 0,
        "allowed_sizes": list(m.platform.allowed_sizes),
        "nvswitches": m.switch_count,
        "cpus": sum(n["cpus"] for n in nodes),
        "free_cpus": sum(n["free_cpus"] for n in nodes),
        "memory_mb": sum(n["memory_mb"] for n in nodes),
        "free_memory_mb": sum(n["free_memory_mb"] for n in nodes),
        "numa_nodes": nodes,
        "vms": sorted(state.allocations),
        "rail_nics": rails,
        "free_rail_nics": free_rails,
        "ready": bool(readiness.get("ready", False)),
        "labels": plain(labels or {}),
    }


def plain(value):
    """JSON-like data as plain dict/list/str/int/float/bool/None (JMESPath checks exact types)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return "%s" % value
    if hasattr(value, "keys"):
        return dict(("%s" % k, plain(value[k])) for k in value.keys())
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return "%s" % value


def _jmespath():
    try:
        import jmespath  # only requests with `where` need it; the controller must have it
    except ImportError:
        raise FleetError("a request has `where`, which needs the Python library jmespath on the "
                         "controller (pip install jmespath, in the Python that runs Ansible)") \
            from None
    return jmespath


def _truthy(value):
    """JMESPath's truth: false, null, and empty strings, lists and objects are false."""
    if value is None or value is False:
        return False
    if isinstance(value, (str, list, dict)) and not value:
        return False
    return True


def where_hosts(expression, documents, who):
    """The names of the hosts whose document the expression holds for (a frozenset)."""
    jmespath = _jmespath()
    try:
        compiled = jmespath.compile(expression)
    except jmespath.exceptions.JMESPathError as exc:
        raise FleetError("%s: where %r is not a valid JMESPath expression: %s" % (
            who, expression, _one_line(exc))) from exc
    matched = []
    for host, doc in documents:
        try:
            value = compiled.search(doc)
        except jmespath.exceptions.JMESPathError as exc:
            raise FleetError("%s: where %r fails on host %r: %s" % (
                who, expression, host, _one_line(exc))) from exc
        if _truthy(value):
            matched.append(host)
    return frozenset(matched)


def _one_line(exc):
    return " ".join(str(exc).split())


# --- the plan ----------------------------------------------------------------------------------

def fleet_plan(facts_by_host, entries, labels=None, exclusive=False, owner_tag=None,
               skipped=None):
    """Assign requests to hosts; the fleet_plan filter's result (see docs/fleet.md).

    facts_by_host: host name -> gpu_topology result. labels: host name -> dict. skipped: hosts
    left out by the caller, host name -> why (they get no share; requests pinned to them are
    unplaced with that reason).
    """
    requests = requests_from_entries(entries)
    labels = labels or {}
    skipped = dict(skipped or {})
    names = sorted(str(h) for h in facts_by_host)
    builder = StateBuilder()
    states = []
    warnings = []
    vm_first = {}
    for host in names:
        state = builder.state(host, facts_by_host[host])
        for text in state.warnings:
            warnings.append("%s: %s" % (host, text))
        for vm in sorted(state.allocations):
            if vm in vm_first:
                warnings.append("VM %r is defined on %r and on %r; a request for it goes to %r"
                                % (vm, vm_first[vm], host, host))
            vm_first[vm] = host
        states.append((host, state))
    state_of = dict(states)
    before = dict((h, s.free_blocks()) for h, s in states)
    before_free = dict((h, s.free_gpus) for h, s in states)
    before_rails = dict((h, rail_counts(s)[0]) for h, s in states)

    # What kvm_layout frees before it places: `state: absent` VMs, and with exclusive, the
    # collection's VMs (of owner_tag) that no request lists.
    fleet = Fleet(states)
    absent_host = {}
    for fr in requests:
        if fr.absent:
            absent_host[fr.request.name] = fleet.release(fr.request.name)
    removed = dict((h, []) for h in names)
    if exclusive:
        listed = set(fr.request.name for fr in requests)
        for host in names:
            facts = facts_by_host[host]
            for entry in facts["allocations"]:
                if not entry.get("managed") or entry.get("name") in listed:
                    continue
                if owner_tag is not None and entry.get("owner_tag") != owner_tag:
                    continue
                if fleet.vm_host.get(entry["name"]) == host:
                    fleet.release(entry["name"])
                    removed[host].append(str(entry["name"]))

    # `where`: each distinct expression once over every host -> the set of hosts it allows.
    to_place = [fr for fr in requests if not fr.absent]
    unplaced_why = {}
    allowed = {}
    if any(fr.where is not None for fr in to_place):
        documents = [(h, where_document(h, state_of[h], facts_by_host[h], labels.get(h)))
                     for h in names]
        by_expression = {}
        for fr in to_place:
            if fr.where is None:
                continue
            who = "requests[%d] (%s)" % (fr.position, fr.request.name)
            if fr.where not in by_expression:
                by_expression[fr.where] = where_hosts(fr.where, documents, who)
            hosts = by_expression[fr.where]
            allowed[fr.request.name] = hosts
            if not hosts:
                unplaced_why[fr.request.name] = "where %r matches no host (of %d)" % (
                    fr.where, len(names))
            elif fr.request.host is not None and fr.request.host in state_of \
                    and fr.request.host not in hosts:
                unplaced_why[fr.request.name] = "host %r does not match its where %r" % (
                    fr.request.host, fr.where)
    for fr in to_place:
        host = fr.request.host
        if host is not None and host not in state_of and fr.request.name not in unplaced_why:
            if host in skipped:
                unplaced_why[fr.request.name] = "host %r has no usable facts: %s" % (
                    host, skipped[host])
            else:
                unplaced_why[fr.request.name] = "host %r is not in the fleet (hosts: %d)" % (
                    host, len(names))
    placing = [fr for fr in to_place if fr.request.name not in unplaced_why]
    result = fleet.plan([fr.request for fr in placing],
                        allowed=[allowed.get(fr.request.name) for fr in placing])
    placed = {}
    for a in result.assignments:
        placed[a.request.name] = (a.host, a.placement)
    for req, why in result.unplaced:
        unplaced_why[req.name] = why

    assignments = dict((h, []) for h in names)
    by_name = {}
    unplaced = []
    for fr in requests:
        name = fr.request.name
        if fr.absent:
            host = absent_host.get(name)
            by_name[name] = {"name": name, "host": host, "state": "absent"}
            if host is not None:
                assignments[host].append(dict(fr.entry))
            continue
        if name in placed:
            host, placement = placed[name]
            entry = placement_entry(fr.request, placement)
            entry["host"] = host
            by_name[name] = entry
            assignments[host].append(dict(fr.entry))
            continue
        why = unplaced_why[name]
        # A VM defined on a host stays in that host's share even when its new shape does not
        # fit, so that kvm_layout exclusive never removes it for that; kvm_layout reports why.
        current = fleet.vm_host.get(name) or vm_first.get(name)
        if current is not None and current in assignments:
            assignments[current].append(dict(fr.entry))
        by_name[name] = {"name": name, "host": current, "gpus_requested": fr.request.gpus,
                         "error": why}
        unplaced.append({"name": name, "gpus": fr.request.gpus, "reason": why})

    hosts = {}
    for host, state in states:
        free_rails, rails = rail_counts(state)
        hosts[host] = {
            "platform": state.platform.name,
            "gpus": state.model.gpu_count,
            "free_gpus_before": before_free[host],
            "free_gpus_after": state.free_gpus,
            "free_blocks_before": dict((str(k), v) for k, v in before[host].items()),
            "free_blocks_after": dict((str(k), v) for k, v in state.free_blocks().items()),
            "rail_nics": rails,
            "free_rail_nics_before": before_rails[host],
            "free_rail_nics_after": free_rails,
            "vms": [e["name"] for e in assignments[host]],
            "removed": removed[host],
        }
    placed_gpus = sum(fr.request.gpus for fr in requests if fr.request.name in placed)
    return {
        "assignments": assignments,
        "unplaced": unplaced,
        "by_name": by_name,
        "hosts": hosts,
        "skipped_hosts": [{"host": h, "reason": skipped[h]} for h in sorted(skipped)],
        "summary": {
            "hosts": len(names),
            "requests": len(requests),
            "placed": len(placed),
            "unplaced": len(unplaced),
            "gpus_requested": sum(fr.request.gpus for fr in requests if not fr.absent),
            "gpus_placed": placed_gpus,
        },
        "warnings": warnings,
    }

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Placement over many hosts: which host each tenant goes to. Private, pure.

:class:`Fleet` keeps every host's ``_placement.HostState`` and an index of hosts by free-block
shape, so a request never rescans every host; :func:`place_on_fleet` places requests jointly in
the order ``HostState.plan`` uses on one host. The ``fleet_plan`` filter (``_fleet_plan``)
builds the host states from gpu_topology's facts and calls this.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace

from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement import first_fit
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import (
    Placement,
    PlacementError,
    Request,
    duplicate_refusals,
)


@dataclass(frozen=True)
class FleetAssignment:
    request: Request
    host: str
    placement: Placement


@dataclass
class FleetPlan:
    assignments: list  # FleetAssignment, in request order
    unplaced: list  # (Request, reason), in request order


class _Index(object):
    """Buckets of hosts by free-block shape, over all hosts or over one allowed subset."""

    __slots__ = ("members", "buckets", "order")

    def __init__(self, members):
        self.members = members  # frozenset of host numbers, None: every host
        self.buckets = {}  # key -> sorted host numbers
        self.order = []  # sorted keys of non-empty buckets

    def add(self, h, key):
        bucket = self.buckets.get(key)
        if bucket is None:
            self.buckets[key] = [h]
            bisect.insort(self.order, key)
        else:
            bisect.insort(bucket, h)

    def remove(self, h, key):
        bucket = self.buckets[key]
        del bucket[bisect.bisect_left(bucket, h)]
        if not bucket:
            del self.buckets[key]
            del self.order[bisect.bisect_left(self.order, key)]

    def size(self):
        return sum(len(b) for b in self.buckets.values())


class Fleet(object):
    """Many hosts, indexed by free-block shape so a request never rescans every host.

    Hosts with the same (platform, free-block vector, free GPUs) form one bucket; buckets are
    kept sorted by free GPUs, so best fit ("fewest free GPUs left that still fit") walks
    buckets from the fullest and stops at the first free-GPU count where something fits.

    A request may be limited to some hosts (``allowed``: host names). Each distinct allowed set
    gets its own bucket index over the same host states, kept current as hosts fill, so a
    limited request walks only its hosts and is placed exactly as if the others did not exist.
    """

    def __init__(self, hosts):
        self.names = []
        self.states = []
        self.index = {}
        self.vm_host = {}
        for name, state in hosts:
            if name in self.index:
                raise PlacementError("hosts: %r is listed twice" % name)
            self.index[name] = len(self.names)
            self.names.append(name)
            self.states.append(state)
            for vm in state.allocations:
                self.vm_host[vm] = name
        self.key_of = []
        self._all = _Index(None)
        self._subsets = {}  # allowed host names (as given) -> _Index
        self.buckets = self._all.buckets
        self.order = self._all.order
        for h, state in enumerate(self.states):
            key = self._key(state)
            self.key_of.append(key)
            self._all.add(h, key)

    @staticmethod
    def _key(state):
        # Hosts of one bucket answer can_fit_gpus alike: on a generic host of several GPU
        # models that needs the free GPUs per model too (a VM gets one model).
        models = () if state.model.single_model else tuple(sorted(state.free_by_model().items()))
        return (state.free_gpus, id(state.model.platform), state.free_vector(), models)

    def _refresh(self, h):
        key = self._key(self.states[h])
        old = self.key_of[h]
        if key != old:
            self.key_of[h] = key
            self._all.remove(h, old)
            self._all.add(h, key)
            for idx in self._subsets.values():
                if h in idx.members:
                    idx.remove(h, old)
                    idx.add(h, key)

    def _index_for(self, allowed):
        """The bucket index of an allowed set of host names (None: every host)."""
        if allowed is None:
            return self._all
        idx = self._subsets.get(allowed) if isinstance(allowed, (frozenset, tuple)) else None
        if idx is None:
            members = frozenset(self.index[n] for n in allowed if n in self.index)
            idx = _Index(members)
            for h in sorted(members):
                idx.add(h, self.key_of[h])
            if isinstance(allowed, (frozenset, tuple)):
                self._subsets[allowed] = idx
        return idx

    def place(self, request, strategy="best", allowed=None):
        """Place one request on the best host; returns (host name, Placement).

        ``allowed``: host names the request may use (None: any). Pass the same frozenset for
        requests that share a constraint: its index is then built once and kept current.
        """
        idx = self._index_for(allowed)
        if request.host is not None or request.name in self.vm_host:
            return self._place_named(request, strategy, idx)
        if idx.members is not None and not idx.members:
            raise PlacementError("request %r (%d GPU%s): no host is allowed for it" % (
                request.name, request.gpus, "" if request.gpus == 1 else "s"))
        if strategy == "first_fit":
            return self._first_fit(request, idx)
        n = request.gpus
        errors = []
        k = 0
        order = idx.order
        buckets = idx.buckets
        while k < len(order):
            free = order[k][0]
            group = []
            while k < len(order) and order[k][0] == free:
                key = order[k]
                rep = self.states[buckets[key][0]]
                if free >= n and rep.can_fit_gpus(n, request.gpu_model):
                    group.append(key)
                k += 1
            if not group:
                continue
            ranked = sorted(group, key=lambda key: (self._after(buckets[key][0], n),
                                                    buckets[key][0]))
            for key in ranked:
                for h in list(buckets.get(key, ())):
                    placed = self._try(h, request, self.states[h].place, errors)
                    if placed is not None:
                        return placed
        raise PlacementError(self._why_not(request, errors, idx))

    def _after(self, h, n):
        """Sort key: the free-block vector left after placing n on host h (best first)."""
        state = self.states[h]
        m = state.model
        if not m.partitioned or n == 0:
            return ()
        free = state.free_mask
        best = None
        for b in m.blocks_by_size.get(n, ()):
            if b.mask & free == b.mask:
                vec = tuple(-c for c in m.vector(free & ~b.mask))
                if best is None or vec < best:
                    best = vec
        return best or ()

    def _first_fit(self, request, idx):
        n = request.gpus
        errors = []
        candidates = []
        for key in idx.order:
            if key[0] >= n:
                candidates.extend(idx.buckets[key])
        for h in sorted(candidates):
            state = self.states[h]
            if not state.can_fit_gpus(n, request.gpu_model):
                continue
            placed = self._try(h, request, lambda r, s=state: first_fit(s, r), errors)
            if placed is not None:
                return placed
        raise PlacementError(self._why_not(request, errors, idx))

    def _try(self, h, request, place, errors):
        """(host name, Placement) when ``place`` fits the request on host h, else None with
        why in ``errors`` (the first three: GPUs fit there, CPUs, memory or rails did not)."""
        try:
            placement = place(request)
        except PlacementError as exc:
            if len(errors) < 3:
                errors.append("%s: %s" % (self.names[h], exc))
            return None
        return self._done(h, request, placement)

    def _why_not(self, request, errors, idx):
        largest = {}
        for key in idx.order:
            free = key[0]
            largest[free] = largest.get(free, 0) + len(idx.buckets[key])
        most = max(largest) if largest else 0
        if idx.members is None:
            hosts = "no host of %d" % len(self.names)
        else:
            hosts = "no allowed host (%d of %d)" % (len(idx.members), len(self.names))
        if errors:
            # Hosts had the GPUs and refused for another reason (CPUs, memory, rail NICs).
            return "request %r (%d GPU%s): %s could take it; hosts with free GPUs that " \
                   "refused it: %s" % (request.name, request.gpus,
                                       "" if request.gpus == 1 else "s",
                                       hosts, "; ".join(errors))
        return "request %r (%d GPU%s): %s has a free %d-GPU block (most free GPUs on one " \
               "host: %d)" % (request.name, request.gpus, "" if request.gpus == 1 else "s",
                              hosts, request.gpus, most)

    def _place_named(self, request, strategy, idx=None):
        host = request.host or self.vm_host.get(request.name)
        current = self.vm_host.get(request.name)
        if current is not None and request.host is not None and request.host != current:
            raise PlacementError("request %r names host %r, but the VM is already defined on %r;"
                                 " remove it there first or drop host" % (
                                     request.name, request.host, current))
        if host not in self.index:
            raise PlacementError("request %r names host %r, which is not in the fleet" % (
                request.name, host))
        h = self.index[host]
        if idx is not None and idx.members is not None and h not in idx.members:
            if current is not None:
                raise PlacementError(
                    "request %r: the VM is already defined on %r, which is not among the hosts "
                    "allowed for it; remove it there first or widen its constraint" % (
                        request.name, host))
            raise PlacementError("request %r names host %r, which is not among the hosts "
                                 "allowed for it" % (request.name, host))
        state = self.states[h]
        placement = first_fit(state, request) if strategy == "first_fit" else state.place(request)
        return self._done(h, request, placement)

    def _done(self, h, request, placement):
        self.vm_host[request.name] = self.names[h]
        self._refresh(h)
        return self.names[h], placement

    def release(self, vm):
        """Forget a VM wherever it is; returns its host name or None."""
        host = self.vm_host.pop(vm, None)
        if host is None:
            return None
        h = self.index[host]
        self.states[h].release(vm)
        self._refresh(h)
        return host

    def plan(self, requests, strategy="best", allowed=None):
        """Place requests jointly; FleetPlan with results in request order.

        The order is HostState.plan's, so each host's share lands as kvm_layout places it
        there: a defined VM whose GPU count changes gives its GPUs back first and stays on its
        host (it keeps the old ones when the new count does not fit); defined VMs go first, then
        the rest largest first (stable). ``allowed``: per request (same order), None or the
        host names it may use (see place()).
        """
        requests = list(requests)
        allowed = list(allowed) if allowed is not None else [None] * len(requests)
        if len(allowed) != len(requests):
            raise PlacementError("allowed: %d entries for %d requests" % (
                len(allowed), len(requests)))
        results = duplicate_refusals(requests)
        effective = list(requests)
        changed = {}
        for k, req in enumerate(requests):
            current = self.vm_host.get(req.name)
            if results[k] is not None or current is None:
                continue
            if req.host is not None and req.host != current:
                results[k] = PlacementError(
                    "request %r names host %r, but the VM is already defined on %r; remove it "
                    "there first or drop host" % (req.name, req.host, current))
                continue
            if allowed[k] is not None and current not in allowed[k]:
                results[k] = PlacementError(
                    "request %r: the VM is already defined on %r, which is not among the hosts "
                    "allowed for it; remove it there first or widen its constraint" % (
                        req.name, current))
                continue
            old = self.states[self.index[current]].allocations.get(req.name)
            if old is not None and len(old.gpus) != req.gpus:
                self.release(req.name)
                changed[k] = (current, old)
                effective[k] = replace(req, host=current)
        todo = [k for k in range(len(requests)) if results[k] is None]
        sticky = [k for k in todo if requests[k].name in self.vm_host]
        rest = sorted((k for k in todo if requests[k].name not in self.vm_host),
                      key=lambda k: -requests[k].gpus)
        for k in sticky + rest:
            try:
                results[k] = self.place(effective[k], strategy, allowed[k])
            except PlacementError as exc:
                results[k] = exc
        for k, (host, old) in changed.items():
            h = self.index[host]
            if isinstance(results[k], PlacementError) and self.states[h].restore(old):
                self.vm_host[old.name] = host
                self._refresh(h)
                results[k] = PlacementError("%s; %s keeps its current %d GPU(s) on %s" % (
                    results[k], old.name, len(old.gpus), host))
        plan = FleetPlan(assignments=[], unplaced=[])
        for req, res in zip(requests, results):
            if isinstance(res, PlacementError):
                plan.unplaced.append((req, str(res)))
            else:
                plan.assignments.append(FleetAssignment(req, res[0], res[1]))
        return plan


def place_on_fleet(hosts, requests, strategy="best", allowed=None):
    """Place requests over [(host name, HostState)] (recorded in those states); see Fleet.plan."""
    return Fleet(hosts).plan(requests, strategy, allowed)

#!/usr/bin/env python
# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Placement benchmark: acceptance vs first fit over a simulated day, and fleet planning speed.

Usage: python bench/placement.py [--quick] [--seeds N] [--study [N]]

1. A day of tenant arrivals and departures (Poisson arrivals, log-normal lifetimes, sizes
   1/2/4/8/16 from a mix) on one DGX-2 and on a fleet of 1,000 DGX-2s. The same event stream
   is replayed with our placement and with first fit (lowest-index free aligned block, lowest
   host index: what an nvidia-vm user does by hand). Prints acceptance by GPUs (share of the
   requested GPUs placed: what fragmentation costs) and by requests, and ours / first fit.
2. Planning 5,000 requests over 1,000 hosts x 16 GPUs, against floors measured in the same run:
   a loop that only reads each request once, and first-fit fleet planning.

Exit status 1 when ours places fewer GPUs than first fit on any fleet seed (10^4 requests a
day: a loss there is a real regression), when ours places fewer GPUs than first fit over all
single-DGX-2 seeds of a mix, or when planning takes 2 s or more. Single-DGX-2 days are compared
per seed but not gated per seed: with 20-80 requests a day, one different early choice changes
which later requests fit, and every policy we tried (including this one, and one that knows
every tenant's departure time) loses some seeds to first fit while winning more; the per-seed
ratios are printed so that the spread is visible.

3. ``--study [N]`` (not gated) prints the evidence for that (bench/README.md): why refusals
   happened (GPU blocks or CPUs/memory), two four-request days on which each policy beats the
   other, N held-out days per mix (seeds 1001..; default 300) for ours, first fit and a rule that
   knows every departure time, what changing one of our choices to first fit's does to a day,
   and, for each bench day a rule wins, a continuation that puts the rule below first fit: no
   rule that sees only the past can beat first fit on some day and never lose on another.
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import random
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_collection():
    """Same symlink farm as tests/conftest.py, so a plain checkout can import the collection."""
    farm = os.path.join(REPO, ".build", "pytest")
    link = os.path.join(farm, "ansible_collections", "gpuvirt", "kvm")
    if not os.path.islink(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        try:
            os.symlink(REPO, link)
        except FileExistsError:
            pass
    sys.path.insert(0, farm)
    sys.path.insert(0, os.path.join(REPO, "tests", "unit", "plugins", "module_utils"))


_import_collection()

import topo_factory  # noqa: E402

from ansible_collections.gpuvirt.kvm.plugins.module_utils._fleet_placement import (  # noqa: E402
    Fleet,
    place_on_fleet,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement import (  # noqa: E402
    HostState,
    _choose_best,
    _choose_first,
    first_fit,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import (  # noqa: E402
    PlacementError,
    Request,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (  # noqa: E402
    PLATFORMS,
)

MIXES = {
    "mixed": {1: 0.30, 2: 0.25, 4: 0.20, 8: 0.15, 16: 0.10},
    "small-heavy": {1: 0.50, 2: 0.30, 4: 0.14, 8: 0.05, 16: 0.01},
    "large-heavy": {1: 0.10, 2: 0.10, 4: 0.20, 8: 0.35, 16: 0.25},
}
DAY_MIN = 24 * 60


def day_of_events(rng, mix, gpus_total, mean_life_min, load):
    """Arrivals over one day at an offered load (GPU demand / capacity); sorted events."""
    sizes = sorted(mix)
    weights = [mix[s] for s in sizes]
    mean_size = sum(s * w for s, w in zip(sizes, weights, strict=True))
    rate = load * gpus_total / (mean_size * mean_life_min)  # arrivals per minute
    sigma = 1.0
    mu = math.log(mean_life_min) - sigma * sigma / 2  # log-normal with the wanted mean
    t, k, arrivals = 0.0, 0, []
    while True:
        t += rng.expovariate(rate)
        if t >= DAY_MIN:
            break
        size = rng.choices(sizes, weights)[0]
        arrivals.append((t, "vm%d" % k, size, rng.lognormvariate(mu, sigma)))
        k += 1
    return arrivals


def replay(arrivals, place, release, refusals=None, placed=None):
    """Run arrivals and departures in time order; (accepted, requests, accepted GPUs, GPUs).

    ``refusals``: a dict that counts refusals by cause ("GPU block", "CPUs/memory").
    ``placed``: a set that receives the names of the requests placed.
    """
    departures = []
    accepted = accepted_gpus = asked_gpus = 0
    for t, name, size, life in arrivals:
        while departures and departures[0][0] <= t:
            release(heapq.heappop(departures)[1])
        asked_gpus += size
        try:
            place(Request(name, gpus=size))
        except PlacementError as exc:
            if refusals is not None:
                cause = "GPU block" if "no free" in str(exc) else "CPUs/memory"
                refusals[cause] = refusals.get(cause, 0) + 1
            continue
        accepted += 1
        accepted_gpus += size
        if placed is not None:
            placed.add(name)
        heapq.heappush(departures, (t + life, name))
    return accepted, len(arrivals), accepted_gpus, asked_gpus


def one_host(base, arrivals, strategy, refusals=None, placed=None):
    state = base.copy()
    if strategy == "ours":
        return replay(arrivals, state.place, state.release, refusals, placed)
    if strategy == "first_fit":
        return replay(arrivals, lambda r: first_fit(state, r), state.release, refusals, placed)
    # A chooser (state, request, candidates) -> ranked candidates, as HostState._place takes.
    return replay(arrivals, lambda r: state._place(r, strategy), state.release, refusals, placed)


def one_host_days(mix_name, seeds, mean_life, load, prefix="one"):
    for seed in seeds:
        rng = random.Random("%s-%s-%d" % (prefix, mix_name, seed))
        yield seed, day_of_events(rng, MIXES[mix_name], 16, mean_life, load)


def seed_split(pairs):
    """[(ours GPUs, first-fit GPUs)] -> (seeds <, =, >, min ratio, mean ratio, total ratio)."""
    ratios = [o / f if f else 1.0 for o, f in pairs]
    return (sum(1 for o, f in pairs if o < f), sum(1 for o, f in pairs if o == f),
            sum(1 for o, f in pairs if o > f), min(ratios), sum(ratios) / len(ratios),
            sum(o for o, _f in pairs) / max(1, sum(f for _o, f in pairs)))


def fleet(base, hosts, arrivals, strategy):
    f = Fleet([("h%04d" % i, base.copy()) for i in range(hosts)])
    how = "best" if strategy == "ours" else "first_fit"
    return replay(arrivals, lambda r: f.place(r, how), f.release)


def _pct(part, whole):
    return 100.0 * part / whole if whole else 100.0


def one_host_table(base, seeds, mean_life, load):
    """Single DGX-2, one day per seed; per mix: totals and how the seeds split."""
    print("\n== one DGX-2: a day per seed, %d seeds, offered load %.1f, mean lifetime %d min" % (
        len(seeds), load, mean_life))
    print("GPU acc = share of requested GPUs placed (what fragmentation costs); req acc = share "
          "of requests placed; per seed: GPU acc ours / first fit")
    print("%-12s %8s | %-15s | %-15s | %-13s | %s" % (
        "mix", "requests", "ours GPU/req", "first-fit", "ratio GPU/req",
        "seeds ours </=/> first fit; min, mean, max per-seed ratio"))
    failures = []
    per_seed = []
    for mix_name in MIXES:
        tot_o = [0, 0, 0, 0]
        tot_f = [0, 0, 0, 0]
        pairs = []
        for _seed, arrivals in one_host_days(mix_name, seeds, mean_life, load):
            ours = one_host(base, arrivals, "ours")
            ff = one_host(base, arrivals, "first_fit")
            tot_o = [a + b for a, b in zip(tot_o, ours, strict=True)]
            tot_f = [a + b for a, b in zip(tot_f, ff, strict=True)]
            pairs.append((ours[2], ff[2]))
        below, equal, above, low, mean, _total = seed_split(pairs)
        ratios = [o / f if f else 1.0 for o, f in pairs]
        print("%-12s %8d | %5.1f%% / %5.1f%% | %5.1f%% / %5.1f%% | %5.3f / %5.3f | %d/%d/%d; "
              "%.3f, %.4f, %.3f" % (
                  mix_name, tot_o[1], _pct(tot_o[2], tot_o[3]), _pct(tot_o[0], tot_o[1]),
                  _pct(tot_f[2], tot_f[3]), _pct(tot_f[0], tot_f[1]), tot_o[2] / tot_f[2],
                  tot_o[0] / tot_f[0], below, equal, above, low, mean, max(ratios)))
        per_seed.append((mix_name, ratios))
        if tot_o[2] < tot_f[2]:
            failures.append("one DGX-2, %s: ours placed %d GPUs < first fit %d over %d seeds" % (
                mix_name, tot_o[2], tot_f[2], len(seeds)))
    print("per-seed GPU acceptance ratio ours / first fit (seeds %d-%d in order):" % (
        seeds[0], seeds[-1]))
    for mix_name, ratios in per_seed:
        for k in range(0, len(ratios), 20):
            print("  %-12s %s" % (mix_name if k == 0 else "", " ".join(
                "%.2f" % x for x in ratios[k:k + 20])))
    return failures


def fleet_table(base, hosts, seeds, mean_life, load):
    """A fleet of DGX-2s, one day per seed and mix."""
    print("\n== fleet of %d DGX-2: a day per seed, offered load %.1f, mean lifetime %d min" % (
        hosts, load, mean_life))
    print("%-12s %4s %8s | %-15s | %-15s | %s" % (
        "mix", "seed", "requests", "ours GPU/req", "first-fit", "ratio GPU/req"))
    failures = []
    for mix_name, mix in MIXES.items():
        for seed in seeds:
            rng = random.Random("fleet-%s-%d" % (mix_name, seed))
            arrivals = day_of_events(rng, mix, 16 * hosts, mean_life, load)
            ours = fleet(base, hosts, arrivals, "ours")
            ff = fleet(base, hosts, arrivals, "first_fit")
            print("%-12s %4d %8d | %5.1f%% / %5.1f%% | %5.1f%% / %5.1f%% | %5.3f / %5.3f" % (
                mix_name, seed, ours[1], _pct(ours[2], ours[3]), _pct(ours[0], ours[1]),
                _pct(ff[2], ff[3]), _pct(ff[0], ff[1]), ours[2] / ff[2], ours[0] / ff[0]))
            if ours[2] < ff[2]:
                failures.append("fleet, %s, seed %d: ours placed %d GPUs < first fit %d" % (
                    mix_name, seed, ours[2], ff[2]))
    return failures


# Two days of four requests: on one our choice loses to first fit, on the other it wins. Steps:
# (name, GPUs, gpu_index or None) places, (name,) releases.
DAY_OURS_LOSE = (("e", 4, None), ("a", 1, 8), ("b", 1, None), ("a",), ("c", 8, None))
DAY_OURS_WIN = (("a", 1, 5), ("b", 1, None), ("c", 4, None), ("d", 8, None))


def _worked_day(base, steps, strategy):
    state = base.copy()
    placed, gpus = [], 0
    for step in steps:
        if len(step) == 1:
            state.release(step[0])
            placed.append("-%s" % step[0])
            continue
        request = Request(step[0], gpus=step[1], gpu_index=step[2])
        try:
            p = state.place(request) if strategy == "ours" else first_fit(state, request)
        except PlacementError:
            placed.append("%s refused" % step[0])
            continue
        gpus += step[1]
        placed.append("%s %d-%d" % (step[0], p.gpu_indexes[0], p.gpu_indexes[-1]))
    return gpus, ", ".join(placed)


def knows_departures(arrivals):
    """A chooser that knows when every tenant leaves (impossible online; an upper reference).

    Per candidate, over each enclosing aligned block: how much longer the new tenant stays than
    the last tenant already there (the time it keeps that block from coalescing), weighted by
    the block's size; the least wins, then our free-block rule, then the lowest index.
    """
    arrive = {name: t for t, name, _size, _life in arrivals}
    leave = {name: t + life for t, name, _size, life in arrivals}

    def choose(state, request, candidates):
        m = state.model
        now, until = arrive[request.name], leave[request.name]
        free = state.free_mask

        def key(b):
            cost = 0.0
            for size in m.sizes_desc:
                if size <= b.size:
                    continue
                for outer in m.blocks_by_size[size]:
                    if outer.gpu_mask & b.gpu_mask == b.gpu_mask:
                        held = [leave[state.gpu_holder[i]] for i in outer.indexes
                                if state.gpu_holder[i] is not None]
                        cost += size * max(0.0, until - max(held or [now]))
            return (cost, tuple(-c for c in m.vector(free & ~b.mask)), b.indexes)

        return sorted(candidates, key=key)

    return choose


def _busiest_block(state, request, candidates):
    """Ours, but ties go to the candidate whose enclosing blocks (smallest first) hold the most
    GPUs already, then the lowest index ("pack into the busiest block")."""
    m = state.model
    free = state.free_mask

    def key(b):
        busy = tuple(-bin(outer.gpu_mask & ~free).count("1")
                     for size in reversed(m.sizes_desc) if size > b.size
                     for outer in m.blocks_by_size[size]
                     if outer.gpu_mask & b.gpu_mask == b.gpu_mask)
        return (tuple(-c for c in m.vector(free & ~b.mask)), busy, b.indexes)

    return sorted(candidates, key=key)


def _large_blocks_only(state, request, candidates):
    """Closer to first fit: only the free 8- and 16-GPU blocks left count, then lowest index."""
    m = state.model
    free = state.free_mask
    keep = [k for k, size in enumerate(m.sizes_desc) if size >= 8]
    return sorted(candidates, key=lambda b: (
        tuple(-m.vector(free & ~b.mask)[k] for k in keep), b.indexes))


def _flipping(at):
    """Our chooser, except that its at-th choice that differs from first fit's is first fit's."""
    differing = [0]

    def choose(state, request, candidates):
        ours = _choose_best(state, request, candidates)
        ff = _choose_first(state, request, candidates)
        if ours[0].indexes != ff[0].indexes:
            differing[0] += 1
            if differing[0] - 1 == at:
                return ff
        return ours

    return choose, differing


def continuation(base, arrivals, strategy):
    """The day cut where a rule first places a request that first fit refused, then continued
    so that the rule ends below first fit; None when the rule never places such a request.

    The prefix up to that request ``x`` is unchanged, so an online rule (one that sees only the
    past) makes the same choices in it. Then every other tenant leaves, ``x`` stays, and 16-GPU
    requests arrive one after another, each leaving before the next. First fit's host is empty
    (it refused ``x``), so it places every one; the rule's host holds ``x`` and places none.
    """
    ours_placed, ff_placed = set(), set()
    ours = one_host(base, arrivals, strategy, placed=ours_placed)[2]
    ff = one_host(base, arrivals, "first_fit", placed=ff_placed)[2]
    cut = next((k for k, a in enumerate(arrivals)
                if a[1] in ours_placed and a[1] not in ff_placed), None)
    if cut is None:
        return None
    t_x, name_x = arrivals[cut][0], arrivals[cut][1]
    day = [(t, name, size, 1e9 if name == name_x else min(life, t_x + 0.5 - t))
           for t, name, size, life in arrivals[:cut + 1]]
    # Up to x the continued day makes the same choices, so its GPUs placed come from the sets.
    ours_prefix = sum(a[2] for a in arrivals[:cut + 1] if a[1] in ours_placed)
    ff_prefix = sum(a[2] for a in arrivals[:cut + 1] if a[1] in ff_placed)
    for k in range(1, (ours_prefix - ff_prefix) // 16 + 2):
        day.append((t_x + k, "z%d" % k, 16, 0.5))
    return ours, ff, day, cut + 1


def study(base, bench_seeds, held_out, mean_life, load):
    """Evidence that no placement rule wins every single-host day (see bench/README.md)."""
    print("\n== study: one DGX-2, why some days are lost to first fit")
    causes = {"ours": {}, "first_fit": {}}
    for mix_name in MIXES:
        for _seed, arrivals in one_host_days(mix_name, bench_seeds, mean_life, load):
            for strategy, refusals in causes.items():
                one_host(base, arrivals, strategy, refusals)
    print("refusals on the bench days (seeds %d-%d, all mixes), by cause: ours %s; first fit %s"
          % (bench_seeds[0], bench_seeds[-1], causes["ours"], causes["first_fit"]))
    for title, steps in (("ours loses", DAY_OURS_LOSE), ("ours wins", DAY_OURS_WIN)):
        print("day where %s: ours %d GPUs (%s); first fit %d GPUs (%s)" % (
            (title,) + _worked_day(base, steps, "ours") + _worked_day(base, steps, "first_fit")))
    seeds = list(range(1001, 1001 + held_out))
    print("held-out days, seeds %d-%d per mix; GPUs placed vs first fit: days </=/>, min and "
          "mean per-day ratio, total ratio" % (seeds[0], seeds[-1]))
    rules = (("ours", None), ("ours, busiest-block ties", _busiest_block),
             ("only 8/16-blocks count", _large_blocks_only),
             ("knows every departure time", knows_departures))
    flips = [0, 0, 0, 0]  # first fit's choice there: more GPUs, fewer, same; days
    for mix_name in MIXES:
        pairs = {name: [] for name, _chooser in rules}
        for _seed, arrivals in one_host_days(mix_name, seeds, mean_life, load):
            ff = one_host(base, arrivals, "first_fit")[2]
            chooser, differing = _flipping(-1)
            ours = one_host(base, arrivals, chooser)[2]
            pairs["ours"].append((ours, ff))
            for name, rule in rules[1:]:
                rule = rule(arrivals) if rule is knows_departures else rule
                pairs[name].append((one_host(base, arrivals, rule)[2], ff))
            flips[3] += 1
            for at in range(differing[0]):
                flipped = one_host(base, arrivals, _flipping(at)[0])[2]
                flips[0 if flipped > ours else 1 if flipped < ours else 2] += 1
        for name, _rule in rules:
            print("  %-12s %-27s %3d/%3d/%3d  %.3f %.4f %.4f" % (
                (mix_name if name == "ours" else "", name) + seed_split(pairs[name])))
    decisions = flips[0] + flips[1] + flips[2]
    print("%d of our choices on those %d days differ from first fit's; taking first fit's at one "
          "of them (ours for the rest of the day) gives the day more GPUs %.1f %%, fewer %.1f %%, "
          "the same %.1f %%" % (decisions, flips[3], *(_pct(x, decisions) for x in flips[:3])))
    print("continuations (see continuation()): each bench day (seeds %d-%d, all mixes) on which a "
          "rule placed more GPUs than first fit, cut at the rule's first request that first fit "
          "refused and continued; days above first fit -> days below after the continuation"
          % (bench_seeds[0], bench_seeds[-1]))
    for name, rule in rules[:3]:  # the online ones
        rule = rule or "ours"
        above = below = 0
        example = None
        for mix_name in MIXES:
            for seed, arrivals in one_host_days(mix_name, bench_seeds, mean_life, load):
                cont = continuation(base, arrivals, rule)
                if cont is None or cont[0] <= cont[1]:
                    continue
                above += 1
                ours_c = one_host(base, cont[2], rule)[2]
                ff_c = one_host(base, cont[2], "first_fit")[2]
                below += ours_c < ff_c
                example = example or (mix_name, seed, cont[0], cont[1], cont[3],
                                      len(cont[2]) - cont[3], ours_c, ff_c)
        print("  %-27s %3d -> %3d" % (name, above, below) + (
            "; e.g. %s seed %d: %d vs %d GPUs; its first %d requests, then %d x 16 GPUs: "
            "%d vs %d" % example
            if example else ""))


def best_of(fn, repeat):
    best = None
    result = None
    for _dummy in range(repeat):
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    return best, result


def planning_speed(base, hosts, count, repeat):
    """Time place_on_fleet for `count` requests against two floors measured here and now."""
    # Half the fleet already holds 4+2+1+1 GPUs, so the planner sees fragmented hosts.
    seeded = []
    for i in range(hosts):
        state = base.copy()
        if i % 2:
            for j, size in enumerate((4, 2, 1, 1)):
                state.place(Request("old%d-%d" % (i, j), gpus=size))
        seeded.append(state)
    free = sum(s.free_gpus for s in seeded)
    print("\n== planning %d requests over %d hosts x 16 GPUs (%d GPUs free; best of %d)" % (
        count, hosts, free, repeat))
    worst = 0.0
    for mix_name in ("small-heavy", "mixed"):
        rng = random.Random("plan-%s" % mix_name)
        mix = MIXES[mix_name]
        sizes = sorted(mix)
        requests = [Request("r%d" % k, gpus=rng.choices(sizes, [mix[s] for s in sizes])[0])
                    for k in range(count)]

        def read_once(requests=requests):
            total = 0
            for r in requests:
                total += r.gpus
            return total

        floor, _dummy = best_of(read_once, repeat)
        timings = {}
        for strategy in ("best", "first_fit"):
            for _dummy in range(repeat):
                # Copies are set-up, not planning: outside the timed region.
                fleet_hosts = [("h%04d" % i, s.copy()) for i, s in enumerate(seeded)]
                start = time.perf_counter()
                plan = place_on_fleet(fleet_hosts, requests, strategy)
                elapsed = time.perf_counter() - start
                if strategy not in timings or elapsed < timings[strategy][0]:
                    timings[strategy] = (elapsed, plan)
        print("%s requests (%d GPUs asked); floor: a loop reading each request once %.4f s" % (
            mix_name, sum(r.gpus for r in requests), floor))
        for strategy in ("best", "first_fit"):
            elapsed, plan = timings[strategy]
            print("  %-9s %.3f s  placed %d (%d GPUs), unplaced %d | x%.0f the read floor, "
                  "x%.2f first-fit planning" % (
                      "ours" if strategy == "best" else "first-fit", elapsed,
                      len(plan.assignments), sum(a.request.gpus for a in plan.assignments),
                      len(plan.unplaced), elapsed / floor, elapsed / timings["first_fit"][0]))
        worst = max(worst, timings["best"][0])
    verdict = "met" if worst < 2 else "MISSED"
    print("ours, slowest mix: %.3f s (target < 2 s: %s)" % (worst, verdict))
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds, one timing repeat")
    parser.add_argument("--seeds", type=int, default=None, help="fleet seeds per mix")
    parser.add_argument("--study", type=int, nargs="?", const=300, default=0, metavar="N",
                        help="also print the single-host study over N held-out days per mix "
                             "(default 300; not gated)")
    args = parser.parse_args(argv)
    seeds = list(range(1, (args.seeds or (2 if args.quick else 5)) + 1))
    started = time.perf_counter()
    topo = topo_factory.dgx2()
    base = HostState(topo, PLATFORMS["dgx2"])
    print("platform dgx2, Python %s, %d CPU(s)" % (sys.version.split()[0], os.cpu_count()))
    one_seeds = list(range(1, 21 if args.quick else 61))
    failures = one_host_table(base, one_seeds, mean_life=180, load=1.3)
    if args.study:
        study(base, one_seeds, args.study, mean_life=180, load=1.3)
    failures += fleet_table(base, 1000, seeds, mean_life=480 if args.quick else 240, load=1.3)
    elapsed = planning_speed(base, 1000, 5000, 1 if args.quick else 3)
    print("\ntotal wall time %.1f s" % (time.perf_counter() - started))
    for failure in failures:
        print("FAIL: " + failure)
    if failures:
        return 1
    if elapsed >= 2.0:
        print("FAIL: planning took %.2f s (target < 2 s)" % elapsed)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

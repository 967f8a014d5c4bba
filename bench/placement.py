#!/usr/bin/env python
# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Placement benchmark: acceptance vs first fit over a simulated day, and fleet planning speed.

Usage: python bench/placement.py [--quick] [--seeds N]

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
which later requests fit, and every policy we tried (including this one) loses some seeds to
first fit while winning more; the per-seed ratios are printed so that the spread is visible.
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

from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement import (  # noqa: E402
    Fleet,
    HostState,
    PlacementError,
    Request,
    first_fit,
    plan_fleet,
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


def replay(arrivals, place, release):
    """Run arrivals and departures in time order; (accepted, requests, accepted GPUs, GPUs)."""
    departures = []
    accepted = accepted_gpus = asked_gpus = 0
    for t, name, size, life in arrivals:
        while departures and departures[0][0] <= t:
            release(heapq.heappop(departures)[1])
        asked_gpus += size
        try:
            place(Request(name, gpus=size))
        except PlacementError:
            continue
        accepted += 1
        accepted_gpus += size
        heapq.heappush(departures, (t + life, name))
    return accepted, len(arrivals), accepted_gpus, asked_gpus


def one_host(base, arrivals, strategy):
    state = base.copy()
    if strategy == "ours":
        return replay(arrivals, state.place, state.release)
    return replay(arrivals, lambda r: first_fit(state, r), state.release)


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
          "of requests placed")
    print("%-12s %8s | %-15s | %-15s | %-13s | %s" % (
        "mix", "requests", "ours GPU/req", "first-fit", "ratio GPU/req",
        "seeds ours >/=/< first-fit (GPU acc); worst, best seed ratio"))
    failures = []
    per_seed = []
    for mix_name, mix in MIXES.items():
        tot_o = [0, 0, 0, 0]
        tot_f = [0, 0, 0, 0]
        split = [0, 0, 0]
        ratios = []
        for seed in seeds:
            rng = random.Random("one-%s-%d" % (mix_name, seed))
            arrivals = day_of_events(rng, mix, 16, mean_life, load)
            ours = one_host(base, arrivals, "ours")
            ff = one_host(base, arrivals, "first_fit")
            tot_o = [a + b for a, b in zip(tot_o, ours, strict=True)]
            tot_f = [a + b for a, b in zip(tot_f, ff, strict=True)]
            split[0 if ours[2] > ff[2] else 1 if ours[2] == ff[2] else 2] += 1
            ratios.append(ours[2] / ff[2] if ff[2] else 1.0)
        g_ratio = tot_o[2] / tot_f[2]
        r_ratio = tot_o[0] / tot_f[0]
        print("%-12s %8d | %5.1f%% / %5.1f%% | %5.1f%% / %5.1f%% | %5.3f / %5.3f | %d/%d/%d; "
              "%.3f, %.3f" % (
                  mix_name, tot_o[1], _pct(tot_o[2], tot_o[3]), _pct(tot_o[0], tot_o[1]),
                  _pct(tot_f[2], tot_f[3]), _pct(tot_f[0], tot_f[1]), g_ratio, r_ratio,
                  split[0], split[1], split[2], min(ratios), max(ratios)))
        per_seed.append((mix_name, ratios))
    print("per-seed GPU acceptance ratio ours / first fit (seeds %d-%d in order):" % (
        seeds[0], seeds[-1]))
    for mix_name, ratios in per_seed:
        for k in range(0, len(ratios), 20):
            print("  %-12s %s" % (mix_name if k == 0 else "", " ".join(
                "%.2f" % x for x in ratios[k:k + 20])))
        if g_ratio < 1.0:
            failures.append("one DGX-2, %s: ours placed %d GPUs < first fit %d over %d seeds" % (
                mix_name, tot_o[2], tot_f[2], len(seeds)))
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
    """Time plan_fleet for `count` requests against two floors measured here and now."""
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
                plan = plan_fleet(fleet_hosts, requests, strategy)
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
    args = parser.parse_args(argv)
    seeds = list(range(1, (args.seeds or (2 if args.quick else 5)) + 1))
    started = time.perf_counter()
    topo = topo_factory.dgx2()
    base = HostState(topo, PLATFORMS["dgx2"])
    print("platform dgx2, Python %s, %d CPU(s)" % (sys.version.split()[0], os.cpu_count()))
    failures = one_host_table(base, list(range(1, 21 if args.quick else 61)), mean_life=180,
                              load=1.3)
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

#!/usr/bin/env python
# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Replay what the stand-in Fabric Manager was asked, from call FIRST on, and print as JSON:

    activated     the partitions activated, in order (fmReturn 0 only)
    refused       every -a or -d that FM refused, as [argv, fmReturn]
    overlaps      [time, partition, partition]: two active partitions that shared a GPU module
    most_active   the largest number of partitions active at once
    left_active   what was still active after the last call

    fm_replay.py STATE_JSON FIRST
"""

from __future__ import annotations

import json
import sys


def replay(state, first):
    modules = {p["id"]: set(p["modules"]) for p in state["partitions"]}
    active, out = [], {"activated": [], "refused": [], "overlaps": [], "most_active": 0}
    for when, argv, rc in state["calls"][first:]:
        if not argv or argv[0] not in ("-a", "-d"):
            continue
        if rc != 0:
            out["refused"].append([argv, rc])
            continue
        pid = int(argv[1])
        if argv[0] == "-d":
            active = [p for p in active if p != pid]
            continue
        out["overlaps"] += [[when, other, pid] for other in active if modules[other] & modules[pid]]
        active.append(pid)
        out["activated"].append(pid)
        out["most_active"] = max(out["most_active"], len(active))
    out["left_active"] = sorted(active)
    return out


def main(argv=None):
    path, first = (argv or sys.argv[1:])[:2]
    with open(path, encoding="utf-8") as handle:
        state = json.load(handle)
    json.dump(replay(state, int(first)), sys.stdout, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

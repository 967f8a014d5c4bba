# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Range lists of small integers: CPUs, NUMA nodes, GPU indexes. Private, pure.

One syntax serves the kernel (``/sys/.../cpulist``), libvirt (``cpuset``, ``nodeset``) and
the collection's own messages and results: ``0-3,8,10-11``. libvirt also writes exclusions
(``0-7,^5``), which ``parse_ranges`` reads. Imports nothing of the collection.
"""

from __future__ import annotations


def parse_ranges(text):
    """Expand a range list ("0-3,^2,8") into a sorted tuple of ints; ValueError if malformed."""
    chosen, excluded = set(), set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        target = chosen
        if part.startswith("^"):
            target, part = excluded, part[1:]
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                target.update(range(int(lo), int(hi) + 1))
            else:
                target.add(int(part))
        except ValueError:
            raise ValueError("%r is not a range list (write it like 0-3,8)" % (text,)) from None
    return tuple(sorted(chosen - excluded))


def format_ranges(values):
    """Compress ints into range-list syntax ("0-3,8"); "" for none."""
    values = sorted(set(int(v) for v in values))
    parts = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else "%d-%d" % (values[i], values[j]))
        i = j + 1
    return ",".join(parts)

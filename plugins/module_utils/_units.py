# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Sizes and their units. Private, pure; imports nothing of the collection.

Two readers share one unit table: ``parse_size_mb`` for what users write (``64GiB``, ``512M``,
a bare number of MiB) and ``scaled_kib`` for libvirt's scaled integers (``<memory
unit='GiB'>4</memory>``), which libvirt rounds up to whole KiB.
"""

from __future__ import annotations

import re

KIB = 1024
MIB = 1024 ** 2
GIB = 1024 ** 3

# Unit -> bytes, as libvirt reads them (virScaleInteger): k/m/g/t and KiB/MiB/... are binary,
# KB/MB/... decimal.
UNITS = {
    "b": 1, "bytes": 1, "k": KIB, "kib": KIB, "kb": 1000, "m": MIB, "mib": MIB, "mb": 1000 ** 2,
    "g": GIB, "gib": GIB, "gb": 1000 ** 3, "t": 1024 ** 4, "tib": 1024 ** 4, "tb": 1000 ** 4,
    # What users also write: "64Gi" is 64 GiB.
    "ki": KIB, "mi": MIB, "gi": GIB, "ti": 1024 ** 4,
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def scaled_kib(number, unit="KiB"):
    """A scaled integer in whole KiB, rounded up as libvirt does; KeyError for an unknown
    unit."""
    return -(-int(number) * UNITS[(unit or "KiB").lower()] // KIB)


def parse_size_mb(value, option):
    """Parse a size (an int is MiB; strings like '64GiB', '512M', '1.5TiB') into whole MiB."""
    if isinstance(value, bool):
        raise ValueError("%s: %r is not a size; give MiB as a number or a string such as "
                         "'64GiB'" % (option, value))
    if isinstance(value, int):
        size_bytes = value * MIB
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise ValueError("%s: %r is not a size; give MiB as a number or a string such as "
                             "'64GiB', '512MiB' or '2TiB'" % (option, value))
        number, unit = m.group(1), (m.group(2) or "").lower()
        # A bare number is MiB; "G", "GiB" and "GB"... as the table says ("g" without "ib").
        factor = UNITS[unit] if unit else MIB
        size_bytes = int(float(number) * factor)
    if size_bytes <= 0:
        raise ValueError("%s: %r must be larger than zero" % (option, value))
    if size_bytes % MIB:
        raise ValueError("%s: %r is not a whole number of MiB" % (option, value))
    return size_bytes // MIB

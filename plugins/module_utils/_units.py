# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Size parsing shared by the modules. Private to this collection."""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_FACTORS = {"": 2 ** 20, "b": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}
_DECIMAL = {"kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12}


def parse_size_mb(value, option):
    """Parse a size (an int is MiB; strings like '64GiB', '512M', '1.5TiB') into whole MiB."""
    if isinstance(value, bool):
        raise ValueError("%s: %r is not a size; give MiB as a number or a string such as "
                         "'64GiB'" % (option, value))
    if isinstance(value, int):
        size_bytes = value * 2 ** 20
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise ValueError("%s: %r is not a size; give MiB as a number or a string such as "
                             "'64GiB', '512MiB' or '2TiB'" % (option, value))
        number, unit = m.group(1), (m.group(2) or "").lower()
        if unit in _DECIMAL:
            factor = _DECIMAL[unit]
        else:
            factor = _FACTORS[unit.rstrip("ib")[:1] if unit not in ("b",) else "b"]
        size_bytes = int(float(number) * factor)
    if size_bytes <= 0:
        raise ValueError("%s: %r must be larger than zero" % (option, value))
    if size_bytes % 2 ** 20:
        raise ValueError("%s: %r is not a whole number of MiB" % (option, value))
    return size_bytes // 2 ** 20

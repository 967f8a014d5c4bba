# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""PCI addresses (domain:bus:slot.function). Private, pure; imports nothing of the collection.

The collection's one spelling is the kernel's: ``0000:34:00.0``, lower-case hex, four digits of
domain, two of bus and slot. Users and libvirt write others (``34:00.0``, ``0x0034``, upper
case); everything is compared in this form.
"""

from __future__ import annotations

import re
from functools import lru_cache

BDF_RE = re.compile(r"^(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


def parse_bdf(text):
    """(domain, bus, slot, function) of "0000:34:00.0" or "34:00.0"; ValueError otherwise."""
    m = BDF_RE.match(str(text).strip())
    if not m:
        raise ValueError("%r is not a PCI address (write it like 0000:34:00.0)" % (text,))
    return int(m.group(1) or "0", 16), int(m.group(2), 16), int(m.group(3), 16), int(m.group(4))


def format_bdf(domain, bus, slot, function):
    """The kernel's spelling of a PCI address: "0000:34:00.0"."""
    return "%04x:%02x:%02x.%d" % (domain or 0, bus or 0, slot or 0, function or 0)


@lru_cache(maxsize=4096)  # placement normalises the same few hundred addresses over and over
def normalize_bdf(text):
    """``text`` in the kernel's spelling; text that is no PCI address comes back stripped and
    lower-cased (it then matches nothing, and the caller says so)."""
    try:
        return format_bdf(*parse_bdf(text))
    except ValueError:
        return str(text).strip().lower()

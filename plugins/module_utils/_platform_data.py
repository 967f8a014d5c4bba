# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""A platform from plain data, in the platform file format: parsed and validated. Private, pure.

``platform_from_dict`` builds a ``_platforms.Platform`` from what a platform file holds (a
platform the collection does not know, or a known one changed with ``base:``), with errors that
name the field and the fix. ``_platform_file`` reads such files; the fleet planner parses the
platform data a host's facts carry with the same function.
"""

from __future__ import annotations

import re
from dataclasses import replace

from ansible_collections.gpuvirt.kvm.plugins.module_utils._bdf import format_bdf, parse_bdf
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
    FABRIC_NONE,
    FABRIC_SHARED_NVSWITCH,
    FABRICS,
    KNOWN_NAMES,
    NVSWITCH_IDS,
    PLATFORMS,
    TEMPLATE_FIELDS,
    FmPartition,
    Platform,
    PlatformError,
    partitions_from_fm,
)

FILE_KEYS = (
    "name", "description", "base", "gpu_ids", "nvswitch_ids", "gpu_count", "nvswitch_count",
    "fabric", "physical_ids", "fm_partitions", "partitions", "allowed_sizes", "templates",
    "os_disk_gb", "extra_passthrough_ids", "gpu_classes", "nvswitch_classes", "module_ids",
    "unavailable", "nvswitch_driver", "nic_ids", "nic_classes", "rail_nics",
)

# A Linux driver name as /sys/bus/pci/drivers lists it (nvidia, virtio-pci, ...).
_DRIVER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _bad(source, msg):
    return PlatformError("platform: %s: %s" % (source, msg))


def _int_value(source, key, value, minimum=0):
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value), 10)
        except ValueError as exc:
            raise _bad(source, "%s must be an integer, got %r" % (key, value)) from exc
    if value < minimum:
        raise _bad(source, "%s must be >= %d, got %d" % (key, minimum, value))
    return value


def _parse_id(source, key, text):
    if isinstance(text, (list, tuple)) and len(text) == 2:
        return (_int_value(source, key, text[0]), _int_value(source, key, text[1]))
    try:
        vendor, device = str(text).lower().split(":")
        return (int(vendor, 16), int(device, 16))
    except ValueError as exc:
        raise _bad(source, "%s: %r is not a PCI ID; write it as vendor:device in hex, e.g. "
                           "10de:20b2" % (key, text)) from exc


def _size_keys(source, key, mapping):
    """Integer keys of a size-indexed mapping; two spellings of one size are an error."""
    if not isinstance(mapping, dict):
        raise _bad(source, "%s must be a mapping of GPU count -> ..., got %s" % (
            key, type(mapping).__name__))
    result = {}
    for raw, value in mapping.items():
        size = _int_value(source, "%s key" % key, raw, minimum=0)
        if size in result:
            raise _bad(source, "%s lists size %d twice (%r); keep one entry per size" % (
                key, size, raw))
        result[size] = value
    return result


def platform_from_dict(data, source="platform file"):
    """Build and validate a Platform from file data (raises PlatformError naming the fix)."""
    unknown = sorted(str(k) for k in data if k not in FILE_KEYS)
    if unknown:
        raise _bad(source, "unknown field(s) %s; accepted fields: %s" % (
            ", ".join(unknown), ", ".join(FILE_KEYS)))
    base_name = data.get("base")
    if base_name is not None:
        if base_name not in PLATFORMS:
            raise _bad(source, "base %r is not a known platform; use one of %s" % (
                base_name, ", ".join(KNOWN_NAMES)))
        base = PLATFORMS[base_name]
    else:
        if "name" not in data:
            raise _bad(source, "missing field 'name' (or give 'base: <known platform>' to start "
                               "from one)")
        base = Platform(name="", description="", gpu_ids=(),
                        nvswitch_ids=tuple(sorted(NVSWITCH_IDS)), gpu_count=0, nvswitch_count=0,
                        fabric=FABRIC_NONE)
    changes = {"source": source}
    name = data.get("name", base.name)
    if not isinstance(name, str) or not name:
        raise _bad(source, "name must be a non-empty string")
    changes["name"] = name
    changes["description"] = str(data.get("description", base.description or name))
    for key in ("gpu_ids", "nvswitch_ids", "nic_ids"):
        if key in data:
            values = data[key]
            if not isinstance(values, list):
                raise _bad(source, "%s must be a list of vendor:device IDs" % key)
            # Listed IDs narrow the platform to them (a known model set), or name devices of
            # other vendors (stand-ins in a lab); the class check still applies to them. An
            # empty or missing list: every NVIDIA GPU (an NVIDIA function of a GPU class).
            changes[key] = tuple(_parse_id(source, key, v) for v in values)
    for key in ("gpu_classes", "nvswitch_classes", "nic_classes"):
        if key in data:
            values = data[key]
            if not isinstance(values, list) or not values:
                raise _bad(source, "%s must be a non-empty list of PCI classes such as 0x0302"
                           % key)
            try:
                changes[key] = tuple(int(str(v), 16) for v in values)
            except ValueError:
                raise _bad(source, "%s: %r holds something that is not a hex PCI class such "
                                   "as 0x0302" % (key, values)) from None
            if any(not 0 < c <= 0xFFFF for c in changes[key]):
                raise _bad(source, "%s: give 16-bit classes (base and sub class), e.g. 0x0302"
                           % key)
    for key in ("gpu_count", "nvswitch_count", "os_disk_gb"):
        if key in data:
            changes[key] = _int_value(source, key, data[key], minimum=1 if key == "os_disk_gb"
                                      else 0)
    fabric = data.get("fabric", base.fabric)
    if fabric not in FABRICS:
        raise _bad(source, "fabric %r is not one of %s" % (fabric, ", ".join(FABRICS)))
    changes["fabric"] = fabric
    gpu_count = changes.get("gpu_count", base.gpu_count)
    nvswitch_count = changes.get("nvswitch_count", base.nvswitch_count)

    physical_ids = base.physical_ids
    if "physical_ids" in data:
        raw = data["physical_ids"]
        if not isinstance(raw, list):
            raise _bad(source, "physical_ids must be a list: GPU index -> physical ID")
        physical_ids = tuple(_int_value(source, "physical_ids", v, 0) for v in raw)
        if len(set(physical_ids)) != len(physical_ids):
            raise _bad(source, "physical_ids lists an ID twice: %s" % list(physical_ids))
    if gpu_count and physical_ids and len(physical_ids) != gpu_count:
        if "physical_ids" in data:
            raise _bad(source, "physical_ids has %d entries but gpu_count is %d; give one "
                               "physical ID per GPU index" % (len(physical_ids), gpu_count))
        physical_ids = tuple(range(1, gpu_count + 1))
    if gpu_count and not physical_ids:
        physical_ids = tuple(range(1, gpu_count + 1))
    changes["physical_ids"] = physical_ids

    fm = base.fm_partitions
    if "fm_partitions" in data:
        fm = {}
        for pid, entry in _size_keys(source, "fm_partitions", data["fm_partitions"]).items():
            if isinstance(entry, dict):
                members = entry.get("members")
                links = entry.get("nvlinks_per_gpu", 0)
            else:
                members, links = entry, 0
            if not isinstance(members, list) or not members:
                raise _bad(source, "fm_partitions %d: members must be a list of physical IDs" % pid)
            fm[pid] = FmPartition(pid, tuple(_int_value(source, "fm_partitions", m)
                                             for m in members),
                                  _int_value(source, "nvlinks_per_gpu", links))
    changes["fm_partitions"] = fm

    if "partitions" in data:
        partitions, switches = _parse_partitions(source, data["partitions"], physical_ids,
                                                 gpu_count, nvswitch_count)
    elif fabric == FABRIC_SHARED_NVSWITCH and fm and (
            "physical_ids" in data or "fm_partitions" in data or base_name is None):
        partitions, switches = partitions_from_fm(fm, physical_ids), {}
    else:
        partitions, switches = base.partitions, base.partition_nvswitches
    changes["partitions"] = partitions
    changes["partition_nvswitches"] = switches

    if "allowed_sizes" in data:
        raw = data["allowed_sizes"]
        if not isinstance(raw, list):
            raise _bad(source, "allowed_sizes must be a list of GPU counts")
        allowed = sorted(set(_int_value(source, "allowed_sizes", v, 1) for v in raw))
        extra = sorted(set(partitions) - set(allowed))
        if extra:
            raise _bad(source, "partitions list size(s) %s that allowed_sizes %s does not "
                               "allow; add them to allowed_sizes or drop those partitions" % (
                                   ", ".join(map(str, extra)), allowed))
        empty = [s for s in allowed if partitions and s not in partitions]
        if empty:
            raise _bad(source, "allowed_sizes has size(s) %s with no partition on this platform "
                               "(sizes with partitions: %s)" % (
                                   ", ".join(map(str, empty)),
                                   ", ".join(map(str, sorted(partitions)))))
        if not partitions:
            changes["sizes"] = tuple(allowed)

    if "templates" in data:
        templates = {}
        for size, entry in _size_keys(source, "templates", data["templates"]).items():
            if not isinstance(entry, dict):
                raise _bad(source, "templates %d must be a mapping with %s" % (
                    size, ", ".join(TEMPLATE_FIELDS)))
            bad = sorted(str(k) for k in entry if k not in TEMPLATE_FIELDS)
            if bad:
                raise _bad(source, "templates %d: unknown field(s) %s; accepted: %s" % (
                    size, ", ".join(bad), ", ".join(TEMPLATE_FIELDS)))
            templates[size] = {k: _int_value(source, "templates %d %s" % (size, k), v, 1)
                               for k, v in entry.items()}
        changes["templates"] = templates
    if "extra_passthrough_ids" in data:
        raw = data["extra_passthrough_ids"]
        if isinstance(raw, list):
            raw = {k: "" for k in raw}
        if not isinstance(raw, dict):
            raise _bad(source, "extra_passthrough_ids must map vendor:device -> why")
        changes["extra_passthrough_ids"] = {
            _parse_id(source, "extra_passthrough_ids", k): str(v) for k, v in raw.items()}
    if "module_ids" in data:
        changes["module_ids"] = _module_ids(source, data["module_ids"])
    if "rail_nics" in data:
        raw = data["rail_nics"]
        if not isinstance(raw, list):
            raise _bad(source, "rail_nics must be a list of NIC addresses such as 0000:35:00.0")
        try:
            changes["rail_nics"] = tuple(sorted({format_bdf(*parse_bdf(str(v))) for v in raw}))
        except ValueError as exc:
            raise _bad(source, "rail_nics: %s" % exc) from exc
    if "nvswitch_driver" in data:
        driver = data["nvswitch_driver"]
        if not isinstance(driver, str) or not _DRIVER_NAME_RE.match(driver):
            raise _bad(source, "nvswitch_driver must be the name of the host driver that owns "
                               "the NVSwitches in shared_nvswitch mode, as /sys/bus/pci/drivers "
                               "lists it (nvidia on a real host), got %r" % (driver,))
        changes["nvswitch_driver"] = driver
    if data.get("unavailable"):
        # Blocks Fabric Manager reported degraded (a host's facts carry them to the fleet).
        raw = data["unavailable"]
        if not isinstance(raw, list) or not all(
                isinstance(e, dict) and isinstance(e.get("gpus"), list) for e in raw):
            raise _bad(source, "unavailable must be a list of {gpus: [indexes], why: text}")
        changes["unavailable"] = {
            tuple(_int_list(source, len(e["gpus"]), e["gpus"])): str(e.get("why", ""))
            for e in raw}
    return replace(base, **changes)


def _module_ids(source, raw):
    """``module_ids``: GPU address -> Fabric Manager module ID (shared NVSwitch)."""
    if not isinstance(raw, dict):
        raise _bad(source, "module_ids must map GPU addresses to module IDs, e.g. "
                           "{'0000:1b:00.0': 5}, as 'nvidia-smi -q' prints \"Module ID\"")
    result = {}
    for bdf, module in raw.items():
        try:
            key = format_bdf(*parse_bdf(bdf))
        except ValueError as exc:
            raise _bad(source, "module_ids: %s" % exc) from exc
        if key in result:
            raise _bad(source, "module_ids names %s twice" % key)
        result[key] = _int_value(source, "module_ids %s" % key, module, 0)
    taken = {}
    for key, module in sorted(result.items()):
        if module in taken:
            raise _bad(source, "module_ids gives module ID %d to both %s and %s; each GPU has its "
                               "own" % (module, taken[module], key))
        taken[module] = key
    return result


def _parse_partitions(source, raw, physical_ids, gpu_count, nvswitch_count):
    """File partitions -> ({size: blocks}, {block: nvswitch indexes})."""
    partitions = {}
    switches = {}
    index_of = {pid: i for i, pid in enumerate(physical_ids)}
    for size, entries in _size_keys(source, "partitions", raw).items():
        if size < 1:
            raise _bad(source, "partitions: size %d is not a GPU count >= 1" % size)
        if not isinstance(entries, list):
            raise _bad(source, "partitions %d must be a list of partitions" % size)
        blocks = []
        for entry in entries:
            sw = ()
            if isinstance(entry, dict):
                known = ("gpus", "physical_ids", "nvswitches")
                bad = sorted(str(k) for k in entry if k not in known)
                if bad or ("gpus" in entry) == ("physical_ids" in entry):
                    raise _bad(source, "partitions %d: %r must have exactly one of gpus "
                                       "(indexes) or physical_ids, and optionally nvswitches"
                               % (size, entry))
                if "physical_ids" in entry:
                    members = []
                    for pid in _int_list(source, size, entry["physical_ids"]):
                        if pid not in index_of:
                            raise _bad(source, "partition %s (size %d) names physical ID %d, "
                                               "which no GPU of this platform has (physical_ids:"
                                               " %s); fix the partition or physical_ids" % (
                                                   entry["physical_ids"], size, pid,
                                                   list(physical_ids)))
                        members.append(index_of[pid])
                else:
                    members = _int_list(source, size, entry["gpus"])
                if entry.get("nvswitches"):
                    sw = tuple(sorted(_int_list(source, size, entry["nvswitches"])))
            else:
                members = _int_list(source, size, entry)
            block = tuple(sorted(members))
            if len(set(block)) != len(block):
                raise _bad(source, "partition %s (size %d) names a GPU twice"
                           % (list(block), size))
            if len(block) != size:
                raise _bad(source, "partition %s has %d GPUs but is listed under size %d; list "
                                   "each partition under its own GPU count" % (
                                       list(block), len(block), size))
            if gpu_count and block[-1] >= gpu_count:
                raise _bad(source, "partition %s (size %d) names GPU index %d, but the platform "
                                   "has %d GPUs (indexes 0-%d); fix the partition or gpu_count" % (
                                       list(block), size, block[-1], gpu_count, gpu_count - 1))
            for s in sw:
                if s >= nvswitch_count:
                    raise _bad(source, "partition %s names NVSwitch index %d, but the platform "
                                       "has %d NVSwitches" % (list(block), s, nvswitch_count))
            if block in blocks:
                raise _bad(source, "partition %s is listed twice under size %d" % (
                    list(block), size))
            blocks.append(block)
            if sw:
                switches[block] = sw
        partitions[size] = tuple(sorted(blocks))
    return partitions, switches


def _int_list(source, size, value):
    if not isinstance(value, list) or not value:
        raise _bad(source, "partitions %d: %r is not a list of GPU indexes" % (size, value))
    return [_int_value(source, "partitions %d" % size, v) for v in value]

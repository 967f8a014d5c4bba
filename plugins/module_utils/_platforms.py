# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Platform data: PCI allow-lists, partitions, NVSwitch rules, template sizes. Private.

Kept as Python data because AnsiballZ ships only Python from module_utils to managed hosts.
Sources are in docs/hardware.md (a copy of the project's hardware notes). Pure: platform files
(a user's own platform) are read by ``_platform_file``.

Vocabulary used throughout:

- GPU *index*: position of a GPU in PCI bus order among the platform's GPUs on this host (the
  order ``nvidia-smi`` and ``nvidia-vm --gpu-index`` use).
- *physical ID*: Fabric Manager's GPU ID (the GPU module ID on H100 and later).
- *partition*: a placeable block of GPU indexes. On DGX-2 (full NVSwitch passthrough) these are
  the PCIe-aligned blocks; on A100/H100 they are Fabric Manager's partitions translated to
  indexes through ``physical_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import NIC_CLASSES

NVIDIA = 0x10DE
PMC_SIERRA = 0x11F8

# PCI classes (base << 8 | sub): GPUs show as 3D controller, or VGA on some PCIe cards.
GPU_CLASSES = (0x0302, 0x0300)
NVSWITCH_CLASSES = (0x0680,)

GPU_VENDORS = (NVIDIA,)

# Every NVIDIA function of a GPU class is a GPU (its audio and USB functions have other classes).
# This table only names the models it knows (reports, messages, gpu_model) and says which
# models make a known platform: it gates nothing. Names and IDs: hardware.md section 2 and the
# PCI ID database (pci.ids); 26b9, 2321, 233b, 2342 and 2901 are named only in pci.ids newer than
# Debian 12's copy (2023-04).
GPU_IDS = {
    (NVIDIA, 0x1DB4): "Tesla V100-PCIE-16GB",
    (NVIDIA, 0x1DB6): "Tesla V100-PCIE-32GB",
    (NVIDIA, 0x1DB8): "Tesla V100-SXM3-32GB",
    (NVIDIA, 0x20B0): "A100-SXM4-40GB",
    (NVIDIA, 0x20B2): "A100-SXM4-80GB",
    (NVIDIA, 0x20B5): "A100-PCIE-80GB",
    (NVIDIA, 0x20B7): "A30",
    (NVIDIA, 0x20F1): "A100-PCIE-40GB",
    (NVIDIA, 0x2235): "A40",
    (NVIDIA, 0x2236): "A10",
    (NVIDIA, 0x2321): "H100-NVL",
    (NVIDIA, 0x2330): "H100-SXM5-80GB",
    (NVIDIA, 0x2331): "H100-PCIE",
    (NVIDIA, 0x2335): "H200-SXM-141GB",
    (NVIDIA, 0x2336): "H200-SXM-141GB",
    (NVIDIA, 0x233B): "H200-NVL",
    (NVIDIA, 0x2342): "GH200",
    (NVIDIA, 0x26B1): "RTX-6000-Ada",
    (NVIDIA, 0x26B5): "L40",
    (NVIDIA, 0x26B9): "L40S",
    (NVIDIA, 0x27B8): "L4",
    (NVIDIA, 0x2901): "B200",
}
NVSWITCH_IDS = {
    (NVIDIA, 0x1AC2): "NVSwitch gen 1",
    (NVIDIA, 0x1AF1): "NVSwitch gen 2",
    (NVIDIA, 0x22A3): "NVSwitch gen 3",
    (NVIDIA, 0x22A4): "NVSwitch gen 3",
}

FABRIC_FULL_PASSTHROUGH = "full_passthrough"  # VMs get GPUs and their NVSwitches (DGX-2 KVM)
FABRIC_SHARED_NVSWITCH = "shared_nvswitch"  # switches stay with the host/service VM (FM)
FABRIC_NONE = "none"
FABRICS = (FABRIC_FULL_PASSTHROUGH, FABRIC_SHARED_NVSWITCH, FABRIC_NONE)

# nvidia-vm's OS disk size is not published; a VM's OS disk is a qcow2 overlay, so this is only
# the virtual size the guest sees. Overridable per platform (os_disk_gb) and per template.
DEFAULT_OS_DISK_GB = 50

TEMPLATE_FIELDS = ("vcpus", "memory_mb", "os_disk_gb")


class PlatformError(Exception):
    """A platform name or file cannot be used on this host."""


@dataclass(frozen=True)
class FmPartition:
    """One Fabric Manager partition as NVIDIA publishes it (members are physical IDs)."""

    id: int
    members: tuple
    nvlinks_per_gpu: int


@dataclass(frozen=True)
class Platform:
    """What a platform looks like and which GPU blocks a VM may get on it."""

    name: str
    description: str
    gpu_ids: tuple  # (vendor, device) pairs; (): every GPU of GPU_VENDORS (generic)
    nvswitch_ids: tuple  # a subset of NVSWITCH_IDS
    gpu_count: int  # 0: any (generic)
    nvswitch_count: int
    fabric: str  # one of FABRICS
    partitions: dict = field(default_factory=dict)  # size -> tuple of index tuples; {}: any
    partition_nvswitches: dict = field(default_factory=dict)  # index tuple -> NVSwitch indexes
    physical_ids: tuple = ()  # index -> FM physical ID
    fm_partitions: dict = field(default_factory=dict)  # FM partition id -> FmPartition
    templates: dict = field(default_factory=dict)  # GPU count -> {field: value} overrides
    os_disk_gb: int = DEFAULT_OS_DISK_GB
    extra_passthrough_ids: dict = field(default_factory=dict)  # (vendor, device) -> why
    sizes: tuple = ()  # generic platforms only: GPU counts allowed (); () means any that fits
    source: str = "built-in"
    # PCI classes (base << 8 | sub) a device must have to count as a GPU / an NVSwitch. A platform
    # file may widen them, e.g. for stand-in devices in a lab or a new device class.
    gpu_classes: tuple = GPU_CLASSES
    nvswitch_classes: tuple = NVSWITCH_CLASSES
    # Shared NVSwitch: GPU address -> FM module ID, from a platform file (``module_ids``).
    module_ids: dict = field(default_factory=dict)
    # Blocks left out of ``partitions`` for now, and why (FM reports their NVLinks degraded).
    unavailable: dict = field(default_factory=dict)
    # Shared NVSwitch: the host driver that owns the NVSwitches, for Fabric Manager. A platform
    # file of stand-in switches (the lab) names theirs; nvidia everywhere else.
    nvswitch_driver: str = "nvidia"
    # NICs (docs/networking.md): IDs and classes that count (() and NIC_CLASSES: the built-in
    # ConnectX / BlueField list), and the rail NICs a platform file names ((): every rail the
    # topology gives; else only those, each still checked against the topology).
    nic_ids: tuple = ()
    nic_classes: tuple = NIC_CLASSES
    rail_nics: tuple = ()

    @property
    def partitioned(self):
        """True when VMs may only get the listed partitions (every known platform)."""
        return bool(self.partitions)

    @property
    def allowed_sizes(self):
        """GPU counts this platform can place; () means any count that fits (generic)."""
        return tuple(sorted(self.partitions)) if self.partitions else tuple(self.sizes)

    def partitions_of(self, size):
        return self.partitions.get(size, ())

    def nvswitches_for(self, block):
        """NVSwitch indexes that go with a block of GPU indexes (none unless full passthrough)."""
        if self.fabric != FABRIC_FULL_PASSTHROUGH:
            return ()
        return self.partition_nvswitches.get(tuple(sorted(block)), ())

    def fm_partition_for(self, block):
        """The Fabric Manager partition ID whose members are exactly this block, or None."""
        wanted = sorted(self.physical_ids[i] for i in block if i < len(self.physical_ids))
        if len(wanted) != len(block):
            return None
        for pid in sorted(self.fm_partitions):
            if sorted(self.fm_partitions[pid].members) == wanted:
                return pid
        return None

    def template_override(self, gpus):
        """Explicit template numbers for a GPU count ({} when the host-derived default applies)."""
        return dict(self.templates.get(gpus, {}))

    def to_dict(self):
        """The platform as plain data, in the platform file format."""
        return {
            "name": self.name,
            "description": self.description,
            "gpu_ids": [_format_id(i) for i in self.gpu_ids],
            "nvswitch_ids": [_format_id(i) for i in self.nvswitch_ids],
            "gpu_count": self.gpu_count,
            "nvswitch_count": self.nvswitch_count,
            "fabric": self.fabric,
            "physical_ids": list(self.physical_ids),
            "fm_partitions": {
                str(p.id): {"members": list(p.members), "nvlinks_per_gpu": p.nvlinks_per_gpu}
                for p in (self.fm_partitions[k] for k in sorted(self.fm_partitions))
            },
            "partitions": {
                str(size): [
                    {"gpus": list(block), "nvswitches": list(self.nvswitches_for(block))}
                    if self.nvswitches_for(block) else list(block)
                    for block in self.partitions[size]
                ]
                for size in sorted(self.partitions, reverse=True)
            },
            "allowed_sizes": list(self.allowed_sizes),
            "templates": {str(k): dict(v) for k, v in sorted(self.templates.items())},
            "os_disk_gb": self.os_disk_gb,
            "extra_passthrough_ids": {
                _format_id(k): v for k, v in sorted(self.extra_passthrough_ids.items())
            },
            "gpu_classes": ["0x%04x" % c for c in self.gpu_classes],
            "nvswitch_classes": ["0x%04x" % c for c in self.nvswitch_classes],
            "module_ids": dict(sorted(self.module_ids.items())),
            "unavailable": [{"gpus": list(block), "why": why}
                            for block, why in sorted(self.unavailable.items())],
            "nic_ids": [_format_id(i) for i in self.nic_ids],
            "nic_classes": ["0x%04x" % c for c in self.nic_classes],
            "rail_nics": list(self.rail_nics),
        }


def _format_id(pair):
    return "%04x:%04x" % pair


def _fm_table(rows):
    return {pid: FmPartition(pid, tuple(members), links) for pid, members, links in rows}


def partitions_from_fm(fm_partitions, physical_ids):
    """Translate FM partitions to index blocks, keeping those whose GPUs are all present."""
    index_of = {pid: i for i, pid in enumerate(physical_ids)}
    by_size = {}
    for pid in sorted(fm_partitions):
        members = fm_partitions[pid].members
        if not all(m in index_of for m in members):
            continue
        block = tuple(sorted(index_of[m] for m in members))
        blocks = by_size.setdefault(len(block), [])
        if block not in blocks:
            blocks.append(block)
    return {size: tuple(sorted(blocks)) for size, blocks in by_size.items()}


# --- DGX-2 / HGX-2 -----------------------------------------------------------------------------

def _r(a, b):
    return tuple(range(a, b + 1))


_DGX2_FM = _fm_table(
    [(0, _r(1, 16), 6), (1, _r(1, 8), 6), (2, _r(9, 16), 6),
     (3, (1, 4, 6, 7, 9, 12, 14, 15), 5), (4, (2, 3, 5, 8, 10, 11, 13, 16), 5),
     (5, (1, 4, 6, 7), 5), (6, (2, 3, 5, 8), 5), (7, (9, 12, 14, 15), 5),
     (8, (10, 11, 13, 16), 5)]
    + [(9 + k, pair, 5) for k, pair in enumerate(
        [(1, 4), (2, 3), (5, 8), (6, 7), (9, 12), (10, 11), (13, 16), (14, 15)])]
    + [(pid, (pid - 16,), 0) for pid in range(17, 33)]
)


def _dgx2_blocks():
    """PCIe-aligned blocks (hardware.md section 3) and their NVSwitch subsets.

    GPUs 0-7 sit on baseboard 0 with NVSwitch indexes 0-5, GPUs 8-15 on baseboard 1 with 6-11.
    A quad gets 3 of its board's switches (first quad 0-2, second quad 3-5) and a pair gets one
    switch *of its quad's three* (pair j of quad q: switch 3q + j). Nesting the subsets this way
    (rather than "pair j of a board gets switch j") keeps every GPU-disjoint set of blocks
    switch-disjoint too: with switch j for pair j, quad 0-3 (switches 0-2) and pair 4-5
    (switch 2) would both need switch 2.
    """
    partitions = {1: [], 2: [], 4: [], 8: [], 16: []}
    switches = {}
    for size in partitions:
        for start in range(0, 16, size):
            block = _r(start, start + size - 1)
            partitions[size].append(block)
            board = start // 8
            base = 6 * board
            if size == 16:
                sw = _r(0, 11)
            elif size == 8:
                sw = _r(base, base + 5)
            elif size == 4:
                quad = (start % 8) // 4
                sw = _r(base + 3 * quad, base + 3 * quad + 2)
            elif size == 2:
                quad, j = divmod((start % 8) // 2, 2)
                sw = (base + 3 * quad + j,)
            else:
                sw = ()
            if sw:
                switches[block] = sw
    return {k: tuple(v) for k, v in partitions.items()}, switches


_DGX2_PARTITIONS, _DGX2_SWITCHES = _dgx2_blocks()

# --- DGX / HGX A100 ----------------------------------------------------------------------------

_A100_FM = _fm_table(
    [(0, _r(1, 16), 12), (1, _r(1, 8), 12), (2, _r(9, 16), 12),
     (3, _r(1, 4) + _r(9, 12), 12), (4, _r(5, 8) + _r(13, 16), 12),
     (5, _r(1, 4) + _r(13, 16), 12), (6, _r(5, 8) + _r(9, 12), 12),
     (7, _r(1, 4), 12), (8, _r(5, 8), 12), (9, _r(9, 12), 12), (10, _r(13, 16), 12)]
    + [(11 + k, (2 * k + 1, 2 * k + 2), 12) for k in range(8)]
    + [(pid, (pid - 18,), 0) for pid in range(19, 35)]
)

# --- DGX / HGX H100 and H200 -------------------------------------------------------------------

_H100_FM = _fm_table(
    [(0, _r(1, 8), 18), (1, _r(1, 4), 18), (2, _r(5, 8), 18),
     (3, (1, 3), 18), (4, (2, 4), 18), (5, (5, 7), 18), (6, (6, 8), 18)]
    + [(pid, (pid - 6,), 0) for pid in range(7, 15)]
)

# B200 / B300 (fabric.md section 4): no partition 0; pairs {1,2} {3,4} {5,6} {7,8}.
_B200_FM = _fm_table(
    [(1, _r(1, 8), 18), (2, _r(1, 4), 18), (3, _r(5, 8), 18),
     (4, (1, 2), 18), (5, (3, 4), 18), (6, (5, 6), 18), (7, (7, 8), 18)]
    + [(pid, (pid - 7,), 0) for pid in range(8, 16)]
)

# Without a module map the built-in tables assume module 1..8 in PCI bus order (as on the
# published H200 system: 1b 43 52 61 9d c3 d1 df); NVIDIA's HGX integration guide shows a board
# where it is not, so placement with fabric_manager reads the real map (_fabric_placement).


def _hgx8(name, description, gpu_ids, nvswitch_ids, nvswitch_count, fm, **extra):
    """An 8-GPU shared-NVSwitch board: FM's partitions over modules 1-8 in PCI order (the
    default of a host without a module map; ``_fabric_placement`` reads the real one)."""
    return Platform(name=name, description=description, gpu_ids=gpu_ids,
                    nvswitch_ids=nvswitch_ids, gpu_count=8, nvswitch_count=nvswitch_count,
                    fabric=FABRIC_SHARED_NVSWITCH, partitions=partitions_from_fm(fm, _r(1, 8)),
                    physical_ids=_r(1, 8), fm_partitions=fm, **extra)


PLATFORMS = {
    "dgx2": Platform(
        name="dgx2",
        description="NVIDIA DGX-2 / HGX-2: 16 V100-SXM3, 12 NVSwitch gen 1, GPUs and NVSwitches "
                    "passed through to VMs (DGX-2 KVM model)",
        gpu_ids=((NVIDIA, 0x1DB8),),
        nvswitch_ids=((NVIDIA, 0x1AC2),),
        gpu_count=16,
        nvswitch_count=12,
        fabric=FABRIC_FULL_PASSTHROUGH,
        partitions=_DGX2_PARTITIONS,
        partition_nvswitches=_DGX2_SWITCHES,
        # The FM physical ID <-> PCI order map of DGX-2 is not published; identity is a
        # placeholder that only matters to a future shared-NVSwitch mode (override in a file).
        physical_ids=_r(1, 16),
        fm_partitions=_DGX2_FM,
    ),
    "dgx-a100": _hgx8(
        "dgx-a100", "NVIDIA DGX / HGX A100 8-GPU: 8 A100-SXM4, 6 NVSwitch gen 2 kept by the host "
                    "(shared NVSwitch, Fabric Manager partitions)",
        gpu_ids=((NVIDIA, 0x20B0), (NVIDIA, 0x20B2)), nvswitch_ids=((NVIDIA, 0x1AF1),),
        nvswitch_count=6, fm=_A100_FM),
    "dgx-h100": _hgx8(
        "dgx-h100", "NVIDIA DGX / HGX H100 and H200 8-GPU: 8 GPUs, 4 NVSwitch gen 3 kept by the "
                    "host or a service VM (shared NVSwitch, Fabric Manager partitions)",
        gpu_ids=((NVIDIA, 0x2330), (NVIDIA, 0x2335), (NVIDIA, 0x2336)),
        nvswitch_ids=((NVIDIA, 0x22A3), (NVIDIA, 0x22A4)), nvswitch_count=4, fm=_H100_FM,
        extra_passthrough_ids={
            (PMC_SIERRA, 0x4128): "PMC-Sierra memory controller: goes to the Fabric Manager "
                                  "service VM together with the NVSwitches, never to a tenant",
        }),
    "hgx-b200": _hgx8(
        "hgx-b200", "NVIDIA DGX / HGX B200 8-GPU: 8 B200; the NVSwitches sit on the NVLink tray, "
                    "out of the host's PCI tree (shared NVSwitch, Fabric Manager partitions)",
        gpu_ids=((NVIDIA, 0x2901),), nvswitch_ids=(), nvswitch_count=0, fm=_B200_FM),
    "generic": Platform(
        name="generic",
        description="Any PCIe GPU server: no fixed partitions, GPU sets chosen by PCIe/NVLink "
                    "topology",
        gpu_ids=(),
        nvswitch_ids=tuple(sorted(NVSWITCH_IDS)),
        gpu_count=0,
        nvswitch_count=0,
        fabric=FABRIC_NONE,
    ),
}

KNOWN_NAMES = tuple(PLATFORMS)


# --- detection ---------------------------------------------------------------------------------

def host_gpus(topology, ids=None, classes=None):
    """GPUs of the host in PCI bus order: every NVIDIA function of a GPU class, or of ``ids``."""
    classes = classes if classes is not None else GPU_CLASSES
    if ids:
        return topology.devices_matching(ids, classes)
    return topology.devices_matching((), classes, vendors=GPU_VENDORS)


def host_nvswitches(topology, ids=None, classes=None):
    """NVSwitches of the host in PCI bus order (all allow-listed models unless ids is given)."""
    return topology.devices_matching(ids if ids is not None else NVSWITCH_IDS,
                                     classes if classes is not None else NVSWITCH_CLASSES)


def platform_gpus(topology, platform):
    """The host's GPUs as this platform counts them (its IDs, or any NVIDIA GPU, and its
    classes), PCI bus order."""
    return host_gpus(topology, platform.gpu_ids or None, platform.gpu_classes)


def platform_nvswitches(topology, platform):
    """The host's NVSwitches as this platform counts them, PCI bus order."""
    return host_nvswitches(topology, platform.nvswitch_ids, platform.nvswitch_classes)


def platform_fabric_devices(topology, platform):
    """The functions besides the NVSwitches that go to a Fabric Manager service VM with them
    (the platform's ``extra_passthrough_ids``: HGX H100's Switchtec management endpoint), PCI
    order. Bridges are never among them: a Switchtec's ports carry the same ID."""
    ids = getattr(platform, "extra_passthrough_ids", None) or {}
    return [d for d in topology.devices_matching(tuple(ids)) if not d.is_bridge]


def gpu_model_name(id_pair):
    """The model a GPU's (vendor, device) names, or "unknown vvvv:dddd"."""
    return GPU_IDS.get(id_pair) or "unknown %s" % _format_id(id_pair)


def gpu_model_ids(text):
    """The (vendor, device) pairs a ``gpu_model`` value names: a PCI ID (10de:26b9) or a model
    name of GPU_IDS (any case); None for "any". ValueError when it names nothing."""
    value = str(text).strip()
    if value.lower() == "any":
        return None
    vendor, sep, device = value.lower().partition(":")
    if sep:
        try:
            return frozenset([(int(vendor, 16), int(device, 16))])
        except ValueError:
            pass
    pairs = frozenset(k for k, name in GPU_IDS.items() if name.lower() == value.lower())
    if not pairs:
        raise ValueError(
            "%r is neither a GPU model nor a PCI ID; give any, a PCI ID such as 10de:26b9, or one "
            "of %s" % (text, ", ".join(sorted(set(GPU_IDS.values())))))
    return pairs


def _describe(devices, names):
    counts = {}
    for dev in devices:
        label = names.get(dev.id_pair) or "unknown model %s" % _format_id(dev.id_pair)
        counts[label] = counts.get(label, 0) + 1
    return ", ".join("%d x %s" % (n, label) for label, n in sorted(counts.items()))


def detect(topology):
    """The known platform matching the host's GPU and NVSwitch IDs and counts, and why."""
    gpus = host_gpus(topology)
    switches = host_nvswitches(topology)
    found = "%d GPU%s%s and %d NVSwitch%s%s" % (
        len(gpus), "" if len(gpus) == 1 else "s",
        " (%s)" % _describe(gpus, GPU_IDS) if gpus else "",
        len(switches), "" if len(switches) == 1 else "es",
        " (%s)" % _describe(switches, NVSWITCH_IDS) if switches else "",
    )
    near = []
    for name, plat in PLATFORMS.items():
        if not plat.gpu_count:
            continue
        ids_ok = gpus and all(g.id_pair in plat.gpu_ids for g in gpus) and all(
            s.id_pair in plat.nvswitch_ids for s in switches)
        if ids_ok and len(gpus) == plat.gpu_count and len(switches) == plat.nvswitch_count:
            return plat, "found %s: matches %s" % (found, name)
        if ids_ok:
            near.append("%s needs %d GPUs and %d NVSwitches" % (
                name, plat.gpu_count, plat.nvswitch_count))
    if not gpus:
        why = "found no NVIDIA GPU (a 3D controller or VGA function): generic"
    elif near:
        why = "found %s: %s; using generic (a missing GPU or switch also lands here: check " \
              "lspci and the GPUs' health)" % (found, "; ".join(near))
    else:
        why = "found %s: no known platform has these devices; using generic" % found
    return PLATFORMS["generic"], why


def _id(text):
    vendor, device = text.split(":")
    return (int(vendor, 16), int(device, 16))


def detect_degraded(topology, slots):
    """A known platform this host was converted as, with GPUs or NVSwitches gone since:
    ``(platform, missing addresses, reason)``, or None.

    ``slots``: the host record's ``slots`` (``{"gpus": {address: {"id": ...}}, "nvswitches":
    {...}}``, what ``kvm_host`` saw at conversion). It holds when the slots make the platform
    (counts and IDs) and every GPU and NVSwitch found now sits in one of them."""
    gpu_slots = (slots or {}).get("gpus") or {}
    switch_slots = (slots or {}).get("nvswitches") or {}
    present_gpus = {d.bdf for d in host_gpus(topology) if not d.missing}
    present_switches = {d.bdf for d in host_nvswitches(topology) if not d.missing}
    missing = sorted((set(gpu_slots) - present_gpus) | (set(switch_slots) - present_switches))
    if not missing or not present_gpus <= set(gpu_slots) or not present_switches <= set(
            switch_slots):
        return None
    gpu_ids = {_id(s["id"]) for s in gpu_slots.values()}
    switch_ids = {_id(s["id"]) for s in switch_slots.values()}
    for name, plat in PLATFORMS.items():
        if (plat.gpu_count and len(gpu_slots) == plat.gpu_count
                and len(switch_slots) == plat.nvswitch_count
                and all(i in plat.gpu_ids for i in gpu_ids)
                and all(i in plat.nvswitch_ids for i in switch_ids)):
            return plat, missing, (
                "degraded %s: %s missing from the slots recorded when the host was converted; "
                "they keep their indexes and are never placed, and the rest places as %s" % (
                    name, ", ".join(missing), name))
    return None


def check_host(platform, topology):
    """Raise PlatformError when the platform cannot describe this host's GPUs."""
    gpus = platform_gpus(topology, platform)
    if platform.gpu_count and len(gpus) != platform.gpu_count:
        raise PlatformError(
            "platform: %s expects %d GPUs (%s) but this host has %d; GPU indexes would not line "
            "up with its partitions. Use platform: auto (falls back to generic) or a platform "
            "file that matches the host" % (
                platform.name, platform.gpu_count,
                ", ".join(_format_id(i) for i in platform.gpu_ids), len(gpus)))
    for size, blocks in platform.partitions.items():
        for block in blocks:
            if block and block[-1] >= len(gpus):
                raise PlatformError(
                    "platform: %s partition %s (size %d) names GPU index %d, but this host has %d "
                    "GPUs (indexes 0-%d); fix the partition in the platform file" % (
                        platform.name, list(block), size, block[-1], len(gpus),
                        len(gpus) - 1))

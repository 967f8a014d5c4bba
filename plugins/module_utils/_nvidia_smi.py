# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Parsers for the text of ``nvidia-smi topo -m`` and ``nvidia-smi -q``, and of NVIDIA's
gpu-admin-tools ``nvidia_gpu_tools.py --query-module-name``. Private.

The modules never run nvidia-smi themselves (the host's GPUs are meant to be on vfio-pci, where
nvidia-smi cannot see them); a user passes the ``topo -m`` text captured while the GPUs were
still on the NVIDIA driver, and NVLink counts from it refine placement on hosts without a
platform table. The kvm_host role runs ``nvidia-smi -q`` once, before it binds the GPUs of a
shared-NVSwitch host to vfio-pci, to learn each GPU's module ID (Fabric Manager's name for it);
where no NVIDIA driver holds the GPUs (they are on vfio-pci already), NVIDIA's gpu-admin-tools
reads it from the GPU itself, and the role asks that instead when the user names it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
_DEVICE_LABEL_RE = re.compile(r"^(GPU\d+|NIC\d+|mlx\d+_\d+)$")
_LINK_RE = re.compile(r"^(X|NV\d+|PIX|PXB|PHB|NODE|SYS|SOC|PSB)$")
_TRAILING_LABELS = ("CPU Affinity", "NUMA Affinity", "GPU NUMA ID")


class NvidiaSmiTopoError(ValueError):
    """The text is not the output of ``nvidia-smi topo -m``."""


class NvidiaSmiQueryError(ValueError):
    """The text is not the output of ``nvidia-smi -q``."""


# "GPU 00000000:18:00.0" opens each GPU's section (nvidia-smi prints an 8-digit domain);
# "Module Id : 7" sits under "Platform Info" (HGX boards; "N/A" elsewhere). Older drivers print
# "Module ID", which NVIDIA's libvirt hook matches without case: so does this.
_QUERY_GPU_RE = re.compile(
    r"^GPU ([0-9A-Fa-f]{4,8}):([0-9A-Fa-f]{2}):([0-9A-Fa-f]{2})\.([0-7])\s*$")
_QUERY_MODULE_RE = re.compile(r"^\s+Module Id\s*:\s*(.*?)\s*$", re.IGNORECASE)


def parse_module_ids(text):
    """``{bdf: module ID}`` from ``nvidia-smi -q``: every GPU it lists, with None where it
    prints no module ID or N/A (not an HGX module). NvidiaSmiQueryError when it lists no GPU,
    or a module ID that is no number."""
    if not isinstance(text, str):
        raise NvidiaSmiQueryError("nvidia-smi -q: expected its text, got %r" % (text,))
    found = {}
    bdf = None
    for line in text.splitlines():
        line = _ANSI_RE.sub("", line).rstrip()
        header = _QUERY_GPU_RE.match(line)
        if header:
            domain, bus, slot, function = header.groups()
            bdf = "%04x:%s:%s.%s" % (int(domain, 16), bus.lower(), slot.lower(), function)
            found[bdf] = None
            continue
        module = _QUERY_MODULE_RE.match(line)
        if module and bdf is not None and found[bdf] is None:
            value = module.group(1)
            if value.upper() == "N/A" or not value:
                continue
            if not value.isdigit():
                raise NvidiaSmiQueryError("nvidia-smi -q: GPU %s has the module ID %r, not a "
                                          "number" % (bdf, value))
            found[bdf] = int(value)
    if not found:
        raise NvidiaSmiQueryError("nvidia-smi -q: no 'GPU 00000000:BB:DD.F' section was found; "
                                  "pass the unmodified output of 'nvidia-smi -q'")
    return found


# nvidia_gpu_tools.py logs through Python's logging ('%(asctime)s.%(msecs)03d %(levelname)-8s
# %(message)s', on stderr) "{device} module name {device.module_name}", where a GPU is
# "GPU <bdf> <name> <device id> BAR0 <address>" and its module name "SXM_<module ID>" (the
# board's GPIO strap + 1: the module ID nvidia-smi prints and Fabric Manager's physicalId).
# NVSwitches answer "NVSwitch_<n>"; they are not GPUs. NVIDIA/gpu-admin-tools v2025.10.20.
_TOOLS_MODULE_RE = re.compile(
    r"\bGPU ([0-9A-Fa-f]{4}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]) .* module name SXM_(\d+)\s*$")
_TOOLS_ERROR_RE = re.compile(r"\b(?:ERROR|CRITICAL)\s+(.*)$")


def parse_gpu_tools_module_names(text):
    """``{bdf: module ID}`` from ``nvidia_gpu_tools.py --devices gpus --query-module-name``
    (its log, stdout and stderr together). NvidiaSmiQueryError, with the tool's own error lines,
    when it names no GPU's module."""
    if not isinstance(text, str):
        raise NvidiaSmiQueryError("nvidia_gpu_tools.py: expected its output, got %r" % (text,))
    found = {}
    errors = []
    for line in text.splitlines():
        line = line.rstrip()
        match = _TOOLS_MODULE_RE.search(line)
        if match:
            found[match.group(1).lower()] = int(match.group(2))
            continue
        error = _TOOLS_ERROR_RE.search(line)
        if error:
            errors.append(error.group(1))
    if not found:
        raise NvidiaSmiQueryError(
            "nvidia_gpu_tools.py --query-module-name named no GPU's module (SXM_n)%s; it reads "
            "it from H100/H200 and B200 SXM GPUs only" % (
                ": " + "; ".join(errors) if errors else ""))
    return found


@dataclass
class NvidiaSmiTopo:
    """The GPU-to-GPU part of ``nvidia-smi topo -m``, GPUs by nvidia-smi index."""

    gpu_count: int
    links: dict = field(default_factory=dict)  # (i, j) -> "NV12" | "PIX" | ... for i != j
    cpu_affinity: dict = field(default_factory=dict)  # i -> "0-23,48-71" (as printed)
    numa_affinity: dict = field(default_factory=dict)  # i -> int or None

    def nvlinks(self, i, j):
        """Number of bonded NVLinks between GPUs i and j (0 when they talk over PCIe)."""
        link = self.links.get((i, j), "")
        return int(link[2:]) if link.startswith("NV") else 0

    def nvlink_matrix(self):
        """{(i, j): count} for every pair joined by NVLink."""
        return {k: self.nvlinks(*k) for k in self.links if self.nvlinks(*k)}


def _error(message):
    return NvidiaSmiTopoError(
        "nvidia_smi_topo: %s; pass the unmodified output of 'nvidia-smi topo -m' "
        "(captured while the GPUs were bound to the nvidia driver), or leave it unset" % message
    )


def parse_topo_matrix(text):
    """Parse ``nvidia-smi topo -m`` output. Raises NvidiaSmiTopoError on anything else."""
    if not isinstance(text, str) or not text.strip():
        raise _error("the text is empty")
    lines = [_ANSI_RE.sub("", line).rstrip() for line in text.splitlines()]
    header_at = None
    for n, line in enumerate(lines):
        tokens = line.split()
        # The header starts with GPU0 (often indented); a row starts with GPU0 followed by X.
        if tokens and tokens[0] == "GPU0" and (len(tokens) < 2 or tokens[1] != "X"):
            header_at = n
            break
    if header_at is None:
        raise _error("no header line with the column 'GPU0' was found")
    header = lines[header_at]
    for label in _TRAILING_LABELS:
        header = header.replace(label, "")
    columns = header.split()
    if not all(_DEVICE_LABEL_RE.match(c) for c in columns):
        raise _error("unexpected column names in the header: %s" % " ".join(columns))
    gpu_columns = [c for c in columns if c.startswith("GPU")]
    expected = ["GPU%d" % i for i in range(len(gpu_columns))]
    if gpu_columns != expected:
        raise _error("GPU columns are not GPU0..GPU%d in order" % (len(gpu_columns) - 1))
    topo = NvidiaSmiTopo(gpu_count=len(gpu_columns))
    seen = set()
    for line in lines[header_at + 1:]:
        tokens = line.split()
        if not tokens:
            if seen:
                break
            continue
        if tokens[0] == "Legend:" or tokens[0].endswith("Legend:"):
            break
        label = tokens[0]
        if not label.startswith("GPU"):
            continue  # NIC rows are not needed for GPU placement
        if not re.match(r"^GPU\d+$", label):
            raise _error("unexpected row label %r" % label)
        i = int(label[3:])
        if i >= topo.gpu_count:
            raise _error("row %s has no matching column" % label)
        cells = tokens[1:1 + len(columns)]
        if len(cells) < len(columns):
            raise _error("row %s has %d cells, expected %d" % (label, len(cells), len(columns)))
        for col, cell in zip(columns, cells):
            if not _LINK_RE.match(cell):
                raise _error("row %s column %s holds %r, not a link type" % (label, col, cell))
            if col.startswith("GPU"):
                j = int(col[3:])
                if (i == j) != (cell == "X"):
                    raise _error("row %s column %s: 'X' must be exactly on the diagonal"
                                 % (label, col))
                if i != j:
                    topo.links[(i, j)] = "SYS" if cell == "SOC" else cell
        rest = tokens[1 + len(columns):]
        if rest:
            topo.cpu_affinity[i] = rest[0]
        if len(rest) > 1:
            topo.numa_affinity[i] = int(rest[1]) if rest[1].isdigit() else None
        seen.add(i)
    missing = sorted(set(range(topo.gpu_count)) - seen)
    if missing:
        raise _error("no row for GPU%s" % ", GPU".join(str(m) for m in missing))
    for (i, j), link in topo.links.items():
        if topo.links.get((j, i)) != link:
            raise _error("GPU%d-GPU%d is %s but GPU%d-GPU%d is %s (the matrix must be "
                         "symmetric)" % (i, j, link, j, i, topo.links.get((j, i))))
    return topo


def nvlinks_for_host(text, gpus_found, sysfs_root):
    """Parse the text and check it describes this host's GPUs; the NVLink matrix."""
    topo = parse_topo_matrix(text)
    if topo.gpu_count != gpus_found:
        raise _error("lists %d GPUs but %d were found under sysfs_root %s; use the text "
                     "captured on this host" % (topo.gpu_count, gpus_found, sysfs_root))
    return topo.nvlink_matrix()


# --- memory health (the deep check of a GPU no VM holds, issue 17 point 2) ---------------------

_QUERY_KEY_RE = re.compile(r"^( *)([^:]+?)\s*(?::\s*(.*?))?\s*$")


def parse_memory_health(text):
    """``{bdf: ((state, reason), ...)}`` from ``nvidia-smi -q`` (or ``-q -d ECC,PAGE_RETIREMENT,
    ROW_REMAPPER``): what its ECC, retired-page and row-remapper sections say of each GPU.

    Failed: uncorrectable ECC errors since the driver loaded (``ECC Errors`` > ``Volatile``, DRAM
    or SRAM); ``Remapping Failure Occurred: Yes`` (NVIDIA's RMA criterion once its field
    diagnostic confirms it). Degraded: a row remap or a retired page that waits for a GPU reset
    (``Remapped Rows`` > ``Pending: Yes``, ``Pending Page Blacklist: Yes``). Sections a GPU does
    not have (``N/A``) say nothing."""
    if not isinstance(text, str):
        raise NvidiaSmiQueryError("nvidia-smi -q: expected its text, got %r" % (text,))
    found, bdf, stack = {}, None, []
    for raw in text.splitlines():
        line = _ANSI_RE.sub("", raw).rstrip()
        header = _QUERY_GPU_RE.match(line)
        if header:
            domain, bus, slot, function = header.groups()
            bdf = "%04x:%s:%s.%s" % (int(domain, 16), bus.lower(), slot.lower(), function)
            found[bdf], stack = [], []
            continue
        m = _QUERY_KEY_RE.match(line)
        if bdf is None or not line.strip() or m is None:
            continue
        depth = len(m.group(1)) // 4
        key, value = m.group(2).strip(), m.group(3)
        del stack[max(depth - 1, 0):]
        if value is None:  # a section header
            stack.append(key)
            continue
        where = tuple(stack)
        signal = _memory_signal(where, key, value.strip())
        if signal:
            found[bdf].append(signal)
    if not found:
        raise NvidiaSmiQueryError("nvidia-smi -q: no GPU section (\"GPU 00000000:18:00.0\") in "
                                  "its text")
    return {b: tuple(s) for b, s in found.items()}


def _memory_signal(where, key, value):
    count = int(value) if value.isdigit() else None
    if where == ("ECC Errors", "Volatile") and "Uncorrectable" in key and count:
        return ("failed", "%d %s ECC error%s since the driver loaded (nvidia-smi -q)" % (
            count, key.replace("Uncorrectable", "uncorrectable").strip(),
            "" if count == 1 else "s"))
    if where == ("Remapped Rows",) and key == "Remapping Failure Occurred" and value == "Yes":
        return ("failed", "row remapping failed (nvidia-smi -q: Remapping Failure Occurred); "
                "NVIDIA's field diagnostic decides whether it is an RMA")
    if where == ("Remapped Rows",) and key == "Pending" and value == "Yes":
        return ("degraded", "a row remap waits for a GPU reset (nvidia-smi -q: Remapped Rows "
                "Pending)")
    # Blackwell-era drivers (580) add these under ECC Errors.
    if where == ("ECC Errors",) and key == "Unrepairable Memory" and value == "Yes":
        return ("failed", "memory the GPU cannot repair (nvidia-smi -q: Unrepairable Memory)")
    if where == ("ECC Errors",) and key.endswith("Repair Pending") and value == "Yes":
        return ("degraded", "a repair waits for a GPU reset (nvidia-smi -q: %s)" % key)
    if where == ("ECC Errors", "Aggregate") and key == "SRAM Threshold Exceeded" and value == "Yes":
        return ("degraded", "SRAM errors over NVIDIA's threshold (nvidia-smi -q: SRAM Threshold "
                "Exceeded)")
    if where == ("Retired Pages",) and key == "Pending Page Blacklist" and value == "Yes":
        return ("degraded", "a retired page waits for a GPU reset (nvidia-smi -q: Pending Page "
                "Blacklist)")
    return None

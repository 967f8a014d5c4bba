# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""A picture of a host and a page of the fleet: SVG and HTML, no script. Private. Pure.

``picture_data`` takes a M(gpu_topology) result and keeps what the text allocation map
(``_host_facts.allocation_map``) tells: each GPU, NVSwitch and rail NIC with its NUMA node, the
PCIe switch above it, who holds it (running, defined, planned, the host's Fabric Manager) and its
health with the reason. It is JSON-ready: the gpu_vms role's layout report carries it, so the
fleet page can be drawn on the controller from the reports alone.

``host_svg`` draws one host: a band per NUMA node, a box per PCIe switch (the upstream port of
the last switch on the device's path; a device straight on a root port gets a box of its own),
a rectangle per device filled with its tenant's colour, free devices outlined, failed devices
crossed out in red and degraded ones in orange, each with its reason. Every device is a ``<g
class="device">`` whose ``data-*`` attributes say what the report says, so a test (or a
script) can read the picture back.

``fleet_page`` makes one HTML page: a table of the hosts with their free capacity by block size
(hosts that failed or sent no report are listed with why), then one SVG per host.
"""

from __future__ import annotations

from html import escape

PICTURE_FORMAT = 1
_SHARED_NVSWITCH = "shared_nvswitch"  # _platforms.FABRIC_SHARED_NVSWITCH (this file is pure)

# Tenant fills, chosen to be told apart and to carry black text; the n-th tenant in name order
# gets the n-th (then round again).
PALETTE = ("#8ecae6", "#ffb703", "#b5e48c", "#cdb4db", "#f4a261", "#90e0ef", "#e9c46a",
           "#a8dadc", "#f7aef8", "#c9ada7", "#99d98c", "#ffd6a5")
_FREE_FILL = "#ffffff"
_HOST_FILL = "#d9d9d9"
_KINDS = ("gpu", "nic", "nvswitch")
_KIND_LABEL = {"gpu": "GPU", "nvswitch": "NVSwitch", "nic": "NIC"}
_KIND_PLURAL = {"gpu": "GPUs", "nvswitch": "NVSwitches", "nic": "NICs"}

# Geometry (pixels).
_DEV_W, _DEV_H, _GAP = 176, 46, 6
_PAD, _GROUP_HEAD, _NODE_HEAD, _MARGIN, _TITLE_H = 8, 18, 24, 12, 44
_GROUPS_PER_ROW = 6
_LEGEND_H = 28

_STYLE = (
    "text{font-family:DejaVu Sans,Arial,sans-serif;font-size:11px;fill:#111}"
    ".title{font-size:15px;font-weight:bold}.sub{font-size:12px}"
    ".node-box{fill:#f5f7fa;stroke:#7a869a}.node-label{font-weight:bold}"
    ".switch-box{fill:#ffffff;stroke:#b0b8c4;stroke-dasharray:4 2}.switch-label{fill:#555}"
    ".dev{stroke:#333;stroke-width:1}.dev-free{stroke:#2a9d3f;stroke-width:2;"
    "stroke-dasharray:6 3}.dev-off{stroke:#999;stroke-dasharray:2 2}"
    ".cross-failed{stroke:#d00000;stroke-width:3}"
    ".cross-degraded{stroke:#f77f00;stroke-width:3;stroke-dasharray:8 4}"
    ".reason{fill:#a00000;font-size:10px}.holder{font-weight:bold}"
)


class PictureError(ValueError):
    """The input is not a gpu_topology result or a picture."""


def _switch_of(entry):
    """(key, label) of the box a device is drawn in: the PCIe switch above it."""
    path = list(entry.get("pcie_path") or [])
    if len(path) >= 3:
        return path[-2], "PCIe switch %s" % path[-2]
    if path:
        return path[0], "root port %s" % path[0]
    bridge = entry.get("host_bridge") or "?"
    return bridge, "host bridge %s" % bridge


def _health_of(entry):
    """(state, reason): ``ok``, ``degraded`` or ``failed``, and why. A GPU listed in
    unhealthy_gpus is never placed, so it is drawn failed whatever its signals (as the text
    map puts that first)."""
    health = entry.get("health") or {}
    state = health.get("state") or "ok"

    def reasons(which):
        found = [s.get("reason") or "" for s in health.get("signals") or []
                 if s.get("state") == which]
        return "; ".join(r for r in found if r) or which

    if state == "failed":
        return "failed", reasons("failed")
    if entry.get("missing"):
        return "failed", "missing from the PCI bus"
    if entry.get("healthy") is False:
        extra = "; degraded: %s" % reasons("degraded") if state == "degraded" else ""
        return "failed", "listed in unhealthy_gpus%s" % extra
    if state == "degraded":
        return "degraded", reasons("degraded")
    return "ok", ""


def picture_data(result):
    """The picture's data (JSON-ready) from a gpu_topology result."""
    if not isinstance(result, dict) or not isinstance(result.get("gpus"), list):
        raise PictureError("expected a gpu_topology result (a dict with gpus, nvswitches, nics "
                           "and allocations), got %s" % type(result).__name__)
    owner = {}
    for alloc in result.get("allocations") or []:
        held = "running" if alloc.get("active") else "defined"
        for bdf in ((alloc.get("gpus") or []) + (alloc.get("nvswitches") or [])
                    + (alloc.get("nics") or []) + (alloc.get("extra_nics") or [])):
            owner[bdf] = (alloc.get("name"), held)
    unplaced = []
    for entry in result.get("plan") or []:
        if "error" in entry:
            unplaced.append({"name": entry.get("name"), "gpus": entry.get("gpus_requested"),
                             "error": entry["error"]})
            continue
        for bdf in (entry.get("gpus") or []) + (entry.get("nvswitches") or []) + (
                entry.get("nics") or []):
            owner[bdf] = (entry.get("name"), "planned")
    platform = result.get("platform") or {}
    shared = platform.get("fabric") == _SHARED_NVSWITCH
    devices = []
    for kind, key in (("gpu", "gpus"), ("nvswitch", "nvswitches"), ("nic", "nics")):
        for number, entry in enumerate(result.get(key) or []):
            holder, held = owner.get(entry["bdf"], (None, None))
            if holder is None and entry.get("allocated_to"):
                holder, held = entry["allocated_to"], "defined"
            tenants = [holder] if holder else []
            if holder is None and kind == "nvswitch" and shared:
                holder, held = "host", "host (Fabric Manager)"
            if holder is None and kind == "nic" and entry.get("host_use"):
                holder, held = "host", "host: %s" % entry["host_use"]
            if holder is None and kind == "gpu" and entry.get("busy"):
                holder, held = "host", "busy: %s" % entry["busy"]
            # A NIC whose VFs VMs hold (or a plan gives): each VF's VM, as the text map says.
            vfs = {}
            for vf in (entry.get("sriov") or {}).get("vfs") or []:
                name, how = owner.get(vf.get("bdf"), (vf.get("allocated_to"), "defined"))
                if name:
                    vfs.setdefault((name, how), 0)
                    vfs[(name, how)] += 1
            if holder is None and vfs:
                tenants = sorted({name for name, _how in vfs})
                holder = ", ".join(tenants)
                held = "VFs: %s" % ", ".join("%s %d (%s)" % (name, n, how)
                                             for (name, how), n in sorted(vfs.items()))
            if holder is None and kind == "nic" and not entry.get("offered", True):
                held = "not offered"
            state, reason = _health_of(entry)
            switch, switch_label = _switch_of(entry)
            node = entry.get("numa_node")
            devices.append({
                "kind": kind,
                "index": entry.get("index", number),
                "bdf": entry["bdf"],
                "model": entry.get("model") or "",
                "numa_node": node if isinstance(node, int) else -1,
                "switch": switch,
                "switch_label": switch_label,
                "holder": holder,
                "held": held,
                "tenants": tenants,
                "state": state,
                "reason": reason,
                "offered": bool(entry.get("offered", True)),
                "netdevs": list(entry.get("rdma_devices") or entry.get("netdevs") or []),
            })
    free = result.get("free_blocks_after_plan", result.get("free_blocks")) or {}
    return {
        "format": PICTURE_FORMAT,
        "platform": platform.get("name") or "",
        "platform_reason": platform.get("reason") or "",
        "planned": bool(result.get("plan")),
        "free_blocks": {str(k): int(v) for k, v in free.items() if int(v)},
        "unplaced": unplaced,
        "numa_nodes": [{"id": n.get("id"), "cpus": n.get("cpus") or ""}
                       for n in result.get("numa_nodes") or []],
        "devices": devices,
    }


def _check_picture(picture):
    if not isinstance(picture, dict) or picture.get("format") != PICTURE_FORMAT \
            or not isinstance(picture.get("devices"), list):
        raise PictureError("expected a host picture of format %d (picture_data's output, the "
                           "layout report's picture), got %s" % (
                               PICTURE_FORMAT, type(picture).__name__
                               if not isinstance(picture, dict) else
                               "format %r" % picture.get("format")))


def tenant_colours(picture):
    """{tenant: fill} in name order: the palette, then hues a golden angle apart."""
    names = sorted({name for d in picture["devices"] for name in d.get("tenants") or ()})
    return {name: PALETTE[i] if i < len(PALETTE) else
            "hsl(%d,65%%,75%%)" % ((i - len(PALETTE)) * 137.5 % 360)
            for i, name in enumerate(names)}


def free_blocks_text(blocks):
    return ", ".join("%d x %s" % (n, size) for size, n in
                     sorted(blocks.items(), key=lambda kv: -int(kv[0])) if n) or "none"


def _short(text, width):
    text = str(text)
    return text if len(text) <= width else text[:width - 1] + "\u2026"


def _attrs(**attrs):
    return "".join(' %s="%s"' % (k.replace("_", "-"), escape(str(v), quote=True))
                   for k, v in attrs.items() if v is not None)


def _address(bdf):
    return bdf[5:] if bdf.startswith("0000:") else bdf


def _why(dev):
    """The reason as drawn: without the device's own address, which the box shows."""
    return "; ".join(part[len(dev["bdf"]) + 2:] if part.startswith(dev["bdf"] + ": ") else part
                     for part in dev["reason"].split("; "))


def _device_svg(dev, x, y, fill):
    label = "%s%s %s" % (_KIND_LABEL[dev["kind"]], dev["index"] if dev["kind"] != "nic" else "",
                         _address(dev["bdf"]))
    if dev["kind"] == "nic" and dev["netdevs"]:
        label = "NIC %s %s" % (_address(dev["bdf"]), ",".join(dev["netdevs"]))
    held = str(dev["held"] or "")
    if dev["holder"] is None:
        holder = held or "free"
    elif held.startswith(("host", "busy", "VFs")):
        holder = held
    else:
        holder = "%s (%s)" % (dev["holder"], held)
    trouble = " - %s: %s" % (dev["state"], dev["reason"]) if dev["state"] != "ok" else ""
    tip = "%s %s %s - %s%s" % (_KIND_LABEL[dev["kind"]], dev["bdf"], dev["model"], holder,
                               trouble)
    style = "dev"
    if dev["holder"] is None:
        style = "dev dev-free" if not held else "dev dev-off"
    parts = [
        "<g%s>" % _attrs(**{
            "class": "device %s" % dev["kind"], "data_kind": dev["kind"],
            "data_index": dev["index"], "data_bdf": dev["bdf"], "data_model": dev["model"],
            "data_numa_node": dev["numa_node"], "data_switch": dev["switch"],
            "data_holder": dev["holder"] or "", "data_held": dev["held"] or "free",
            "data_state": dev["state"], "data_reason": dev["reason"]}),
        "<title>%s</title>" % escape(tip),
        '<rect class="%s" x="%d" y="%d" width="%d" height="%d" rx="4" fill="%s"/>' % (
            style, x, y, _DEV_W, _DEV_H, fill),
        '<text x="%d" y="%d">%s</text>' % (x + 6, y + 14, escape(_short(label, 30))),
        '<text class="holder" x="%d" y="%d">%s</text>' % (x + 6, y + 28,
                                                          escape(_short(holder, 24))),
    ]
    if dev["state"] != "ok":
        parts.append('<line class="cross-%s" x1="%d" y1="%d" x2="%d" y2="%d"/>' % (
            dev["state"], x + 2, y + 2, x + _DEV_W - 2, y + _DEV_H - 2))
        parts.append('<line class="cross-%s" x1="%d" y1="%d" x2="%d" y2="%d"/>' % (
            dev["state"], x + 2, y + _DEV_H - 2, x + _DEV_W - 2, y + 2))
        parts.append('<text class="reason" x="%d" y="%d">%s</text>' % (
            x + 6, y + 41, escape(_short("%s: %s" % (dev["state"], _why(dev)), 32))))
    parts.append("</g>")
    return "".join(parts)


def _fill(dev, colours):
    if dev["holder"] is None:
        return _FREE_FILL
    tenants = dev.get("tenants") or ()
    return colours.get(tenants[0], _HOST_FILL) if tenants else _HOST_FILL


def host_svg(host, picture):
    """One host's SVG (a string, an ``<svg>`` element that an HTML page can hold inline)."""
    _check_picture(picture)
    colours = tenant_colours(picture)
    by_node = {}
    for dev in picture["devices"]:
        by_node.setdefault(dev["numa_node"], {}).setdefault(
            (dev["switch"], dev["switch_label"]), []).append(dev)
    cpus = {n.get("id"): n.get("cpus") for n in picture.get("numa_nodes") or []}
    group_w = _DEV_W + 2 * _PAD
    body, y = [], _MARGIN + _TITLE_H
    widest = 1
    for node in sorted(by_node):
        groups = sorted(by_node[node].items(), key=lambda kv: (
            min(_KINDS.index(d["kind"]) for d in kv[1]), kv[0][0]))
        rows = [groups[i:i + _GROUPS_PER_ROW] for i in range(0, len(groups), _GROUPS_PER_ROW)]
        widest = max(widest, max(len(r) for r in rows))
        node_parts, gy = [], y + _NODE_HEAD
        for row in rows:
            row_h = 0
            for col, ((switch, switch_label), devs) in enumerate(row):
                devs = sorted(devs, key=lambda d: (_KINDS.index(d["kind"]), d["bdf"]))
                gx = _MARGIN + _PAD + col * (group_w + _GAP)
                gh = _GROUP_HEAD + len(devs) * (_DEV_H + _GAP) + _PAD - _GAP
                node_parts.append('<g%s><rect class="switch-box" x="%d" y="%d" width="%d" '
                                  'height="%d" rx="3"/><text class="switch-label" x="%d" y="%d">'
                                  '%s</text>' % (
                                      _attrs(**{"class": "pcie-switch", "data_switch": switch}),
                                      gx, gy, group_w, gh, gx + 4, gy + 13,
                                      escape(_short(switch_label, 32))))
                for i, dev in enumerate(devs):
                    node_parts.append(_device_svg(dev, gx + _PAD, gy + _GROUP_HEAD
                                                  + i * (_DEV_H + _GAP), _fill(dev, colours)))
                node_parts.append("</g>")
                row_h = max(row_h, gh)
            gy += row_h + _GAP
        node_h = gy - y + _PAD - _GAP
        label = ("NUMA node %s, CPUs %s" % (node, cpus[node]) if cpus.get(node)
                 else "NUMA node %s" % node) if node >= 0 else "no NUMA node"
        body.append('<g%s><rect class="node-box" x="%d" y="%d" width="%%(node_w)d" height="%d" '
                    'rx="6"/><text class="node-label" x="%d" y="%d">%s</text>%s</g>' % (
                        _attrs(**{"class": "numa-node", "data_node": node}), _MARGIN, y,
                        node_h, _MARGIN + 8, y + 16, escape(label), "".join(node_parts)))
        y += node_h + _GAP
    node_w = widest * (group_w + _GAP) - _GAP + 2 * _PAD
    counts = {}
    for dev in picture["devices"]:
        counts[dev["kind"]] = counts.get(dev["kind"], 0) + 1
    title = "%s: %s" % (host, picture.get("platform") or "?")
    sub = "%s; free blocks%s: %s" % (
        ", ".join("%d %s" % (counts[k], (_KIND_PLURAL if counts[k] > 1 else _KIND_LABEL)[k])
                  for k in _KINDS if k in counts) or "no devices",
        " after the plan" if picture.get("planned") else "",
        free_blocks_text(picture.get("free_blocks") or {}))
    # Wide enough for the title and the line under it (bold 15 px, 12 px text).
    width = max(node_w + 2 * _MARGIN, 2 * _MARGIN + 10 * len(title), 2 * _MARGIN + 7 * len(sub),
                420)
    legend_y = y + 6
    legend = ['<g class="legend">']
    lx = _MARGIN
    keys = [(name, fill, "dev") for name, fill in colours.items()] + [
        ("free", _FREE_FILL, "dev dev-free"), ("host", _HOST_FILL, "dev"),
        ("failed", None, "cross-failed"), ("degraded", None, "cross-degraded")]
    for name, fill, cls in keys:
        step = 30 + 7 * min(len(name), 20)
        if lx > _MARGIN and lx + step > width - _MARGIN:
            lx = _MARGIN
            legend_y += 18
        if fill is None:
            legend.append('<line class="%s" x1="%d" y1="%d" x2="%d" y2="%d"/>' % (
                cls, lx, legend_y + 12, lx + 14, legend_y))
        else:
            legend.append('<rect class="%s" x="%d" y="%d" width="14" height="14" fill="%s"/>' % (
                cls, lx, legend_y, fill))
        legend.append('<text x="%d" y="%d">%s</text>' % (lx + 18, legend_y + 11,
                                                         escape(_short(name, 20))))
        lx += step
    legend.append("</g>")
    height = legend_y + _LEGEND_H
    svg_attrs = _attrs(**{"class": "host", "data_host": host,
                          "data_platform": picture.get("platform") or "", "aria_label": title})
    return "".join([
        '<svg xmlns="http://www.w3.org/2000/svg"%s width="%d" height="%d" viewBox="0 0 %d %d" '
        'role="img">' % (svg_attrs, width, height, width, height),
        "<title>%s</title><style>%s</style>" % (escape(title), _STYLE),
        '<text class="title" x="%d" y="%d">%s</text>' % (_MARGIN, _MARGIN + 14, escape(title)),
        '<text class="sub" x="%d" y="%d">%s</text>' % (_MARGIN, _MARGIN + 32, escape(sub)),
        "".join(body).replace("%(node_w)d", str(node_w)),
        "".join(legend),
        "</svg>",
    ])


_PAGE_STYLE = (
    "body{font-family:DejaVu Sans,Arial,sans-serif;margin:16px;color:#111}"
    "table{border-collapse:collapse;margin-bottom:24px}"
    "th,td{border:1px solid #b0b8c4;padding:4px 8px;text-align:left}"
    "th{background:#eef1f5}td.num{text-align:right}tr.not-ok td{background:#fde2e2}"
    "section{margin-bottom:28px}svg{display:block}"
)


def _free_gpus(picture):
    gpus = [d for d in picture["devices"] if d["kind"] == "gpu"]
    return (len([d for d in gpus if d["holder"] is None and d["state"] != "failed"]), len(gpus))


def _note(item, host, status, unplaced):
    """Why a host is not ok: its errors (fleet_summary's), else its line without the host's
    name, and the requests a plan could not place."""
    words = [str(e) for e in item.get("errors") or [] if e]
    line = str(item.get("line") or "").strip()
    if line.startswith(host):
        line = line[len(host):].strip()
        if line.startswith(status):
            line = line[len(status):].strip()
    if not words and status != "ok" and line:
        words.append(line)
    words += ["%s (%s GPUs) not placed: %s" % (u.get("name"), u.get("gpus"), u.get("error"))
              for u in unplaced]
    if not words and status == "no report":
        words.append("no picture: the host failed before its topology was read, or was "
                     "unreachable")
    return "; ".join(words)


def fleet_page(hosts, title="gpuvirt.kvm fleet"):
    """The HTML page. ``hosts``: a list of dicts with ``host``, and ``picture`` (or None when the
    host has none), ``status`` (by default ``ok``, ``not placed`` when a plan left requests
    out, ``no report`` without a picture), and ``errors`` or ``line`` (why, for a host that is
    not ok: fleet_summary's entries have them). Hosts with the largest free block come first,
    then by name."""
    if not isinstance(hosts, (list, tuple)):
        raise PictureError("expected a list of hosts, got %s" % type(hosts).__name__)
    rows, sections, sizes = [], [], set()
    entries = []
    for item in hosts:
        if not isinstance(item, dict) or not item.get("host"):
            raise PictureError("each host must be a dict with host, got %r" % (item,))
        picture = item.get("picture")
        if picture is not None:
            _check_picture(picture)
            sizes.update(int(s) for s in picture.get("free_blocks") or {})
        entries.append((item, picture))
    sizes = sorted(sizes, reverse=True)

    def rank(pair):
        item, picture = pair
        blocks = (picture or {}).get("free_blocks") or {}
        return (-max([int(s) for s, n in blocks.items() if n] or [0]), item["host"])

    for item, picture in sorted(entries, key=rank):
        host = str(item["host"])
        unplaced = (picture or {}).get("unplaced") or []
        status = item.get("status") or (
            "no report" if picture is None else "not placed" if unplaced else "ok")
        anchor = "host-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in host)
        cells = ['<td><a href="#%s">%s</a></td>' % (escape(anchor, quote=True), escape(host))
                 if picture is not None else "<td>%s</td>" % escape(host),
                 "<td>%s</td>" % escape(status)]
        if picture is not None:
            free, total = _free_gpus(picture)
            bad = [d for d in picture["devices"] if d["state"] != "ok"]
            cells.append("<td>%s</td>" % escape(picture.get("platform") or ""))
            cells.append('<td class="num">%d / %d</td>' % (free, total))
            blocks = picture.get("free_blocks") or {}
            cells.extend('<td class="num">%s</td>' % (blocks.get(str(s)) or "")
                         for s in sizes)
            cells.append("<td>%s</td>" % escape("; ".join(
                "%s %s %s: %s" % (_KIND_LABEL[d["kind"]], d["bdf"], d["state"], d["reason"])
                for d in bad)))
            sections.append('<section id="%s"><h2>%s</h2>%s</section>' % (
                escape(anchor, quote=True), escape(host), host_svg(host, picture)))
        else:
            cells.append('<td colspan="%d"></td>' % (2 + len(sizes) + 1))
        cells.append("<td>%s</td>" % escape(_note(item, host, status, unplaced)))
        rows.append('<tr%s%s>%s</tr>' % (
            _attrs(data_host=host, data_status=status),
            "" if status == "ok" else ' class="not-ok"', "".join(cells)))
    head = ("<tr><th>Host</th><th>Status</th><th>Platform</th><th>GPUs free / all</th>%s"
            "<th>Failed or degraded</th><th>Why not ok</th></tr>" % "".join(
                "<th>Free %d-GPU blocks</th>" % s for s in sizes))
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>%s</title><style>%s</style></head><body>" % (escape(title), _PAGE_STYLE),
        "<h1>%s</h1>" % escape(title),
        '<table class="fleet"><thead>%s</thead><tbody>%s</tbody></table>' % (head,
                                                                             "".join(rows)),
        "".join(sections),
        "</body></html>\n",
    ])

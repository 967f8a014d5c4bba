# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The picture of a host (issue 17, point 6): the SVG's devices match the report (one per GPU,
NVSwitch and NIC, holder and state as attributes, drawn in their NUMA node and PCIe switch), the
fleet page lists free capacity by block size, and Chromium renders the page without errors."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from xml.etree import ElementTree

import pytest
from test__health import _faulty as faulty

from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_context import host_context
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_facts import build
from ansible_collections.gpuvirt.kvm.plugins.module_utils._picture import (
    PictureError,
    fleet_page,
    host_svg,
    picture_data,
    tenant_colours,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_request import plan_requests

SVG = "{http://www.w3.org/2000/svg}"
DAY = ({"name": "train-a", "gpus": 4}, {"name": "dev-b", "gpus": 2}, {"name": "dev-c", "gpus": 1})


def _result(name, root, faults=None, requests=DAY):
    """gpu_topology's result for fixture host ``name`` with ``{bdf: fixture fields}`` faults
    written into its tree, read the way a host is read, with ``requests`` planned."""
    sysfs_root, proc_root = faulty(name, faults or {}, root)
    ctx = host_context({
        "sysfs_root": sysfs_root, "proc_root": proc_root, "platform": "auto",
        "nvidia_smi_topo": None, "unhealthy_gpus": [], "reserved_cpus": "",
        "reserved_memory_mb": None, "fabric_manager": None,
        "host_record": "/nonexistent/kvm_host.json", "aer_correctable_threshold": 100,
        "health_record": "/nonexistent/health.json"}, bridges=False)
    return build(ctx.topology, ctx.platform, ctx.platform_reason, [], plan_requests(list(requests)),
                 reserved_cpus="", unhealthy_gpus=ctx.unhealthy_gpus, health=ctx.health)


def _devices(svg):
    """{bdf: (attributes, the numa-node group's data-node, the pcie-switch group's
    data-switch, the classes of the cross lines)} read back from the SVG as XML."""
    root = ElementTree.fromstring(svg)
    found = {}
    for node in root.iter(SVG + "g"):
        if node.get("class") != "numa-node":
            continue
        for switch in node.iter(SVG + "g"):
            if switch.get("class") != "pcie-switch":
                continue
            for dev in switch.iter(SVG + "g"):
                if "device" in dev.get("class", "").split():
                    assert dev.get("data-bdf") not in found, "drawn twice"
                    crosses = [line.get("class") for line in dev.iter(SVG + "line")]
                    found[dev.get("data-bdf")] = (dict(dev.attrib), int(node.get("data-node")),
                                                  switch.get("data-switch"), crosses)
    return found


def _owners(result):
    owner = {}
    for entry in result["plan"]:
        for bdf in [] if "error" in entry else entry["gpus"] + entry["nvswitches"] + entry["nics"]:
            owner[bdf] = entry["name"]
    return owner


@pytest.mark.parametrize("name", ["dgx2", "dgx-a100", "dgx-h100", "pcie-4gpu"])
def test_each_device_is_drawn_once_where_the_topology_puts_it_with_its_holder(name, tmp_path):
    result = _result(name, tmp_path / name)
    drawn = _devices(host_svg(name, picture_data(result)))
    reported = result["gpus"] + result["nvswitches"] + result["nics"]
    assert sorted(drawn) == sorted(e["bdf"] for e in reported)
    owners = _owners(result)
    assert owners, "the plan placed nothing"
    shared = result["platform"]["fabric"] == "shared_nvswitch"
    for entry in reported:
        attrs, node, switch, crosses = drawn[entry["bdf"]]
        assert node == entry["numa_node"]
        path = entry["pcie_path"]
        assert switch == (path[-2] if len(path) >= 3 else path[0])
        assert attrs["data-state"] == "ok" and crosses == []
        if entry["bdf"] in owners:
            assert (attrs["data-holder"], attrs["data-held"]) == (owners[entry["bdf"]], "planned")
        elif shared and entry in result["nvswitches"]:
            assert (attrs["data-holder"], attrs["data-held"]) == ("host", "host (Fabric Manager)")
        elif entry.get("host_use"):  # a NIC the host keeps (storage, management)
            assert (attrs["data-holder"], attrs["data-held"]) == (
                "host", "host: %s" % entry["host_use"])
        else:
            assert (attrs["data-holder"], attrs["data-held"]) == ("", "free")


def test_a_gpu_and_its_rail_nic_share_their_pcie_switch_box(tmp_path):
    result = _result("dgx-h100", tmp_path / "h100")
    drawn = _devices(host_svg("h100", picture_data(result)))
    for nic in result["nics"]:
        for gpu in nic["rail_gpus"]:
            assert drawn[nic["bdf"]][2] == drawn[gpu][2]


def test_failed_and_degraded_devices_are_crossed_out_with_their_reason(tmp_path):
    result = _result("dgx2", tmp_path / "dgx2", {
        "0000:34:00.0": {"aer": {"fatal": {"CmpltTO": 1}}},
        "0000:36:00.0": {"link": {"width": 8, "max_width": 16}},
        "0000:61:00.0": {"gone": True}})
    svg = host_svg("dgx2", picture_data(result))
    drawn = _devices(svg)
    attrs, _node, _switch, crosses = drawn["0000:34:00.0"]
    assert attrs["data-state"] == "failed" and crosses == ["cross-failed"] * 2
    assert "fatal" in attrs["data-reason"] and attrs["data-holder"] == ""  # never placed
    attrs, _node, _switch, crosses = drawn["0000:36:00.0"]
    assert attrs["data-state"] == "degraded" and crosses == ["cross-degraded"] * 2
    assert "trained at x8 of x16" in attrs["data-reason"]
    attrs, _node, _switch, crosses = drawn["0000:61:00.0"]
    assert (attrs["data-kind"], attrs["data-state"]) == ("nvswitch", "failed")
    assert "all ones" in attrs["data-reason"] and crosses == ["cross-failed"] * 2
    healthy = [a for a, _n, _s, c in drawn.values() if a["data-state"] == "ok"]
    assert len(healthy) == len(drawn) - 3 and all(
        not c for a, _n, _s, c in drawn.values() if a["data-state"] == "ok")
    # the reason is on the device itself, in its text and its tooltip
    root = ElementTree.fromstring(svg)
    for dev in root.iter(SVG + "g"):
        if dev.get("data-bdf") == "0000:34:00.0":
            words = " ".join(t.text for t in dev.iter(SVG + "text"))
            assert "failed:" in words
            assert "fatal" in dev.find(SVG + "title").text


def test_running_defined_planned_and_shared_holders_are_told_apart():
    gpus = [{"index": i, "bdf": "0000:%02x:00.0" % (0x10 + i), "numa_node": i // 2,
             "pcie_path": ["0000:00:01.0", "0000:01:00.0", "0000:02:0%d.0" % i]}
            for i in range(4)]
    result = {
        "platform": {"name": "hgx", "reason": "test", "fabric": "shared_nvswitch"},
        "gpus": gpus,
        "nvswitches": [{"index": 0, "bdf": "0000:20:00.0", "numa_node": 0,
                        "pcie_path": ["0000:00:02.0"]}],
        "nics": [],
        "allocations": [
            {"name": "day-a", "gpus": ["0000:10:00.0"], "nvswitches": [], "active": True},
            {"name": "day-b", "gpus": ["0000:11:00.0"], "nvswitches": [], "active": False}],
        "plan": [{"name": "next", "gpus": ["0000:12:00.0"], "nvswitches": [], "nics": []},
                 {"name": "nope", "error": "no room"}],
        "free_blocks": {"1": 2}, "free_blocks_after_plan": {"1": 1},
        "numa_nodes": [{"id": 0, "cpus": "0-3"}, {"id": 1, "cpus": "4-7"}],
    }
    picture = picture_data(result)
    assert picture["free_blocks"] == {"1": 1} and picture["planned"]
    drawn = {b: a for b, (a, _n, _s, _c) in _devices(host_svg("h", picture)).items()}
    assert [(drawn[g["bdf"]]["data-holder"], drawn[g["bdf"]]["data-held"]) for g in gpus] == [
        ("day-a", "running"), ("day-b", "defined"), ("next", "planned"), ("", "free")]
    assert drawn["0000:20:00.0"]["data-held"] == "host (Fabric Manager)"
    # one colour per tenant; free devices are outlined, not filled with a tenant's colour
    root = ElementTree.fromstring(host_svg("h", picture))
    fills = {}
    for dev in root.iter(SVG + "g"):
        if dev.get("data-holder") is not None and "device" in dev.get("class"):
            rect = dev.find(SVG + "rect")
            fills[dev.get("data-holder")] = (rect.get("fill"), rect.get("class"))
    assert len({fills[n][0] for n in ("day-a", "day-b", "next")}) == 3
    assert fills[""] == ("#ffffff", "dev dev-free")


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.hosts, self.cells, self.devices = [], [], [], 0
        self.row = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-host" in attrs:
            self.row = [attrs["data-host"], attrs["data-status"]]
            self.rows.append(self.row)
        elif tag == "svg":
            self.hosts.append(attrs["data-host"])
        elif tag == "g" and "device" in (attrs.get("class") or "").split():
            self.devices += 1

    def handle_data(self, data):
        if self.row is not None and data.strip():
            self.row.append(data.strip())

    def handle_endtag(self, tag):
        if tag == "tr":
            self.row = None


def test_the_fleet_page_lists_hosts_by_free_capacity_then_draws_each(tmp_path):
    big = picture_data(_result("dgx2", tmp_path / "dgx2", requests=[{"name": "a", "gpus": 1}]))
    small = picture_data(_result("dgx-h100", tmp_path / "h100", requests=DAY))
    html = fleet_page([
        {"host": "h100-<1>", "picture": small},
        {"host": "down", "status": "failed", "line": "b-hpc: no room for 16 GPUs"},
        {"host": "dgx2-1", "picture": big}])
    page = Page()
    page.feed(html)
    # largest free block first: the DGX-2 (8 + 4 + 2 + 1 free) before the H100 (1 free)
    assert [r[:2] for r in page.rows] == [["dgx2-1", "ok"], ["h100-<1>", "ok"],
                                          ["down", "failed"]]
    assert page.rows[0][2:] == ["dgx2-1", "ok", "dgx2", "15 / 16", "1", "1", "1", "1"]
    assert page.rows[1][2:] == ["h100-<1>", "ok", "dgx-h100", "1 / 8", "1"]
    assert page.rows[2][2:] == ["down", "failed", "b-hpc: no room for 16 GPUs"]
    assert page.hosts == ["dgx2-1", "h100-<1>"]
    assert page.devices == len(big["devices"]) + len(small["devices"])
    assert "<1>" not in html  # escaped
    with pytest.raises(PictureError, match="expected a host picture of format 1"):
        fleet_page([{"host": "x", "picture": {"devices": []}}])
    with pytest.raises(PictureError, match="expected a gpu_topology result"):
        picture_data({"failed": True, "msg": "no libvirt"})


def _png_pixels(path):
    """(width, height, distinct colours) of an 8-bit RGB(A) PNG, decoded with zlib (filters
    undone), enough to tell a drawn page from a blank one."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and colour in (2, 6)
            step = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * step
    prev = bytearray(stride)
    colours = set()
    for y in range(height):
        filt = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - step] if x >= step else 0
            b = prev[x]
            c = prev[x - step] if x >= step else 0
            if filt == 1:
                line[x] = (line[x] + a) & 0xFF
            elif filt == 2:
                line[x] = (line[x] + b) & 0xFF
            elif filt == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xFF
            elif filt == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) \
                    & 0xFF
        if y % 8 == 0:
            colours.update(bytes(line[i:i + 3]) for i in range(0, stride, step * 8))
        prev = line
    return width, height, colours


def chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI"):
        pytest.fail("chromium is not installed (tools/install-system-deps.sh installs it)")
    if found is None:
        pytest.skip("no chromium (Debian's package; tools/install-system-deps.sh installs it)")
    return found


def test_chromium_renders_the_page_of_a_dgx2_an_h100_and_a_pcie_host(tmp_path):
    browser = chromium()
    hosts = [{"host": name, "picture": picture_data(_result(name, tmp_path / name, faults))}
             for name, faults in (
                 ("dgx2", {"0000:34:00.0": {"aer": {"fatal": {"CmpltTO": 1}}}}),
                 ("dgx-h100", {"0000:43:00.0": {"link": {"width": 8, "max_width": 16}}}),
                 ("pcie-4gpu", {}))]
    page = tmp_path / "fleet.html"
    page.write_text(fleet_page(hosts), encoding="utf-8")
    devices = sum(len(h["picture"]["devices"]) for h in hosts)
    png = tmp_path / "fleet.png"
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
            "--v=0", "--user-data-dir=%s" % (tmp_path / "profile")]
    shot = subprocess.run(  # pylint: disable=ansible-bad-function
        base + ["--screenshot=%s" % png, "--window-size=1280,2800", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert shot.returncode == 0, shot.stderr[-2000:]
    # Chromium logs every console message (a parse error, a failed load) as INFO:CONSOLE.
    assert not [line for line in shot.stderr.splitlines() if ":CONSOLE" in line]
    width, height, colours = _png_pixels(png)
    assert (width, height) == (1280, 2800)
    assert len(colours) > 5, "the screenshot is blank"
    # The DOM Chromium built from the page holds every device the pictures hold.
    dom = subprocess.run(  # pylint: disable=ansible-bad-function
        base + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
        check=False)
    parsed = Page()
    parsed.feed(dom.stdout)
    assert parsed.hosts == ["dgx2", "dgx-h100", "pcie-4gpu"]  # the largest free block first
    assert parsed.devices == devices


def test_manual_marks_vfs_unoffered_nics_and_unplaced_requests_say_what_the_map_says():
    """What the review of the first version found the picture told differently from the text
    map: a GPU in unhealthy_gpus (degraded or not) is failed and never free; a NIC whose VFs a
    plan gives a VM is that VM's; a NIC not offered is not free; requests a plan left out make
    the host's row say so."""
    path = ["0000:00:01.0", "0000:01:00.0", "0000:02:00.0"]
    result = {
        "platform": {"name": "generic", "reason": "test"},
        "gpus": [
            {"index": 0, "bdf": "0000:10:00.0", "numa_node": 0, "pcie_path": path,
             "healthy": False, "health": {"state": "degraded", "signals": [
                 {"source": "link", "state": "degraded",
                  "reason": "0000:10:00.0's link trained at x8 of x16"}]}},
            {"index": 1, "bdf": "0000:11:00.0", "numa_node": 0, "pcie_path": path,
             "healthy": True}],
        "nvswitches": [],
        "nics": [
            {"bdf": "0000:18:00.0", "numa_node": 0, "pcie_path": path, "offered": True,
             "rdma_devices": ["mlx5_0"], "sriov": {"vfs": [
                 {"bdf": "0000:18:00.1", "allocated_to": None},
                 {"bdf": "0000:18:00.2", "allocated_to": "old-vm"}]}},
            {"bdf": "0000:19:00.0", "numa_node": 0, "pcie_path": path, "offered": False}],
        "allocations": [{"name": "old-vm", "gpus": [], "nvswitches": [], "nics": [],
                         "extra_nics": ["0000:18:00.2"], "active": True}],
        "plan": [{"name": "vfvm", "gpus": ["0000:11:00.0"], "nvswitches": [],
                  "nics": ["0000:18:00.1"]},
                 {"name": "big", "gpus_requested": 8, "error": "no 8 free GPUs"}],
        "free_blocks": {"1": 1}, "free_blocks_after_plan": {},
    }
    picture = picture_data(result)
    drawn = {b: a for b, (a, _n, _s, _c) in _devices(host_svg("h", picture)).items()}
    gpu0 = drawn["0000:10:00.0"]
    assert gpu0["data-state"] == "failed" and gpu0["data-holder"] == ""
    assert gpu0["data-reason"].startswith("listed in unhealthy_gpus; degraded: ")
    nic = drawn["0000:18:00.0"]
    assert (nic["data-holder"], nic["data-held"]) == (
        "old-vm, vfvm", "VFs: old-vm 1 (running), vfvm 1 (planned)")
    assert drawn["0000:19:00.0"]["data-held"] == "not offered"
    page = Page()
    page.feed(fleet_page([{"host": "h", "picture": picture}]))
    assert page.rows[0][:2] == ["h", "not placed"]
    assert "0 / 2" in page.rows[0]  # the marked GPU is not free, the other is planned
    assert page.rows[0][-1] == "big (8 GPUs) not placed: no 8 free GPUs"
    # a host that failed keeps its picture and says why
    page = Page()
    page.feed(fleet_page([{"host": "h", "picture": picture, "status": "failed",
                           "errors": ["b-hpc: start failed: vfio"]}]))
    assert page.rows[0][-1].startswith("b-hpc: start failed: vfio")


def test_every_tenant_of_a_crowded_host_has_a_colour_of_its_own(tmp_path):
    result = _result("dgx2", tmp_path / "dgx2", requests=[
        {"name": "t%02d" % i, "gpus": 1} for i in range(16)])
    colours = tenant_colours(picture_data(result))
    assert len(colours) == 16 and len(set(colours.values())) == 16

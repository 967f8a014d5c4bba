#!/usr/bin/env python
# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What every host of the fleet test must hold after each step, and what the reports must say.

    check_fleet.py STEP STATE.json REPORT_DIR SCRATCH    (exit 1 with the differences)
"""

from __future__ import annotations

import json
import os
import sys
from html.parser import HTMLParser

DAY = {
    "gpu-a": {"a-train": ("shutoff", 14), "a-dev1": ("shutoff", 7), "a-dev2": ("shutoff", 3),
              "a-dev3": ("shutoff", 1)},
    "gpu-b": {"b-train": ("shutoff", 4), "b-dev1": ("shutoff", 2), "b-dev2": ("shutoff", 1)},
    "cpu-c": {"c-web": ("running", 0), "c-batch": ("running", 0), "c-foreign": ("shutoff", 0)},
}
NIGHT_A = {"a-hpc": ("shutoff", 28)}
NIGHT_C = {"c-hpc": ("running", 0), "c-foreign": ("shutoff", 0)}
EMPTY = {"gpu-a": {}, "gpu-b": {}, "cpu-c": {"c-foreign": ("shutoff", 0)}}

EXPECTED = {
    "images": EMPTY,
    "plan": EMPTY,
    "day": DAY,
    "day-again": DAY,
    "unknown-layout": DAY,
    "night-one-failed": {"gpu-a": NIGHT_A, "gpu-b": DAY["gpu-b"], "cpu-c": NIGHT_C},
    "night-fixed": {"gpu-a": NIGHT_A, "gpu-b": {"b-hpc": ("shutoff", 8)}, "cpu-c": NIGHT_C},
    "teardown": EMPTY,
    "fleet": {"gpu-a": {"f-big": ("shutoff", 28)}, "gpu-b": {"f-a100": ("shutoff", 8)},
              "cpu-c": {"f-cpu": ("running", 0), "c-foreign": ("shutoff", 0)}},
}


def fleet_report(report_dir):
    with open(os.path.join(report_dir, "fleet.json")) as f:
        return {e["host"]: e for e in json.load(f)}


class Page(HTMLParser):
    """fleet.html read back: the table's rows (host -> status) and each host SVG's devices."""

    def __init__(self):
        super().__init__()
        self.rows, self.devices, self.host = {}, {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-host" in attrs:
            self.rows[attrs["data-host"]] = attrs["data-status"]
        elif tag == "svg" and "data-host" in attrs:
            self.host = attrs["data-host"]
            self.devices[self.host] = []
        elif tag == "g" and "device" in (attrs.get("class") or "").split():
            self.devices[self.host].append(attrs)


def read_page(path):
    page = Page()
    with open(path, encoding="utf-8") as f:
        page.feed(f.read())
    return page


def check_page(path, state, problems):
    """The page draws, for each host, as many devices held by each domain as libvirt says the
    domain holds (its GPUs, NVSwitches and NICs), with the host's table row."""
    if not os.path.exists(path):
        problems.append("%s was not written" % path)
        return
    page = read_page(path)
    for host, domains in state.items():
        if page.rows.get(host) != "ok":
            problems.append("%s: %s's row says %r" % (path, host, page.rows.get(host)))
        drawn = page.devices.get(host, [])
        for name, dom in domains.items():
            held = [d for d in drawn if d["data-holder"] == name]
            if len(held) != dom["hostdevs"]:
                problems.append("%s: %s draws %d devices held by %s, libvirt says %d" % (
                    path, host, len(held), name, dom["hostdevs"]))
            if held and {d["data-held"] for d in held} != {
                    "running" if dom["state"] == "running" else "defined"}:
                problems.append("%s: %s's devices say %r" % (
                    path, name, {d["data-held"] for d in held}))


def main(step, state_path, report_dir, scratch):
    with open(state_path) as f:
        state = json.load(f)
    problems = []
    for host, want in EXPECTED[step].items():
        have = {name: (d["state"], d["hostdevs"]) for name, d in state[host].items()}
        if have != want:
            problems.append("%s: domains %s, expected %s" % (host, have, want))
    for host in ("gpu-a", "gpu-b", "cpu-c"):
        if not os.path.exists(os.path.join(scratch, host, "images", "tiny-1.0.qcow2")):
            problems.append("%s: the image tiny-1.0 is not in its store" % host)
    fleet = fleet_report(report_dir) if step not in ("images", "plan") else {}

    def status(host, want, changed=None, error=None):
        entry = fleet.get(host)
        if entry is None:
            problems.append("fleet.json: no entry for %s" % host)
            return
        if entry["status"] != want:
            problems.append("fleet.json: %s is %r, expected %r (%s)" % (
                host, entry["status"], want, entry["line"]))
        if changed is not None and entry["changed"] != changed:
            problems.append("fleet.json: %s changed=%r, expected %r" % (
                host, entry["changed"], changed))
        if error is not None and not any(error in e for e in entry["errors"]):
            problems.append("fleet.json: %s errors %r lack %r" % (host, entry["errors"], error))

    if step == "plan":  # plan_tenants drew the day it planned, and created nothing
        page = read_page(os.path.join(scratch, "pictures", "plan.html"))
        for host, vms in DAY.items():
            if page.rows.get(host) != "ok":
                problems.append("plan.html: %s's row says %r" % (host, page.rows.get(host)))
            for name, (_state, hostdevs) in vms.items():
                held = [d["data-held"] for d in page.devices.get(host, [])
                        if d["data-holder"] == name]
                if name != "c-foreign" and held != ["planned"] * hostdevs:
                    problems.append("plan.html: %s draws %r for %s, expected %d planned" % (
                        host, held, name, hostdevs))
    elif step == "day":
        for host in DAY:
            status(host, "ok", changed=True)
            # Each host's stack, as its gpu_topology read it (libvirt: the fleet's libvirtd).
            versions = fleet.get(host, {}).get("versions") or {}
            if not versions.get("libvirt") or not fleet[host]["stack"].startswith(
                    "gpuvirt.kvm %s, " % versions.get("collection")) or \
                    "libvirt %s" % versions["libvirt"] not in fleet[host]["stack"]:
                problems.append("fleet.json: %s has no version report: %r / %r" % (
                    host, versions, fleet.get(host, {}).get("stack")))
        with open(os.path.join(report_dir, "gpu-a.json")) as f:
            report = json.load(f)
        if [d["name"] for d in report["desired"]] != ["a-train", "a-dev1", "a-dev2", "a-dev3"] \
                or not all(d["matches"] for d in report["desired"]):
            problems.append("gpu-a.json: desired vs actual wrong: %r" % report["desired"])
        if report["free_blocks"] != {"1": 1}:
            problems.append("gpu-a.json: free_blocks %r, expected one free GPU"
                            % report["free_blocks"])
        # The picture, in the report dir and where gpuvirt_picture asked.
        check_page(os.path.join(report_dir, "fleet.html"), state, problems)
        check_page(os.path.join(scratch, "pictures", "day.html"), state, problems)
        gpus = [d for d in read_page(os.path.join(report_dir, "fleet.html")).devices.get(
            "gpu-a", []) if d["data-kind"] == "gpu"]
        if len(gpus) != 16 or [d["data-holder"] for d in gpus].count("") != 1:
            problems.append("fleet.html: gpu-a draws %d GPUs, %d free; expected 16, one free" % (
                len(gpus), [d["data-holder"] for d in gpus].count("")))
    elif step == "day-again":
        for host in DAY:
            status(host, "ok", changed=False)
    elif step == "unknown-layout":
        for host in DAY:
            status(host, "failed", error="no layout named 'weekend'")
    elif step == "night-one-failed":
        status("gpu-a", "ok", changed=True)
        status("cpu-c", "ok", changed=True)
        status("gpu-b", "failed", error="b-hpc")
        with open(os.path.join(report_dir, "gpu-a.json")) as f:
            removed = sorted(json.load(f)["removed"])
        if removed != ["a-dev1", "a-dev2", "a-dev3", "a-train"]:
            problems.append("gpu-a.json: removed %r" % removed)
    elif step == "night-fixed":
        status("gpu-b", "ok", changed=True)
        if sorted(fleet) != ["gpu-b"]:
            problems.append("fleet.json lists %s; with -l gpu-b only gpu-b ran" % sorted(fleet))
    elif step in ("teardown", "fleet"):
        for host in DAY:
            status(host, "ok")
    if step in ("night-one-failed", "night-fixed", "teardown", "fleet"):
        data = os.path.join(scratch, "gpu-a", "disks", "a-dev2-data.qcow2")
        if not os.path.exists(data):
            problems.append("a-dev2's data disk %s was deleted" % data)
    for p in problems:
        print("check %s: %s" % (step, p))
    if not problems:
        print("check %s: every host as expected" % step)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

#!/usr/bin/env python
# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Print, as JSON, what libvirt STORED for domains: the facts the integration tests assert.

It reads `virsh dumpxml --inactive` (the persistent definition the next start uses) with the
standard library only, on purpose: the tests check the collection's XML with a parser that is not
the collection's own. With --sysfs-root, each passed-through device also gets the host NUMA node
that the (fixture) sysfs tree gives it, so a test can compare the guest bus a GPU sits on with
the host node it comes from.

    domxml.py [--uri URI] [--sysfs-root DIR] NAME [NAME ...]   -> {"NAME": {...}, ...}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

METADATA_NS = "https://gpuvirt.invalid/xmlns/kvm/1"


def cpulist(text):
    """'0-3,^2,8' -> [0, 1, 3, 8] (libvirt's cpuset syntax)."""
    chosen, excluded = set(), set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        target = excluded if part.startswith("^") else chosen
        part = part.lstrip("^")
        lo, dash, hi = part.partition("-")
        target.update(range(int(lo), int(hi if dash else lo) + 1))
    return sorted(chosen - excluded)


def pci_address(el):
    """A libvirt <address> element -> 'dddd:bb:ss.f' (values may be hex '0x..' or decimal)."""
    def num(name):
        value = el.get(name, "0")
        return int(value, 16) if value.lower().startswith("0x") else int(value)

    return "%04x:%02x:%02x.%x" % (num("domain"), num("bus"), num("slot"), num("function"))


def summarise(root, sysfs_root=None):
    """The facts of one domain's XML."""
    controllers = {}
    for c in root.findall("./devices/controller[@type='pci']"):
        addr = c.find("address")
        node = c.find("./target/node")
        controllers[int(c.get("index"))] = {
            "model": c.get("model"),
            "parent_bus": None if addr is None else int(addr.get("bus"), 0),
            "node": None if node is None else int(node.text),
        }

    def guest_node(bus):
        """The guest NUMA node of the pcie-expander-bus above a guest bus, or None (root)."""
        seen = set()
        while bus is not None and bus in controllers and bus not in seen:
            seen.add(bus)
            ctl = controllers[bus]
            if ctl["model"] == "pcie-expander-bus":
                return ctl["node"]
            bus = ctl["parent_bus"]
        return None

    hostdevs = []
    for h in root.findall("./devices/hostdev[@type='pci']"):
        bdf = pci_address(h.find("./source/address"))
        guest = h.find("address")
        bus = None if guest is None else int(guest.get("bus"), 0)
        host_node = None
        if sysfs_root:
            path = os.path.join(sysfs_root, "bus", "pci", "devices", bdf, "numa_node")
            with open(path, encoding="ascii") as handle:
                host_node = int(handle.read().strip())
        port = controllers.get(bus) or {}
        # the emulated switch above it: the upstream port a downstream port hangs from
        switch = (port["parent_bus"] if port.get("model") == "pcie-switch-downstream-port"
                  else None)
        hostdevs.append({"bdf": bdf, "managed": h.get("managed"), "guest_bus": bus,
                         "guest_node": guest_node(bus), "host_node": host_node,
                         "switch": switch})
    pins = sorted(root.findall("./cputune/vcpupin"), key=lambda p: int(p.get("vcpu")))
    vcpu = root.find("vcpu")
    numatune = root.find("numatune")
    memory = None if numatune is None else numatune.find("memory")
    meta = root.find("./metadata/{%s}allocation" % METADATA_NS)
    metadata = {}
    if meta is not None:
        metadata = dict(meta.attrib)
        for child in meta:
            tag = child.tag.split("}", 1)[-1]
            if child.text is not None:
                metadata[tag] = child.text
    disks = []
    for d in root.findall("./devices/disk"):
        source = d.find("source")
        driver = d.find("driver")
        target = d.find("target")
        disks.append({
            "device": d.get("device"),
            "source": None if source is None else source.get("file"),
            "format": None if driver is None else driver.get("type"),
            "target": None if target is None else target.get("dev"),
            "bus": None if target is None else target.get("bus"),
            "readonly": d.find("readonly") is not None,
        })
    interfaces = []
    for i in root.findall("./devices/interface"):
        source = i.find("source")
        mac = i.find("mac")
        model = i.find("model")
        driver = i.find("driver")
        interfaces.append({
            "type": i.get("type"),
            "source": None if source is None else (source.get("network") or source.get("bridge")),
            "mac": None if mac is None else mac.get("address"),
            "model": None if model is None else model.get("type"),
            "queues": None if driver is None or driver.get("queues") is None
            else int(driver.get("queues")),
        })
    cpu_node = {}
    if sysfs_root:
        node_dir = os.path.join(sysfs_root, "devices", "system", "node")
        for entry in os.listdir(node_dir):
            if entry.startswith("node") and entry[4:].isdigit():
                with open(os.path.join(node_dir, entry, "cpulist"), encoding="ascii") as handle:
                    for cpu in cpulist(handle.read().strip()):
                        cpu_node[cpu] = int(entry[4:])
    vcpupins = [cpulist(p.get("cpuset")) for p in pins]
    cells = []
    for cell in root.findall("./cpu/numa/cell"):
        vcpus = cpulist(cell.get("cpus"))
        cells.append({"id": int(cell.get("id")), "cpus": vcpus,
                      "memory": int(cell.get("memory")), "unit": cell.get("unit", "KiB"),
                      # host nodes of the CPUs this guest cell's vCPUs are pinned to
                      "host_nodes": sorted(set(cpu_node.get(c) for v in vcpus
                                               if v < len(vcpupins) for c in vcpupins[v]))
                      if cpu_node else None})
    mem = root.find("memory")
    return {
        "name": root.findtext("name"),
        "uuid": root.findtext("uuid"),
        "type": root.get("type"),
        "managed": meta is not None,
        "metadata": metadata,
        "memory": int(mem.text), "memory_unit": mem.get("unit", "KiB"),
        "vcpus": int(vcpu.text),
        "vcpu_cpuset": cpulist(vcpu.get("cpuset")),
        # host CPU of vCPU 0, 1, ... (each pin is one CPU when the VM is dedicated)
        "vcpupins": vcpupins,
        "emulatorpin": cpulist(root.find("./cputune/emulatorpin").get("cpuset"))
        if root.find("./cputune/emulatorpin") is not None else [],
        "numatune": None if memory is None else {
            "mode": memory.get("mode"), "nodeset": cpulist(memory.get("nodeset")),
            "memnodes": [{"cellid": int(m.get("cellid")), "mode": m.get("mode"),
                          "nodeset": cpulist(m.get("nodeset"))}
                         for m in numatune.findall("memnode")]},
        "cells": cells,
        "expanders": [{"index": k, "node": c["node"]} for k, c in sorted(controllers.items())
                      if c["model"] == "pcie-expander-bus"],
        "hostdevs": hostdevs,
        "disks": disks,
        "interfaces": interfaces,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default="qemu:///system")
    parser.add_argument("--sysfs-root")
    parser.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    out = {}
    for name in args.names:
        xml = subprocess.run(["virsh", "-c", args.uri, "dumpxml", "--inactive", name],
                             check=True, capture_output=True, text=True).stdout
        out[name] = summarise(ET.fromstring(xml), args.sysfs_root)
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

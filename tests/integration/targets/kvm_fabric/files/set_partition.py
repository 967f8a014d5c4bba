#!/usr/bin/env python
# SPDX-License-Identifier: GPL-3.0-or-later
"""Record a Fabric Manager partition in a defined domain's gpuvirt metadata, as kvm_vm does for
a GPU tenant, so that a tiny GPU-less VM that really runs here exercises the hook.

    set_partition.py NAME PARTITION      (libvirt-python, qemu:///system)
"""

import sys
import xml.etree.ElementTree as ET

import libvirt

NS = "https://gpuvirt.invalid/xmlns/kvm/1"

conn = libvirt.open("qemu:///system")
dom = conn.lookupByName(sys.argv[1])
root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
alloc = root.find("metadata/{%s}allocation" % NS)
alloc.set("fm_partition", sys.argv[2])
ET.register_namespace("gpuvirt", NS)
conn.defineXML(ET.tostring(root, encoding="unicode"))

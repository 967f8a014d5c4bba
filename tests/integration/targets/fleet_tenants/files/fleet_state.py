#!/usr/bin/env python
# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Print every host's domains as JSON, read with libvirt-python (not the collection's code).

    fleet_state.py HOST=URI [HOST=URI ...]
      -> {"HOST": {"DOMAIN": {"state": "running"|"shutoff"|..., "gpus": N}, ...}, ...}
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET

import libvirt

STATES = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
          libvirt.VIR_DOMAIN_PAUSED: "paused"}


def main(argv):
    out = {}
    for arg in argv:
        host, uri = arg.split("=", 1)
        conn = libvirt.open(uri)
        try:
            doms = {}
            for dom in conn.listAllDomains():
                root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                hostdevs = root.findall("./devices/hostdev")
                doms[dom.name()] = {"state": STATES.get(dom.state()[0], str(dom.state()[0])),
                                    "hostdevs": len(hostdevs)}
            out[host] = doms
        finally:
            conn.close()
    json.dump(out, sys.stdout, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1:])

#!/usr/bin/env python
# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Print {name: [state, id]} of the gvt-mh-* domains as JSON (an ID changes when a domain is
started again, so two reads tell whether it was restarted)."""

import json
import sys

import libvirt

conn = libvirt.open("qemu:///system")
out = {}
for dom in conn.listAllDomains(0):
    if dom.name().startswith("gvt-mh-"):
        out[dom.name()] = ["running" if dom.isActive() else "shutoff", dom.ID()]
json.dump(out, sys.stdout, sort_keys=True)
sys.stdout.write("\n")

#!/usr/bin/env python
# SPDX-License-Identifier: GPL-3.0-or-later
"""Forward 127.0.0.1:PORT to port 22 of a running demo VM's first NIC (QEMU user networking).

    tools/demo-forward.py NAME PORT

The demo's VMs use QEMU's user-mode networking, which lets nothing in; libvirt 9.0 (Debian 12)
has no passt backend for <portForward>, so the forward is added to the running QEMU through its
monitor (hostfwd_add on the NIC's netdev, which libvirt names host<alias>: hostnet0). It lasts
until QEMU exits. A forward that is already there is left alone. A lab and demo tool: real hosts
put tenants on a bridge or a libvirt network instead.
"""

import sys

import libvirt_qemu

import libvirt

HMP = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP


def main(name, port):
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName(name)
        rule = "tcp:127.0.0.1:%d-:22" % port
        usernet = libvirt_qemu.qemuMonitorCommand(dom, "info usernet", HMP)
        # "  TCP[HOST_FORWARD]  17  127.0.0.1  2224  10.0.2.15  22  0  0"
        for line in usernet.splitlines():
            fields = line.split()
            if fields[:1] == ["TCP[HOST_FORWARD]"] and fields[2:4] == ["127.0.0.1", str(port)]:
                return 0
        out = libvirt_qemu.qemuMonitorCommand(dom, "hostfwd_add hostnet0 %s" % rule, HMP)
        if out.strip():
            print("demo-forward: %s: %s" % (rule, out.strip()), file=sys.stderr)
            return 1
        return 0
    finally:
        conn.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], int(sys.argv[2])))

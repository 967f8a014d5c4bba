#!/usr/bin/env python
# SPDX-License-Identifier: GPL-3.0-or-later
"""The guest_boot target's reach into a running guest on this machine's libvirt.

  guest.py forward NAME PORT     forward 127.0.0.1:PORT to the guest's port 22 (QEMU user-mode
                                 networking's hostfwd, through the monitor: libvirt 9.0 here
                                 has no passt backend for <portForward>)
  guest.py console NAME TIMEOUT  `virsh console NAME` in a pty until a login prompt; prints what
                                 the console showed (exit 1 without a prompt)
"""

import os
import pty
import select
import sys
import time

import libvirt_qemu

import libvirt

URI = "qemu:///system"


def forward(name, port):
    conn = libvirt.open(URI)
    dom = conn.lookupByName(name)
    # libvirt names a NIC's netdev "host" + its alias (net0 for the first NIC).
    out = libvirt_qemu.qemuMonitorCommand(
        dom, "hostfwd_add hostnet0 tcp:127.0.0.1:%d-:22" % port,
        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    if out.strip():
        sys.exit("hostfwd_add: %s" % out.strip())


def console(name, timeout):
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp("virsh", ["virsh", "-c", URI, "console", name, "--force"])
    seen = b""
    deadline = time.monotonic() + timeout
    next_enter = time.monotonic() + 3
    ok = False
    try:
        while time.monotonic() < deadline:
            ready = select.select([fd], [], [], 1)[0]
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                seen += chunk
                if b"login:" in seen.split(b"Escape character", 1)[-1]:
                    ok = True
                    break
            if time.monotonic() >= next_enter:
                os.write(fd, b"\r")
                next_enter = time.monotonic() + 5
    finally:
        os.write(fd, b"\x1d")  # Ctrl-] leaves virsh console
        time.sleep(0.5)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    sys.stdout.write(seen.decode("utf-8", "replace")[-2000:] + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    if sys.argv[1] == "forward":
        forward(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "console":
        console(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)

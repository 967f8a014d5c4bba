#!/usr/bin/env python
# SPDX-License-Identifier: GPL-3.0-or-later
"""Run daemons under a child subreaper that reaps their orphans at once, as an init does.

Usage: subreaper.py CMD [ARGS...] [-- CMD [ARGS...] ...]

Where no init system reaps orphans promptly (a container or a micro-VM whose PID 1 is not an
init), a QEMU process that libvirtd daemonized stays a zombie until PID 1 collects it; on the
development machines PID 1 does that on a one-second tick, one to two seconds after the
process ended. libvirtd's `destroy` polls the process with kill(pid, 0), which a zombie still
answers, so every destroy took one to two seconds of waiting for PID 1 (a real host's init reaps
at once and destroy returns in about 0.2 s).

This script forks a background process that becomes a child subreaper
(prctl(PR_SET_CHILD_SUBREAPER)), runs each CMD in turn (`virtlogd -d`, `libvirtd -d`: they
daemonize and return), and then reaps every process the kernel re-parents to it: the daemons
themselves and the QEMU processes they daemonize. It exits when none is left (the daemons were
stopped). The foreground process exits with the first non-zero status of the CMDs, or 0.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36


def commands(argv):
    current, result = [], []
    for arg in argv:
        if arg == "--":
            if current:
                result.append(current)
            current = []
        else:
            current.append(arg)
    if current:
        result.append(current)
    return result


def main(argv):
    cmds = commands(argv)
    if not cmds:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    read_end, write_end = os.pipe()
    if os.fork():
        # Foreground: wait for the daemons' start-up status, then return it.
        os.close(write_end)
        status = os.read(read_end, 16).decode() or "1"
        return int(status)
    os.close(read_end)
    os.setsid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("subreaper: prctl(PR_SET_CHILD_SUBREAPER) failed: %s"
              % os.strerror(ctypes.get_errno()), file=sys.stderr)
    status = 0
    for cmd in cmds:
        try:
            code = subprocess.call(cmd)
        except OSError as exc:
            print("subreaper: cannot run %s: %s" % (cmd[0], exc), file=sys.stderr)
            code = 127
        status = status or code
    # Let go of the caller's terminal and pipes (a caller reading our output would wait for
    # them to close), then report and reap for as long as anything is re-parented to us.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.chdir("/")  # nor keep the caller's folder (a CI checkout that gets deleted) busy
    os.write(write_end, str(status).encode())
    os.close(write_end)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

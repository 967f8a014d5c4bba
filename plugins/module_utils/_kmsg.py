# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The kernel log gateway: the records of ``/dev/kmsg``, read without waiting. Private to this
collection.

This is the only module that reads the kernel log. ``/dev/kmsg`` (Documentation/ABI/testing/
dev-kmsg) gives each reader that opens it every record still in the kernel's ring buffer, one
record per ``read()`` ("PRIORITY,SEQUENCE,TIMESTAMP,FLAGS;MESSAGE", continuation lines " KEY=
VALUE" after it); opened with ``O_NONBLOCK``, a read past the newest record fails with EAGAIN
instead of waiting for the next one, and one whose record the buffer overwrote meanwhile fails
with EPIPE (the next read goes on from the oldest record left). Reading it does not consume
anything (unlike ``/proc/kmsg``, which syslog daemons drain and which is never read here).

The path is taken beside the sysfs root (``/dev/kmsg`` for ``/sys``): a fixture tree carries
its own ``dev/kmsg``, a regular file that is read to its end.
"""

from __future__ import annotations

import errno
import os

# A record is at most CONSOLE_EXT_LOG_MAX (8192) bytes; a smaller buffer fails with EINVAL.
_RECORD_MAX = 8192
# The ring buffer is 2^CONFIG_LOG_BUF_SHIFT bytes (at most 32 MiB; log_buf_len= on the kernel's
# command line may set more): reading stops after this much, so a host that logs faster than it
# is read cannot keep a run here. Past it the newest records are not read (a known limit).
_READ_MAX = 64 << 20


class KernelLogError(Exception):
    """The kernel log cannot be read; the message names the file and why."""


def kernel_log_path(sysfs_root):
    """The kernel log of the host whose sysfs is at ``sysfs_root``: ``dev/kmsg`` beside it."""
    root = os.path.dirname(os.path.normpath(sysfs_root or "/sys"))
    return os.path.join(root, "dev", "kmsg")


def read_kernel_log(path, contains=None):
    """The lines of the kernel log at ``path`` (text, oldest first; a record's continuation
    lines are lines of their own), only those holding ``contains`` when given, read until there
    is no more (never waiting for a new record). KernelLogError when it cannot be opened or
    read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise KernelLogError("cannot read the kernel log %s: %s" % (
            path, exc.strerror or exc)) from None
    found, pending, total = [], b"", 0
    want = None if contains is None else contains.encode("utf-8")

    def keep(lines):
        found.extend(raw.decode("utf-8", errors="replace") for raw in lines
                     if raw and (want is None or want in raw))

    try:
        while total < _READ_MAX:
            try:
                chunk = os.read(fd, _RECORD_MAX)
            except BlockingIOError:
                break  # EAGAIN: the newest record was read
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    continue  # that record was overwritten; the next read goes on
                raise KernelLogError("cannot read the kernel log %s: %s" % (
                    path, exc.strerror or exc)) from None
            if not chunk:
                break  # a regular file (a fixture) at its end
            total += len(chunk)
            # /dev/kmsg gives whole records; a regular file gives blocks: keep whole lines.
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            keep(lines)
    finally:
        os.close(fd)
    keep([pending])
    return found

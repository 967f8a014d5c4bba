# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The kernel log gateway: /dev/kmsg read without waiting, a fixture's regular file read to its
end, and a log that cannot be read named."""

from __future__ import annotations

import errno
import os
import threading

import pytest

import ansible_collections.gpuvirt.kvm.plugins.module_utils._kmsg as kmsg
from ansible_collections.gpuvirt.kvm.plugins.module_utils._kmsg import (
    KernelLogError,
    kernel_log_path,
    read_kernel_log,
)

# /dev/kmsg records as `cat /dev/kmsg` prints them (Documentation/ABI/testing/dev-kmsg): a
# dev_printk record carries " KEY=VALUE" continuation lines.
RECORDS = (
    "6,1000,5300000000,-;Linux version 5.15.0-1042-nvidia (buildd@lcy02-amd64-051)\n"
    "3,1044,5312345690,-;nvidia-nvswitch0: SXid (PCI:0000:07:00.0): 24007, Fatal, Link 30 "
    "sourcetrack timeout error\n"
    "4,1045,5312345700,-;pcieport 0000:00:01.0: AER: Corrected error received: 0000:07:00.0\n"
    " SUBSYSTEM=pci\n"
    " DEVICE=+pci:0000:00:01.0\n"
    "3,1046,5312346001,-,caller=T412;nvidia-nvswitch2: SXid (PCI:0000:09:00.0): 12028, "
    "Non-fatal, Link 32 egress non-posted PRIV error (First)\n")


def test_the_path_sits_beside_the_sysfs_root():
    assert kernel_log_path("/sys") == "/dev/kmsg"
    assert kernel_log_path("/sys/") == "/dev/kmsg"
    assert kernel_log_path("/tmp/h100/sys") == "/tmp/h100/dev/kmsg"


def test_a_regular_file_is_read_to_its_end_line_by_line(tmp_path):
    path = tmp_path / "kmsg"
    path.write_text(RECORDS)
    lines = read_kernel_log(str(path))
    assert len(lines) == 6 and lines[3] == " SUBSYSTEM=pci"
    sxid = read_kernel_log(str(path), contains="SXid")
    assert [line.split(";", 1)[0] for line in sxid] == ["3,1044,5312345690,-",
                                                        "3,1046,5312346001,-,caller=T412"]


def test_lines_across_the_read_size_and_a_last_line_without_newline_are_whole(tmp_path):
    path = tmp_path / "kmsg"
    filler = "".join("6,%d,%d,-;%s\n" % (n, n * 1000, "x" * 90) for n in range(200))
    last = "3,9999,99999999,-;nvidia-nvswitch1: SXid (PCI:0000:08:00.0): 20009, Non-fatal, L 2"
    path.write_text(filler + last)
    assert len(filler) > 2 * 8192
    lines = read_kernel_log(str(path))
    assert lines == (filler + last).split("\n")
    assert read_kernel_log(str(path), contains="SXid") == [last]


@pytest.mark.parametrize("make, why", [
    (lambda p: None, "No such file or directory"),
    (os.mkdir, "Is a directory"),
])
def test_a_log_that_cannot_be_read_is_named(tmp_path, make, why):
    path = str(tmp_path / "kmsg")
    make(path)
    with pytest.raises(KernelLogError, match="cannot read the kernel log %s: %s" % (path, why)):
        read_kernel_log(path)


def test_a_record_overwritten_while_reading_is_passed_over(tmp_path, monkeypatch):
    """EPIPE: the ring buffer overwrote the record the reader was at; the next read goes on
    from the oldest one left. EAGAIN ends the read (O_NONBLOCK: no record is waited for)."""
    path = tmp_path / "kmsg"
    path.write_text("")
    answers = [b"6,1,100,-;first\n", OSError(errno.EPIPE, "Broken pipe"),
               b"3,9,900,-;nvidia-nvswitch0: SXid (PCI:0000:07:00.0): 24007, Fatal\n",
               BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"),
               b"6,10,1000,-;never read\n"]
    real_read = os.read

    def fake_read(fd, size):
        assert size >= 8192  # a record is up to 8192 bytes: less fails with EINVAL
        real_read(fd, size)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(kmsg.os, "read", fake_read)
    assert read_kernel_log(str(path)) == [
        "6,1,100,-;first", "3,9,900,-;nvidia-nvswitch0: SXid (PCI:0000:07:00.0): 24007, Fatal"]
    assert len(answers) == 1
    answers[:] = [OSError(errno.EINVAL, "Invalid argument")]
    with pytest.raises(KernelLogError, match="Invalid argument"):
        read_kernel_log(str(path))


@pytest.mark.skipif(not os.path.exists("/dev/kmsg"), reason="no /dev/kmsg here")
def test_the_machines_dev_kmsg_is_read_without_waiting():
    done = []

    def read():
        try:
            done.append(read_kernel_log("/dev/kmsg"))
        except KernelLogError as exc:
            done.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    assert done, "reading /dev/kmsg did not return: it waited for a new record"
    if isinstance(done[0], KernelLogError):
        pytest.skip("this machine's /dev/kmsg cannot be read here: %s" % done[0])
    records = [line for line in done[0] if not line.startswith(" ")]
    assert records and all(len(r.split(";", 1)[0].split(",")) >= 4 for r in records)

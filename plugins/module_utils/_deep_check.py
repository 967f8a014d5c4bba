# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The deep check's reach outside the process: a GPU handed to the NVIDIA driver and back
through sysfs, and ``nvidia-smi -q`` run on it. Private to this collection.

Binding is done as the kernel documents it (Documentation/ABI/testing/sysfs-bus-pci) and as
``gpuvirt-vfio-bind`` does it: ``driver_override`` names the driver, the function is unbound
from the one it has, and ``drivers_probe`` hands it to the named one. What ``driver_override``
held before is written back afterwards. Which GPUs may be touched is ``_health_check``'s call.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

DEFAULT_DRIVER = "nvidia"
DEFAULT_NVIDIA_SMI = "nvidia-smi"
DEFAULT_TIMEOUT = 120
# The sections the deep check reads (nvidia-smi -q -d: ECC, retired pages, remapped rows).
QUERY = ("-q", "-d", "ECC,PAGE_RETIREMENT,ROW_REMAPPER")
BIND_WAIT = 15.0  # seconds for a probe to bind (the NVIDIA driver initialises the GPU)


class DeepCheckError(Exception):
    """The deep check cannot run, or could not put a GPU back (``stranded``); the message says
    what to do."""

    def __init__(self, message, stranded=False):
        super().__init__(message)
        self.stranded = stranded


def _device(sysfs_root, bdf):
    return os.path.join(sysfs_root, "bus", "pci", "devices", bdf)


def driver_of(sysfs_root, bdf):
    """The driver a function is bound to now, or None."""
    link = os.path.join(_device(sysfs_root, bdf), "driver")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def driver_loaded(sysfs_root, driver):
    """Whether the kernel has the PCI driver ``driver`` (its module is loaded)."""
    return os.path.isdir(os.path.join(sysfs_root, "bus", "pci", "drivers", driver))


def override_of(sysfs_root, bdf):
    """What ``driver_override`` holds ('' for the kernel's ``(null)``)."""
    try:
        with open(os.path.join(_device(sysfs_root, bdf), "driver_override"), "r",
                  encoding="utf-8") as handle:
            value = handle.read().strip()
    except OSError:
        return ""
    return "" if value == "(null)" else value


def find_nvidia_smi(command):
    """The path of ``command`` (a path, or a name on PATH), or DeepCheckError."""
    found = shutil.which(command)
    if not found:
        raise DeepCheckError(
            "deep_check: %s is not found or not executable: install the NVIDIA driver's "
            "utilities (nvidia-smi), or give its path in deep_check.nvidia_smi" % command)
    return found


def _write(path, text):
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise DeepCheckError("cannot write %r to %s: %s" % (
            text.strip(), path, exc.strerror or exc)) from None


def bind(sysfs_root, bdf, driver, override=None, wait=BIND_WAIT):
    """Bind ``bdf`` to ``driver`` (None: to no driver) and leave ``override`` in its
    ``driver_override`` (None: ``driver``). DeepCheckError when it is not bound after ``wait``
    seconds."""
    device = _device(sysfs_root, bdf)
    _write(os.path.join(device, "driver_override"), (driver or "") + "\n")
    current = driver_of(sysfs_root, bdf)
    if current and current != driver:
        _write(os.path.join(device, "driver", "unbind"), bdf)
    if driver and driver_of(sysfs_root, bdf) != driver:
        _write(os.path.join(sysfs_root, "bus", "pci", "drivers_probe"), bdf)
    deadline = time.monotonic() + wait
    while driver_of(sysfs_root, bdf) != driver:
        if time.monotonic() > deadline:
            raise DeepCheckError("%s did not bind to %s within %g s (it is on %s)" % (
                bdf, driver or "no driver", wait, driver_of(sysfs_root, bdf) or "no driver"))
        time.sleep(0.1)
    wanted = driver or "" if override is None else override
    if wanted != (driver or ""):
        _write(os.path.join(device, "driver_override"), wanted + "\n")


def query(nvidia_smi, bdf, timeout=DEFAULT_TIMEOUT):
    """``nvidia-smi -q -d ECC,PAGE_RETIREMENT,ROW_REMAPPER -i BDF``: (exit status, its output,
    its error output)."""
    try:
        proc = subprocess.run(  # pylint: disable=ansible-bad-function
            [nvidia_smi] + list(QUERY) + ["-i", bdf], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, "", "no answer in %d s" % timeout
    except OSError as exc:
        raise DeepCheckError("deep_check: cannot run %s: %s" % (
            nvidia_smi, exc.strerror or exc)) from None
    return (proc.returncode, proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"))

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The host's stack, as nvidia-vm's `version show` printed it. Private to this collection.

Pure: gpu_topology reads the parts through the gateways and host_stack() puts them together.
Which collection, kernel, libvirt, QEMU, OVMF, NVIDIA driver and Fabric Manager a host runs,
each a version string or None where it is not there (or not known):

- the kernel from <proc_root>/sys/kernel/osrelease, as `uname -r` prints it (_sysfs);
- libvirt and QEMU from the libvirt daemon: virConnectGetLibVersion, virConnectGetVersion
  (_libvirt);
- OVMF and Fabric Manager as installed: dpkg-query, else rpm (_deb_packages);
- the NVIDIA driver from <sysfs_root>/module/nvidia/version while the module is loaded (_sysfs),
  else the installed driver package's version.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

# galaxy.yml's version (tests/unit keeps the two equal).
COLLECTION_VERSION = "0.1.0"

# Package names per package manager, per part. dpkg's are globs (the branch is in the name:
# nvidia-fabricmanager-570); rpm names carry no branch.
DPKG_NAMES = {
    "ovmf": ["ovmf"],
    "nvidia_driver": ["nvidia-headless-*-server", "nvidia-headless-[0-9]*",
                      "nvidia-driver-[0-9]*", "nvidia-kernel-common-[0-9]*"],
    "fabric_manager": ["nvidia-fabricmanager-[0-9]*", "nvidia-fabricmanager"],
}
RPM_NAMES = {
    "ovmf": ["edk2-ovmf"],
    "nvidia_driver": ["nvidia-driver", "kmod-nvidia-open-dkms", "kmod-nvidia-latest-dkms"],
    "fabric_manager": ["nvidia-fabric-manager"],
}
DPKG_FORMAT = "${Package}\t${Version}\t${db:Status-Abbrev}\n"
RPM_FORMAT = "%{NAME}\t%{EPOCHNUM}:%{VERSION}-%{RELEASE}\n"


def all_names(table):
    """Every name or glob of DPKG_NAMES or RPM_NAMES, sorted (what to ask the tool for)."""
    return sorted({n for patterns in table.values() for n in patterns})


def libvirt_version(number):
    """libvirt's packed version (major * 1,000,000 + minor * 1,000 + release) -> '9.0.0'."""
    if not isinstance(number, int) or isinstance(number, bool) or number <= 0:
        return None
    return "%d.%d.%d" % (number // 1000000, number // 1000 % 1000, number % 1000)


def parse_dpkg(text):
    """dpkg-query -W output (DPKG_FORMAT) -> {package: version} of installed packages only
    (status 'ii', or 'hi' for a held one, as kvm_host holds the NVIDIA driver and FM)."""
    out = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) == 3 and fields[2][1:2] == "i" and fields[1]:
            out[fields[0]] = fields[1]
    return out


def parse_rpm(text):
    """rpm -q output (RPM_FORMAT) -> {package: version}; 'package X is not installed' skipped.

    An epoch of 0 is left out, as rpm itself leaves it out of its names."""
    out = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) == 2 and fields[1]:
            epoch, _colon, version = fields[1].partition(":")
            out[fields[0]] = version if epoch in ("0", "") else fields[1]
    return out


def package_versions(manager, installed):
    """{ovmf, nvidia_driver, fabric_manager: version or None} from what ``manager`` ('dpkg',
    'rpm' or None) says is installed: the first name of each part's list that matches."""
    table = {"dpkg": DPKG_NAMES, "rpm": RPM_NAMES}.get(manager)
    out = {}
    for part in DPKG_NAMES:
        out[part] = None
        for pattern in (table or {}).get(part, ()):
            found = sorted(name for name in installed if fnmatchcase(name, pattern))
            if found:
                out[part] = installed[found[0]]
                break
    return out


def host_stack(kernel=None, loaded_driver=None, libvirt_versions=(None, None), packages=None):
    """{collection, kernel, libvirt, qemu, ovmf, nvidia_driver, nvidia_driver_loaded,
    fabric_manager}.

    ``kernel``, ``loaded_driver``: _sysfs.read_stack_files(); ``libvirt_versions``:
    _libvirt's versions() (Nones when libvirt was not reached); ``packages``:
    package_versions(), or None when the package manager was not asked.
    """
    packages = packages or {}
    return {
        "collection": COLLECTION_VERSION,
        "kernel": kernel,
        "libvirt": libvirt_version(libvirt_versions[0]),
        "qemu": libvirt_version(libvirt_versions[1]),
        "ovmf": packages.get("ovmf"),
        "nvidia_driver": loaded_driver or packages.get("nvidia_driver"),
        "nvidia_driver_loaded": loaded_driver is not None,
        "fabric_manager": packages.get("fabric_manager"),
    }


def stack_line(versions):
    """One line for reports: 'gpuvirt.kvm 0.1.0, kernel 6.1.0-28-amd64, libvirt 9.0.0, ...'."""
    if not isinstance(versions, dict):
        return ""
    labels = (("collection", "gpuvirt.kvm"), ("kernel", "kernel"), ("libvirt", "libvirt"),
              ("qemu", "QEMU"), ("ovmf", "OVMF"), ("nvidia_driver", "NVIDIA driver"),
              ("fabric_manager", "Fabric Manager"))
    parts = []
    for key, label in labels:
        value = versions.get(key)
        if value:
            if key == "nvidia_driver" and versions.get("nvidia_driver_loaded") is False:
                value += " (installed, not loaded)"
            parts.append("%s %s" % (label, value))
    return ", ".join(parts)

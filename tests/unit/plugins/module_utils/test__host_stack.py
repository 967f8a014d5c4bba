# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""The version report: the host's stack read from kernel-shaped trees and the package managers'
own output formats (dpkg-query -W with a format, rpm -q --qf)."""

import os
import stat

import pytest
import yaml

import sysfs_builder
from ansible_collections.gpuvirt.kvm.plugins.module_utils._deb_packages import installed_versions
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_stack import (
    COLLECTION_VERSION,
    DPKG_NAMES,
    RPM_NAMES,
    all_names,
    host_stack,
    libvirt_version,
    package_versions,
    parse_dpkg,
    parse_rpm,
    stack_line,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_stack_files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))


def test_collection_version_is_galaxy_ymls():
    with open(os.path.join(ROOT, "galaxy.yml"), encoding="utf-8") as handle:
        assert COLLECTION_VERSION == str(yaml.safe_load(handle)["version"])


@pytest.mark.parametrize("number,text", [
    (9000000, "9.0.0"),          # libvirt 9.0.0 (Debian 12)
    (7002022, "7.2.22"),         # QEMU 7.2.22
    (10010000, "10.10.0"),
    (0, None), (None, None), (-1, None), (True, None),
])
def test_libvirt_version(number, text):
    assert libvirt_version(number) == text


# `dpkg-query -W -f='${Package}\t${Version}\t${db:Status-Abbrev}\n' ovmf nvidia-...`: names
# that were once installed and removed show 'rc ' or 'un ', and are not installed.
DPKG = (
    "ovmf\t2022.11-6+deb12u2\tii \n"
    "nvidia-fabricmanager-570\t570.133.20-1\thi \n"  # held, as kvm_host holds it
    "nvidia-headless-570-server\t570.133.20-0ubuntu0.22.04.1\tii \n"
    "nvidia-headless-535-server\t535.230.02-0ubuntu0.22.04.3\trc \n"
    "nvidia-driver-550\t\tun \n"
)
# `rpm -q --qf '%{NAME}\t%{EPOCHNUM}:%{VERSION}-%{RELEASE}\n' edk2-ovmf nvidia-driver ...`
RPM = (
    "edk2-ovmf\t0:20240524-6.el9_5\n"
    "nvidia-driver\t3:570.133.20-1.el9\n"
    "package kmod-nvidia-open-dkms is not installed\n"
    "nvidia-fabric-manager\t0:570.133.20-1\n"
)


def test_parse_dpkg_keeps_installed_packages_only():
    assert parse_dpkg(DPKG) == {
        "ovmf": "2022.11-6+deb12u2",
        "nvidia-fabricmanager-570": "570.133.20-1",
        "nvidia-headless-570-server": "570.133.20-0ubuntu0.22.04.1",
    }


def test_parse_rpm_drops_epoch_zero_and_missing_packages():
    assert parse_rpm(RPM) == {"edk2-ovmf": "20240524-6.el9_5",
                              "nvidia-driver": "3:570.133.20-1.el9",
                              "nvidia-fabric-manager": "570.133.20-1"}


def test_package_versions_per_manager():
    assert package_versions("dpkg", parse_dpkg(DPKG)) == {
        "ovmf": "2022.11-6+deb12u2", "nvidia_driver": "570.133.20-0ubuntu0.22.04.1",
        "fabric_manager": "570.133.20-1"}
    assert package_versions("rpm", parse_rpm(RPM)) == {
        "ovmf": "20240524-6.el9_5", "nvidia_driver": "3:570.133.20-1.el9",
        "fabric_manager": "570.133.20-1"}
    assert package_versions(None, {}) == {
        "ovmf": None, "nvidia_driver": None, "fabric_manager": None}
    assert "nvidia-fabricmanager-[0-9]*" in all_names(DPKG_NAMES)
    assert all_names(RPM_NAMES)[0] == "edk2-ovmf"


def _tool(folder, name, output, rc):
    """A stand-in package tool on PATH that prints OUTPUT and records its argv."""
    path = folder / name
    path.write_text("#!/bin/sh\nprintf '%%s\\n' \"$@\" > %s/argv\nprintf '%%s' '%s'\nexit %d\n"
                    % (folder, output.replace("'", "'\\''"), rc))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_installed_versions_asks_dpkg_query_first(tmp_path, monkeypatch):
    _tool(tmp_path, "dpkg-query", DPKG, 1)  # 1: some names are not installed
    _tool(tmp_path, "rpm", RPM, 1)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert installed_versions(["ovmf", "nvidia-fabricmanager-[0-9]*"], ["edk2-ovmf"]) == (
        "dpkg", parse_dpkg(DPKG))
    assert (tmp_path / "argv").read_text() == (
        "-W\n-f=${Package}\t${Version}\t${db:Status-Abbrev}\n\novmf\nnvidia-fabricmanager-[0-9]*\n")


def test_installed_versions_with_rpm_only_and_with_neither(tmp_path, monkeypatch):
    _tool(tmp_path, "rpm", RPM, 1)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert installed_versions(["ovmf"], ["edk2-ovmf", "kmod-nvidia-open-dkms"]) == (
        "rpm", parse_rpm(RPM))
    (tmp_path / "rpm").unlink()
    assert installed_versions(["ovmf"], ["edk2-ovmf"]) == (None, {})


def test_stack_files_of_the_captured_h100_vm(tmp_path):
    sysfs, proc = sysfs_builder.build_host("h100-cloud-vm", str(tmp_path))
    kernel, loaded = read_stack_files(sysfs, proc)
    assert (kernel, loaded) == ("6.18.44-fc-v657-gpu", None)  # the capture's uname -r
    assert host_stack(kernel, loaded, (9000000, 7002022)) == {
        "collection": COLLECTION_VERSION, "kernel": "6.18.44-fc-v657-gpu",
        "libvirt": "9.0.0", "qemu": "7.2.22",
        "ovmf": None, "nvidia_driver": None, "nvidia_driver_loaded": False,
        "fabric_manager": None,
    }


def test_kernel_from_boot_image_and_the_loaded_driver_first(tmp_path):
    desc = {
        "name": "tiny",
        "cpu": {"sockets": 1, "cores_per_socket": 2, "threads_per_core": 1},
        "numa": {"memory_gib": 4},
        "kernel": {"cmdline": "BOOT_IMAGE=/boot/vmlinuz-5.15.0-1042-nvidia ro",
                   "drivers": ["nvidia"], "nvidia_version": "570.133.20"},
        "pci": [{"host_bridge": "0000:00", "node": 0, "devices": []}],
    }
    kernel, loaded = read_stack_files(*sysfs_builder.build(desc, str(tmp_path)))
    assert (kernel, loaded) == ("5.15.0-1042-nvidia", "570.133.20")
    stack = host_stack(kernel, loaded, (None, None),
                       package_versions("dpkg", parse_dpkg(DPKG)))
    assert (stack["libvirt"], stack["qemu"]) == (None, None)
    # The loaded module's version wins over the package's.
    assert stack["nvidia_driver"] == "570.133.20"
    assert stack["nvidia_driver_loaded"] is True
    assert stack["fabric_manager"] == "570.133.20-1"
    assert stack_line(stack) == (
        "gpuvirt.kvm %s, kernel 5.15.0-1042-nvidia, OVMF 2022.11-6+deb12u2, NVIDIA driver "
        "570.133.20, Fabric Manager 570.133.20-1" % COLLECTION_VERSION)


def test_stack_line_says_when_the_driver_is_not_loaded():
    assert stack_line({"collection": "0.1.0", "nvidia_driver": "570.133.20-1",
                       "nvidia_driver_loaded": False}) == (
        "gpuvirt.kvm 0.1.0, NVIDIA driver 570.133.20-1 (installed, not loaded)")
    assert stack_line(None) == ""

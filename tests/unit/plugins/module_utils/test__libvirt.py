# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""The libvirt gateway on this machine's libvirtd (what domains hold: test__holdings.py)."""


import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
    LibvirtGateway,
    LibvirtGatewayError,
    has_libvirt,
)

# --- the real libvirt of this machine (VMs that start: tests/integration/targets/real_vms) ----


@pytest.fixture
def system_gateway():
    if not has_libvirt():
        pytest.skip("libvirt-python is not installed")
    try:
        gateway = LibvirtGateway("qemu:///system")
    except LibvirtGatewayError as exc:
        pytest.skip("qemu:///system unreachable: %s" % exc)
    yield gateway
    gateway.close()


@pytest.mark.libvirt
def test_errors_carry_libvirts_words(system_gateway):
    with pytest.raises(LibvirtGatewayError, match="refused the domain definition"):
        system_gateway.define("<domain type='kvm'><name>x</name></domain>")
    with pytest.raises(LibvirtGatewayError, match="does not exist"):
        system_gateway.start("gpuvirt-no-such-domain")


def test_unreachable_uri_is_one_error_type():
    if not has_libvirt():
        pytest.skip("libvirt-python is not installed")
    with pytest.raises(LibvirtGatewayError, match="cannot connect to libvirt at uri"):
        LibvirtGateway("qemu+unix:///system?socket=/nonexistent/sock")

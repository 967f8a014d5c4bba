# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Reading what a domain holds back from its XML (libvirt is the source of truth), and the
libvirt gateway on this machine's libvirtd."""


import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import METADATA_NS
from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import (
    read_domain,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
    LibvirtGateway,
    LibvirtGatewayError,
    has_libvirt,
)

DOMAIN = """<domain type='kvm'>
  <name>vm-a</name>
  <uuid>6a1f0b9e-1d7c-4a53-9d55-0d2f7c1c8a10</uuid>
  <metadata>
    <gpuvirt:allocation xmlns:gpuvirt='%s' owner='gpuvirt.kvm' template='4'>
      <gpuvirt:image>dgx-os-6.2</gpuvirt:image>
    </gpuvirt:allocation>
  </metadata>
  <memory unit='GiB'>4</memory>
  <vcpu placement='static'>4</vcpu>
  <cputune>
    <vcpupin vcpu='0' cpuset='2'/><vcpupin vcpu='1' cpuset='50'/>
    <vcpupin vcpu='2' cpuset='3'/><vcpupin vcpu='3' cpuset='51'/>
    <emulatorpin cpuset='0,48'/>
  </cputune>
  <numatune><memory mode='strict' nodeset='0'/></numatune>
  <devices>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x34' slot='0x00' function='0x0'/></source>
    </hostdev>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x61' slot='0x00' function='0x0'/></source>
    </hostdev>
    <hostdev mode='subsystem' type='usb'><source><vendor id='0x1'/></source></hostdev>
  </devices>
</domain>""" % METADATA_NS


def test_allocation_from_xml():
    alloc = read_domain(DOMAIN, active=True)
    assert alloc.name == "vm-a"
    assert alloc.hostdevs == ("0000:34:00.0", "0000:61:00.0")
    assert alloc.pinned_cpus == (2, 3, 50, 51)
    assert alloc.cpuset == ()
    assert alloc.numa_nodes == (0,)
    assert alloc.memory_kib == 4 * 1024 * 1024
    assert alloc.managed and alloc.metadata["owner"] == "gpuvirt.kvm"
    assert alloc.metadata["image"] == "dgx-os-6.2"


def test_unmanaged_shared_domain():
    xml = """<domain type='kvm'><name>other</name><memory>1048576</memory>
      <vcpu cpuset='4-7,^5'>2</vcpu><devices/></domain>"""
    alloc = read_domain(xml)
    assert not alloc.managed
    assert alloc.cpuset == (4, 6, 7)
    assert alloc.pinned_cpus == ()
    assert alloc.memory_kib == 1048576


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

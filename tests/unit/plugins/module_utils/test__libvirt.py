# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Reading allocations back from domain XML (libvirt is the source of truth)."""

import os
import uuid

import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
    METADATA_NS,
    LibvirtGateway,
    LibvirtGatewayError,
    has_libvirt,
    parse_allocation,
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
    alloc = parse_allocation(DOMAIN, active=True)
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
    alloc = parse_allocation(xml)
    assert not alloc.managed
    assert alloc.cpuset == (4, 6, 7)
    assert alloc.pinned_cpus == ()
    assert alloc.memory_kib == 1048576


# --- lifecycle on the real libvirt of this machine -------------------------------------------

TINY = """<domain type='{type}'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <cpu mode='{cpu_mode}'>{cpu_extra}</cpu>
  <devices><controller type='usb' model='none'/><memballoon model='none'/></devices>
</domain>"""


def _tiny_xml(name):
    # /dev/kvm here is a software KVM: an OS-less guest runs under kvm with host-passthrough
    # minus arch-capabilities (else QEMU aborts on MSR 0x10a); TCG always works.
    if os.path.exists("/dev/kvm"):
        return TINY.format(type="kvm", name=name, cpu_mode="host-passthrough",
                           cpu_extra="<feature policy='disable' name='arch-capabilities'/>")
    return TINY.format(type="qemu", name=name, cpu_mode="maximum", cpu_extra="")


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
def test_lifecycle_of_a_tiny_vm(system_gateway):
    gw = system_gateway
    name = "gpuvirt-unit-%s" % uuid.uuid4().hex[:8]
    try:
        assert gw.state(name) is None
        assert gw.define(_tiny_xml(name)) == name
        assert gw.state(name) == "shutoff"
        assert name in gw.domain_names()
        gw.start(name)
        assert gw.state(name) == "running"
        # No OS answers ACPI: without force the wait times out and says what to do.
        with pytest.raises(LibvirtGatewayError, match="force: true"):
            gw.shutdown(name, timeout=1)
        assert gw.state(name) == "running"
        assert gw.shutdown(name, timeout=1, force=True) == "destroyed"
        assert gw.state(name) == "shutoff"
        assert gw.shutdown(name, timeout=1) == "shutdown"  # already off: nothing to do
        allocs = {a.name: a for a in gw.allocations()}
        assert allocs[name].memory_kib == 64 * 1024
        gw.undefine(name)
        assert gw.state(name) is None
    finally:
        if gw.state(name) is not None:
            gw.destroy(name)
            gw.undefine(name)


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

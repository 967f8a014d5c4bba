# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Reading allocations back from domain XML (libvirt is the source of truth)."""

from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
    METADATA_NS,
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

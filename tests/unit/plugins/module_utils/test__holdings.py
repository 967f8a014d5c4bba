# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""What defined domains hold and which files they use, read from their XML (_holdings)."""

import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import (
    METADATA_NS,
    Domain,
    DomainXmlError,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import (
    disk_chains,
    disk_files,
    holdings,
    read_domain,
    read_domains,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import DomainXml

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


def test_disk_files_reads_nested_backing_stores():
    xml = """<domain type='kvm'><name>v</name><devices>
      <disk type='file' device='disk'><source file='/d/top.qcow2'/>
        <backingStore type='file'><format type='qcow2'/><source file='/s/base.qcow2'/>
          <backingStore type='block'><source dev='/dev/vg/lv'/><backingStore/></backingStore>
        </backingStore><target dev='vda'/></disk>
      <disk type='network' device='disk'><source protocol='rbd' name='pool/img'/></disk>
      <disk type='volume' device='disk'><source pool='p' volume='v1'/></disk>
      <disk type='file' device='cdrom'><target dev='sda'/></disk>
    </devices></domain>"""
    dom = Domain.from_xml(xml)
    assert disk_files(dom) == ("/d/top.qcow2", "/s/base.qcow2", "/dev/vg/lv")
    assert disk_files(dom, lambda pool, vol: "/pools/%s/%s" % (pool, vol))[-1] == "/pools/p/v1"


def test_holdings_in_placements_terms():
    dom = read_domain(DOMAIN, active=True)
    (held,) = holdings([dom], ["0000:34:00.0"], ["0000:61:00.0"])
    assert (held.gpus, held.nvswitches, held.cpus) == (("0000:34:00.0",), ("0000:61:00.0",),
                                                       (2, 3, 50, 51))
    assert (held.numa_nodes, held.memory_mb, held.memory_by_node) == ((0,), 4096, {0: 4096})
    assert held.cpu_policy == "dedicated"


def test_a_domain_whose_xml_cannot_be_read_is_named():
    bad = DomainXml(name="odd", active=False, xml="<domain><memory unit='parsecs'>1</memory>"
                    "</domain>")
    with pytest.raises(DomainXmlError, match="domain odd holds .*unknown unit 'parsecs'"):
        read_domains([bad])
    with pytest.raises(DomainXmlError, match="the disks of domain odd"):
        disk_chains([bad])


def test_a_disk_written_without_a_type_is_a_file():
    dom = Domain.from_xml("<domain type='kvm'><name>h</name><devices><disk device='disk'>"
                          "<source file='/d/hand.qcow2'/><target dev='vda'/></disk></devices>"
                          "</domain>")
    assert disk_files(dom) == ("/d/hand.qcow2",)

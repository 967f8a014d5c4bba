# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Domain XML <-> typed objects: round trips, normalisation, what survives hand edits."""

import glob
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import (
    METADATA_NS,
    Address,
    CharDevice,
    Controller,
    Disk,
    Domain,
    DomainXmlError,
    GpuvirtMetadata,
    HostdevPci,
    Interface,
    MetadataDisk,
    Raw,
    format_cpuset,
    parse_cpuset,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import read_domain

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "domain")
CASES = sorted(os.path.basename(p)[:-len("-in.xml")]
               for p in glob.glob(os.path.join(FIXTURES, "*-in.xml")))
VALIDATOR = shutil.which("virt-xml-validate")


def fixture(case, kind):
    with open(os.path.join(FIXTURES, "%s-%s.xml" % (case, kind)), encoding="utf-8") as handle:
        return handle.read()


def validate(path):
    """Run libvirt's own schema check on a file; returns (ok, output)."""
    if VALIDATOR is None:
        pytest.skip("virt-xml-validate is not installed (package libvirt-clients)")
    proc = subprocess.run([VALIDATOR, path, "domain"], capture_output=True, text=True,
                          check=False)
    return proc.returncode == 0, proc.stdout + proc.stderr


def test_required_cases_exist():
    assert {"tiny-cpu", "dgx2-1gpu", "dgx2-8gpu", "dgx2-16gpu", "hand-edited",
            "ovmf"} <= set(CASES)
    for case in CASES:
        assert os.path.isfile(os.path.join(FIXTURES, case + "-out.xml")), case


@pytest.mark.parametrize("case", CASES)
def test_round_trip(case):
    out = fixture(case, "out")
    assert Domain.from_xml(fixture(case, "in")).to_xml() == out
    assert Domain.from_xml(out).to_xml() == out


@pytest.mark.parametrize("case", CASES)
def test_output_validates(case):
    ok, output = validate(os.path.join(FIXTURES, case + "-out.xml"))
    assert ok, output


@pytest.mark.parametrize("case", CASES)
def test_normalising_never_changes_what_a_domain_holds(case):
    """What _holdings reads from the XML (libvirt is the source of truth) stays the same."""
    before = read_domain(fixture(case, "in"))
    after = read_domain(fixture(case, "out"))
    assert before == after


# --- normalisation --------------------------------------------------------------------------

def test_tiny_cpu_is_normalised_like_libvirt():
    dom = Domain.from_xml(fixture("tiny-cpu", "in"))
    assert dom.memory_kib == 64 * 1024
    assert dom.vcpu.cpuset == (0, 2, 3)  # "0-3,^1"
    out = dom.to_xml()
    assert "<memory unit='KiB'>65536</memory>" in out
    assert "cpuset='0,2-3'" in out
    assert "52:54:00:ab:cd:ef" in out  # libvirt stores MACs in lower case
    assert "<!--" not in out and "<?xml" not in out


@pytest.mark.parametrize("unit, value, kib", [
    ("KiB", "1024", 1024), ("MiB", "64", 65536), ("GiB", "2", 2 * 1024 ** 2),
    ("G", "1", 1024 ** 2), ("MB", "1", 977), ("bytes", "1025", 2), ("TiB", "1", 1024 ** 3),
])
def test_memory_units(unit, value, kib):
    dom = Domain.from_xml("<domain type='kvm'><name>x</name><memory unit='%s'>%s</memory>"
                          "<devices/></domain>" % (unit, value))
    assert dom.memory_kib == kib


def test_pci_addresses_compare_by_value():
    xml = ("<domain type='kvm'><name>x</name><devices><hostdev mode='subsystem' type='pci'>"
           "<source><address domain='0' bus='52' slot='0x0' function='0'/></source>"
           "</hostdev></devices></domain>")
    dom = Domain.from_xml(xml)
    assert dom.hostdevs[0].bdf == "0000:34:00.0"  # decimal 52 == 0x34
    assert "bus='0x34'" in dom.to_xml()


@pytest.mark.parametrize("text, values", [
    ("0-3,8", (0, 1, 2, 3, 8)), ("0-3,^1", (0, 2, 3)), ("5", (5,)), ("", ()),
    (" 1 , 3-4 ", (1, 3, 4)),
])
def test_cpuset_syntax(text, values):
    assert parse_cpuset(text) == values
    if values:
        assert parse_cpuset(format_cpuset(values)) == values


def test_format_cpuset_compresses():
    assert format_cpuset([3, 1, 2, 8, 48, 49]) == "1-3,8,48-49"
    assert format_cpuset([]) is None


@pytest.mark.parametrize("bdf, expected", [
    ("0000:34:00.0", "0000:34:00.0"), ("34:00.1", "0000:34:00.1"),
    ("0001:C1:1F.7", "0001:c1:1f.7"),
])
def test_address_from_bdf(bdf, expected):
    assert Address.pci(bdf).bdf == expected


@pytest.mark.parametrize("bdf", ["34:00", "gg:00.0", "0000:34:00.8", ""])
def test_address_rejects_bad_bdf(bdf):
    with pytest.raises(DomainXmlError, match="not a PCI address"):
        Address.pci(bdf)


# --- what survives hand edits ----------------------------------------------------------------

def _find_all(xml, path, ns=None):
    return ET.fromstring(xml).findall(path, ns or {})


def test_hand_edited_keeps_what_the_model_does_not_know():
    out = Domain.from_xml(fixture("hand-edited", "in")).to_xml()
    qemu = {"qemu": "http://libvirt.org/schemas/domain/qemu/1.0"}
    args = [a.get("value") for a in _find_all(out, "./qemu:commandline/qemu:arg", qemu)]
    assert args == ["-fw_cfg", "name=opt/com.example/config,string=a b"]
    root = ET.fromstring(out)
    # Unknown top-level elements, devices, attributes and children, each still in place.
    for path in ("./blkiotune/weight", "./memtune/hard_limit", "./sysinfo/system/entry",
                 "./pm/suspend-to-mem", "./seclabel", "./cputune/shares",
                 "./cputune/vcpusched", "./features/kvm/hidden", "./cpu/cache",
                 "./os/bootmenu", "./memoryBacking/locked", "./devices/graphics/listen",
                 "./devices/video/model", "./devices/channel/target", "./devices/watchdog",
                 "./devices/disk/iotune/total_iops_sec", "./devices/interface/bandwidth/inbound",
                 "./devices/interface/driver/host", "./devices/interface/mtu",
                 "./devices/rng/rate", "./devices/hostdev/rom",
                 "./devices/hostdev/source/vendor", "./devices/disk/source/host",
                 "./devices/controller/target[@hotplug='off']"):
        assert root.find(path) is not None, path
    assert root.find("./devices/disk").get("snapshot") == "no"
    assert root.find("./devices/disk/driver").get("detect_zeroes") == "unmap"
    assert root.find("./devices/interface/source").get("portgroup") == "gpu"
    assert root.find("./devices/interface/driver").get("rx_queue_size") == "1024"
    assert root.find("./devices/controller[@type='usb']").get("ports") == "15"
    assert root.findtext("./description") == 'Edited by hand: "do not touch" & keep <this>'
    alloc = root.find("./metadata/{%s}allocation" % METADATA_NS)
    assert alloc.get("future_attribute") == "kept"
    assert alloc.findtext("{%s}future_child" % METADATA_NS) == "kept too"
    assert root.findtext("./metadata/{urn:example:inventory}app/"
                         "{urn:example:inventory}rack") == "R12"
    assert root.find("./metadata/{http://libosinfo.org/xmlns/libvirt/domain/1.0}libosinfo"
                     "/{http://libosinfo.org/xmlns/libvirt/domain/1.0}os") is not None


def test_hand_edited_unknown_devices_stay_in_order():
    dom = Domain.from_xml(fixture("hand-edited", "in"))
    tags = [d.tag if isinstance(d, Raw) else type(d).__name__ for d in dom.devices]
    assert tags == ["Emulator", "Disk", "Disk", "Controller", "Controller", "Controller",
                    "Controller", "Interface", "Interface", "CharDevice", "CharDevice",
                    "Channel", "input", "graphics", "video", "HostdevPci", "hostdev",
                    "watchdog", "MemBalloon", "Rng"]
    # A network disk is a typed Disk whose <source> the model keeps as it was.
    rbd = dom.disks[1]
    assert rbd.type == "network" and rbd.source is None and rbd.target_dev == "vdb"


def test_typed_values_of_the_hand_edited_domain():
    dom = Domain.from_xml(fixture("hand-edited", "in"))
    assert dom.memory_kib == 91 * 1024 ** 2
    assert dom.controller("pci", 0).pcihole64_kib == 128 * 1024 ** 2
    assert [p.cpuset for p in dom.cputune.vcpupins] == [(1,), (49,), (2,), (50,)]
    assert dom.cputune.emulatorpin == (0, 48)
    assert dom.interfaces[0].queues == 4 and dom.interfaces[0].driver_name == "vhost"
    assert dom.interfaces[1].type == "bridge" and dom.interfaces[1].source == "br-data"
    assert dom.disks[0].backing.source == "/var/lib/gpuvirt/images/dgx-os-6.2.qcow2"
    assert dom.disks[0].serial == "os-disk" and dom.disks[0].boot_order == 1
    alloc = dom.gpuvirt
    assert alloc.gpus == ("0000:34:00.0",) and alloc.numa_nodes == (0,)
    assert alloc.disks == [MetadataDisk(target="vda", role="os", size_gb=50)]


def test_edits_to_typed_fields_keep_the_unknown_rest():
    dom = Domain.from_xml(fixture("hand-edited", "in"))
    dom.disks[0].queues = 2
    dom.interfaces[0].queues = 2
    root = ET.fromstring(dom.to_xml())
    driver = root.find("./devices/disk/driver")
    assert driver.get("queues") == "2" and driver.get("detect_zeroes") == "unmap"
    nic = root.find("./devices/interface/driver")
    assert nic.get("queues") == "2" and nic.find("host").get("csum") == "off"


def test_live_xml_extras_survive():
    """What libvirt adds to a running domain's XML (ids, aliases, ttys) is kept, not lost."""
    xml = """<domain type='kvm' id='7'><name>x</name><memory>1024</memory><devices>
      <console type='pty' tty='/dev/pts/3'><source path='/dev/pts/3'/>
        <target type='serial' port='0'/><alias name='serial0'/></console>
      <interface type='network'><mac address='52:54:00:00:00:01'/>
        <source network='default' portid='abc' bridge='virbr0'/><target dev='vnet0'/>
        <model type='virtio'/><alias name='net0'/></interface></devices></domain>"""
    dom = Domain.from_xml(xml)
    out = dom.to_xml()
    root = ET.fromstring(out)
    assert root.get("id") == "7"
    assert root.find("./devices/console").get("tty") == "/dev/pts/3"
    assert root.find("./devices/console/alias").get("name") == "serial0"
    assert root.find("./devices/interface/target").get("dev") == "vnet0"
    assert root.find("./devices/interface/source").get("bridge") == "virbr0"
    assert Domain.from_xml(out).to_xml() == out


# --- building from objects --------------------------------------------------------------------

def test_objects_to_xml():
    dom = Domain(type="qemu", name="built", memory_kib=65536)
    dom.metadata = [GpuvirtMetadata(template="t", gpus=("0000:34:00.0",), numa_nodes=(0, 1))]
    dom.devices = [
        Disk(source="/d.qcow2", driver_name="qemu", driver_type="qcow2", target_dev="vda",
             target_bus="virtio"),
        Controller(type="pci", index=0, model="pcie-root", pcihole64_kib=1024),
        Controller(type="pci", index=1, model="pcie-expander-bus", model_name="pxb-pcie",
                   target_bus_nr=128, target_node=1),
        Interface(type="user", mac="52:54:00:00:00:01", model="virtio"),
        HostdevPci(source=Address.pci("0000:34:00.1", with_type=False),
                   address=Address(domain=0, bus=2, slot=0, function=1)),
        CharDevice(kind="serial"),
    ]
    out = dom.to_xml()
    root = ET.fromstring(out)
    assert root.get("type") == "qemu"
    pxb = root.find("./devices/controller[@model='pcie-expander-bus']")
    assert pxb.find("model").get("name") == "pxb-pcie"
    assert pxb.find("target").get("busNr") == "128" and pxb.findtext("target/node") == "1"
    assert root.find("./devices/controller/pcihole64").text == "1024"
    src = root.find("./devices/hostdev/source/address")
    assert (src.get("bus"), src.get("function"), src.get("type")) == ("0x34", "0x1", None)
    assert "<gpuvirt:allocation xmlns:gpuvirt='%s' owner='gpuvirt.kvm'" % METADATA_NS in out
    assert Domain.from_xml(out).to_xml() == out
    alloc = read_domain(out)
    assert alloc.managed and alloc.hostdevs == ("0000:34:00.1",)
    assert alloc.metadata["gpus"] == "0000:34:00.0" and alloc.metadata["template"] == "t"
    assert alloc.metadata["numa_nodes"] == "0,1"


def test_equality_covers_unknown_elements():
    a = Domain.from_xml(fixture("hand-edited", "in"))
    b = Domain.from_xml(fixture("hand-edited", "out"))
    assert a == b
    assert b.extras.children[-1].element.tag == "seclabel"
    b.extras.children[-1].element.set("relabel", "no")
    assert a != b


def test_qemu_commandline_is_read_in_order_and_keeps_its_env():
    a = Domain.from_xml(fixture("hand-edited", "in"))
    assert a.qemu_commandline.args == ["-fw_cfg", "name=opt/com.example/config,string=a b"]
    b = Domain.from_xml(fixture("hand-edited", "out"))
    b.qemu_commandline.args[0] = "-S"
    assert a != b
    # <qemu:env> is kept as it was, after the arguments.
    assert "<qemu:env name='QEMU_AUDIO_DRV' value='none'/>\n  </qemu:commandline>\n</domain>" \
        in a.to_xml()


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("<domain><name>x</name>", "not well-formed"),
    ("", "not well-formed|empty"),
    ("<network><name>x</name></network>", "expected a <domain> element, found <network>"),
    ("<domain><name>x</name><vcpu>four</vcpu></domain>", "<vcpu>: 'four' is not a number"),
    ("<domain><memory unit='parsecs'>1</memory></domain>", "unknown unit 'parsecs'"),
    ("<domain><vcpu cpuset='0-a'>1</vcpu></domain>", "is not a CPU or node set"),
    ("<domain><devices><hostdev mode='subsystem' type='pci'><source/></hostdev></devices>"
     "</domain>", "has no <source><address>"),
])
def test_bad_xml_is_a_clear_error(text, message):
    with pytest.raises(DomainXmlError, match=message):
        Domain.from_xml(text)

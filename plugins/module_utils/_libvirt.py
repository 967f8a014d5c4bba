# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The collection's only gateway to libvirt. Private to this collection.

Every other module talks to libvirt through :class:`LibvirtGateway`; tests swap the URI
(``test:///default`` or a private ``qemu:///session``), never patch classes.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

try:
    import libvirt
except ImportError:  # reported by the module with missing_required_lib()
    libvirt = None

# The namespace of the collection's own <metadata> element in a domain's XML.
METADATA_NS = "https://gpuvirt.invalid/xmlns/kvm/1"
METADATA_PREFIX = "gpuvirt"

DEFAULT_URI = "qemu:///system"


class LibvirtGatewayError(Exception):
    """A libvirt call failed; the message carries libvirt's own words."""


def has_libvirt():
    return libvirt is not None


@dataclass
class DomainAllocation:
    """What one defined domain holds, read back from its XML (the source of truth)."""

    name: str
    uuid: str
    active: bool
    hostdevs: tuple = ()  # PCI BDFs of every <hostdev type='pci'>
    pinned_cpus: tuple = ()  # host CPUs its vCPUs are pinned to (dedicated)
    cpuset: tuple = ()  # host CPUs its vCPUs float over (shared), if not pinned
    numa_nodes: tuple = ()
    memory_kib: int = 0
    managed: bool = False  # carries the collection's metadata
    metadata: dict = field(default_factory=dict)


def _bdf_of(address):
    def part(name, width):
        value = address.get(name, "0")
        return "%0*x" % (width, int(value, 16) if value.lower().startswith("0x") else int(value))

    return "%s:%s:%s.%s" % (part("domain", 4), part("bus", 2), part("slot", 2),
                            int(address.get("function", "0"), 0))


def _cpus(text):
    """Expand a libvirt cpuset ("0-3,^2,8") into a sorted tuple."""
    chosen, excluded = set(), set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        target = excluded if part.startswith("^") else chosen
        part = part.lstrip("^")
        if "-" in part:
            lo, hi = part.split("-", 1)
            target.update(range(int(lo), int(hi) + 1))
        else:
            target.add(int(part))
    return tuple(sorted(chosen - excluded))


def parse_allocation(xml_text, active=False):
    """Read what a domain holds from its XML: PCI hostdevs, pinned CPUs, nodes, memory."""
    root = ET.fromstring(xml_text)
    name = root.findtext("name", "")
    uuid = root.findtext("uuid", "")
    hostdevs = []
    for hostdev in root.findall("./devices/hostdev"):
        if hostdev.get("type") != "pci":
            continue
        address = hostdev.find("./source/address")
        if address is not None:
            hostdevs.append(_bdf_of(address))
    pinned = set()
    for pin in root.findall("./cputune/vcpupin"):
        pinned.update(_cpus(pin.get("cpuset")))
    vcpu = root.find("vcpu")
    cpuset = _cpus(vcpu.get("cpuset")) if vcpu is not None and not pinned else ()
    nodes = ()
    memory = root.find("./numatune/memory")
    if memory is not None and memory.get("nodeset"):
        nodes = _cpus(memory.get("nodeset"))
    mem_el = root.find("memory")
    memory_kib = 0
    if mem_el is not None and mem_el.text:
        memory_kib = _to_kib(int(mem_el.text), mem_el.get("unit", "KiB"))
    metadata = {}
    meta_el = root.find("./metadata/{%s}allocation" % METADATA_NS)
    if meta_el is not None:
        metadata = dict(meta_el.attrib)
        for child in meta_el:
            tag = child.tag.split("}", 1)[-1]
            metadata[tag] = child.text or ""
    return DomainAllocation(
        name=name, uuid=uuid, active=active, hostdevs=tuple(sorted(set(hostdevs))),
        pinned_cpus=tuple(sorted(pinned)), cpuset=cpuset, numa_nodes=nodes,
        memory_kib=memory_kib, managed=meta_el is not None, metadata=metadata,
    )


_UNITS = {"b": 1, "bytes": 1, "kb": 1000, "k": 1024, "kib": 1024, "mb": 10 ** 6, "m": 1024 ** 2,
          "mib": 1024 ** 2, "gb": 10 ** 9, "g": 1024 ** 3, "gib": 1024 ** 3, "tb": 10 ** 12,
          "t": 1024 ** 4, "tib": 1024 ** 4}


def _to_kib(value, unit):
    return value * _UNITS.get(unit.lower(), 1024) // 1024


def disk_sources(xml_text, volume_path=None):
    """File and block paths of a domain's disks and of the backingStore chains in its XML."""
    root = ET.fromstring(xml_text)
    paths = []

    def source_path(element, kind):
        source = element.find("source")
        if source is None:
            return None
        if kind == "file":
            return source.get("file")
        if kind == "block":
            return source.get("dev")
        if kind == "volume" and volume_path is not None:
            return volume_path(source.get("pool"), source.get("volume"))
        return None  # network disks (rbd, iscsi, nbd) have no local file to protect

    for disk in root.findall("./devices/disk"):
        element, kind = disk, disk.get("type", "file")
        # libvirt nests the chain: <disk><source/><backingStore type=..><source/><backingStore>..
        while element is not None:
            path = source_path(element, kind)
            if path and path not in paths:
                paths.append(path)
            element = element.find("backingStore")
            kind = element.get("type", "file") if element is not None else None
    return tuple(paths)


class LibvirtGateway:
    """A connection to one libvirt daemon."""

    def __init__(self, uri=DEFAULT_URI):
        if libvirt is None:
            raise LibvirtGatewayError("the Python libvirt bindings (libvirt-python) are missing")
        self.uri = uri
        try:
            self.conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise LibvirtGatewayError(
                "cannot connect to libvirt at uri %r: %s" % (uri, exc.get_error_message())
            ) from exc

    def close(self):
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def allocations(self):
        """Every defined domain's allocation, running or not (a device is taken by either)."""
        result = []
        try:
            domains = self.conn.listAllDomains(0)
        except libvirt.libvirtError as exc:
            raise LibvirtGatewayError("cannot list domains at %r: %s" % (self.uri, exc)) from exc
        for dom in domains:
            try:
                xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                active = bool(dom.isActive())
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # undefined while we listed
                raise LibvirtGatewayError("cannot read domain %s: %s" % (dom.name(), exc)) from exc
            result.append(parse_allocation(xml, active=active))
        return sorted(result, key=lambda a: a.name)

    def _volume_path(self, pool, volume):
        try:
            return self.conn.storagePoolLookupByName(pool).storageVolLookupByName(volume).path()
        except libvirt.libvirtError:
            return None  # a pool that is gone holds no file we could protect

    def disk_chains(self):
        """{domain name: disk paths with their backing chains}, as libvirt reports them.

        Inactive domains report only what their XML names; running ones also the backing
        chain libvirt probed at start (live XML). Callers that must know the whole chain of an
        inactive domain's disks follow it with qemu-img (module_utils._images).
        """
        result = {}
        try:
            domains = self.conn.listAllDomains(0)
        except libvirt.libvirtError as exc:
            raise LibvirtGatewayError("cannot list domains at %r: %s" % (self.uri, exc)) from exc
        for dom in domains:
            try:
                xmls = [dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)]
                if dom.isActive():
                    xmls.append(dom.XMLDesc(0))
                name = dom.name()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # undefined while we listed
                raise LibvirtGatewayError("cannot read domain %s: %s" % (dom.name(), exc)) from exc
            paths = []
            for xml in xmls:
                for path in disk_sources(xml, self._volume_path):
                    if path not in paths:
                        paths.append(path)
            result[name] = tuple(paths)
        return result

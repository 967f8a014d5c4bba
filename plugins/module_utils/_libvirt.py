# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The collection's only gateway to libvirt. Private to this collection.

Every other module talks to libvirt through :class:`LibvirtGateway`; tests swap the URI
(``test:///default`` or a private ``qemu:///session``), never patch classes.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

# The namespace of the collection's own <metadata> element lives with the XML model.
from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import (
    METADATA_NS,
    parse_cpuset,
)

try:
    import libvirt
except ImportError:  # reported by the module with missing_required_lib()
    libvirt = None


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
    return parse_cpuset(text)


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
            if child.attrib:
                continue  # records such as <gpuvirt:disk target= role=/>, not flat values
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


def _ignore_error(_ctx, _err):
    return None


class LibvirtGateway:
    """A connection to one libvirt daemon."""

    def __init__(self, uri=DEFAULT_URI):
        if libvirt is None:
            raise LibvirtGatewayError("the Python libvirt bindings (libvirt-python) are missing")
        self.uri = uri
        # libvirt prints every error to stderr unless a handler takes it; ours are raised as
        # LibvirtGatewayError with the same words, so the copy on stderr is only noise.
        libvirt.registerErrorHandler(_ignore_error, None)
        try:
            self.conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise LibvirtGatewayError(
                "cannot connect to libvirt at uri %r: %s" % (uri, exc.get_error_message())
            ) from exc

    def reopen(self):
        """A new connection to the same daemon (one per worker thread; close it after use)."""
        return LibvirtGateway(self.uri)

    def close(self):
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _list_domains(self):
        try:
            return self.conn.listAllDomains(0)
        except libvirt.libvirtError as exc:
            raise LibvirtGatewayError("cannot list domains at %r: %s" % (self.uri, exc)) from exc

    def allocations(self):
        """Every defined domain's allocation, running or not (a device is taken by either)."""
        result = []
        for dom in self._list_domains():
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
        for dom in self._list_domains():
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

    # --- domain lifecycle --------------------------------------------------------------------
    # Every call maps libvirt's exception to LibvirtGatewayError carrying libvirt's own words.

    def _lookup(self, name):
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise LibvirtGatewayError("cannot look up domain %s: %s" % (name, exc)) from exc

    def exists(self, name):
        return self._lookup(name) is not None

    def state(self, name):
        """'running', 'paused', 'shutoff', 'shutdown' (in progress), 'crashed', ... or None."""
        dom = self._lookup(name)
        if dom is None:
            return None
        try:
            code = dom.state()[0]
        except libvirt.libvirtError as exc:
            raise LibvirtGatewayError("cannot read the state of %s: %s" % (name, exc)) from exc
        return _STATES.get(code, "unknown")

    def domain_xml(self, name, inactive=True):
        """The domain's XML (inactive: as defined, which is what the next start uses)."""
        dom = self._lookup(name)
        if dom is None:
            raise LibvirtGatewayError("domain %s does not exist" % name)
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        try:
            return dom.XMLDesc(flags)
        except libvirt.libvirtError as exc:
            raise LibvirtGatewayError("cannot read domain %s: %s" % (name, exc)) from exc

    def define(self, xml):
        """Define (or redefine) a domain from XML; returns its name."""
        try:
            return self.conn.defineXML(xml).name()
        except libvirt.libvirtError as exc:
            raise LibvirtGatewayError("libvirt refused the domain definition: %s"
                                      % exc.get_error_message()) from exc

    def start(self, name):
        dom = self._require(name)
        try:
            dom.create()
        except libvirt.libvirtError as exc:
            raise LibvirtGatewayError("cannot start %s: %s" % (name, exc.get_error_message())) \
                from exc

    def block_resize(self, name, path, size_bytes):
        """Grow a disk of a running domain to ``size_bytes`` (QEMU resizes it; the guest sees
        the new size at once). Never called to shrink."""
        dom = self._require(name)
        try:
            dom.blockResize(path, int(size_bytes), libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
        except libvirt.libvirtError as exc:
            raise LibvirtGatewayError("cannot grow disk %s of %s: %s" % (
                path, name, exc.get_error_message())) from exc

    def destroy(self, name):
        """Power a domain off at once (no guest shutdown). A stopped domain is left as is."""
        dom = self._require(name)
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                return  # it stopped between the check and the call
            raise LibvirtGatewayError("cannot destroy %s: %s" % (name, exc.get_error_message())) \
                from exc

    def shutdown(self, name, timeout, force=False, poll=0.2):
        """ACPI shutdown, wait up to timeout seconds; then destroy if force, else raise.

        Returns 'shutdown' when the guest powered off by itself, 'destroyed' when forced.
        """
        dom = self._require(name)
        if force and timeout <= 0:
            # No grace period asked for: power off at once, as virsh destroy does.
            was_active = dom.isActive()
            self.destroy(name)
            return "destroyed" if was_active else "shutdown"
        try:
            if not dom.isActive():
                return "shutdown"
            dom.shutdown()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                raise LibvirtGatewayError("cannot shut down %s: %s"
                                          % (name, exc.get_error_message())) from exc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state(name) in ("shutoff", None):
                return "shutdown"
            time.sleep(poll)
        if not force:
            raise LibvirtGatewayError(
                "%s did not power off within %d s of an ACPI shutdown (the guest may have no OS "
                "or ignore ACPI); set force: true to power it off, or raise timeout"
                % (name, timeout))
        self.destroy(name)
        return "destroyed"

    def undefine(self, name):
        """Undefine a stopped domain with its NVRAM, managed save and snapshot metadata."""
        dom = self._require(name)
        flags = 0
        for flag in ("VIR_DOMAIN_UNDEFINE_NVRAM", "VIR_DOMAIN_UNDEFINE_MANAGED_SAVE",
                     "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA",
                     "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA"):
            flags |= getattr(libvirt, flag, 0)
        try:
            try:
                dom.undefineFlags(flags)
            except libvirt.libvirtError as exc:
                # Drivers without NVRAM or snapshots (the test driver, some remote ones) reject
                # these flags; they then have nothing those flags would remove.
                if exc.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG,
                                                libvirt.VIR_ERR_NO_SUPPORT):
                    raise
                dom.undefineFlags(0)
        except libvirt.libvirtError as exc:
            raise LibvirtGatewayError("cannot undefine %s: %s" % (name, exc.get_error_message())) \
                from exc

    def _require(self, name):
        dom = self._lookup(name)
        if dom is None:
            raise LibvirtGatewayError("domain %s does not exist" % name)
        return dom

    def networks(self):
        """{network name: active?} for every libvirt network."""
        try:
            return {n.name(): bool(n.isActive()) for n in self.conn.listAllNetworks(0)}
        except libvirt.libvirtError as exc:
            raise LibvirtGatewayError("cannot list networks at %r: %s" % (self.uri, exc)) from exc

    def domain_names(self):
        try:
            return sorted(d.name() for d in self._list_domains())
        except libvirt.libvirtError as exc:
            raise LibvirtGatewayError("cannot list domains at %r: %s" % (self.uri, exc)) from exc


_STATES = {}
if libvirt is not None:
    _STATES = {
        libvirt.VIR_DOMAIN_NOSTATE: "nostate",
        libvirt.VIR_DOMAIN_RUNNING: "running",
        libvirt.VIR_DOMAIN_BLOCKED: "running",
        libvirt.VIR_DOMAIN_PAUSED: "paused",
        libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
        libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
        libvirt.VIR_DOMAIN_CRASHED: "crashed",
        libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
    }

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Libvirt domain XML as typed objects, without policy. Private to this collection.

One dataclass per element the collection uses, each with ``to_element()`` and
``from_element()``; :class:`Domain` adds ``to_xml()`` and ``from_xml()``. Nothing here decides
anything (``_vm_spec`` does) and nothing imports libvirt (``_libvirt`` does).

Users edit domains by hand, so what this model does not know survives a round trip: unknown
attributes and child elements of a modelled element are kept in its ``extras``, unknown devices
and top-level elements as :class:`Raw` nodes. Known values are normalised the way libvirt
normalises them (memory in KiB, PCI addresses in hex, CPU sets compressed), and output is
pretty-printed with a fixed attribute order, so ``from_xml(x).to_xml()`` is stable.
XML comments are dropped, as libvirt drops them on define.
"""

from __future__ import annotations

import copy
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from ansible_collections.gpuvirt.kvm.plugins.module_utils._bdf import format_bdf, parse_bdf
from ansible_collections.gpuvirt.kvm.plugins.module_utils._ranges import (
    format_ranges,
    parse_ranges,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._units import UNITS, scaled_kib

# The namespace of the collection's own <metadata> element (the libvirt gateway imports it).
METADATA_NS = "https://gpuvirt.invalid/xmlns/kvm/1"
METADATA_PREFIX = "gpuvirt"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
_XML_NS = "http://www.w3.org/XML/1998/namespace"

# Prefixes used when writing a namespace the parsed document did not name itself.
_PREFIXES = {
    METADATA_NS: METADATA_PREFIX,
    QEMU_NS: "qemu",
    "http://libosinfo.org/xmlns/libvirt/domain/1.0": "libosinfo",
}

_INDENT = "  "


class DomainXmlError(ValueError):
    """The text is not a libvirt domain this model can read; the message says where."""


# --- small helpers -------------------------------------------------------------------------------

def parse_cpuset(text):
    """Expand a libvirt CPU/node set ("0-3,^2,8") into a sorted tuple of ints."""
    try:
        return parse_ranges(text)
    except ValueError as exc:
        raise DomainXmlError("%r is not a CPU or node set (write it like 0-3,8)" % text) from exc


def format_cpuset(values):
    """Compress ints into libvirt's set syntax ("0-3,8"); None for an empty set."""
    return format_ranges(values) or None


def _num(text, what):
    """A libvirt number: '0x..' is hex, anything else decimal (libvirt never writes octal)."""
    if text is None:
        return None
    value = text.strip()
    try:
        if value.lower().startswith("0x"):
            return int(value, 16)
        return int(value, 10)
    except ValueError as exc:
        raise DomainXmlError("%s: %r is not a number" % (what, text)) from exc


def _kib(value, unit, what):
    """A libvirt scaled size in KiB (libvirt rounds byte counts up to whole KiB)."""
    if value is None:
        return None
    number = _num(value, what)
    if (unit or "KiB").lower() not in UNITS:
        raise DomainXmlError("%s: unknown unit %r (use KiB, MiB, GiB, ...)" % (what, unit))
    return scaled_kib(number, unit)


def _yesno(text, yes="yes", no="no"):
    if text is None:
        return None
    return text == yes


def _flag(value, yes="yes", no="no"):
    if value is None:
        return None
    return yes if value else no


def _hex(value, width):
    return None if value is None else "0x%0*x" % (width, value)


def _split_tag(tag):
    if tag[:1] == "{":
        uri, local = tag[1:].split("}", 1)
        return uri, local
    return None, tag


@dataclass
class Extras:
    """What a modelled element held that the model does not know, kept for the rewrite."""

    attrs: dict = field(default_factory=dict)  # unknown attributes, in document order
    children: list = field(default_factory=list)  # unknown child elements (Raw), in order
    sub: dict = field(default_factory=dict)  # child tag -> Extras of a child read into fields

    def __bool__(self):
        return bool(self.attrs or self.children or self.sub)


class Raw(object):
    """An element the model does not know, kept as parsed so that it survives a rewrite."""

    __slots__ = ("element",)

    def __init__(self, element):
        self.element = element

    @property
    def tag(self):
        return self.element.tag

    def to_element(self):
        return copy.deepcopy(self.element)

    def __eq__(self, other):
        return isinstance(other, Raw) and _serialize(self.element, {}) == _serialize(
            other.element, {})

    __hash__ = None

    def __repr__(self):
        return "Raw(%s)" % _serialize(self.element, {}, pretty=False)


class _Reader(object):
    """Reads an element, remembering which attributes and children the model consumed."""

    def __init__(self, element):
        self.el = element
        self.extras = Extras()
        self._attrs = set()
        self._children = set()
        self._subs = []

    def get(self, name):
        self._attrs.add(name)
        return self.el.get(name)

    def num(self, name):
        return _num(self.get(name), "<%s %s>" % (_split_tag(self.el.tag)[1], name))

    def yesno(self, name, yes="yes", no="no"):
        return _yesno(self.get(name), yes, no)

    def text(self):
        text = self.el.text
        return text.strip() if text is not None and text.strip() else None

    def sub(self, tag):
        """The first child with this tag, read into fields of the parent; None if absent."""
        child = self.el.find(tag)
        if child is None:
            return None
        self._children.add(id(child))
        reader = _Reader(child)
        self._subs.append((tag, reader))
        return reader

    def subs(self, tag):
        """All children with this tag, each becoming a typed object of its own."""
        found = self.el.findall(tag)
        for child in found:
            self._children.add(id(child))
        return found

    def finish(self):
        for key, value in self.el.attrib.items():
            if key not in self._attrs:
                self.extras.attrs[key] = value
        for child in self.el:
            if id(child) not in self._children:
                self.extras.children.append(Raw(copy.deepcopy(child)))
        for tag, reader in self._subs:
            sub = reader.finish()
            if sub:
                self.extras.sub[tag] = sub
        return self.extras


def _element(tag, attrs=(), extras=None, text=None):
    el = ET.Element(tag)
    for key, value in attrs:
        if value is not None:
            el.set(key, str(value))
    if extras:
        for key, value in extras.attrs.items():
            if key not in el.attrib:
                el.set(key, value)
    if text is not None:
        el.text = str(text)
    return el


def _sub(parent, tag, attrs=(), extras=None, text=None, force=False):
    """Append a child read into the parent's fields, when a field or a kept extra needs it."""
    sub_extras = extras.sub.get(tag) if extras else None
    if not force and text is None and not sub_extras and all(v is None for _key, v in attrs):
        return None
    el = _element(tag, attrs, sub_extras, text)
    if sub_extras:
        for raw in sub_extras.children:
            el.append(raw.to_element())
    parent.append(el)
    return el


def _finish(el, extras):
    if extras:
        for raw in extras.children:
            el.append(raw.to_element())
    return el


def _append(parent, obj):
    if obj is not None:
        parent.append(obj.to_element())


# --- serialisation -------------------------------------------------------------------------------

def _esc_text(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _esc_attr(text):
    return (_esc_text(text).replace("'", "&apos;").replace("\n", "&#10;")
            .replace("\r", "&#13;").replace("\t", "&#9;"))


def _uris(el, skip_tag=None):
    """Namespace URIs used in a subtree (elements and attributes), skipping skip_tag subtrees."""
    found = []
    todo = [el]
    while todo:
        node = todo.pop(0)
        for name in [node.tag] + list(node.attrib):
            uri = _split_tag(name)[0]
            if uri and uri != _XML_NS and uri not in found:
                found.append(uri)
        todo.extend(c for c in node if skip_tag is None or c.tag != skip_tag)
    return found


class _Writer(object):
    """Writes an element tree the way libvirt does: single quotes, two-space indentation,
    namespace prefixes declared on the element that first needs them."""

    def __init__(self, prefixes):
        self.prefixes = dict(_PREFIXES)
        self.prefixes.update(prefixes or {})
        self.out = []

    # scope: {uri: prefix} in force, and scope[None]: the default namespace in force.

    def _prefix(self, uri, scope, decls):
        if uri in scope:
            return scope[uri]
        used = set(v for k, v in scope.items() if k is not None)
        prefix = self.prefixes.get(uri)
        if not prefix or prefix in used:
            n = 0
            while "ns%d" % n in used:
                n += 1
            prefix = "ns%d" % n
        scope[uri] = prefix
        decls.append((prefix, uri))
        return prefix

    def _element_name(self, tag, scope, decls):
        uri, local = _split_tag(tag)
        if uri is None:
            if scope.get(None):
                decls.append(("", ""))  # back to no namespace below a default one
                scope[None] = None
            return local
        if scope.get(None) == uri:
            return local
        if uri not in scope and self.prefixes.get(uri) == "":
            # The document wrote this namespace as a default one (xmlns='...'): keep it so.
            decls.append(("", uri))
            scope[None] = uri
            return local
        return self._attr_name(tag, scope, decls)

    def _attr_name(self, name, scope, decls):
        uri, local = _split_tag(name)
        if uri is None:
            return local
        if uri == _XML_NS:
            return "xml:" + local
        return "%s:%s" % (self._prefix(uri, scope, decls), local)

    def write(self, el, level, scope, pretty=True, predeclare=()):
        scope = dict(scope)
        decls = []
        for uri in predeclare:
            self._prefix(uri, scope, decls)
        name = self._element_name(el.tag, scope, decls)
        attrs = [(self._attr_name(k, scope, decls), v) for k, v in el.attrib.items()]
        out = self.out
        out.append("<" + name)
        # libvirt writes <domain type='kvm' xmlns:qemu='...'> but <gpuvirt:allocation
        # xmlns:gpuvirt='...' owner='...'>: declarations after the root's attributes, before
        # any other element's.
        xmlns = ["xmlns%s='%s'" % (":" + prefix if prefix else "", _esc_attr(uri))
                 for prefix, uri in decls]
        attrs = ["%s='%s'" % (key, _esc_attr(value)) for key, value in attrs]
        for item in (attrs + xmlns if predeclare else xmlns + attrs):
            out.append(" " + item)
        children = list(el)
        text = el.text or ""
        if not children:
            if text.strip() or (text and not pretty):
                out.append(">" + _esc_text(text) + "</%s>" % name)
            else:
                out.append("/>")
            return
        mixed = text.strip() or any((c.tail or "").strip() for c in children)
        if not pretty or mixed:
            # Mixed content: indentation would change the text, so write it as it was.
            out.append(">" + _esc_text(text))
            for child in children:
                self.write(child, level + 1, scope, pretty=False)
                out.append(_esc_text(child.tail or ""))
            out.append("</%s>" % name)
            return
        out.append(">\n")
        for child in children:
            out.append(_INDENT * (level + 1))
            self.write(child, level + 1, scope)
            out.append("\n")
        out.append(_INDENT * level + "</%s>" % name)


def _serialize(el, prefixes, pretty=True, predeclare=()):
    writer = _Writer(prefixes)
    writer.write(el, 0, {}, pretty=pretty, predeclare=predeclare)
    return "".join(writer.out)


def _parse(text):
    """Parse XML text; returns (root element, {uri: prefix} as the document declared them)."""
    parser = ET.XMLPullParser(events=("start-ns", "start"))
    root = None
    namespaces = {}

    def drain():
        nonlocal root
        for event, item in parser.read_events():
            if event == "start-ns":
                prefix, uri = item
                if uri and uri not in namespaces:
                    namespaces[uri] = prefix
            elif root is None:
                root = item

    try:
        parser.feed(text)
        drain()
        parser.close()
        drain()
    except ET.ParseError as exc:
        raise DomainXmlError("domain XML is not well-formed: %s" % exc) from exc
    if root is None:
        raise DomainXmlError("domain XML is empty")
    return root, namespaces


# --- addresses -----------------------------------------------------------------------------------

@dataclass
class Address:
    """<address>: a guest or host PCI address; other address types keep their attributes."""

    type: str | None = "pci"
    domain: int | None = None
    bus: int | None = None
    slot: int | None = None
    function: int | None = None
    multifunction: bool | None = None
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def pci(cls, bdf, multifunction=None, with_type=True):
        """A PCI address from "0000:34:00.0" (or "34:00.0")."""
        try:
            domain, bus, slot, function = parse_bdf(bdf)
        except ValueError as exc:
            raise DomainXmlError(str(exc)) from exc
        return cls(type="pci" if with_type else None, domain=domain, bus=bus, slot=slot,
                   function=function, multifunction=multifunction)

    @property
    def bdf(self):
        """"dddd:bb:ss.f" (libvirt's missing parts count as 0)."""
        return format_bdf(self.domain, self.bus, self.slot, self.function)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        kind = r.get("type")
        if kind in ("pci", None) and el.get("bus") is not None or kind == "pci":
            addr = cls(type=kind, domain=r.num("domain"), bus=r.num("bus"), slot=r.num("slot"),
                       function=r.num("function"),
                       multifunction=r.yesno("multifunction", "on", "off"))
        else:
            addr = cls(type=kind)
        addr.extras = r.finish()
        return addr

    def to_element(self):
        is_pci = self.type == "pci" or self.bus is not None
        attrs = [("type", self.type)]
        if is_pci:
            attrs += [("domain", _hex(self.domain, 4)), ("bus", _hex(self.bus, 2)),
                      ("slot", _hex(self.slot, 2)),
                      ("function", None if self.function is None else "0x%x" % self.function),
                      ("multifunction", _flag(self.multifunction, "on", "off"))]
        return _finish(_element("address", attrs, self.extras), self.extras)


def _address(reader):
    el = reader.el.find("address")
    if el is None:
        return None
    reader.subs("address")
    return Address.from_element(el)


# --- the collection's metadata -------------------------------------------------------------------

def _ns(tag):
    return "{%s}%s" % (METADATA_NS, tag)


def _split_list(text):
    return tuple(p for p in re.split(r"[,\s]+", text or "") if p)


@dataclass
class MetadataDisk:
    """<gpuvirt:disk>: what a disk is for and the size asked for (domain XML has neither)."""

    target: str
    role: str
    size_gb: int | None = None
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        obj = cls(target=r.get("target"), role=r.get("role"), size_gb=r.num("size_gb"))
        obj.extras = r.finish()
        return obj

    def to_element(self):
        return _finish(_element(_ns("disk"), [("target", self.target), ("role", self.role),
                                              ("size_gb", self.size_gb)], self.extras),
                       self.extras)


@dataclass
class GpuvirtMetadata:
    """<gpuvirt:allocation>: the collection's record in a managed domain (what it holds and
    where it came from). Scalars are attributes, lists are comma-separated text children."""

    owner: str = "gpuvirt.kvm"
    created_by: str | None = None
    template: str | None = None
    cpu_policy: str | None = None
    image: str | None = None
    image_version: str | None = None
    owner_tag: str | None = None
    seed_digest: str | None = None  # content hash of the cloud-init seed files
    # Shared NVSwitch: the Fabric Manager partition of exactly these GPUs, which the libvirt
    # hook activates when the domain starts and deactivates when it is released.
    fm_partition: int | None = None
    gpus: tuple = ()
    nvswitches: tuple = ()
    nics: tuple = ()  # rail NIC functions or VFs placement gave it
    numa_nodes: tuple = ()
    disks: list = field(default_factory=list)  # MetadataDisk
    extras: Extras = field(default_factory=Extras, repr=False)

    TAG = _ns("allocation")

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)

        def child(tag):
            sub = r.sub(_ns(tag))
            return sub.text() if sub is not None else None

        obj = cls(owner=r.get("owner"), created_by=r.get("created_by"),
                  template=r.get("template"), cpu_policy=r.get("cpu_policy"),
                  seed_digest=r.get("seed_digest"), fm_partition=r.num("fm_partition"),
                  image=child("image"),
                  image_version=child("image_version"),
                  owner_tag=child("owner_tag"), gpus=_split_list(child("gpus")),
                  nvswitches=_split_list(child("nvswitches")),
                  nics=_split_list(child("nics")),
                  numa_nodes=tuple(_num(n, "<gpuvirt:numa_nodes>")
                                   for n in _split_list(child("numa_nodes"))),
                  disks=[MetadataDisk.from_element(d) for d in r.subs(_ns("disk"))])
        obj.extras = r.finish()
        return obj

    def to_element(self):
        el = _element(self.TAG, [("owner", self.owner), ("created_by", self.created_by),
                                 ("template", self.template), ("cpu_policy", self.cpu_policy),
                                 ("seed_digest", self.seed_digest),
                                 ("fm_partition", self.fm_partition)],
                      self.extras)
        for tag, value in (("image", self.image), ("image_version", self.image_version),
                           ("owner_tag", self.owner_tag),
                           ("gpus", ",".join(self.gpus) or None),
                           ("nvswitches", ",".join(self.nvswitches) or None),
                           ("nics", ",".join(self.nics) or None),
                           ("numa_nodes", ",".join(str(n) for n in self.numa_nodes) or None)):
            _sub(el, _ns(tag), (), self.extras, text=value)
        for disk in self.disks:
            el.append(disk.to_element())
        return _finish(el, self.extras)


# --- memory, vCPUs, tuning -----------------------------------------------------------------------

@dataclass
class HugePage:
    """<page> of <memoryBacking><hugepages>: a page size for some guest NUMA cells (or all)."""

    size_kib: int
    nodeset: tuple | None = None  # guest cell ids; None: every cell
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        obj = cls(size_kib=_kib(r.get("size"), r.get("unit"), "<page size>"),
                  nodeset=parse_cpuset(r.get("nodeset")) if el.get("nodeset") else None)
        obj.extras = r.finish()
        return obj

    def to_element(self):
        return _finish(_element("page", [
            ("size", self.size_kib), ("unit", "KiB"),
            ("nodeset", None if self.nodeset is None else format_cpuset(self.nodeset))],
            self.extras), self.extras)


@dataclass
class MemoryBacking:
    """<memoryBacking>; hugepages None: no <hugepages>, []: the default page size."""

    hugepages: list | None = None
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        hp = r.sub("hugepages")
        pages = None
        if hp is not None:
            pages = [HugePage.from_element(p) for p in hp.subs("page")]
        obj = cls(hugepages=pages)
        obj.extras = r.finish()
        return obj

    def to_element(self):
        el = _element("memoryBacking", (), self.extras)
        if self.hugepages is not None:
            hp = _sub(el, "hugepages", (), self.extras, force=True)
            for page in self.hugepages:
                hp.append(page.to_element())
        return _finish(el, self.extras)


@dataclass
class Vcpu:
    """<vcpu>: how many, and (shared policy) the host CPUs they float over."""

    count: int = 1
    placement: str | None = "static"
    cpuset: tuple | None = None
    current: int | None = None
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        obj = cls(count=_num(r.text(), "<vcpu>"), placement=r.get("placement"),
                  cpuset=parse_cpuset(r.get("cpuset")) if el.get("cpuset") else None,
                  current=r.num("current"))
        obj.extras = r.finish()
        return obj

    def to_element(self):
        return _finish(_element("vcpu", [
            ("placement", self.placement),
            ("cpuset", None if self.cpuset is None else format_cpuset(self.cpuset)),
            ("current", self.current)], self.extras, text=self.count), self.extras)


@dataclass
class VcpuPin:
    vcpu: int
    cpuset: tuple
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        obj = cls(vcpu=r.num("vcpu"), cpuset=parse_cpuset(r.get("cpuset")))
        obj.extras = r.finish()
        return obj

    def to_element(self):
        return _finish(_element("vcpupin", [("vcpu", self.vcpu),
                                            ("cpuset", format_cpuset(self.cpuset))],
                                self.extras), self.extras)


@dataclass
class IOThreadPin:
    iothread: int
    cpuset: tuple
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        obj = cls(iothread=r.num("iothread"), cpuset=parse_cpuset(r.get("cpuset")))
        obj.extras = r.finish()
        return obj

    def to_element(self):
        return _finish(_element("iothreadpin", [("iothread", self.iothread),
                                                ("cpuset", format_cpuset(self.cpuset))],
                                self.extras), self.extras)


@dataclass
class CpuTune:
    """<cputune>: vCPU, emulator and I/O thread pinning."""

    vcpupins: list = field(default_factory=list)
    emulatorpin: tuple | None = None
    iothreadpins: list = field(default_factory=list)
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        emu = r.sub("emulatorpin")
        obj = cls(vcpupins=[VcpuPin.from_element(p) for p in r.subs("vcpupin")],
                  emulatorpin=parse_cpuset(emu.get("cpuset")) if emu is not None else None,
                  iothreadpins=[IOThreadPin.from_element(p) for p in r.subs("iothreadpin")])
        obj.extras = r.finish()
        return obj

    def to_element(self):
        el = _element("cputune", (), self.extras)
        for pin in self.vcpupins:
            el.append(pin.to_element())
        if self.emulatorpin is not None:
            _sub(el, "emulatorpin", [("cpuset", format_cpuset(self.emulatorpin))], self.extras)
        for pin in self.iothreadpins:
            el.append(pin.to_element())
        return _finish(el, self.extras)


@dataclass
class MemNode:
    """<memnode>: the host nodes one guest NUMA cell's memory comes from."""

    cellid: int
    mode: str
    nodeset: tuple
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        obj = cls(cellid=r.num("cellid"), mode=r.get("mode"),
                  nodeset=parse_cpuset(r.get("nodeset")))
        obj.extras = r.finish()
        return obj

    def to_element(self):
        return _finish(_element("memnode", [("cellid", self.cellid), ("mode", self.mode),
                                            ("nodeset", format_cpuset(self.nodeset))],
                                self.extras), self.extras)


@dataclass
class NumaTune:
    """<numatune>: the host nodes guest memory comes from."""

    mode: str | None = None
    nodeset: tuple | None = None
    memnodes: list = field(default_factory=list)
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        mem = r.sub("memory")
        mode = nodeset = None
        if mem is not None:
            mode = mem.get("mode")
            nodeset = parse_cpuset(mem.get("nodeset")) if mem.el.get("nodeset") else None
        obj = cls(mode=mode, nodeset=nodeset,
                  memnodes=[MemNode.from_element(m) for m in r.subs("memnode")])
        obj.extras = r.finish()
        return obj

    def to_element(self):
        el = _element("numatune", (), self.extras)
        _sub(el, "memory", [("mode", self.mode), ("nodeset", None if self.nodeset is None
                                                  else format_cpuset(self.nodeset))], self.extras)
        for node in self.memnodes:
            el.append(node.to_element())
        return _finish(el, self.extras)


# --- os, features, cpu, clock --------------------------------------------------------------------

@dataclass
class Os:
    """<os>: machine type, firmware (loader + NVRAM for OVMF) and boot order."""

    type: str = "hvm"
    arch: str | None = None
    machine: str | None = None
    firmware: str | None = None  # <os firmware='efi'> (libvirt's automatic firmware choice)
    loader: str | None = None
    loader_readonly: bool | None = None
    loader_type: str | None = None
    loader_secure: bool | None = None
    nvram: str | None = None
    nvram_template: str | None = None
    boot: list = field(default_factory=list)  # boot devices in order: "hd", "cdrom", "network"
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        typ = r.sub("type")
        loader = r.sub("loader")
        nvram = r.sub("nvram")
        boots = []
        for b in r.subs("boot"):
            boots.append(b.get("dev"))
        obj = cls(
            type=typ.text() if typ is not None else None,
            arch=typ.get("arch") if typ is not None else None,
            machine=typ.get("machine") if typ is not None else None,
            firmware=r.get("firmware"),
            loader=loader.text() if loader is not None else None,
            loader_readonly=loader.yesno("readonly") if loader is not None else None,
            loader_type=loader.get("type") if loader is not None else None,
            loader_secure=loader.yesno("secure") if loader is not None else None,
            nvram=nvram.text() if nvram is not None else None,
            nvram_template=nvram.get("template") if nvram is not None else None,
            boot=boots)
        obj.extras = r.finish()
        return obj

    def to_element(self):
        el = _element("os", [("firmware", self.firmware)], self.extras)
        _sub(el, "type", [("arch", self.arch), ("machine", self.machine)], self.extras,
             text=self.type)
        _sub(el, "loader", [("readonly", _flag(self.loader_readonly)),
                            ("secure", _flag(self.loader_secure)), ("type", self.loader_type)],
             self.extras, text=self.loader)
        _sub(el, "nvram", [("template", self.nvram_template)], self.extras, text=self.nvram)
        for dev in self.boot:
            el.append(_element("boot", [("dev", dev)]))
        return _finish(el, self.extras)


@dataclass
class Features:
    """<features>: the flags we set; every other feature is kept as it was."""

    acpi: bool = False
    apic: bool = False
    ioapic_driver: str | None = None
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        ioapic = r.sub("ioapic")
        obj = cls(acpi=r.sub("acpi") is not None, apic=r.sub("apic") is not None,
                  ioapic_driver=ioapic.get("driver") if ioapic is not None else None)
        obj.extras = r.finish()
        return obj

    def to_element(self):
        el = _element("features", (), self.extras)
        _sub(el, "acpi", (), self.extras, force=self.acpi)
        _sub(el, "apic", (), self.extras, force=self.apic)
        _sub(el, "ioapic", [("driver", self.ioapic_driver)], self.extras)
        return _finish(el, self.extras)


@dataclass
class CpuFeature:
    policy: str
    name: str
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        obj = cls(policy=r.get("policy"), name=r.get("name"))
        obj.extras = r.finish()
        return obj

    def to_element(self):
        return _finish(_element("feature", [("policy", self.policy), ("name", self.name)],
                                self.extras), self.extras)


@dataclass
class NumaCell:
    """<cell> of <cpu><numa>: one guest NUMA node."""

    id: int
    cpus: tuple
    memory_kib: int
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        obj = cls(id=r.num("id"), cpus=parse_cpuset(r.get("cpus")),
                  memory_kib=_kib(r.get("memory"), r.get("unit"), "<cell memory>"))
        obj.extras = r.finish()
        return obj

    def to_element(self):
        return _finish(_element("cell", [
            ("id", self.id), ("cpus", format_cpuset(self.cpus)), ("memory", self.memory_kib),
            ("unit", "KiB")], self.extras), self.extras)


@dataclass
class Cpu:
    """<cpu>: mode, topology, feature policies and guest NUMA cells."""

    mode: str | None = None
    match: str | None = None
    check: str | None = None
    migratable: bool | None = None
    model: str | None = None
    model_fallback: str | None = None
    sockets: int | None = None
    dies: int | None = None
    cores: int | None = None
    threads: int | None = None
    # <maxphysaddr mode='emulate' bits='46'/>: the guest's physical address width
    maxphysaddr_mode: str | None = None
    maxphysaddr_bits: int | None = None
    features: list = field(default_factory=list)  # CpuFeature
    cells: list = field(default_factory=list)  # NumaCell
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        model = r.sub("model")
        topo = r.sub("topology")
        phys = r.sub("maxphysaddr")
        numa = r.sub("numa")
        obj = cls(
            mode=r.get("mode"), match=r.get("match"), check=r.get("check"),
            migratable=r.yesno("migratable", "on", "off"),
            model=model.text() if model is not None else None,
            model_fallback=model.get("fallback") if model is not None else None,
            sockets=topo.num("sockets") if topo is not None else None,
            dies=topo.num("dies") if topo is not None else None,
            cores=topo.num("cores") if topo is not None else None,
            threads=topo.num("threads") if topo is not None else None,
            maxphysaddr_mode=phys.get("mode") if phys is not None else None,
            maxphysaddr_bits=phys.num("bits") if phys is not None else None,
            features=[CpuFeature.from_element(f) for f in r.subs("feature")],
            cells=([NumaCell.from_element(c) for c in numa.subs("cell")]
                   if numa is not None else []))
        obj.extras = r.finish()
        return obj

    def to_element(self):
        el = _element("cpu", [("mode", self.mode), ("match", self.match), ("check", self.check),
                              ("migratable", _flag(self.migratable, "on", "off"))], self.extras)
        _sub(el, "model", [("fallback", self.model_fallback)], self.extras, text=self.model)
        _sub(el, "topology", [("sockets", self.sockets), ("dies", self.dies),
                              ("cores", self.cores), ("threads", self.threads)], self.extras)
        _sub(el, "maxphysaddr", [("mode", self.maxphysaddr_mode), ("bits", self.maxphysaddr_bits)],
             self.extras)
        for feature in self.features:
            el.append(feature.to_element())
        if self.cells or "numa" in self.extras.sub:
            numa = _sub(el, "numa", (), self.extras, force=True)
            for cell in self.cells:
                numa.append(cell.to_element())
        return _finish(el, self.extras)


@dataclass
class Timer:
    name: str
    tickpolicy: str | None = None
    present: bool | None = None
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        obj = cls(name=r.get("name"), tickpolicy=r.get("tickpolicy"),
                  present=r.yesno("present"))
        obj.extras = r.finish()
        return obj

    def to_element(self):
        return _finish(_element("timer", [("name", self.name), ("tickpolicy", self.tickpolicy),
                                          ("present", _flag(self.present))], self.extras),
                       self.extras)


@dataclass
class Clock:
    offset: str | None = "utc"
    timers: list = field(default_factory=list)
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        obj = cls(offset=r.get("offset"),
                  timers=[Timer.from_element(t) for t in r.subs("timer")])
        obj.extras = r.finish()
        return obj

    def to_element(self):
        el = _element("clock", [("offset", self.offset)], self.extras)
        for timer in self.timers:
            el.append(timer.to_element())
        return _finish(el, self.extras)


# --- devices -------------------------------------------------------------------------------------

@dataclass
class Emulator:
    path: str
    extras: Extras = field(default_factory=Extras, repr=False)

    TAG = "emulator"

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        obj = cls(path=r.text())
        obj.extras = r.finish()
        return obj

    def to_element(self):
        return _finish(_element("emulator", (), self.extras, text=self.path), self.extras)


def _read_source(reader, kind):
    """(path, (pool, volume)) of a disk's or backing store's <source>: a file or block device
    path, or a storage-pool volume; network sources stay in extras."""
    kind = kind or "file"  # libvirt's default, for XML written by hand
    if kind not in ("file", "block", "volume"):
        return None, None
    src = reader.sub("source")
    if src is None:
        return None, None
    if kind == "volume":
        return None, (src.get("pool"), src.get("volume"))
    return src.get("file" if kind == "file" else "dev"), None


def _write_source(el, kind, source, volume, extras):
    if volume is not None:
        _sub(el, "source", [("pool", volume[0]), ("volume", volume[1])], extras)
    elif source is not None:
        _sub(el, "source", [("dev" if kind == "block" else "file", source)], extras)


@dataclass
class BackingStore:
    """<backingStore>: the image a disk's overlay reads from; all None is the empty terminator."""

    type: str | None = None
    format: str | None = None
    source: str | None = None
    volume: tuple | None = None  # (pool, volume) of a storage-pool volume (type volume)
    backing: BackingStore | None = None
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        kind = r.get("type")
        fmt = r.sub("format")
        source, volume = _read_source(r, kind)
        nested = el.find("backingStore")
        if nested is not None:
            r.subs("backingStore")
        obj = cls(type=kind, format=fmt.get("type") if fmt is not None else None, source=source,
                  volume=volume,
                  backing=BackingStore.from_element(nested) if nested is not None else None)
        obj.extras = r.finish()
        return obj

    def to_element(self):
        el = _element("backingStore", [("type", self.type)], self.extras)
        _sub(el, "format", [("type", self.format)], self.extras)
        _write_source(el, self.type, self.source, self.volume, self.extras)
        _append(el, self.backing)
        return _finish(el, self.extras)


@dataclass
class Disk:
    """<disk>: a file or block device seen by the guest as a disk or CD-ROM."""

    type: str = "file"
    device: str = "disk"
    driver_name: str | None = None
    driver_type: str | None = None
    cache: str | None = None
    io: str | None = None
    discard: str | None = None
    queues: int | None = None
    iothread: int | None = None
    source: str | None = None  # the file (type file) or device (type block)
    volume: tuple | None = None  # (pool, volume) of a storage-pool volume (type volume)
    backing: BackingStore | None = None
    target_dev: str | None = None
    target_bus: str | None = None
    readonly: bool = False
    serial: str | None = None
    boot_order: int | None = None
    address: Address | None = None
    extras: Extras = field(default_factory=Extras, repr=False)

    TAG = "disk"

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        kind = r.get("type")
        drv = r.sub("driver")
        source, volume = _read_source(r, kind)
        target = r.sub("target")
        serial = r.sub("serial")
        boot = r.sub("boot")
        backing = el.find("backingStore")
        if backing is not None:
            r.subs("backingStore")
        obj = cls(
            type=kind, device=r.get("device"),
            driver_name=drv.get("name") if drv else None,
            driver_type=drv.get("type") if drv else None,
            cache=drv.get("cache") if drv else None,
            io=drv.get("io") if drv else None,
            discard=drv.get("discard") if drv else None,
            queues=drv.num("queues") if drv else None,
            iothread=drv.num("iothread") if drv else None,
            source=source, volume=volume,
            backing=BackingStore.from_element(backing) if backing is not None else None,
            target_dev=target.get("dev") if target else None,
            target_bus=target.get("bus") if target else None,
            readonly=r.sub("readonly") is not None,
            serial=serial.text() if serial else None,
            boot_order=boot.num("order") if boot else None,
            address=_address(r))
        obj.extras = r.finish()
        return obj

    def to_element(self):
        el = _element("disk", [("type", self.type), ("device", self.device)], self.extras)
        _sub(el, "driver", [("name", self.driver_name), ("type", self.driver_type),
                            ("cache", self.cache), ("io", self.io), ("discard", self.discard),
                            ("iothread", self.iothread), ("queues", self.queues)], self.extras)
        _write_source(el, self.type, self.source, self.volume, self.extras)
        _append(el, self.backing)
        _sub(el, "target", [("dev", self.target_dev), ("bus", self.target_bus)], self.extras)
        _sub(el, "readonly", (), self.extras, force=self.readonly)
        _sub(el, "serial", (), self.extras, text=self.serial)
        _sub(el, "boot", [("order", self.boot_order)], self.extras)
        _append(el, self.address)
        return _finish(el, self.extras)


@dataclass
class Controller:
    """<controller>: PCIe root, expander buses, root ports, and USB/SATA/SCSI controllers."""

    type: str
    index: int | None = None
    model: str | None = None
    model_name: str | None = None  # <model name='pxb-pcie'/>: the QEMU device behind the model
    target_chassis: int | None = None
    target_port: int | None = None
    target_bus_nr: int | None = None
    target_node: int | None = None  # guest NUMA cell of an expander bus
    pcihole64_kib: int | None = None
    address: Address | None = None
    extras: Extras = field(default_factory=Extras, repr=False)

    TAG = "controller"

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        model = r.sub("model")
        target = r.sub("target")
        node = target.sub("node") if target else None
        hole = r.sub("pcihole64")
        obj = cls(
            type=r.get("type"), index=r.num("index"), model=r.get("model"),
            model_name=model.get("name") if model else None,
            target_chassis=target.num("chassis") if target else None,
            target_port=target.num("port") if target else None,
            target_bus_nr=target.num("busNr") if target else None,
            target_node=_num(node.text(), "<target><node>") if node else None,
            pcihole64_kib=(_kib(hole.text(), hole.get("unit"), "<pcihole64>")
                           if hole else None),
            address=_address(r))
        obj.extras = r.finish()
        return obj

    def to_element(self):
        el = _element("controller", [("type", self.type), ("index", self.index),
                                     ("model", self.model)], self.extras)
        _sub(el, "model", [("name", self.model_name)], self.extras)
        target = _sub(el, "target", [
            ("chassis", self.target_chassis),
            ("port", None if self.target_port is None else "0x%x" % self.target_port),
            ("busNr", self.target_bus_nr)], self.extras, force=self.target_node is not None)
        if target is not None:
            sub = self.extras.sub.get("target")
            _sub(target, "node", (), sub, text=self.target_node)
        if self.pcihole64_kib is not None:
            _sub(el, "pcihole64", [("unit", "KiB")], self.extras, text=self.pcihole64_kib)
        _append(el, self.address)
        return _finish(el, self.extras)


_INTERFACE_SOURCE = {"network": "network", "bridge": "bridge", "direct": "dev"}


@dataclass
class Interface:
    """<interface>: a guest NIC on a libvirt network, a host bridge, or QEMU user networking."""

    type: str
    source: str | None = None  # network name, bridge name, or host device (direct)
    mac: str | None = None
    model: str | None = None
    driver_name: str | None = None  # None: libvirt uses vhost when /dev/vhost-net exists
    queues: int | None = None
    link_state: str | None = None
    boot_order: int | None = None
    address: Address | None = None
    extras: Extras = field(default_factory=Extras, repr=False)

    TAG = "interface"

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        kind = r.get("type")
        source = None
        if kind in _INTERFACE_SOURCE:
            src = r.sub("source")
            if src is not None:
                source = src.get(_INTERFACE_SOURCE[kind])
        mac = r.sub("mac")
        model = r.sub("model")
        drv = r.sub("driver")
        link = r.sub("link")
        boot = r.sub("boot")
        address = mac.get("address") if mac else None
        # libvirt stores MACs in lower case; so does the model, so that specs compare equal.
        obj = cls(type=kind, source=source, mac=address.lower() if address else None,
                  model=model.get("type") if model else None,
                  driver_name=drv.get("name") if drv else None,
                  queues=drv.num("queues") if drv else None,
                  link_state=link.get("state") if link else None,
                  boot_order=boot.num("order") if boot else None, address=_address(r))
        obj.extras = r.finish()
        return obj

    def to_element(self):
        el = _element("interface", [("type", self.type)], self.extras)
        _sub(el, "mac", [("address", self.mac)], self.extras)
        if self.source is not None and self.type in _INTERFACE_SOURCE:
            _sub(el, "source", [(_INTERFACE_SOURCE[self.type], self.source)], self.extras)
        _sub(el, "model", [("type", self.model)], self.extras)
        _sub(el, "driver", [("name", self.driver_name), ("queues", self.queues)], self.extras)
        _sub(el, "link", [("state", self.link_state)], self.extras)
        _sub(el, "boot", [("order", self.boot_order)], self.extras)
        _append(el, self.address)
        return _finish(el, self.extras)


@dataclass
class HostdevPci:
    """<hostdev mode='subsystem' type='pci'>: a host PCI function passed through (VFIO)."""

    source: Address
    managed: bool | None = True
    address: Address | None = None  # where the guest sees it
    driver_name: str | None = None
    extras: Extras = field(default_factory=Extras, repr=False)

    TAG = "hostdev"

    @property
    def bdf(self):
        return self.source.bdf

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        r.get("mode")
        r.get("type")
        drv = r.sub("driver")
        src = r.sub("source")
        src_addr = src.el.find("address") if src else None
        if src_addr is None:
            raise DomainXmlError("<hostdev type='pci'> has no <source><address>")
        src.subs("address")
        obj = cls(source=Address.from_element(src_addr), managed=r.yesno("managed"),
                  address=_address(r), driver_name=drv.get("name") if drv else None)
        obj.extras = r.finish()
        return obj

    def to_element(self):
        el = _element("hostdev", [("mode", "subsystem"), ("type", "pci"),
                                  ("managed", _flag(self.managed))], self.extras)
        _sub(el, "driver", [("name", self.driver_name)], self.extras)
        source = _sub(el, "source", (), self.extras, force=True)
        source.append(self.source.to_element())
        _append(el, self.address)
        return _finish(el, self.extras)


@dataclass
class CharDevice:
    """<serial> or <console>."""

    kind: str  # "serial" or "console" (the tag)
    type: str = "pty"
    target_type: str | None = None
    target_port: int | None = None
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        target = r.sub("target")
        obj = cls(kind=el.tag, type=r.get("type"),
                  target_type=target.get("type") if target else None,
                  target_port=target.num("port") if target else None)
        obj.extras = r.finish()
        return obj

    def to_element(self):
        el = _element(self.kind, [("type", self.type)], self.extras)
        _sub(el, "target", [("type", self.target_type), ("port", self.target_port)],
             self.extras)
        return _finish(el, self.extras)


GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"  # the port qemu-guest-agent listens on


@dataclass
class Channel:
    """<channel>: a named virtio-serial port, such as the QEMU guest agent's."""

    type: str = "unix"
    target_type: str | None = "virtio"
    target_name: str | None = None
    extras: Extras = field(default_factory=Extras, repr=False)

    TAG = "channel"

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        target = r.sub("target")
        obj = cls(type=r.get("type"),
                  target_type=target.get("type") if target else None,
                  target_name=target.get("name") if target else None)
        obj.extras = r.finish()
        return obj

    def to_element(self):
        el = _element("channel", [("type", self.type)], self.extras)
        _sub(el, "target", [("type", self.target_type), ("name", self.target_name)],
             self.extras)
        return _finish(el, self.extras)


@dataclass
class MemBalloon:
    model: str = "none"
    address: Address | None = None
    extras: Extras = field(default_factory=Extras, repr=False)

    TAG = "memballoon"

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        obj = cls(model=r.get("model"), address=_address(r))
        obj.extras = r.finish()
        return obj

    def to_element(self):
        el = _element("memballoon", [("model", self.model)], self.extras)
        _append(el, self.address)
        return _finish(el, self.extras)


@dataclass
class Rng:
    """<rng>: a virtio entropy source fed from a host device."""

    model: str = "virtio"
    backend_model: str | None = "random"
    backend: str | None = "/dev/urandom"
    address: Address | None = None
    extras: Extras = field(default_factory=Extras, repr=False)

    TAG = "rng"

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        backend = r.sub("backend")
        obj = cls(model=r.get("model"),
                  backend_model=backend.get("model") if backend else None,
                  backend=backend.text() if backend else None, address=_address(r))
        obj.extras = r.finish()
        return obj

    def to_element(self):
        el = _element("rng", [("model", self.model)], self.extras)
        _sub(el, "backend", [("model", self.backend_model)], self.extras, text=self.backend)
        _append(el, self.address)
        return _finish(el, self.extras)


_DEVICE_CLASSES = {cls.TAG: cls for cls in (Emulator, Disk, Controller, Interface, MemBalloon,
                                            Rng, Channel)}


def device_from_element(el):
    """The typed device for an element under <devices>, or Raw when the model does not know it."""
    if el.tag == "hostdev":
        if el.get("type") == "pci" and el.get("mode", "subsystem") == "subsystem":
            return HostdevPci.from_element(el)
        return Raw(copy.deepcopy(el))
    if el.tag in ("serial", "console"):
        return CharDevice.from_element(el)
    cls = _DEVICE_CLASSES.get(el.tag)
    if cls is None:
        return Raw(copy.deepcopy(el))
    return cls.from_element(el)


# --- the domain ----------------------------------------------------------------------------------

@dataclass
class QemuCommandline:
    """<qemu:commandline>: arguments libvirt passes to QEMU as they are. The collection uses it
    only for what libvirt has no element for (OVMF's ``opt/ovmf/X-PciMmio64Mb`` fw_cfg entry,
    a name libvirt reserves in <sysinfo type='fwcfg'>); <qemu:env> and the rest stay extras."""

    TAG = "{%s}commandline" % QEMU_NS
    ARG = "{%s}arg" % QEMU_NS

    args: list = field(default_factory=list)  # str, in order
    extras: Extras = field(default_factory=Extras, repr=False)

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)
        obj = cls(args=[a.get("value") for a in r.subs(cls.ARG)])
        obj.extras = r.finish()
        return obj

    def to_element(self):
        el = _element(self.TAG, (), self.extras)
        for value in self.args:
            el.append(_element(self.ARG, [("value", value)]))
        return _finish(el, self.extras)


@dataclass
class Domain:
    """<domain>: a libvirt guest definition."""

    type: str = "kvm"
    name: str | None = None
    uuid: str | None = None
    title: str | None = None
    description: str | None = None
    metadata: list = field(default_factory=list)  # GpuvirtMetadata and Raw elements
    memory_kib: int | None = None
    current_memory_kib: int | None = None
    memory_backing: MemoryBacking | None = None
    vcpu: Vcpu | None = None
    iothreads: int | None = None
    cputune: CpuTune | None = None
    numatune: NumaTune | None = None
    os: Os | None = None
    features: Features | None = None
    cpu: Cpu | None = None
    clock: Clock | None = None
    on_poweroff: str | None = None
    on_reboot: str | None = None
    on_crash: str | None = None
    devices: list = field(default_factory=list)  # typed devices and Raw, in document order
    qemu_commandline: QemuCommandline | None = None
    extras: Extras = field(default_factory=Extras, repr=False)
    namespaces: dict = field(default_factory=dict, repr=False)  # uri -> prefix seen when parsed

    # --- queries ---

    @property
    def gpuvirt(self):
        """The collection's metadata (<gpuvirt:allocation>), or None for a domain it did not
        create."""
        for item in self.metadata:
            if isinstance(item, GpuvirtMetadata):
                return item
        return None

    def devices_of(self, cls):
        return [d for d in self.devices if isinstance(d, cls)]

    @property
    def disks(self):
        return self.devices_of(Disk)

    @property
    def controllers(self):
        return self.devices_of(Controller)

    @property
    def interfaces(self):
        return self.devices_of(Interface)

    @property
    def hostdevs(self):
        return self.devices_of(HostdevPci)

    @property
    def channels(self):
        return self.devices_of(Channel)

    def controller(self, type_, index):
        for c in self.controllers:
            if c.type == type_ and c.index == index:
                return c
        return None

    # --- conversion ---

    @classmethod
    def from_xml(cls, text):
        """Parse domain XML (as libvirt or a user wrote it)."""
        root, namespaces = _parse(text)
        if root.tag != "domain":
            raise DomainXmlError("expected a <domain> element, found <%s>" % root.tag)
        dom = cls.from_element(root)
        dom.namespaces = namespaces
        return dom

    @classmethod
    def from_element(cls, el):
        r = _Reader(el)

        def text(tag):
            sub = r.sub(tag)
            return sub.text() if sub is not None else None

        def typed(tag, kind):
            found = el.find(tag)
            if found is None:
                return None
            r.subs(tag)
            return kind.from_element(found)

        metadata = []
        meta = r.sub("metadata")
        if meta is not None:
            for child in meta.el:
                meta.subs(child.tag)
                if child.tag == GpuvirtMetadata.TAG:
                    metadata.append(GpuvirtMetadata.from_element(child))
                else:
                    metadata.append(Raw(copy.deepcopy(child)))
        mem = r.sub("memory")
        cur = r.sub("currentMemory")
        iothreads = r.sub("iothreads")
        devices = []
        devs = r.sub("devices")
        if devs is not None:
            for child in devs.el:
                devs.subs(child.tag)
                devices.append(device_from_element(child))
        dom = cls(
            type=r.get("type"), name=text("name"), uuid=text("uuid"), title=text("title"),
            description=text("description"), metadata=metadata,
            memory_kib=_kib(mem.text(), mem.get("unit"), "<memory>") if mem else None,
            current_memory_kib=(_kib(cur.text(), cur.get("unit"), "<currentMemory>")
                                if cur else None),
            memory_backing=typed("memoryBacking", MemoryBacking), vcpu=typed("vcpu", Vcpu),
            iothreads=_num(iothreads.text(), "<iothreads>") if iothreads else None,
            cputune=typed("cputune", CpuTune), numatune=typed("numatune", NumaTune),
            os=typed("os", Os), features=typed("features", Features), cpu=typed("cpu", Cpu),
            clock=typed("clock", Clock), on_poweroff=text("on_poweroff"),
            on_reboot=text("on_reboot"), on_crash=text("on_crash"), devices=devices,
            qemu_commandline=typed(QemuCommandline.TAG, QemuCommandline))
        dom.extras = r.finish()
        return dom

    def to_element(self):
        el = _element("domain", [("type", self.type)], self.extras)
        x = self.extras
        _sub(el, "name", (), x, text=self.name)
        _sub(el, "uuid", (), x, text=self.uuid)
        _sub(el, "title", (), x, text=self.title)
        _sub(el, "description", (), x, text=self.description)
        if self.metadata:
            meta = _sub(el, "metadata", (), x, force=True)
            for item in self.metadata:
                meta.append(item.to_element())
        if self.memory_kib is not None:
            _sub(el, "memory", [("unit", "KiB")], x, text=self.memory_kib)
        if self.current_memory_kib is not None:
            _sub(el, "currentMemory", [("unit", "KiB")], x, text=self.current_memory_kib)
        _append(el, self.memory_backing)
        _append(el, self.vcpu)
        _sub(el, "iothreads", (), x, text=self.iothreads)
        _append(el, self.cputune)
        _append(el, self.numatune)
        _append(el, self.os)
        _append(el, self.features)
        _append(el, self.cpu)
        _append(el, self.clock)
        _sub(el, "on_poweroff", (), x, text=self.on_poweroff)
        _sub(el, "on_reboot", (), x, text=self.on_reboot)
        _sub(el, "on_crash", (), x, text=self.on_crash)
        devices = _sub(el, "devices", (), x, force=True)
        for dev in self.devices:
            devices.append(dev.to_element())
        _finish(el, x)
        _append(el, self.qemu_commandline)  # last, where libvirt keeps it
        return el

    def to_xml(self):
        """The domain as libvirt-style XML text (two-space indentation, trailing newline)."""
        root = self.to_element()
        # Namespaces used outside <metadata> (qemu:commandline and the like) are declared on
        # <domain>, where libvirt declares them; metadata elements declare their own, as
        # libvirt stores each of them on its own.
        outside = _uris(root, skip_tag="metadata")
        return _serialize(root, self.namespaces, predeclare=outside) + "\n"

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The collection's only gateway to libvirt. Private to this collection.

Every other module talks to libvirt through :class:`LibvirtGateway`; tests swap the URI
(``test:///default`` or a private ``qemu:///session``), never patch classes. It hands out XML
text, names and states, and takes XML text: reading what a domain holds is ``_holdings``' work,
on the XML model of ``_domain``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

try:
    import libvirt
except ImportError:  # reported by the module with missing_required_lib()
    libvirt = None
try:
    import libvirt_qemu  # the guest agent's commands (same libvirt-python package)
except ImportError:
    libvirt_qemu = None


DEFAULT_URI = "qemu:///system"


class LibvirtGatewayError(Exception):
    """A libvirt call failed; the message carries libvirt's own words."""


def has_libvirt():
    return libvirt is not None


@dataclass(frozen=True)
class DomainXml:
    """One defined domain as libvirt reports it: its name, power state and XML text."""

    name: str
    active: bool
    xml: str  # the inactive definition: what the next start uses
    live_xml: str | None = None  # the running definition (list_domains(live=True), running only)


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

    def versions(self):
        """(libvirt's version, the hypervisor's version) as libvirt packs them, or None each."""
        out = []
        for call in (self.conn.getLibVersion, self.conn.getVersion):
            try:
                out.append(call())
            except libvirt.libvirtError:
                out.append(None)
        return tuple(out)

    def _list_domains(self):
        try:
            return self.conn.listAllDomains(0)
        except libvirt.libvirtError as exc:
            raise LibvirtGatewayError("cannot list domains at %r: %s" % (self.uri, exc)) from exc

    def list_domains(self, live=False):
        """[DomainXml] of every defined domain, running or not (a device is taken by either),
        sorted by name; with ``live``, running ones carry their live XML too."""
        result = []
        for dom in self._list_domains():
            try:
                xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                active = bool(dom.isActive())
                live_xml = dom.XMLDesc(0) if live and active else None
                name = dom.name()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # undefined while we listed
                raise LibvirtGatewayError("cannot read domain %s: %s" % (dom.name(), exc)) from exc
            result.append(DomainXml(name=name, active=active, xml=xml, live_xml=live_xml))
        return sorted(result, key=lambda d: d.name)

    def volume_path(self, pool, volume):
        """The path of a storage-pool volume, or None when the pool or volume is gone."""
        try:
            return self.conn.storagePoolLookupByName(pool).storageVolLookupByName(volume).path()
        except libvirt.libvirtError:
            return None  # a pool that is gone holds no file we could protect

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

    def agent_command(self, name, command, arguments=None, timeout=10):
        """One QEMU guest agent command to a running domain; the agent's ``return`` value.

        Raises LibvirtGatewayError with libvirt's words when the domain has no agent channel or
        no agent answers on it within timeout seconds.
        """
        dom = self._require(name)
        if libvirt_qemu is None:
            raise LibvirtGatewayError("libvirt-python has no libvirt_qemu module here; it "
                                      "sends the guest agent's commands")
        request = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        try:
            reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(request), int(timeout), 0)
        except libvirt.libvirtError as exc:
            raise LibvirtGatewayError(exc.get_error_message()) from exc
        try:
            return json.loads(reply).get("return")
        except (TypeError, ValueError, AttributeError) as exc:
            raise LibvirtGatewayError("the guest agent of %s answered %r, not JSON"
                                      % (name, reply)) from exc

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

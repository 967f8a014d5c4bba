# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""VMs that really start on this machine's libvirtd (qemu:///system), driven from Python.

The libvirt gateway's lifecycle (define, start, ACPI shutdown that times out, forced power-off,
undefine) and a CPU-only VM placed on this machine's own topology whose pinning takes effect in
the running QEMU. They left tests/unit because they start VMs; runme.sh runs them with pytest.
Every domain is named gpuvirt-it-* and removed at the end of its test.
"""

import os
import shutil
import subprocess
import tempfile
import uuid

import pytest

import libvirt
from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import Domain
from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain_builder import build_domain
from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import (
    read_domain,
    read_domains,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
    LibvirtGateway,
    LibvirtGatewayError,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement import HostState
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import (
    PlacementError,
    Request,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import PLATFORMS
from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_host
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_spec import (
    DiskSpec,
    NetworkSpec,
    VmSpec,
    make_spec,
)


@pytest.fixture
def system_gateway():
    gateway = LibvirtGateway("qemu:///system")
    yield gateway
    gateway.close()


def _remove(conn, name):
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    if dom.isActive():
        dom.destroy()
    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


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


def test_lifecycle_of_a_tiny_vm(system_gateway):
    gw = system_gateway
    name = "gpuvirt-it-%s" % uuid.uuid4().hex[:8]
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
        allocs = read_domains(gw.list_domains())
        assert allocs[name].memory_kib == 64 * 1024
        gw.undefine(name)
        assert gw.state(name) is None
    finally:
        if gw.state(name) is not None:
            gw.destroy(name)
            gw.undefine(name)


def test_tiny_vm_runs_on_this_host():
    """A CPU-only VM placed on this machine's real topology starts, pinned, and reads back."""
    conn = libvirt.open("qemu:///system")
    topo = read_host()
    name = "gpuvirt-it-%s" % uuid.uuid4().hex[:8]
    try:
        placement = HostState(topo, PLATFORMS["generic"]).place(
            Request(name, gpus=0, vcpus=1, memory_mb=64))
    except PlacementError as exc:
        pytest.fail("this machine has no unreserved CPU to pin: %s" % exc)
    # QEMU runs as its own user: the folder must be reachable (pytest's tmp_path is 0700), and
    # on a disk (cache='none' opens with O_DIRECT, which tmpfs refuses).
    folder = tempfile.mkdtemp(prefix="gpuvirt-it-", dir="/var/tmp")
    os.chmod(folder, 0o755)
    try:
        base, overlay = os.path.join(folder, "base.qcow2"), os.path.join(folder, "os.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "16M"], check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                        overlay], check=True)
        spec = make_spec(
            placement, topo, disks=[DiskSpec(role="os", path=overlay, size_gb=1, backing=base)],
            networks=[NetworkSpec(type="user")],
            domain_type="kvm" if os.path.exists("/dev/kvm") else "qemu",
            # This machine's software KVM (kvm_pvm) refuses MSR 0x10a (IA32_ARCH_CAPABILITIES).
            cpu_disable_features=["arch-capabilities"] if os.path.exists("/dev/kvm") else ())
        try:
            dom = conn.defineXML(build_domain(spec, topo).to_xml())
            dom.create()
            state, _reason = dom.state()
            assert state == libvirt.VIR_DOMAIN_RUNNING
            # The pinning took effect in the running QEMU, not only in the XML.
            _info, cpumaps = dom.vcpus()
            assert [c for c, on in enumerate(cpumaps[0]) if on] == list(spec.cpus)
            emulator = dom.emulatorPinInfo()
            assert [c for c, on in enumerate(emulator) if on] == list(spec.emulator_cpus)
            inactive = Domain.from_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            assert VmSpec.from_domain(inactive) == spec
            live = read_domain(dom.XMLDesc(0), active=True)
            assert live.pinned_cpus == tuple(sorted(spec.cpus)) and live.managed
        finally:
            _remove(conn, name)
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        conn.close()

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The libvirt qemu hook of a shared-NVSwitch host: a tenant's Fabric Manager partition is active
while its VM runs, however the VM is started or stopped. Private.

libvirt runs ``/etc/libvirt/hooks/qemu NAME OPERATION SUB-OPERATION EXTRA`` with the domain's XML
on stdin at every start and stop: ``virsh start``, ``shutdown`` and ``destroy``, autostart after a
reboot, and this collection's modules alike. For a domain whose gpuvirt metadata records
``fm_partition`` (``kvm_vm`` records it when ``fabric_manager`` is set):

- ``prepare begin``, before libvirt touches the devices: activate the partition. When Fabric
  Manager refuses or cannot be reached the hook exits 1 with FM's reason on stderr, and libvirt
  refuses the start with that reason. (NVIDIA's own hook lets the VM boot without NVLink and
  says nothing.) A partition already active for this domain is kept.
- ``release end``, once QEMU is gone (after a failed start too): deactivate the partition, but
  only if this domain activated it. A start that failed because another domain holds the
  partition must not take it from that domain.

Every other call, and every domain without the record, exits 0 at once, with one exception:
when Fabric Manager runs in a service VM (the settings name that domain, ``service_vm``), the
service VM's ``started begin`` starts ``gpuvirt-fabric-redeclare --wait`` detached and exits 0.
A hook must not call libvirt while libvirt waits on it, and the FM in the VM needs a while to
come up; the detached run waits for it, then declares the running tenants' partitions
(:func:`redeclare`), or does nothing when FM started afresh.

After Fabric Manager restarts (``FABRIC_MODE_RESTART=1``) it waits 60 s to be told which
partitions are still in use, else it drops them all. :func:`redeclare` tells it: the partitions
recorded in the live definitions of the running domains (``fmpm --set-activated-list``), and
makes the hook's records match. ``roles/kvm_host/files/gpuvirt-fabric-redeclare`` runs it, and
``gpuvirt-fabric-redeclare.service`` runs that each time ``nvidia-fabricmanager`` starts.

It runs on the host's own Python without Ansible: this module, ``_fabric``, ``_fabric_model``,
``_domain`` and its helpers (``_bdf``, ``_ranges``, ``_units``) are all it imports.
``roles/kvm_host/files/gpuvirt-qemu-hook`` is the script libvirt runs. Settings (FM's address,
the fmpm path) come from ``/etc/gpuvirt/fabric.json``; without it, FM on this host and fmpm on
PATH. Not yet done here: installing it (``kvm_host``), and skipping the GPU reset that libvirt
and QEMU do at start, which on boards without Autonomous Link Initialization (HGX-2, HGX A100)
leaves an activated partition's NVLinks down (NVIDIA/libvirt-hooks README).
"""

from __future__ import annotations

import os
import sys
import time

from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import Domain, DomainXmlError
from ansible_collections.gpuvirt.kvm.plugins.module_utils._fabric import (
    DEFAULT_HOOK_CONFIG,
    DEFAULT_HOOK_STATE,
    FabricManager,
    PartitionHolders,
    read_hook_config,
    start_detached,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._fabric_model import (
    FM_NOT_CONFIGURED,
    FM_NOT_SUPPORTED,
    FabricError,
    in_use_message,
)

# What the hook and the re-declaration import, and so what a host needs of the collection under
# /usr/local/lib/gpuvirt/hook/ansible_collections/gpuvirt/kvm/plugins/module_utils/.
HOST_FILES = ("_fabric_hook", "_fabric", "_fabric_model", "_domain", "_bdf", "_ranges", "_units",
              "_libvirt")

ACTIVATE = "activate"
DEACTIVATE = "deactivate"
HOOKED = {("prepare", "begin"): ACTIVATE, ("release", "end"): DEACTIVATE}
SERVICE_VM_STARTED = ("started", "begin")
# How long a detached re-declaration waits for FM in a service VM that has just started.
DEFAULT_SERVICE_VM_WAIT = 300
REDECLARE_SCRIPT = "gpuvirt-fabric-redeclare"  # under GPUVIRT_HOOK_LIB


def decide(argv, xml_text):
    """(ACTIVATE or DEACTIVATE, partition ID) for one hook call, or (None, None).

    ``argv``: the hook's arguments (domain, operation, sub-operation, extra). Raises
    DomainXmlError when a hooked call brings XML that records a partition but cannot be read."""
    if len(argv) < 3:
        return None, None
    action = HOOKED.get((argv[1], argv[2]))
    if action is None or "fm_partition" not in xml_text:  # most calls: nothing to parse
        return None, None
    meta = Domain.from_xml(xml_text).gpuvirt
    if meta is None or meta.fm_partition is None:
        return None, None
    return action, meta.fm_partition


def run(argv, xml_text, config=None, state_dir=DEFAULT_HOOK_STATE, fm=None):
    """Do what one hook call asks: (exit status, message for stderr)."""
    try:
        action, pid = decide(argv, xml_text)
    except DomainXmlError as exc:
        return 1, "gpuvirt fabric hook: %s: cannot read the domain XML: %s" % (argv[0], exc)
    if action is None:
        return 0, ""
    domain = argv[0]
    try:
        if fm is None:
            cfg = read_hook_config(DEFAULT_HOOK_CONFIG) if config is None else config
            fm = FabricManager(address=cfg.get("address"), fmpm=cfg.get("fmpm"),
                               starting_wait=cfg.get("starting_wait", 60))
        with PartitionHolders(state_dir) as holders:
            if action == ACTIVATE:
                return 0, _activate(fm, holders, domain, pid)
            return 0, _deactivate(fm, holders, domain, pid)
    except (FabricError, OSError) as exc:
        what = "start" if action == ACTIVATE else "release"
        tail = ("; the VM does not start" if action == ACTIVATE else
                "; the partition may still be active: check `fmpm -l` and run `fmpm -d %d` "
                "once nothing uses it" % pid)
        return 1, "gpuvirt fabric hook: %s (%s, Fabric Manager partition %d): %s%s" % (
            domain, what, pid, getattr(exc, "message", None) or exc, tail)


def _activate(fm, holders, domain, pid):
    held = holders.all()
    listing = fm.partitions()
    part = listing.get(pid)
    if part is None:
        raise FabricError(
            "Fabric Manager at %s lists no partition %d, which the domain's metadata records: "
            "its partitions changed since the VM was placed. Run kvm_vm for it again with "
            "fabric_manager set, with recreate: true if its GPUs must move" % (fm.address, pid))
    if part.active:
        if held.get(pid) == domain:  # a restart of the domain, or a record redeclare() wrote
            return "partition %d is already active for %s; kept" % (pid, domain)
        raise FabricError(in_use_message(fm.address, listing, pid, held) + (
            "" if pid in held else "; a domain started before the hook was installed may hold "
            "it: `fmpm -d %d` frees it once nothing uses it" % pid))
    # The record first: an activation whose record could not be written would leave an active
    # partition that no release ever deactivates.
    holders.record(pid, domain)
    try:
        fm.activate(pid, held)
    except FabricError:
        holders.forget(pid)
        raise
    return "activated partition %d for %s" % (pid, domain)


def _deactivate(fm, holders, domain, pid):
    holder = holders.all().get(pid)
    if holder != domain:
        return "partition %d was not activated for %s (%s); left as it is" % (
            pid, domain, "held by %s" % holder if holder else "no record")
    was_active = fm.deactivate(pid)
    holders.forget(pid)
    return "deactivated partition %d of %s%s" % (
        pid, domain, "" if was_active else " (it was no longer active)")


def running_partitions(domains):
    """{partition ID: domain name} recorded in the live definitions of the running domains
    (``_libvirt.DomainXml`` with ``live_xml``). Two running domains recording one partition, or
    partitions that share a GPU, cannot both be right: ValueError naming them."""
    held = {}
    for dom in domains:
        if not dom.active or "fm_partition" not in (dom.live_xml or dom.xml):
            continue
        meta = Domain.from_xml(dom.live_xml or dom.xml).gpuvirt
        if meta is None or meta.fm_partition is None:
            continue
        if meta.fm_partition in held:
            raise ValueError("running domains %s and %s both record Fabric Manager partition %d"
                             % (held[meta.fm_partition], dom.name, meta.fm_partition))
        held[meta.fm_partition] = dom.name
    return held


def redeclare(gateway, fm, holders):
    """Declare the running domains' partitions to a Fabric Manager that has just restarted, and
    rewrite the hook's records (``holders``, a PartitionHolders, locked here only while they are
    rewritten: a hook waits on that lock while libvirt holds its domain, so libvirt and FM are
    asked first). Returns {partition ID: domain name}, or None when FM was not waiting for a
    list (it started afresh, or has its list already)."""
    held = running_partitions(gateway.list_domains(live=True))
    try:
        fm.partitions(wait=False)  # the 60 s window does not allow a wait here
    except FabricError as exc:
        if exc.code != FM_NOT_CONFIGURED:
            raise
    else:
        return None  # FM answers: it is not in its restart window
    try:
        fm.declare_active(sorted(held))
    except FabricError as exc:
        if exc.code != FM_NOT_SUPPORTED:
            raise
        return None  # it was starting afresh (at boot), not waiting for a list
    with holders:
        for pid in holders.all():
            if pid not in held:
                holders.forget(pid)
        for pid, name in held.items():
            holders.record(pid, name)
    return held


def redeclare_main(argv=None, stdout=None, stderr=None, uri="qemu:///system",
                   config_path=DEFAULT_HOOK_CONFIG, state_dir=DEFAULT_HOOK_STATE,
                   sleep=time.sleep, clock=time.monotonic, retry_interval=2.0):
    """``gpuvirt-fabric-redeclare [--wait SECONDS]``: redeclare() on this host; returns the exit
    status. With ``--wait`` (the hook's detached run at a service VM's start) a Fabric Manager
    that cannot be reached yet is tried again until the time is up."""
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
        LibvirtGateway,
        LibvirtGatewayError,
    )

    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    argv = sys.argv[1:] if argv is None else list(argv)
    wait = 0.0
    if argv[:1] == ["--wait"] and len(argv) == 2 and argv[1].isdigit():
        wait = float(argv[1])  # FM in a service VM that has just started: wait to reach it
    elif argv:
        stderr.write("usage: gpuvirt-fabric-redeclare [--wait SECONDS]\n")
        return 2
    try:
        config = read_hook_config(config_path)
        # One look at FM's list: NOT_CONFIGURED then means "waiting for the list" (or still
        # starting; declare_active keeps trying that for starting_wait).
        fm = FabricManager(address=config.get("address"), fmpm=config.get("fmpm"),
                           starting_wait=config.get("starting_wait", 60))
        deadline = clock() + wait
        while True:
            try:
                with LibvirtGateway(uri) as gateway:
                    held = redeclare(gateway, fm, PartitionHolders(state_dir))
                break
            except FabricError as exc:
                if not exc.unreachable or clock() + retry_interval > deadline:
                    raise
                sleep(retry_interval)  # the service VM's FM is not listening yet
    except (FabricError, LibvirtGatewayError, DomainXmlError, ValueError, OSError) as exc:
        why = getattr(exc, "message", None) or exc
        stderr.write("gpuvirt-fabric-redeclare: %s; the running tenants may have no NVLink "
                     "until their partitions are declared\n" % why)
        return 1
    if held is None:
        stdout.write("Fabric Manager is not waiting for a list of active partitions; nothing "
                     "declared\n")
        return 0
    said = ", ".join("partition %d (%s)" % kv for kv in sorted(held.items()))
    stdout.write("declared %s\n" % (said or "no active partition (no running tenant records one)"))
    return 0


def spawn_redeclare(config, state_dir, env=None):
    """Start ``gpuvirt-fabric-redeclare --wait N`` detached from the hook (a session of its own,
    no stdin, its output in ``state_dir/redeclare.log``); returns the Popen."""
    env = dict(os.environ if env is None else env)
    lib = env.get("GPUVIRT_HOOK_LIB") or os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))))
    wait = int(config.get("service_vm_wait", DEFAULT_SERVICE_VM_WAIT))
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    with open(os.path.join(state_dir, "redeclare.log"), "a", encoding="utf-8") as log:
        log.write("%s: %s started; waiting up to %d s for Fabric Manager\n" % (
            time.strftime("%Y-%m-%dT%H:%M:%S"), config["service_vm"], wait))
        log.flush()
        return start_detached([os.path.join(lib, REDECLARE_SCRIPT), "--wait", str(wait)], log, env)


def main(argv=None, stdin=None, stderr=None, config_path=DEFAULT_HOOK_CONFIG,
         state_dir=DEFAULT_HOOK_STATE, spawn=spawn_redeclare):
    """The hook as libvirt runs it; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    stdin = sys.stdin if stdin is None else stdin
    stderr = sys.stderr if stderr is None else stderr
    if len(argv) < 3 or (argv[1], argv[2]) not in tuple(HOOKED) + (SERVICE_VM_STARTED,):
        return 0  # libvirt's XML is not even read
    try:
        config = read_hook_config(config_path)
    except FabricError as exc:
        stderr.write("gpuvirt fabric hook: %s\n" % exc.message)
        return 1
    if (argv[1], argv[2]) == SERVICE_VM_STARTED:
        # Never fail here: the service VM runs already, and a late declaration can be made by
        # hand (gpuvirt-fabric-redeclare); say why it was not started.
        if config.get("service_vm") and argv[0] == config["service_vm"]:
            try:
                spawn(config, state_dir)
            except OSError as exc:
                stderr.write("gpuvirt fabric hook: %s started, but gpuvirt-fabric-redeclare "
                             "could not be started (%s); run it by hand within Fabric "
                             "Manager's 60 s\n" % (argv[0], exc))
        return 0
    status, message = run(argv, stdin.read(), config=config, state_dir=state_dir)
    if status and message:
        stderr.write(message + "\n")
    return status

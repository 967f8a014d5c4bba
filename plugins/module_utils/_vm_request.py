# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""A VM as the user asks for it: kvm_vm's options, checked once for every caller. Private.

:data:`VM_OPTIONS` is the one argument spec of a VM request, with its constraints. kvm_vm
types its options with it (AnsibleModule), kvm_layout types each entry and ``defaults`` with
it, gpu_topology's ``plan`` entries are a subset of it, and the fleet_plan filter types the
placement keys of its requests with it. Each then goes through :func:`request_from_params`,
which checks the constraints and what no spec can say (names, sizes, ranges) and returns a
:class:`VmRequest`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ansible_collections.gpuvirt.kvm.plugins.module_utils._argspec import (
    ArgSpecError,
    ArgumentSpec,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._cloud_init import CloudInitError
from ansible_collections.gpuvirt.kvm.plugins.module_utils._cloud_init import (
    check as check_cloud_init,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import NIC_MODES, NICS_AUTO
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import (
    CPU_POLICIES,
    POLICY_DEDICATED,
    Request,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import gpu_model_ids
from ansible_collections.gpuvirt.kvm.plugins.module_utils._units import parse_size_mb
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_spec import (
    CPU_MODES,
    DOMAIN_TYPES,
    FIRMWARES,
    NetworkSpec,
)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STATES = ("present", "running", "stopped", "absent")

# The options placement reads (gpu_topology's plan entries, the fleet planner).
PLACEMENT_OPTIONS = ("name", "gpus", "gpu_index", "gpu_model", "vcpus", "memory", "cpu_policy",
                     "hugepages", "nics", "nic_mode", "nics_allow_fewer")


class VmError(Exception):
    """A VM cannot be converged; the message names the VM, the option and the fix."""


NIC_OPTIONS = ArgumentSpec(
    dict(network=dict(type="str"), bridge=dict(type="str"), user=dict(type="bool"),
         mac=dict(type="str")),
    mutually_exclusive=[("network", "bridge", "user")],
    required_one_of=[("network", "bridge", "user")],
    labels={"network": "network (a libvirt network)", "bridge": "bridge (a host bridge)",
            "user": "user: true"})

CLOUD_INIT_OPTIONS = ArgumentSpec(dict(
    hostname=dict(type="str"), user=dict(type="str"),
    ssh_authorized_keys=dict(type="list", elements="str", no_log=False),
    password_hash=dict(type="str", no_log=True),
    user_data=dict(type="raw"),
    packages=dict(type="list", elements="str"),
    runcmd=dict(type="list", elements="raw"),
    write_files=dict(type="list", elements="dict"),
    mounts=dict(type="list", elements="list"),
    data_disk_mount=dict(type="str"),
    network_config=dict(type="dict")))

VM_OPTIONS = ArgumentSpec(
    dict(
        name=dict(type="str", required=True),
        state=dict(type="str", choices=list(STATES), default="running"),
        gpus=dict(type="int"),
        gpu_index=dict(type="int"),
        gpu_model=dict(type="str"),
        nics=dict(type="raw"),
        nic_mode=dict(type="str", choices=list(NIC_MODES)),
        nics_allow_fewer=dict(type="bool"),
        fabric_manager_vm=dict(type="bool"),
        image=dict(type="str"),
        vcpus=dict(type="int"),
        memory=dict(type="raw"),
        os_disk_size=dict(type="raw"),
        data_disk_size=dict(type="raw"),
        networks=dict(type="list", elements="dict", options=NIC_OPTIONS),
        cloud_init=dict(type="dict", options=CLOUD_INIT_OPTIONS),
        cpu_policy=dict(type="str", choices=list(CPU_POLICIES)),
        hugepages=dict(type="bool"),
        cpu_mode=dict(type="str", choices=list(CPU_MODES)),
        cpu_disable_features=dict(type="list", elements="str"),
        domain_type=dict(type="str", choices=list(DOMAIN_TYPES)),
        firmware=dict(type="str", choices=list(FIRMWARES)),
        force=dict(type="bool", default=False),
        timeout=dict(type="int", default=120),
        remove_data=dict(type="bool", default=False),
        recreate=dict(type="bool", default=False),
        owner_tag=dict(type="str"),
    ),
    required_by={"gpu_index": "gpus"},
    reasons={"gpu_index": "gpu_index is the first GPU of a gpus-sized block"})

# A kvm_layout entry: kvm_vm's options for one VM (where a run keeps its files, O(store) and
# O(disk_dir), are options of the run, given to the modules themselves).
LAYOUT_VM_KEYS = tuple(VM_OPTIONS.options)
LAYOUT_ENTRY = VM_OPTIONS
# gpu_topology's plan entries: what placement reads, with the values a new VM gets.
PLAN_ENTRY = VM_OPTIONS.subset(PLACEMENT_OPTIONS, defaults={
    "gpus": 0, "cpu_policy": POLICY_DEDICATED, "hugepages": False, "nics": 0,
    "nic_mode": "auto", "nics_allow_fewer": False})


def vm_argspec():
    """The options of one VM (kvm_vm adds where the run keeps its files, and the host, libvirt
    and lock options)."""
    return VM_OPTIONS.argument_spec


def plan_entry_argspec():
    """gpu_topology's ``plan`` entry options."""
    return PLAN_ENTRY.argument_spec


@dataclass(frozen=True)
class VmRequest:
    """One VM as the user declared it (kvm_vm's options, or one entry of kvm_layout's vms)."""

    # None: not given. A new VM then gets CREATE_DEFAULTS; an existing VM keeps what it has
    # (resolve() fills these in once the domain has been read).
    name: str
    state: str = "running"
    gpus: int | None = None
    gpu_index: int | None = None
    gpu_model: str | None = None  # None: GPUs of one model; "any"; a model name or PCI ID
    nics: object = None  # rail NICs: "auto", a count, 0; None: a new VM none, a VM its own
    nic_mode: str | None = None  # auto | whole | vf
    nics_allow_fewer: bool | None = None
    fabric_manager_vm: bool | None = None  # the Fabric Manager service VM (every NVSwitch)
    image: str | None = None
    vcpus: int | None = None
    memory_mb: int | None = None
    os_disk_gb: int | None = None
    data_disk_gb: int | None = None
    networks: tuple | None = None  # NetworkSpec with mac possibly None
    cloud_init: dict | None = None
    cpu_policy: str | None = None
    hugepages: bool | None = None
    cpu_mode: str | None = None
    cpu_disable_features: tuple | None = None
    domain_type: str | None = None
    firmware: str | None = None
    force: bool = False
    timeout: int = 120
    remove_data: bool = False
    recreate: bool = False
    owner_tag: str | None = None


def _size_gb(value, option):
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        mib = value * 1024  # a bare number is GiB for disks
    else:
        text = str(value).strip()
        mib = parse_size_mb(int(text) * 1024 if text.isdigit() else text, option)
    if mib % 1024:
        raise VmError("%s: %r is not a whole number of GiB" % (option, value))
    return mib // 1024


def request_from_params(p, where=""):
    """Check kvm_vm-style options (a typed mapping) into a VmRequest. Raises VmError."""
    prefix = where + "." if where else ""
    name = p.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise VmError(
            "%sname: %r is not a valid VM name; use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit" % (prefix, name))
    state = p.get("state") or "running"
    if state not in STATES:
        raise VmError("%sstate: %r is not one of %s" % (prefix, state, ", ".join(STATES)))
    try:
        VM_OPTIONS.check(p, where)
    except ArgSpecError as exc:
        raise VmError(str(exc)) from exc
    for option in ("gpus", "gpu_index", "vcpus", "timeout"):
        if isinstance(p.get(option), bool):
            # Ansible types true as the int 1; a flag where a count belongs is a mistake.
            raise VmError("%s%s: %r is not a number" % (prefix, option, p[option]))
    if p.get("remove_data") and state != "absent":
        raise VmError("%sremove_data: only valid with state: absent (the data disk of %s is "
                      "kept otherwise)" % (prefix, name))
    gpus = p.get("gpus")
    if gpus is not None and gpus < 0:
        raise VmError("%sgpus: %d; give 0 or more (0 is a CPU-only VM)" % (prefix, gpus))
    if p.get("gpu_index") is not None:
        if not gpus:
            raise VmError("%sgpu_index: set, but gpus is 0; give gpus too (gpu_index is the "
                          "first GPU of a gpus-sized block)" % prefix)
        if p["gpu_index"] < 0:
            raise VmError("%sgpu_index: %d; GPU indexes start at 0" % (prefix, p["gpu_index"]))
    if p.get("gpu_model") is not None:
        try:
            gpu_model_ids(p["gpu_model"])
        except ValueError as exc:
            raise VmError("%sgpu_model: %s" % (prefix, exc)) from exc
    nics = p.get("nics")
    if nics is not None:
        text = str(nics).strip().lower()
        if isinstance(nics, bool) or not (text == NICS_AUTO or (text.isascii()
                                                                and text.isdigit())):
            raise VmError("%snics: %r; give auto (the rail NICs under the VM's GPUs), a number "
                          "of them, or 0 (docs/networking.md)" % (prefix, nics))
        nics = NICS_AUTO if text == NICS_AUTO else int(text)
        if nics and gpus == 0:
            raise VmError("%snics: %s, but gpus is 0; rail NICs go with GPUs" % (prefix, nics))
    memory_mb = None
    if p.get("memory") is not None:
        try:
            memory_mb = parse_size_mb(p["memory"], prefix + "memory")
        except ValueError as exc:
            raise VmError(str(exc)) from exc
    try:
        os_disk_gb = _size_gb(p.get("os_disk_size"), prefix + "os_disk_size")
        data_disk_gb = _size_gb(p.get("data_disk_size"), prefix + "data_disk_size")
    except ValueError as exc:
        raise VmError(str(exc)) from exc
    for option, size in (("os_disk_size", os_disk_gb), ("data_disk_size", data_disk_gb)):
        if size is not None and size < 1:
            raise VmError("%s%s: %r; give a size of 1 GiB or more (a number is GiB, or a "
                          "string with a unit such as 40GiB)" % (prefix, option, p.get(option)))
    if p.get("vcpus") is not None and p["vcpus"] < 1:
        raise VmError("%svcpus: %d; give 1 or more" % (prefix, p["vcpus"]))
    networks = None
    if p.get("networks") is not None:
        networks = tuple(
            NetworkSpec(type=kind, source=None if kind == "user" else net[kind],
                        mac=net.get("mac"))
            for net in p["networks"]
            for kind in [next(k for k in ("network", "bridge", "user") if net.get(k))])
    if p.get("cloud_init"):
        try:
            check_cloud_init(p["cloud_init"], prefix + "cloud_init")
        except CloudInitError as exc:
            raise VmError(str(exc)) from exc
    timeout = p.get("timeout")
    timeout = 120 if timeout is None else timeout
    if timeout < 0:
        raise VmError("%stimeout: %d; give seconds >= 0" % (prefix, timeout))
    return VmRequest(
        name=name, state=state, gpus=gpus, gpu_index=p.get("gpu_index"),
        gpu_model=p.get("gpu_model"), nics=nics, nic_mode=p.get("nic_mode"),
        nics_allow_fewer=p.get("nics_allow_fewer"),
        fabric_manager_vm=p.get("fabric_manager_vm"), image=p.get("image"),
        vcpus=p.get("vcpus"), memory_mb=memory_mb, os_disk_gb=os_disk_gb,
        data_disk_gb=data_disk_gb, networks=networks,
        cloud_init=p.get("cloud_init"), cpu_policy=p.get("cpu_policy"),
        hugepages=p.get("hugepages"), cpu_mode=p.get("cpu_mode"),
        cpu_disable_features=None if p.get("cpu_disable_features") is None
        else tuple(p["cpu_disable_features"]),
        domain_type=p.get("domain_type"), firmware=p.get("firmware"),
        force=bool(p.get("force")), timeout=timeout, remove_data=bool(p.get("remove_data")),
        recreate=bool(p.get("recreate")), owner_tag=p.get("owner_tag"),
    )


def check_unique(requests, wheres):
    """Raise VmError when two requests share a name (``wheres``: where each was written)."""
    seen = {}
    for req, where in zip(requests, wheres):
        if req.name in seen:
            raise VmError("%s.name: %r is listed twice (also %s); names must be unique" % (
                where, req.name, seen[req.name]))
        seen[req.name] = where


# What an option left out means for a VM that does not exist yet. An existing VM keeps its
# own value instead (sticky): `name` + `state: stopped` stops an 8-GPU OVMF VM on a bridge
# without touching its GPUs, firmware or NICs.
CREATE_DEFAULTS = {
    "gpus": 0,
    "cpu_policy": POLICY_DEDICATED,
    "hugepages": False,
    "networks": (NetworkSpec(type="network", source="default"),),
    "cpu_disable_features": (),
    "domain_type": "kvm",
    # "firmware" depends on the GPUs: see create_firmware().
}


def create_firmware(gpus):
    """A new VM's firmware when none is asked for: UEFI (OVMF) for GPU VMs, whose large BARs
    need a 64-bit PCI window the firmware must map (hardware.md section 5); BIOS without GPUs."""
    return "ovmf" if gpus else "bios"


def resolve(req, actual=None):
    """The request with every option left out filled in: from the VM (`actual`) or defaults."""
    if actual is None:
        fill = dict(CREATE_DEFAULTS, firmware=create_firmware(
            req.gpus if req.gpus is not None else CREATE_DEFAULTS["gpus"]))
    else:
        fill = {
            "gpus": len(actual.gpus),
            "cpu_policy": actual.cpu_policy,
            "hugepages": bool(actual.hugepage_kb),
            # The NICs as they are, MACs included; queues are sized again from the vCPUs.
            "networks": tuple(replace(n, queues=None) for n in actual.networks),
            "cpu_mode": actual.cpu_mode,
            "cpu_disable_features": tuple(actual.cpu_disable_features),
            "domain_type": actual.domain_type,
            "firmware": actual.firmware,
            "owner_tag": actual.owner_tag,
        }
        if req.domain_type is not None and req.domain_type != actual.domain_type:
            # A new domain type takes its own default CPU mode (host-passthrough for kvm,
            # maximum for TCG) unless cpu_mode is given.
            del fill["cpu_mode"]
        if req.gpus is None or req.gpus == len(actual.gpus):
            # Same template: its size stays (a new GPU count takes the new template's).
            fill.update(vcpus=actual.vcpus, memory_mb=actual.memory_mb)
    return replace(req, **{k: v for k, v in fill.items() if getattr(req, k) is None})


def placement_request(req, host=None):
    """What placement reads of a (resolved) request."""
    return Request(name=req.name, gpus=req.gpus, gpu_index=req.gpu_index, vcpus=req.vcpus,
                   memory_mb=req.memory_mb, cpu_policy=req.cpu_policy,
                   hugepages=req.hugepages, host=host, gpu_model=req.gpu_model,
                   nics=req.nics or 0, nic_mode=req.nic_mode or "auto",
                   nics_allow_fewer=bool(req.nics_allow_fewer),
                   fabric_service=bool(req.fabric_manager_vm),
                   replace_failed=bool(getattr(req, "recreate", False))
                   and getattr(req, "state", None) not in ("stopped", "absent"))


# --- the callers' entry points --------------------------------------------------------------------

def plan_requests(entries, option="plan"):
    """gpu_topology's ``plan`` entries (typed by AnsibleModule) -> placement Requests."""
    requests, wheres = [], []
    for n, entry in enumerate(entries):
        wheres.append("%s[%d]" % (option, n))
        requests.append(request_from_params(entry, wheres[-1]))
    check_unique(requests, wheres)
    return [placement_request(resolve(r)) for r in requests]


@dataclass(frozen=True)
class Exclusive:
    """kvm_layout's ``exclusive``: remove the collection's VMs the layout does not list."""

    listed: frozenset
    owner_tag: str | None = None  # only VMs carrying this tag (defaults.owner_tag)
    force: bool = False
    timeout: int = 120


def layout_requests(p, secrets=None):
    """kvm_layout's entries (``defaults`` merged, typed and checked like kvm_vm's options) ->
    ([VmRequest], Exclusive or None). Secrets (no_log values) are added to ``secrets``."""
    secrets = set() if secrets is None else secrets
    raw_defaults = p.get("defaults") or {}
    bad = sorted(k for k in raw_defaults if k not in LAYOUT_VM_KEYS or k == "name")
    if bad:
        raise VmError("defaults: unknown option(s) %s; accepted: %s" % (
            ", ".join(bad), ", ".join(k for k in LAYOUT_VM_KEYS if k != "name")))
    secrets |= LAYOUT_ENTRY.secrets(raw_defaults)  # before typing: an error may quote it
    try:
        # Typed like an entry, but nothing filled in (an entry's own value still wins).
        defaults = LAYOUT_ENTRY.without_defaults().typed(raw_defaults, "defaults")
    except ArgSpecError as exc:
        raise VmError(str(exc)) from exc
    defaults = {k: v for k, v in defaults.items() if v is not None and k in raw_defaults}
    requests, wheres = [], []
    for n, entry in enumerate(p["vms"]):
        where = "vms[%d]" % n
        if not isinstance(entry, dict):
            raise VmError("%s: expected a dict of kvm_vm options, got %r" % (where, entry))
        bad = sorted(k for k in entry if k not in LAYOUT_VM_KEYS)
        if bad:
            raise VmError("%s: unknown option(s) %s; accepted: %s" % (
                where, ", ".join(bad), ", ".join(LAYOUT_VM_KEYS)))
        merged = dict(raw_defaults)
        merged.update(entry)
        secrets |= LAYOUT_ENTRY.secrets(merged)
        try:
            typed = LAYOUT_ENTRY.typed(merged, where)
        except ArgSpecError as exc:
            raise VmError(str(exc)) from exc
        requests.append(request_from_params(typed, where))
        wheres.append(where)
    check_unique(requests, wheres)
    exclusive = None
    if p.get("exclusive"):
        if defaults.get("timeout") is not None and defaults["timeout"] < 0:
            # The removals' shutdown wait: checked here, as no entry may carry it.
            raise VmError("defaults.timeout: %d; give seconds >= 0" % defaults["timeout"])
        exclusive = Exclusive(listed=frozenset(r.name for r in requests),
                              owner_tag=defaults.get("owner_tag"),
                              force=bool(defaults.get("force", False)),
                              timeout=defaults.get("timeout", 120))
    return requests, exclusive


def exclusive_removals(domains, exclusive):
    """The requests that remove what ``exclusive`` does not keep: the collection's VMs (of its
    owner tag) that the layout does not list. ``domains``: {name: DefinedDomain}."""
    if exclusive is None:
        return []
    # With an owner tag in defaults, exclusive keeps to the VMs carrying that tag: several
    # layouts (teams, a demo) can then share one host without removing each other's VMs.
    return [VmRequest(name=name, state="absent", force=exclusive.force,
                      timeout=exclusive.timeout)
            for name, dom in sorted(domains.items())
            if dom.managed and name not in exclusive.listed
            and (exclusive.owner_tag is None
                 or dom.metadata.get("owner_tag") == exclusive.owner_tag)]

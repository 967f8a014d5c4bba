# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Everything converging some VMs needs to know of the host, read before anything is decided.
Private.

:func:`observe` reads, once per run: every defined domain's XML (through ``_holdings``), the
libvirt networks when a request names NICs, whether each of the requested VMs' own files
exist, the images new OS disks would be built on, the real size of the disks a request
resizes, and which disks a running VM's QEMU has open. ``_vm_plan.plan`` then decides from
this :class:`Snapshot` alone, and ``_vm_apply`` acts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ansible_collections.gpuvirt.kvm.plugins.module_utils import _qemu_img
from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import Domain
from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import read_domains
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_plan import (
    disk_paths,
    image_move,
    os_path,
    other_os_path,
    own_disks,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_spec import VmSpec


@dataclass
class Snapshot:
    """The host as one run found it (plain data; ``_vm_plan`` decides from it alone)."""

    domains: dict = field(default_factory=dict)  # name -> DefinedDomain, every defined domain
    specs: dict = field(default_factory=dict)  # name -> VmSpec of a requested managed domain
    networks: dict | None = None  # libvirt network -> active?; None: not read (not needed)
    paths: dict = field(default_factory=dict)  # path -> exists? (os.path.lexists)
    sizes: dict = field(default_factory=dict)  # path -> virtual size (bytes) or error text
    live_disks: dict = field(default_factory=dict)  # running VM -> paths its QEMU has open
    images: dict = field(default_factory=dict)  # image ref -> (Image, real path) or error text

    def exists(self, path):
        """Whether a file the run may create or remove exists (observed for every such path)."""
        return self.paths[path]


def observe(gateway, ctx, requests, domains=None):
    """A Snapshot for these requests. ``domains`` ({name: DefinedDomain}) when already read
    in this run (under the same lock)."""
    snap = Snapshot(domains=read_domains(gateway.list_domains()) if domains is None
                    else domains)
    if any(r.state != "absent" and (r.networks is not None or r.name not in snap.domains)
           for r in requests):
        # NICs a VM already has are not checked again: the networks are read only when a
        # request names NICs or creates a VM.
        snap.networks = gateway.networks()
    for req in requests:
        dom = snap.domains.get(req.name)
        if dom is not None and dom.managed:
            snap.specs[req.name] = VmSpec.from_domain(dom.domain)
        _observe_files(snap, ctx, req, snap.specs.get(req.name))
        if dom is not None and dom.active and (any(
                p in snap.sizes for p in _disk_paths_of(snap, ctx, req)) or _kept_overlay(
                    snap, ctx, req)):
            live = Domain.from_xml(gateway.domain_xml(req.name, inactive=False))
            snap.live_disks[req.name] = frozenset(d.source for d in live.disks if d.source)
    return snap


def _kept_overlay(snap, ctx, req):
    """Whether the OS overlay an image move kept is there (the plan removes it once the VM
    runs without it: the live definition says so)."""
    spec = snap.specs.get(req.name)
    current = os_path(spec, own=True) if spec else None
    paths = disk_paths(ctx.disk_dir, req.name)
    return current in (paths["os"], paths["os_alt"]) and snap.paths.get(
        other_os_path(paths, current), False)


def _disk_paths_of(snap, ctx, req):
    paths = list(disk_paths(ctx.disk_dir, req.name).values())
    spec = snap.specs.get(req.name)
    if spec is not None:
        paths += [d.path for d in spec.disks if d.path]
    return paths


def _observe_files(snap, ctx, req, spec):
    own = {d.role: d for d in own_disks(spec)} if spec is not None else {}
    paths = disk_paths(ctx.disk_dir, req.name)
    for path in list(paths.values()) + [d.path for d in own.values()]:
        if path not in snap.paths:
            snap.paths[path] = os.path.lexists(path)
    if req.state == "absent":
        return
    if ("os" not in own or image_move(req, spec)) and req.image and req.image not in snap.images:
        try:
            image = ctx.store.resolve(req.image)
            snap.images[req.image] = (image, os.path.realpath(image.path))
        except _qemu_img.ImagesError as exc:
            snap.images[req.image] = str(exc)
    # The real size of a disk is read only when a request asks for a size other than the one
    # recorded: a no-op run makes no qemu-img call.
    if "os" in own and req.os_disk_gb is not None and req.os_disk_gb != own["os"].size_gb:
        _read_size(snap, own["os"].path)
    data = own.get("data")
    data_path = data.path if data is not None else paths["data"]
    if req.data_disk_gb is not None and req.data_disk_gb != (data.size_gb if data else None) \
            and (data is not None or snap.paths[data_path]):
        _read_size(snap, data_path)


def _read_size(snap, path):
    try:
        snap.sizes[path] = _qemu_img.info(path, backing_chain=False).virtual_size
    except _qemu_img.ImagesError as exc:
        snap.sizes[path] = str(exc)

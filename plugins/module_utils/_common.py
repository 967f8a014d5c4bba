# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Argument specs shared by the modules (twins of the doc fragments). Private."""

from __future__ import annotations

from ansible.module_utils.basic import env_fallback, missing_required_lib

from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
    DEFAULT_URI,
    LibvirtGateway,
    LibvirtGatewayError,
    has_libvirt,
)


def host_argspec():
    """Options of the gpuvirt.kvm.host doc fragment."""
    return dict(
        sysfs_root=dict(type="path", default="/sys"),
        proc_root=dict(type="path", default="/proc"),
        platform=dict(type="str", default="auto"),
        nvidia_smi_topo=dict(type="str"),
        unhealthy_gpus=dict(type="list", elements="str", default=[]),
        reserved_cpus=dict(type="str"),
        reserved_memory_mb=dict(type="int"),
    )


def libvirt_argspec():
    """Options of the gpuvirt.kvm.host.LIBVIRT doc fragment."""
    # No default here: a default would win over env_fallback; resolve_uri() supplies it.
    return dict(uri=dict(type="str", fallback=(env_fallback, ["LIBVIRT_DEFAULT_URI"])))


def resolve_uri(uri):
    """The URI to use: the option (or LIBVIRT_DEFAULT_URI), else qemu:///system."""
    return uri or DEFAULT_URI


def connect_or_fail(module):
    """A LibvirtGateway for the module's uri option, or fail_json saying what is missing."""
    if not has_libvirt():
        module.fail_json(msg=missing_required_lib("libvirt-python"))
    try:
        return LibvirtGateway(resolve_uri(module.params["uri"]))
    except LibvirtGatewayError as exc:
        module.fail_json(msg="uri: %s" % exc)

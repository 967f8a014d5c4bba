# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The host_picture and fleet_page filters (documented in host_picture.yml and fleet_page.yml):
thin shells over module_utils._picture, which draws."""

from __future__ import annotations

from collections.abc import Mapping

from ansible.errors import AnsibleFilterError
from jinja2 import Undefined

from ansible_collections.gpuvirt.kvm.plugins.module_utils import _picture


def host_picture(topology):
    """A gpu_topology result -> the picture's data (what the layout report carries)."""
    try:
        return _picture.picture_data(topology)
    except _picture.PictureError as exc:
        raise AnsibleFilterError("host_picture: %s" % exc) from None


def _lookup(mapping, host, key):
    try:
        if host not in mapping:
            return None
        value = mapping[host]
        value = value[key] if key in value else None
    except (KeyError, TypeError):
        return None
    if value is None or isinstance(value, Undefined):
        return None
    return value


def _picture_in(value):
    """A picture, or a report (the layout report) that carries one, or None."""
    if not isinstance(value, Mapping):
        return None
    if "devices" in value and "format" in value:
        return dict(value)
    picture = value.get("picture")
    return dict(picture) if isinstance(picture, Mapping) else None


def fleet_page(hosts, hostvars=None, key="gpu_vms_report", title="gpuvirt.kvm fleet"):
    """The fleet's HTML page from host names or fleet_summary entries (and hostvars)."""
    if not isinstance(hosts, (list, tuple)):
        raise AnsibleFilterError("fleet_page: expected a list of hosts (names, or the entries of "
                                 "fleet_summary), got %s" % type(hosts).__name__)
    entries = []
    for item in hosts:
        entry = dict(item) if isinstance(item, Mapping) else {"host": "%s" % item}
        if not entry.get("host"):
            raise AnsibleFilterError("fleet_page: each entry needs a host, got %r" % (item,))
        picture = _picture_in(entry)
        if picture is None and hostvars is not None:
            picture = _picture_in(_lookup(hostvars, entry["host"], key))
        entry["picture"] = picture
        entries.append(entry)
    try:
        return _picture.fleet_page(entries, title=title)
    except _picture.PictureError as exc:
        raise AnsibleFilterError("fleet_page: %s" % exc) from None


class FilterModule:
    def filters(self):
        return {"host_picture": host_picture, "fleet_page": fleet_page}

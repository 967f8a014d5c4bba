# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What a VM's cloud-init NoCloud seed holds (``_seed`` writes it as an ISO). Private, pure."""

from __future__ import annotations

import hashlib
import json


def render(name, cloud_init):
    """The NoCloud files for a VM: {'meta-data': str, 'user-data': str}.

    JSON is valid YAML, so the files are written as JSON: stable, and no YAML library is needed
    on the managed host.
    """
    cloud_init = cloud_init or {}
    meta = {"instance-id": name, "local-hostname": cloud_init.get("hostname") or name}
    user = {"hostname": cloud_init.get("hostname") or name, "preserve_hostname": False}
    login = cloud_init.get("user")
    keys = list(cloud_init.get("ssh_authorized_keys") or [])
    if login:
        entry = {"name": login, "groups": ["sudo"], "shell": "/bin/bash",
                 "sudo": "ALL=(ALL) NOPASSWD:ALL", "lock_passwd": True}
        if keys:
            entry["ssh_authorized_keys"] = keys
        if cloud_init.get("password_hash"):
            entry["passwd"] = cloud_init["password_hash"]
            entry["lock_passwd"] = False
        user["users"] = ["default", entry]
    elif keys:
        user["ssh_authorized_keys"] = keys
    return {
        "meta-data": json.dumps(meta, indent=2, sort_keys=True) + "\n",
        "user-data": "#cloud-config\n" + json.dumps(user, indent=2, sort_keys=True) + "\n",
    }


def digest(files):
    """A short content hash of the seed files (stored in the VM's metadata to spot changes)."""
    h = hashlib.sha256()
    for key in sorted(files):
        h.update(key.encode() + b"\0" + files[key].encode() + b"\0")
    return h.hexdigest()[:16]

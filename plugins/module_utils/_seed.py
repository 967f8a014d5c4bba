# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""cloud-init NoCloud seed ISOs (the only genisoimage caller). Private to this collection."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile

ISO_TOOLS = ("genisoimage", "mkisofs", "xorrisofs")


class SeedError(Exception):
    """The seed ISO could not be written."""


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


def iso_tool():
    for tool in ISO_TOOLS:
        path = shutil.which(tool)
        if path:
            return path
    return None


def write_iso(path, files):
    """Write a NoCloud seed ISO (volume id cidata) atomically to path."""
    tool = iso_tool()
    if tool is None:
        raise SeedError("cloud_init needs genisoimage, mkisofs or xorrisofs on the host "
                        "(Debian: apt-get install genisoimage); none was found")
    folder = tempfile.mkdtemp(prefix=".seed-", dir=os.path.dirname(path) or ".")
    try:
        for name, text in files.items():
            with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
                handle.write(text)
        tmp_iso = os.path.join(folder, "seed.iso")
        argv = [tool, "-quiet", "-output", tmp_iso, "-volid", "cidata", "-joliet", "-rock"]
        argv += [os.path.join(folder, n) for n in sorted(files)]
        # Not AnsibleModule.run_command: this runs outside modules too (tests, tools).
        proc = subprocess.run(  # pylint: disable=ansible-bad-function
            argv, capture_output=True, text=True, check=False,
            env=dict(os.environ, LANG="C", LC_ALL="C"))
        if proc.returncode != 0:
            raise SeedError("%s failed (exit %d): %s" % (os.path.basename(tool), proc.returncode,
                                                         proc.stderr.strip()))
        # Only its owner (root; libvirt hands it to QEMU when the VM starts) may read it: it
        # can hold the password hash of cloud_init.
        os.chmod(tmp_iso, 0o600)
        os.replace(tmp_iso, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

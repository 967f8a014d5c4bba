# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What a VM's cloud-init NoCloud seed holds (``_seed`` writes it as an ISO). Private, pure.

The user-data is the user's own cloud-config (``user_data``) with ours merged in: our hostname,
user and keys only where the user's sets nothing; ``packages``, ``runcmd``, ``write_files`` and
``mounts`` appended to the user's lists; the data disk formatted (only when it holds nothing) and
mounted when ``data_disk_mount`` asks. ``network_config`` becomes the seed's network-config.
"""

from __future__ import annotations

import hashlib
import json
import re

# The data disk's filesystem label: how the guest finds it, whatever its device name.
DATA_LABEL = "gpuvirt-data"
# The data disk as the guest sees it: the second virtio disk (the OS disk is the first; the
# seed ISO is on SATA). Only formatted when blkid finds neither a filesystem nor a partition
# table on it, so a wrong guess never formats a disk that holds anything.
DATA_DEVICE = "/dev/vdb"
_MOUNT_RE = re.compile(r"^/[^\s,]*$")
# Lists of cloud-config that the options add to (after the user's own entries).
LIST_KEYS = ("packages", "runcmd", "write_files", "mounts")


class CloudInitError(ValueError):
    """cloud_init is malformed; the message names the option (cloud_init.user_data ...)."""


def _user_data(value, where):
    """user_data as a mapping: a mapping, or cloud-config text (YAML after '#cloud-config')."""
    if value is None:
        return {}
    if isinstance(value, str):
        text = value.lstrip()
        if not text.startswith("#cloud-config"):
            raise CloudInitError(
                "%s: text must be cloud-config, starting with '#cloud-config' (other user-data "
                "formats such as shell scripts or MIME archives are not merged); or give a "
                "mapping" % where)
        try:
            import yaml  # pylint: disable=import-outside-toplevel
        except ImportError as exc:
            raise CloudInitError(
                "%s: reading cloud-config text needs PyYAML on the managed host (Debian: "
                "python3-yaml); or give user_data as a mapping (from_yaml on the controller)"
                % where) from exc
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise CloudInitError("%s: not valid YAML: %s" % (
                where, " ".join(str(exc).split()))) from exc
        if value is None:
            return {}
    if not isinstance(value, dict):
        raise CloudInitError("%s: expected a mapping of cloud-config keys, got %s" % (
            where, type(value).__name__))
    odd = sorted(repr(k) for k in value if not isinstance(k, str))
    if odd:
        raise CloudInitError("%s: cloud-config keys are names (strings); got %s" % (
            where, ", ".join(odd)))
    for key in LIST_KEYS + ("users", "bootcmd"):
        if key in value and not isinstance(value[key], list):
            raise CloudInitError("%s.%s: expected a list, got %s" % (
                where, key, type(value[key]).__name__))
    return value


def check(cloud_init, where="cloud_init"):
    """Raise CloudInitError for malformed cloud_init options; returns the user-data mapping."""
    cloud_init = cloud_init or {}
    user_data = _user_data(cloud_init.get("user_data"), where + ".user_data")
    for i, item in enumerate(cloud_init.get("write_files") or []):
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) \
                or not item["path"].startswith("/"):
            raise CloudInitError(
                "%s.write_files[%d]: each entry needs an absolute path, as cloud-init's "
                "write_files takes it ({path: /etc/x, content: ..., permissions: '0644'})"
                % (where, i))
    for i, item in enumerate(cloud_init.get("mounts") or []):
        if not isinstance(item, list) or not 2 <= len(item) <= 6:
            raise CloudInitError(
                "%s.mounts[%d]: each entry is a list of 2 to 6 fstab fields, as cloud-init's "
                "mounts takes it ([/dev/vdc, /scratch, ext4, 'defaults,nofail'])" % (where, i))
    mount = cloud_init.get("data_disk_mount")
    if mount is not None and not _MOUNT_RE.match(mount):
        raise CloudInitError("%s.data_disk_mount: %r is not an absolute path without spaces or "
                             "commas (such as /data)" % (where, mount))
    network = cloud_init.get("network_config")
    if network is not None:
        if not isinstance(network, dict) or network.get("version") not in (1, 2):
            raise CloudInitError(
                "%s.network_config: give cloud-init network config version 1 or 2 as a mapping "
                "with its version ({version: 2, ethernets: {...}}); got %r"
                % (where, network if not isinstance(network, dict) else network.get("version")))
        if network["version"] == 2 and not isinstance(network.get("ethernets", {}), dict):
            raise CloudInitError("%s.network_config.ethernets: expected a mapping of interface "
                                 "IDs to their settings" % where)
    return user_data


def _ours(name, cloud_init):
    """What the options ask for, as cloud-config."""
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
    for key in LIST_KEYS:
        if cloud_init.get(key):
            user[key] = list(cloud_init[key])
    mount = cloud_init.get("data_disk_mount")
    if mount:
        user["bootcmd"] = [[
            "sh", "-c",
            # Every boot, before cloud-init's mounts: format only a disk that holds nothing -
            # blkid -p finds no signature at all (exit 2; not an error, not a conflict) and its
            # first MiB is zeros, as a new data disk's is.
            'd=%s; [ -b "$d" ] || exit 0; blkid -p "$d" >/dev/null 2>&1; [ $? -eq 2 ] || exit 0; '
            'cmp -s -n 1048576 "$d" /dev/zero || exit 0; mkfs.ext4 -q -L %s "$d"; exit 0'
            % (DATA_DEVICE, DATA_LABEL)]]
        user.setdefault("mounts", []).append(
            ["LABEL=%s" % DATA_LABEL, mount, "ext4", "defaults,nofail", "0", "2"])
    return user


def merge(theirs, ours):
    """The user's cloud-config with ours merged in (a new mapping).

    The user's keys win: ours fills in only what it does not set. Lists of LIST_KEYS and
    ``bootcmd`` are joined, the user's entries first. ``users``: ours that the user's list does
    not name are appended.
    """
    out = dict(theirs)
    for key, value in ours.items():
        if key not in out:
            out[key] = value
        elif key in LIST_KEYS or key == "bootcmd":
            out[key] = list(out[key]) + [v for v in value if v not in out[key]]
        elif key == "users":
            # Only our named user: a users list without "default" drops the image's default
            # user on purpose, and stays that way.
            named = {u.get("name") if isinstance(u, dict) else u for u in out[key]}
            out[key] = list(out[key]) + [
                u for u in value if isinstance(u, dict) and u.get("name") not in named]
    return out


def render(name, cloud_init):
    """The NoCloud files for a VM: {'meta-data', 'user-data'[, 'network-config']: str}.

    JSON is valid YAML, so the files are written as JSON: stable, and no YAML library is needed
    on the managed host. Raises CloudInitError for malformed options (see check()).
    """
    cloud_init = cloud_init or {}
    theirs = check(cloud_init)
    meta = {"instance-id": name,
            "local-hostname": theirs.get("hostname") if isinstance(theirs.get("hostname"), str)
            else cloud_init.get("hostname") or name}
    user = merge(theirs, _ours(name, cloud_init))
    files = {
        "meta-data": json.dumps(meta, indent=2, sort_keys=True) + "\n",
        # default=str: dates and times that YAML text may hold, as text
        "user-data": "#cloud-config\n" + json.dumps(user, indent=2, sort_keys=True,
                                                    default=str) + "\n",
    }
    if cloud_init.get("network_config") is not None:
        files["network-config"] = json.dumps(cloud_init["network_config"], indent=2,
                                             sort_keys=True) + "\n"
    return files


def digest(files):
    """A short content hash of the seed files (stored in the VM's metadata to spot changes)."""
    h = hashlib.sha256()
    for key in sorted(files):
        h.update(key.encode() + b"\0" + files[key].encode() + b"\0")
    return h.hexdigest()[:16]

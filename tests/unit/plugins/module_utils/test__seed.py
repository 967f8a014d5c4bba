# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""cloud-init NoCloud seeds: rendered content and a real ISO written by genisoimage."""

import json
import os

import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils import _cloud_init, _seed


def test_render_user_with_keys_and_password():
    files = _cloud_init.render("vm-a", {"user": "ops",
                                        "ssh_authorized_keys": ["ssh-ed25519 AAAA k"],
                                        "password_hash": "$6$salt$hash"})
    meta = json.loads(files["meta-data"])
    assert meta == {"instance-id": "vm-a", "local-hostname": "vm-a"}
    assert files["user-data"].startswith("#cloud-config\n")
    user = json.loads(files["user-data"].split("\n", 1)[1])
    entry = user["users"][1]
    assert entry["name"] == "ops" and entry["ssh_authorized_keys"] == ["ssh-ed25519 AAAA k"]
    assert entry["passwd"] == "$6$salt$hash" and entry["lock_passwd"] is False


def test_digest_changes_with_content_only():
    render, digest = _cloud_init.render, _cloud_init.digest
    a = render("vm-a", {"hostname": "h1"})
    assert digest(a) == digest(render("vm-a", {"hostname": "h1"}))
    assert digest(a) != digest(render("vm-a", {"hostname": "h2"}))


@pytest.mark.skipif(_seed.iso_tool() is None, reason="no genisoimage/mkisofs/xorrisofs")
def test_write_iso_is_a_cidata_volume(tmp_path):
    path = tmp_path / "seed.iso"
    _seed.write_iso(str(path), _cloud_init.render("vm-a", {"user": "ops"}))
    data = path.read_bytes()
    # ISO 9660: primary volume descriptor at sector 16, volume id at offset 40 of it.
    assert data[0x8001:0x8006] == b"CD001"
    assert data[0x8028:0x8028 + 6] == b"CIDATA" or data[0x8028:0x8028 + 6] == b"cidata"
    assert b"#cloud-config" in data
    assert sorted(os.listdir(tmp_path)) == ["seed.iso"]  # the staging folder is gone
    # It may hold a password hash: only its owner reads it (libvirt gives it to QEMU).
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"

# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""cloud-init as users write it: their own cloud-config merged with the VM's options, the data
disk formatted only when empty, network config, and clear errors for malformed input."""

import json
import subprocess

import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils._cloud_init import (
    DATA_LABEL,
    CloudInitError,
    check,
    digest,
    render,
)


def _user(files):
    assert files["user-data"].startswith("#cloud-config\n")
    return json.loads(files["user-data"].split("\n", 1)[1])


# What the seed said before user_data existed: a VM whose options did not change keeps its seed
# (same digest), so upgrading the collection rewrites no seed ISO.
OLD_SEED = {
    "meta-data": '{\n  "instance-id": "vm-a",\n  "local-hostname": "vm-a"\n}\n',
    "user-data": '#cloud-config\n{\n  "hostname": "vm-a",\n  "preserve_hostname": false,\n'
                 '  "ssh_authorized_keys": [\n    "ssh-ed25519 AAAA k"\n  ]\n}\n',
}


def test_the_seed_of_the_old_options_is_unchanged():
    assert render("vm-a", {"ssh_authorized_keys": ["ssh-ed25519 AAAA k"]}) == OLD_SEED


def test_user_data_keys_win_ours_fill_in():
    files = render("vm-a", {
        "hostname": "ours", "user": "ops", "ssh_authorized_keys": ["ssh-ed25519 AAAA k"],
        "user_data": {"hostname": "theirs", "timezone": "UTC",
                      "users": [{"name": "ops", "shell": "/bin/zsh"}, "default"],
                      "packages": ["htop"]},
        "packages": ["nvtop"],
    })
    user = _user(files)
    assert user["hostname"] == "theirs"  # theirs wins
    assert user["timezone"] == "UTC"
    # Their ops stays as they wrote it; ours is not added twice.
    assert user["users"] == [{"name": "ops", "shell": "/bin/zsh"}, "default"]
    assert user["packages"] == ["htop", "nvtop"]  # joined, theirs first
    assert user["preserve_hostname"] is False  # ours, where they set nothing
    assert json.loads(files["meta-data"])["local-hostname"] == "theirs"


def test_user_data_as_cloud_config_text():
    text = "#cloud-config\npackage_update: true\nruncmd:\n  - [touch, /tmp/theirs]\n"
    user = _user(render("vm-a", {"user_data": text, "runcmd": ["touch /tmp/ours"],
                                 "user": "ops"}))
    assert user["package_update"] is True
    assert user["runcmd"] == [["touch", "/tmp/theirs"], "touch /tmp/ours"]
    assert user["users"][0] == "default" and user["users"][1]["name"] == "ops"


def test_write_files_mounts_and_network_config():
    net = {"version": 2, "ethernets": {
        "rail0": {"match": {"macaddress": "52:54:00:aa:bb:01"}, "set-name": "rail0",
                  "addresses": ["10.0.0.5/24"]},
        "mgmt": {"match": {"macaddress": "52:54:00:aa:bb:00"}, "dhcp4": True}}}
    files = render("vm-a", {
        "write_files": [{"path": "/etc/motd", "content": "GPU tenant\n"}],
        "mounts": [["/dev/vdc", "/scratch", "ext4", "defaults,nofail"]],
        "network_config": net})
    user = _user(files)
    assert user["write_files"] == [{"path": "/etc/motd", "content": "GPU tenant\n"}]
    assert user["mounts"] == [["/dev/vdc", "/scratch", "ext4", "defaults,nofail"]]
    assert json.loads(files["network-config"]) == net
    assert "network-config" not in render("vm-a", {})


def test_data_disk_mount_formats_only_an_empty_disk(tmp_path):
    user = _user(render("vm-a", {"data_disk_mount": "/data",
                                 "user_data": {"mounts": [["tmpfs", "/tmp", "tmpfs"]]}}))
    assert user["mounts"] == [["tmpfs", "/tmp", "tmpfs"],
                              ["LABEL=%s" % DATA_LABEL, "/data", "ext4", "defaults,nofail", "0",
                               "2"]]
    (argv,) = user["bootcmd"]
    assert argv[:2] == ["sh", "-c"]
    # Run the guard with blkid and mkfs.ext4 as stand-ins on PATH (blkid -p exits 0 when it
    # finds a signature, 2 when it finds none, 4 on an I/O error, 8 on conflicting ones): only
    # a disk with no signature and a zeroed first MiB is formatted, with the label.
    disk = tmp_path / "disk"
    script = argv[2].replace("/dev/vdb", str(disk))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, body in (("blkid", "exit $(cat %s/rc)" % tmp_path),
                       ("mkfs.ext4", 'echo "$*" > %s/formatted' % tmp_path)):
        (bin_dir / tool).write_text("#!/bin/sh\n%s\n" % body)
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": "%s:/usr/bin:/bin" % bin_dir}

    def boot(blkid_rc, content=b""):
        (tmp_path / "rc").write_text(str(blkid_rc))
        disk.write_bytes(content.ljust(1 << 20, b"\0"))
        (tmp_path / "formatted").unlink(missing_ok=True)
        # test -b fails on a plain file: the guard's device test is checked on its own below
        run = script.replace('[ -b "$d" ] || exit 0; ', "")
        subprocess.run(["sh", "-c", run], env=env, check=True)
        return (tmp_path / "formatted").read_text() if (tmp_path / "formatted").exists() else None

    assert boot(2) == "-q -L %s %s\n" % (DATA_LABEL, disk)
    assert boot(0) is None  # a filesystem or a partition table (an OS disk)
    assert boot(4) is None  # an I/O error
    assert boot(8) is None  # conflicting signatures
    assert boot(2, b"raw data no tool knows") is None  # no signature, but not empty
    assert boot(127) is None  # no blkid at all
    assert '[ -b "$d" ] || exit 0' in argv[2]


def test_our_user_joins_a_users_list_without_bringing_back_default():
    user = _user(render("vm-a", {"user": "ops", "user_data": {"users": [{"name": "x"}]}}))
    assert [u if isinstance(u, str) else u["name"] for u in user["users"]] == ["x", "ops"]


def test_digest_follows_every_option():
    base = digest(render("vm-a", {"user": "ops"}))
    for extra in ({"packages": ["x"]}, {"runcmd": ["true"]}, {"data_disk_mount": "/data"},
                  {"network_config": {"version": 2}}, {"user_data": {"timezone": "UTC"}}):
        assert digest(render("vm-a", dict({"user": "ops"}, **extra))) != base, extra


@pytest.mark.parametrize("cloud_init,message", [
    ({"user_data": "runcmd: [true]"}, r"cloud_init\.user_data: text must be cloud-config, "
                                      r"starting with '#cloud-config'"),
    ({"user_data": "#cloud-config\nruncmd: [true\n"}, r"cloud_init\.user_data: not valid YAML"),
    ({"user_data": ["a"]}, r"cloud_init\.user_data: expected a mapping of cloud-config keys, "
                           r"got list"),
    ({"user_data": {"packages": "htop"}}, r"cloud_init\.user_data\.packages: expected a list, "
                                          r"got str"),
    ({"write_files": [{"content": "x"}]}, r"cloud_init\.write_files\[0\]: each entry needs an "
                                          r"absolute path"),
    ({"mounts": [["/dev/vdc"]]}, r"cloud_init\.mounts\[0\]: each entry is a list of 2 to 6"),
    ({"data_disk_mount": "data"}, r"cloud_init\.data_disk_mount: 'data' is not an absolute path"),
    ({"user_data": "#cloud-config\n1: a\nb: c\n"}, r"cloud_init\.user_data: cloud-config keys are "
                                                   r"names \(strings\); got 1"),
    ({"network_config": {"ethernets": {}}}, r"cloud_init\.network_config: give cloud-init "
                                            r"network config version 1 or 2"),
    ({"network_config": {"version": 2, "ethernets": []}},
     r"cloud_init\.network_config\.ethernets: expected a mapping"),
])
def test_malformed_cloud_init(cloud_init, message):
    with pytest.raises(CloudInitError, match=message):
        check(cloud_init)
    with pytest.raises(CloudInitError, match=message):
        render("vm-a", cloud_init)

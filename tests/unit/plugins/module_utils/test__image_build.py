# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Image builds (_image_build): the options checked, the base image and its digest, the
manifest next to the image, and the builder's helpers (host tools, disks, debugfs, mounts).

The build itself (debootstrap, apt in a chroot, the disk) runs for real in the guest_boot
integration target; what a request means and how apt's failures are reported are in
test__image_request.py.
"""

import pytest
from image_helpers import BUILD_KEY, build_params

from ansible_collections.gpuvirt.kvm.plugins.module_utils import _image_build as ib
from ansible_collections.gpuvirt.kvm.plugins.module_utils import _image_request as ir
from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_store import ImageStore

KEY = BUILD_KEY
params = build_params


def error(**over):
    with pytest.raises(ir.BuildError) as exc:
        ib.validate(params(**over))
    return str(exc.value)


def test_gpu_profile_needs_the_driver_version():
    msg = error(profile="gpu")
    assert msg.startswith("nvidia_driver:") and "Fabric Manager" in msg
    assert error(profile="minimal", nvidia_driver="550").startswith("nvidia_driver:")
    assert error(profile="gpu", nvidia_driver="latest").startswith("nvidia_driver:")


@pytest.mark.parametrize("over, option", [
    (dict(name="bad name"), "name:"),
    (dict(version="../1"), "version:"),
    (dict(suite="book worm"), "suite:"),
    (dict(suite="dists/bookworm"), "suite:"),
    (dict(mirror="ftp://x"), "mirror:"),
    (dict(components=["main", "no space"]), "components:"),
    (dict(packages=["Foo"]), "packages:"),
    (dict(packages=["htop", "htop=1"]), "packages: htop given more than once"),
    (dict(disk_size_gb=1), "disk_size_gb:"),
    (dict(disk_size_gb=0), "disk_size_gb:"),
    (dict(components=[]), "components: give at least one"),
    (dict(kernel_args=["a b"]), "kernel_args:"),
    (dict(repositories=[dict(name="Cuda", uri="http://x")]), "repositories[0].name:"),
    (dict(repositories=[dict(name="a", uri="x")]), "repositories[0].uri:"),
    (dict(repositories=[dict(name="a", uri="http://x", suite="../")]), "repositories[0].suite:"),
    (dict(repositories=[dict(name="a", uri="http://x", suite="./", components=["main"])]),
     "repositories[0].components: a flat repository"),
    (dict(repositories=[dict(name="a", uri="http://x", suite="stable")]),
     "repositories[0].components: the suite stable needs"),
    (dict(repositories=[dict(name="a", uri="http://x"), dict(name="a", uri="http://y")]),
     "repositories[1].name: a is given twice"),
    (dict(repositories=[dict(name="a", uri="http://x", key="not a key")]),
     "repositories[0].key: neither"),
    (dict(repositories=[dict(name="a", uri="http://x", key=KEY.split("-----END", maxsplit=1)[0])]),
     "repositories[0].key: the ASCII-armored key has no END"),
    (dict(repositories=[dict(name="a", uri="http://x", key="/nonexistent/key.gpg")]),
     "repositories[0].key: cannot read"),
])
def test_bad_input_names_the_option(over, option):
    assert error(**over).startswith(option)


def test_missing_host_tools_names_packages():
    assert ib.missing_host_tools(which=lambda t: "/usr/bin/" + t, isdir=lambda p: True) == []
    missing = ib.missing_host_tools(which=lambda t: None if t in ("mcopy", "debootstrap") else t,
                                    isdir=lambda p: False)
    assert missing == ["debootstrap", "mtools", "grub-efi-amd64-bin"]


def test_manifest_goes_with_the_image(tmp_path):
    store = ImageStore(str(tmp_path))
    path = ib.manifest_path(store, "dl-guest", "1")
    assert path == str(tmp_path / "dl-guest-1.manifest.json")
    assert ib.read_manifest(store, "dl-guest", "1") is None
    ib._write_json(path, {"inputs_digest": "x"})
    assert ib.read_manifest(store, "dl-guest", "1") == {"inputs_digest": "x"}
    # Removing the image removes its manifest (and the store never lists it as an image).
    image = tmp_path / "dl-guest-1.qcow2"
    image.write_bytes(b"")
    store.unlink_image(str(image))
    assert not (tmp_path / "dl-guest-1.manifest.json").exists()


def test_base_image_instead_of_a_suite(tmp_path):
    image = tmp_path / "cloud.qcow2"
    image.write_bytes(b"pretend image")
    digest = ib.file_digests(str(image))["sha256"]
    good = {"src": str(image), "checksum": "sha256:" + digest}
    req = ib.validate(params(suite=None, base_image=good))
    assert req.base_image.public() == {"src": str(image), "checksum": "sha256:" + digest}
    assert req.inputs()["base_packages"] == list(ir.IMAGE_BASE_PACKAGES)
    ib.check_base_digest(req.base_image)  # the right digest passes
    bad = {"src": str(image), "checksum": "sha256:" + "0" * 64}
    wrong = ib.validate(params(suite=None, base_image=bad))
    with pytest.raises(ir.BuildError) as exc:
        ib.check_base_digest(wrong.base_image)
    assert str(exc.value).startswith("base_image.checksum: %s has sha256:%s" % (image, digest))
    assert error(base_image={"src": str(image), "checksum": "sha256:" + digest}).startswith(
        "suite: give a debootstrap suite or base_image, not both")
    assert error(suite=None).startswith("suite: None is not a Debian suite name")
    assert error(suite=None, base_image={"src": "cloud.qcow2", "checksum": "x"}).startswith(
        "base_image.src:")
    assert error(suite=None, base_image={"src": str(tmp_path / "missing"),
                                         "checksum": "sha256:" + digest}).startswith(
        "base_image.src:")
    assert error(suite=None, base_image={"src": "https://x/img", "checksum": "md5:1"}).startswith(
        "base_image.checksum:")


def test_root_partition_of_gpt_mbr_and_bare_disks():
    gpt = {"partitiontable": {"label": "gpt", "partitions": [
        {"start": 2048, "size": 8192, "type": "21686148-6449-6E6F-744E-656564454649"},
        {"start": 10240, "size": 200000, "type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"},
        {"start": 210240, "size": 4000000, "type": "0fc63daf-8483-4772-8e79-3d69d8477de4"}]}}
    assert ib.root_partition(gpt) == (210240, 4000000)
    gpt["partitiontable"]["partitions"].append(
        {"start": 5000000, "size": 100, "type": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"})
    assert ib.root_partition(gpt) == (5000000, 100)  # the x86-64 root type wins
    mbr = {"partitiontable": {"label": "dos", "partitions": [
        {"start": 2048, "size": 1000, "type": "83"}, {"start": 4096, "size": 9000, "type": "83"}]}}
    assert ib.root_partition(mbr) == (4096, 9000)
    assert ib.root_partition(None) == (0, None)
    with pytest.raises(ir.BuildError) as exc:
        ib.root_partition({"partitiontable": {"partitions": [{"start": 1, "size": 2,
                                                              "type": "7"}]}})
    assert str(exc.value).startswith("base_image.src: no Linux root partition")


def test_parse_debugfs_ls_reads_modes():
    # As debugfs 1.47 prints them: "." and ".." have no size field.
    out = ("/2/040755/0/0/.//\n/2/040755/0/0/..//\n/1126/104755/0/0/sudo/281624/\n"
           "/1200/102755/0/42/crontab/45000/\n/1300/120777/0/0/vmlinuz/30/\n")
    entries = ib.parse_debugfs_ls(out)
    assert entries["sudo"] == (0o104755, 0, 0)
    assert entries["crontab"] == (0o102755, 0, 42)
    assert entries["vmlinuz"] == (0o120777, 0, 0)
    assert sorted(entries) == ["crontab", "sudo", "vmlinuz"]


def test_mounted_under_sees_real_mounts(tmp_path):
    assert ib._mounted_under("/proc")  # a mount point itself
    assert ib._mounted_under("/")  # something is mounted under the root
    assert not ib._mounted_under(str(tmp_path / "scratch"))

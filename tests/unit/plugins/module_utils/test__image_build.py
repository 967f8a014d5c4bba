# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Image builds (_image_build): what a request means, and how apt's failures are reported.

The build itself (debootstrap, apt in a chroot, the disk) runs for real in the guest_boot
integration target; these tests cover the parts that decide what goes into an image.
"""

import json

import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils import _image_build as ib
from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_store import ImageStore

KEY = ("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmDMEZ0000BYJKwYBBAHaRw8BAQdA\n"
       "-----END PGP PUBLIC KEY BLOCK-----")


def params(**over):
    base = dict(name="dl-guest", version="1", suite="bookworm", mirror=None, components=None,
                repositories=[], packages=[], profile="minimal", nvidia_driver=None,
                container_engine="docker", disk_size_gb=8, kernel_args=[])
    base.update(over)
    return base


def error(**over):
    with pytest.raises(ib.BuildError) as exc:
        ib.validate(params(**over))
    return str(exc.value)


def test_minimal_request_defaults():
    req = ib.validate(params())
    assert req.mirror == ib.DEFAULT_MIRROR
    assert req.components == ("main",)
    assert req.extra_packages() == []
    assert ib.sources_list(req) == "deb http://deb.debian.org/debian bookworm main\n"
    assert ib.preferences(req) == ""


def test_gpu_profile_adds_driver_toolkit_engine_and_pins_the_branch():
    req = ib.validate(params(profile="gpu", nvidia_driver="550.163.01", container_engine="podman",
                             packages=["htop", "nvidia-container-toolkit=1.17.8-1"]))
    assert req.extra_packages() == ["linux-image-amd64", "linux-headers-amd64", "nvidia-driver",
                                    "nvidia-container-toolkit", "podman", "htop",
                                    "nvidia-container-toolkit=1.17.8-1"]
    prefs = ib.preferences(req)
    assert "Pin: version 550.163.01-*\nPin-Priority: 1001" in prefs
    # A branch pins every version on it, not 5500 or 55.
    branch = ib.validate(params(profile="gpu", nvidia_driver="550"))
    assert "Pin: version 550.*\n" in ib.preferences(branch)
    assert "Package: nvidia-container-toolkit\nPin: version 1.17.8-1\n" in prefs
    # The driver pin's globs cover the driver's libraries, never a toolkit version.
    assert "libnvidia-*" in ib.NVIDIA_PIN_GLOBS.split()


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


def test_repository_files_flat_and_suite(tmp_path):
    keyfile = tmp_path / "k.gpg"
    keyfile.write_bytes(b"\x99\x01binary")
    req = ib.validate(params(repositories=[
        dict(name="vendor", uri="http://127.0.0.1:8080/", suite="./", key=KEY),
        dict(name="sec", uri="http://security.debian.org/debian-security",
             suite="bookworm-security", components=["main"]),
        dict(name="bin", uri="https://x.example/repo", suite="/", key=str(keyfile)),
    ]))
    vendor = ib.repository_files(req.repositories[0])
    assert vendor["/etc/apt/keyrings/gpuvirt-vendor.asc"].startswith(b"-----BEGIN PGP")
    assert vendor["/etc/apt/sources.list.d/gpuvirt-vendor.sources"].decode() == (
        "Types: deb\nURIs: http://127.0.0.1:8080\nSuites: ./\n"
        "Signed-By: /etc/apt/keyrings/gpuvirt-vendor.asc\n")
    sec = ib.repository_files(req.repositories[1])
    assert list(sec) == ["/etc/apt/sources.list.d/gpuvirt-sec.sources"]
    assert b"Components: main\n" in sec["/etc/apt/sources.list.d/gpuvirt-sec.sources"]
    assert b"Signed-By" not in sec["/etc/apt/sources.list.d/gpuvirt-sec.sources"]
    assert "/etc/apt/keyrings/gpuvirt-bin.gpg" in ib.repository_files(req.repositories[2])


def test_inputs_digest_follows_every_input_and_key_content():
    a = ib.validate(params(repositories=[dict(name="v", uri="http://x", key=KEY)]))
    b = ib.validate(params(repositories=[dict(name="v", uri="http://x", key=KEY)]))
    assert a.inputs_digest() == b.inputs_digest()
    other_key = KEY.replace("mDMEZ0000", "mDMEZ1111")
    c = ib.validate(params(repositories=[dict(name="v", uri="http://x", key=other_key)]))
    assert c.inputs_digest() != a.inputs_digest()
    assert ib.input_differences(a.inputs(), c.inputs()) == ["repositories"]
    d = ib.validate(params(packages=["htop"]))
    assert ib.input_differences(a.inputs(), d.inputs()) == ["packages", "repositories"]
    # the collection's own recipe is not the user's input
    older = dict(a.inputs(), base_packages=a.inputs()["base_packages"][:-1], recipe=0)
    assert ib.input_differences(older, a.inputs()) == ["base_packages", "recipe"]
    assert ib.user_input_differences(older, a.inputs()) == []
    assert ib.user_input_differences(older, d.inputs()) == ["packages", "repositories"]
    # The base cache depends on the suite, mirror and components only.
    assert a.base_key() == d.base_key()
    assert a.base_key() != ib.validate(params(components=["main", "contrib"])).base_key()
    json.dumps(a.inputs())  # plain data, as the manifest stores it


def test_grub_cfg_boots_by_uuid_on_the_serial_console():
    cfg = ib.grub_cfg("0f0e-uuid", ["nvidia-drm.modeset=1"])
    assert "search --no-floppy --fs-uuid --set=root 0f0e-uuid\n" in cfg
    assert ("linux /vmlinuz root=UUID=0f0e-uuid ro console=tty0 console=ttyS0,115200n8 "
            "nvidia-drm.modeset=1\n") in cfg
    assert "terminal_output serial console" in cfg and cfg.endswith("boot\n")


APT_UNSIGNED = "\n".join([
    "Get:1 http://127.0.0.1:41234 ./ InRelease [1,020 B]",
    "Err:1 http://127.0.0.1:41234 ./ InRelease",
    "  The following signatures couldn't be verified because the public key is not available:"
    " NO_PUBKEY 6A1B2C3D4E5F6789",
    "Reading package lists...",
    "W: GPG error: http://127.0.0.1:41234 ./ InRelease: The following signatures couldn't be"
    " verified because the public key is not available: NO_PUBKEY 6A1B2C3D4E5F6789",
    "E: The repository 'http://127.0.0.1:41234 ./ InRelease' is not signed.",
]) + "\n"


def test_apt_update_error_names_the_repository_key():
    req = ib.validate(params(repositories=[
        dict(name="other", uri="http://10.1.1.1/repo", suite="./"),
        dict(name="vendor", uri="http://127.0.0.1:41234", suite="./", key=KEY)]))
    msg = str(ib.apt_update_error(APT_UNSIGNED, req))
    assert msg.startswith("repositories[1].key: apt could not verify http://127.0.0.1:41234")
    assert "NO_PUBKEY" in msg
    unreachable = ("Err:2 http://10.1.1.1/repo ./ Release\n  404  Not Found\n"
                   "E: The repository 'http://10.1.1.1/repo ./ Release' does not have a Release "
                   "file.\n")
    assert str(ib.apt_update_error(unreachable, req)).startswith("repositories[0].uri:")
    assert str(ib.apt_update_error("E: something else\n", req)).startswith("mirror:")


def test_apt_install_error_names_the_package_and_the_profile():
    req = ib.validate(params(packages=["gpuvirt-nonexistent", "htop=9.9"]))
    out = "Reading package lists...\nE: Unable to locate package gpuvirt-nonexistent\n"
    msg = str(ib.apt_install_error(out, req))
    assert msg.startswith("packages: no repository has the package gpuvirt-nonexistent")
    assert "no image was registered" in msg
    out = "E: Version '9.9' for 'htop' was not found\n"
    assert str(ib.apt_install_error(out, req)).startswith("packages: htop has no version 9.9")
    gpu = ib.validate(params(profile="gpu", nvidia_driver="550"))
    out = "E: Unable to locate package nvidia-container-toolkit\n"
    msg = str(ib.apt_install_error(out, gpu))
    assert msg.startswith("profile: no repository has the package nvidia-container-toolkit")
    assert "repositories" in msg


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
    assert req.inputs()["base_packages"] == list(ib.IMAGE_BASE_PACKAGES)
    ib.check_base_digest(req.base_image)  # the right digest passes
    bad = {"src": str(image), "checksum": "sha256:" + "0" * 64}
    wrong = ib.validate(params(suite=None, base_image=bad))
    with pytest.raises(ib.BuildError) as exc:
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
    with pytest.raises(ib.BuildError) as exc:
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

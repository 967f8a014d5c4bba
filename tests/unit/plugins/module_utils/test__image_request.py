# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Image build requests (_image_request): what a request means, and how apt's failures are
reported.

The requests come from _image_build.validate, as kvm_image_build makes them; the build itself
(debootstrap, apt in a chroot, the disk) runs for real in the guest_boot integration target.
"""

import json

from image_helpers import BUILD_KEY, build_params

from ansible_collections.gpuvirt.kvm.plugins.module_utils import _image_build as ib
from ansible_collections.gpuvirt.kvm.plugins.module_utils import _image_request as ir

KEY = BUILD_KEY
params = build_params


def test_minimal_request_defaults():
    req = ib.validate(params())
    assert req.mirror == ir.DEFAULT_MIRROR
    assert req.components == ("main",)
    assert req.extra_packages() == []
    assert ir.sources_list(req) == "deb http://deb.debian.org/debian bookworm main\n"
    assert ir.preferences(req) == ""


def test_gpu_profile_adds_driver_toolkit_engine_and_pins_the_branch():
    req = ib.validate(params(profile="gpu", nvidia_driver="550.163.01", container_engine="podman",
                             packages=["htop", "nvidia-container-toolkit=1.17.8-1"]))
    assert req.extra_packages() == ["linux-image-amd64", "linux-headers-amd64", "nvidia-driver",
                                    "nvidia-container-toolkit", "podman", "htop",
                                    "nvidia-container-toolkit=1.17.8-1"]
    prefs = ir.preferences(req)
    assert "Pin: version 550.163.01-*\nPin-Priority: 1001" in prefs
    # A branch pins every version on it, not 5500 or 55.
    branch = ib.validate(params(profile="gpu", nvidia_driver="550"))
    assert "Pin: version 550.*\n" in ir.preferences(branch)
    assert "Package: nvidia-container-toolkit\nPin: version 1.17.8-1\n" in prefs
    # The driver pin's globs cover the driver's libraries, never a toolkit version.
    assert "libnvidia-*" in ir.NVIDIA_PIN_GLOBS.split()


def test_repository_files_flat_and_suite(tmp_path):
    keyfile = tmp_path / "k.gpg"
    keyfile.write_bytes(b"\x99\x01binary")
    req = ib.validate(params(repositories=[
        dict(name="vendor", uri="http://127.0.0.1:8080/", suite="./", key=KEY),
        dict(name="sec", uri="http://security.debian.org/debian-security",
             suite="bookworm-security", components=["main"]),
        dict(name="bin", uri="https://x.example/repo", suite="/", key=str(keyfile)),
    ]))
    vendor = ir.repository_files(req.repositories[0])
    assert vendor["/etc/apt/keyrings/gpuvirt-vendor.asc"].startswith(b"-----BEGIN PGP")
    assert vendor["/etc/apt/sources.list.d/gpuvirt-vendor.sources"].decode() == (
        "Types: deb\nURIs: http://127.0.0.1:8080\nSuites: ./\n"
        "Signed-By: /etc/apt/keyrings/gpuvirt-vendor.asc\n")
    sec = ir.repository_files(req.repositories[1])
    assert list(sec) == ["/etc/apt/sources.list.d/gpuvirt-sec.sources"]
    assert b"Components: main\n" in sec["/etc/apt/sources.list.d/gpuvirt-sec.sources"]
    assert b"Signed-By" not in sec["/etc/apt/sources.list.d/gpuvirt-sec.sources"]
    assert "/etc/apt/keyrings/gpuvirt-bin.gpg" in ir.repository_files(req.repositories[2])


def test_inputs_digest_follows_every_input_and_key_content():
    a = ib.validate(params(repositories=[dict(name="v", uri="http://x", key=KEY)]))
    b = ib.validate(params(repositories=[dict(name="v", uri="http://x", key=KEY)]))
    assert a.inputs_digest() == b.inputs_digest()
    other_key = KEY.replace("mDMEZ0000", "mDMEZ1111")
    c = ib.validate(params(repositories=[dict(name="v", uri="http://x", key=other_key)]))
    assert c.inputs_digest() != a.inputs_digest()
    assert ir.input_differences(a.inputs(), c.inputs()) == ["repositories"]
    d = ib.validate(params(packages=["htop"]))
    assert ir.input_differences(a.inputs(), d.inputs()) == ["packages", "repositories"]
    # the collection's own recipe is not the user's input
    older = dict(a.inputs(), base_packages=a.inputs()["base_packages"][:-1], recipe=0)
    assert ir.input_differences(older, a.inputs()) == ["base_packages", "recipe"]
    assert ir.user_input_differences(older, a.inputs()) == []
    assert ir.user_input_differences(older, d.inputs()) == ["packages", "repositories"]
    # The base cache depends on the suite, mirror and components only.
    assert a.base_key() == d.base_key()
    assert a.base_key() != ib.validate(params(components=["main", "contrib"])).base_key()
    json.dumps(a.inputs())  # plain data, as the manifest stores it


def test_grub_cfg_boots_by_uuid_on_the_serial_console():
    cfg = ir.grub_cfg("0f0e-uuid", ["nvidia-drm.modeset=1"])
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
    msg = str(ir.apt_update_error(APT_UNSIGNED, req))
    assert msg.startswith("repositories[1].key: apt could not verify http://127.0.0.1:41234")
    assert "NO_PUBKEY" in msg
    unreachable = ("Err:2 http://10.1.1.1/repo ./ Release\n  404  Not Found\n"
                   "E: The repository 'http://10.1.1.1/repo ./ Release' does not have a Release "
                   "file.\n")
    assert str(ir.apt_update_error(unreachable, req)).startswith("repositories[0].uri:")
    assert str(ir.apt_update_error("E: something else\n", req)).startswith("mirror:")


def test_apt_install_error_names_the_package_and_the_profile():
    req = ib.validate(params(packages=["gpuvirt-nonexistent", "htop=9.9"]))
    out = "Reading package lists...\nE: Unable to locate package gpuvirt-nonexistent\n"
    msg = str(ir.apt_install_error(out, req))
    assert msg.startswith("packages: no repository has the package gpuvirt-nonexistent")
    assert "no image was registered" in msg
    out = "E: Version '9.9' for 'htop' was not found\n"
    assert str(ir.apt_install_error(out, req)).startswith("packages: htop has no version 9.9")
    gpu = ib.validate(params(profile="gpu", nvidia_driver="550"))
    out = "E: Unable to locate package nvidia-container-toolkit\n"
    msg = str(ir.apt_install_error(out, gpu))
    assert msg.startswith("profile: no repository has the package nvidia-container-toolkit")
    assert "repositories" in msg

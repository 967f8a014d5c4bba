# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Tiny real disk images (made with the real qemu-img), store snapshots, .deb packages and
kvm_image's task, for the image tests (test__qemu_img, test__image_store, test__deb_packages,
test__image_task); kvm_image_build's options and a key (test__image_build, test__image_request)."""

import hashlib
import os
import subprocess

from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_task import ImageTask

MIB = 1024 * 1024


def qcow2(path, size="16M", backing=None, data=b""):
    """A real qcow2 made by qemu-img; ``data`` written at offset 0 through qemu-io-free means."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        argv += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run(argv + [str(path)] + ([size] if size else []), check=True)
    if data:
        # Give images distinct content without qemu-io: convert a raw file holding ``data``.
        raw = str(path) + ".src.raw"
        with open(raw, "wb") as out:
            out.write(data.ljust(MIB, b"\0"))
        os.unlink(path)
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw,
                        str(path)], check=True)
        os.unlink(raw)
    return str(path)


def raw_disk(path, size=MIB, mbr=True):
    """A raw disk: zeros with an MBR boot signature, as a partitioned blank disk has."""
    with open(path, "wb") as out:
        out.truncate(size)
        if mbr:
            out.seek(510)
            out.write(b"\x55\xaa")
    return str(path)


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def snapshot(root):
    """Every entry under ``root`` (hidden ones too): type, size and content digest or target."""
    result = {}
    if not os.path.exists(root):
        return None
    for folder, dirs, files in os.walk(root):
        for entry in sorted(dirs + files):
            full = os.path.join(folder, entry)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                result[rel] = ("link", os.readlink(full))
            elif os.path.isdir(full):
                result[rel] = ("dir",)
            else:
                result[rel] = ("file", os.path.getsize(full), sha256(full))
    return result


def task(store, check_mode=False, usage=None, **params):
    params.setdefault("state", "present")
    params["store"] = str(store)
    return ImageTask(params, check_mode=check_mode,
                     usage_reader=(lambda: dict(usage or {})))


def run(store, check_mode=False, usage=None, **params):
    return task(store, check_mode, usage, **params).run()


def build_deb(tmp_path, files, name="gpuvirt-unit-image", version="1.0"):
    tree = tmp_path / ("%s_%s" % (name, version))
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: %s\nVersion: %s\nArchitecture: all\nMaintainer: test <t@example.invalid>\n"
        "Description: unit test image\n" % (name, version))
    for rel, maker in files.items():
        target = tree / rel.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        maker(target)
    deb = tmp_path / ("%s_%s_all.deb" % (name, version))
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(deb)],
                   check=True, stdout=subprocess.DEVNULL)
    return str(deb)


# kvm_image_build: an armored key's shape, and the module's options with their defaults.
BUILD_KEY = ("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmDMEZ0000BYJKwYBBAHaRw8BAQdA\n"
             "-----END PGP PUBLIC KEY BLOCK-----")


def build_params(**over):
    base = dict(name="dl-guest", version="1", suite="bookworm", mirror=None, components=None,
                repositories=[], packages=[], profile="minimal", nvidia_driver=None,
                container_engine="docker", disk_size_gb=8, kernel_args=[])
    base.update(over)
    return base

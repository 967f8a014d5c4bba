# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""The qemu-img gateway, the image store, the .deb source and kvm_image's backend
(_qemu_img, _image_store, _deb_packages, _image_task), on tiny real images made with the
real qemu-img."""

import functools
import hashlib
import http.server
import json
import os
import shutil
import struct
import subprocess
import threading

import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils._deb_packages import (
    DebianPackages,
    pick_image_file,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import Domain
from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import disk_chains, disk_paths
from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_store import (
    ImageStore,
    parse_checksum,
    validate_name,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_task import ImageTask
from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
    LibvirtGateway,
    has_libvirt,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._qemu_img import (
    ImagesError,
    chain_paths,
    check,
    create_disk,
    create_overlay,
    disk_usage,
    info,
    resize,
)

MIB = 1024 * 1024


# ----------------------------------------------------------------------------- helpers


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


@pytest.fixture
def store(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    return folder


# ----------------------------------------------------------------------------- qemu-img


def test_info_qcow2_raw_and_chain(tmp_path):
    base = qcow2(tmp_path / "base.qcow2", "16M")
    top = qcow2(tmp_path / "top.qcow2", None, backing=base)
    raw = raw_disk(tmp_path / "disk.raw", 2 * MIB)
    detail = info(top)
    assert detail.format == "qcow2" and detail.virtual_size == 16 * MIB
    assert detail.backing_path == base
    assert [link.path for link in detail.backing_chain] == [base]
    assert detail.backing_chain[0].format == "qcow2"
    assert info(raw, backing_chain=False).format == "raw"
    assert info(raw).virtual_size == 2 * MIB
    assert chain_paths(top) == [top, base]


def test_chain_paths_stops_at_a_missing_link(tmp_path):
    base = qcow2(tmp_path / "base.qcow2", "16M")
    mid = qcow2(tmp_path / "mid.qcow2", None, backing=base)
    top = qcow2(tmp_path / "top.qcow2", None, backing=mid)
    os.unlink(base)
    with pytest.raises(ImagesError, match="No such file"):
        info(top)  # qemu-img's own words come through
    assert chain_paths(top) == [top, mid, base]


def test_overlay_is_constant_in_base_size_and_follows_no_alias(tmp_path):
    small = qcow2(tmp_path / "small.qcow2", data=b"x" * 4096)
    big = qcow2(tmp_path / "big.qcow2", "64M")
    with open(tmp_path / "big.raw", "wb") as out:
        out.write(os.urandom(16 * MIB))
    os.unlink(big)
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(tmp_path / "big.raw"),
                    big], check=True)
    os.symlink("big.qcow2", tmp_path / "alias")
    over_small = create_overlay(small, tmp_path / "o1.qcow2")
    over_big = create_overlay(str(tmp_path / "alias"), tmp_path / "o2.qcow2", size_gb=0.0625)
    assert os.path.getsize(over_small.path) == os.path.getsize(over_big.path)
    assert os.path.getsize(big) > 16 * MIB and os.path.getsize(over_big.path) < MIB
    # The overlay names the versioned file, not the alias it was given.
    assert over_big.backing_file == big and over_big.virtual_size == 64 * MIB
    with pytest.raises(ImagesError, match="smaller"):
        create_overlay(big, tmp_path / "o3.qcow2", size_gb=0.001)
    with pytest.raises(ImagesError, match="exists"):
        create_overlay(big, over_big.path)
    assert not os.path.exists(tmp_path / "o3.qcow2")


def test_create_disk_and_resize(tmp_path):
    disk = create_disk(tmp_path / "data.qcow2", 0.5)
    assert disk.format == "qcow2" and disk.virtual_size == 512 * MIB
    raw = create_disk(tmp_path / "data.raw", 0.25, fmt="raw")
    assert raw.format == "raw" and os.path.getsize(raw.path) == 256 * MIB
    assert os.stat(raw.path).st_blocks * 512 < MIB  # sparse
    assert resize(disk.path, 1).virtual_size == 1024 * MIB
    with pytest.raises(ImagesError, match="never shrunk"):
        resize(disk.path, 0.5)
    with pytest.raises(ImagesError, match="disk format"):
        create_disk(tmp_path / "x.vmdk", 1, fmt="vmdk")
    with pytest.raises(ImagesError, match="positive"):
        create_disk(tmp_path / "y.qcow2", 0)


def test_check_reports_corruption_in_qemu_imgs_words(tmp_path):
    image = qcow2(tmp_path / "c.qcow2")
    check(image)
    with open(image, "r+b") as out:  # L1 table offset past the end of the file
        out.seek(40)
        out.write(struct.pack(">Q", 0x10000 * 50))
    with pytest.raises(ImagesError, match="exceeding the end of the file"):
        check(image)


@pytest.mark.parametrize("value", ["dgx-os", "6.2", "4-0-5", "a", "x_1+2", "A" * 64])
def test_valid_names(value):
    assert validate_name(value, "name") == value


@pytest.mark.parametrize("value, words", [
    ("", "must not be empty"), ("../x", "not a valid"), ("a/b", "not a valid"),
    ("has space", "not a valid"), ("-x", "not a valid"), (".hidden", "not a valid"),
    ("a..b", "not a valid"), ("x" * 65, "at most 64"), ("x" * 200, "at most 64"),
    ("tab\t", "not a valid"), ("é", "not a valid"), (None, "must not be empty"),
])
def test_invalid_names(value, words):
    with pytest.raises(ImagesError) as err:
        validate_name(value, "version")
    assert str(err.value).startswith("version:") and words in str(err.value)


def test_checksums():
    assert parse_checksum("sha256:" + "A" * 64) == ("sha256", "a" * 64)
    assert parse_checksum("sha512:" + "0" * 128) == ("sha512", "0" * 128)
    for bad in ["md5:" + "0" * 32, "0" * 64, "sha256:xyz", "sha256:" + "0" * 63, ""]:
        with pytest.raises(ImagesError, match="^checksum:"):
            parse_checksum(bad)


# ----------------------------------------------------------------------------- the store


def test_first_install_is_default_and_the_four_facts(store, src):
    image = qcow2(src / "a.qcow2", data=b"version one")
    facts = []
    for check_mode in (True, False, True, False):
        before = snapshot(str(store))
        result = run(store, check_mode, name="dgx-os", version="6.1", src=image)
        facts.append(result["changed"])
        if check_mode:
            assert snapshot(str(store)) == before, "check mode changed the store"
    assert facts == [True, True, False, False]
    assert os.readlink(store / "dgx-os") == "dgx-os-6.1.qcow2"
    assert sha256(store / "dgx-os-6.1.qcow2") == sha256(image)
    meta = json.load(open(store / ".dgx-os-6.1.qcow2.json"))
    assert meta["digests"]["sha256"] == sha256(image) and meta["source"] == image
    assert sorted(os.listdir(store)) == [".dgx-os-6.1.qcow2.json", "dgx-os", "dgx-os-6.1.qcow2"]
    assert result["image"]["is_default"] and result["image"]["format"] == "qcow2"
    assert result["image"]["virtual_size"] == MIB


def test_check_mode_predicts_what_the_run_does(store, src):
    image = qcow2(src / "a.qcow2", data=b"one")
    predicted = run(store, True, name="dgx-os", version="6.1", src=image)
    done = run(store, False, name="dgx-os", version="6.1", src=image)
    assert predicted["diff"] == done["diff"]
    assert [a.replace("would install", "installed") for a in predicted["actions"]][0] \
        .startswith("installed dgx-os-6.1 from %s" % image)
    assert predicted["images"][0]["path"] == done["images"][0]["path"]


def test_raw_images_and_versions(store, src):
    run(store, name="ubuntu", version="22.04", src=raw_disk(src / "u.img"))
    run(store, name="ubuntu", version="24.04", src=raw_disk(src / "v.img", 2 * MIB))
    listing = ImageStore(str(store)).list()
    assert [(i.ref, i.format, i.is_default) for i in listing] == [
        ("ubuntu-22.04", "raw", True), ("ubuntu-24.04", "raw", False)]
    assert os.stat(store / "ubuntu-24.04.raw").st_blocks * 512 <= 64 * 1024  # holes stay holes
    result = run(store, name="ubuntu", version="24.04", state="default")
    assert result["changed"] and os.readlink(store / "ubuntu") == "ubuntu-24.04.raw"
    assert not run(store, name="ubuntu", version="24.04", state="default")["changed"]


def test_versions_sort_naturally(store, src):
    for version in ["6.10", "6.9", "6.2"]:
        run(store, name="os", version=version, src=qcow2(src / ("%s.qcow2" % version)))
    assert [i.version for i in ImageStore(str(store)).list()] == ["6.2", "6.9", "6.10"]


def test_resolve(store, src):
    run(store, name="dgx-os", version="6.1", src=qcow2(src / "a.qcow2"))
    run(store, name="dgx-os", version="6.2", src=qcow2(src / "b.qcow2", data=b"2"))
    images = ImageStore(str(store))
    assert images.resolve("dgx-os").version == "6.1"
    assert images.resolve("dgx-os-6.2").path == str(store / "dgx-os-6.2.qcow2")
    with pytest.raises(ImagesError) as err:
        images.resolve("centos")
    assert "dgx-os (default 6.1; versions 6.1, 6.2)" in str(err.value)
    for bad in ["../x", "", "a b"]:
        with pytest.raises(ImagesError, match="not a valid"):
            images.resolve(bad)


@pytest.mark.parametrize("content, words", [
    (b"hello, this is not a disk\n", "looks like text"),
    (b"<html><body>404 Not Found</body></html>" * 20, "looks like text"),
    (b"\x1f\x8b\x08\x00" + b"\0" * 1020, "gzip-compressed"),
    (b"\x01\x02\x03" * 7, "not a whole number"),
    (b"", "empty"),
])
def test_non_images_are_refused(store, src, content, words):
    bad = src / "bad.qcow2"
    bad.write_bytes(content)
    with pytest.raises(ImagesError) as err:
        run(store, name="x", version="1", src=str(bad))
    assert str(err.value).startswith("src:") and words in str(err.value)
    assert snapshot(str(store)) is None  # not even the folder was left behind


def test_corrupt_qcow2_is_refused_with_qemu_imgs_words(store, src):
    header = qcow2(src / "header.qcow2")
    with open(header, "r+b") as out:
        out.seek(4)
        out.write(struct.pack(">I", 99))
    l1 = qcow2(src / "l1.qcow2")
    with open(l1, "r+b") as out:
        out.seek(40)
        out.write(struct.pack(">Q", 0x10000 * 50))
    run(store, name="good", version="1", src=qcow2(src / "good.qcow2"))
    before = snapshot(str(store))
    for path, words in ((header, "Unsupported qcow2 version 99"), (l1, "corrupt qcow2")):
        for check_mode in (True, False):
            with pytest.raises(ImagesError) as err:
                run(store, check_mode, name="bad", version="1", src=path)
            assert str(err.value).startswith("src:") and words in str(err.value)
            assert snapshot(str(store)) == before


def test_backing_file_outside_the_store_is_refused(store, src):
    base = qcow2(src / "base.qcow2")
    top = qcow2(src / "top.qcow2", None, backing=base)
    for check_mode in (True, False):
        with pytest.raises(ImagesError) as err:
            run(store, check_mode, name="x", version="1", src=top)
        assert "backing file %s" % base in str(err.value) and "not an image in the store" \
            in str(err.value)
    assert snapshot(str(store)) is None


def test_backing_file_in_the_store_is_accepted_and_protected(store, src):
    run(store, name="base", version="1", src=qcow2(src / "base.qcow2"))
    derived = qcow2(src / "derived.qcow2", None, backing=store / "base-1.qcow2")
    run(store, name="custom", version="1", src=derived)
    listing = {i.ref: i for i in ImageStore(str(store)).list()}
    assert listing["base-1"].base_of == ("custom-1",)
    assert listing["custom-1"].backing == str(store / "base-1.qcow2")
    with pytest.raises(ImagesError, match="the backing file of image custom-1"):
        run(store, name="base", state="absent")
    run(store, name="custom", state="absent")
    assert run(store, name="base", state="absent")["changed"]
    assert os.listdir(store) == []


def test_checksum(store, src):
    image = qcow2(src / "a.qcow2")
    wrong = "sha256:" + "0" * 64
    with pytest.raises(ImagesError) as err:
        run(store, name="x", version="1", src=image, checksum=wrong)
    assert str(err.value).startswith("checksum:") and sha256(image) in str(err.value)
    assert snapshot(str(store)) is None
    with pytest.raises(ImagesError, match="^checksum:"):
        run(store, True, name="x", version="1", src=image, checksum=wrong)
    digest = hashlib.sha512(open(image, "rb").read()).hexdigest()
    assert run(store, name="x", version="1", src=image, checksum="sha512:" + digest)["changed"]
    meta = json.load(open(store / ".x-1.qcow2.json"))
    assert meta["digests"] == {"sha256": sha256(image), "sha512": digest}
    # A rerun with the checksum compares digests only: even a vanished source is fine.
    os.unlink(image)
    assert not run(store, name="x", version="1", src=str(store / "x-1.qcow2"),
                   checksum="sha512:" + digest)["changed"]


def test_different_content_needs_force_and_never_replaces_a_used_image(store, src, tmp_path):
    one = qcow2(src / "one.qcow2", data=b"one")
    two = qcow2(src / "two.qcow2", data=b"two")
    run(store, name="x", version="1", src=one)
    before = snapshot(str(store))
    with pytest.raises(ImagesError) as err:
        run(store, name="x", version="1", src=two)
    assert "different content" in str(err.value) and "force" in str(err.value)
    assert snapshot(str(store)) == before
    overlay = create_overlay(str(store / "x"), tmp_path / "vm.qcow2")
    usage = {"vm-a": (overlay.path,)}
    with pytest.raises(ImagesError, match="used by domain vm-a"):
        run(store, usage=usage, name="x", version="1", src=two, force=True)
    assert snapshot(str(store)) == before
    result = run(store, name="x", version="1", src=two, force=True)
    assert result["changed"] and result["actions"][0].startswith("replaced x-1")
    assert sha256(store / "x-1.qcow2") == sha256(two)
    assert os.readlink(store / "x") == "x-1.qcow2"


def test_absent_refusals(store, src, tmp_path):
    run(store, name="os", version="1", src=qcow2(src / "1.qcow2", data=b"1"))
    run(store, name="os", version="2", src=qcow2(src / "2.qcow2", data=b"2"))
    overlay = create_overlay(str(store / "os-2.qcow2"), tmp_path / "vm.qcow2")
    usage = {"vm-b": (overlay.path,), "vm-a": (overlay.path, "/nonexistent/disk.qcow2")}
    before = snapshot(str(store))
    for check_mode in (True, False):
        with pytest.raises(ImagesError) as err:
            run(store, check_mode, usage=usage, name="os", version="2", state="absent")
        assert "used by domains vm-a, vm-b" in str(err.value)
        with pytest.raises(ImagesError) as err:  # the default while others remain
            run(store, check_mode, usage=usage, name="os", version="1", state="absent")
        assert "default of os" in str(err.value) and "state=default" in str(err.value)
        with pytest.raises(ImagesError, match="os-2 is used by domains vm-a, vm-b"):
            run(store, check_mode, usage=usage, name="os", state="absent")
    assert snapshot(str(store)) == before
    listing = {i["ref"]: i for i in run(store, usage=usage, name="os")["images"]}
    assert listing["os-2"]["used_by"] == ["vm-a", "vm-b"] and listing["os-1"]["used_by"] == []
    # Unused and not the default: goes. Then the last version takes its alias with it.
    facts = [run(store, cm, name="os", version="2", state="absent")["changed"]
             for cm in (True, False, True, False)]
    assert facts == [True, True, False, False]
    result = run(store, name="os", state="absent")
    assert "removed the default alias %s" % (store / "os") in result["actions"]
    assert os.listdir(store) == []


def test_alias_named_by_a_disk_is_never_moved(store, src, tmp_path):
    run(store, name="os", version="1", src=qcow2(src / "1.qcow2", data=b"1"))
    run(store, name="os", version="2", src=qcow2(src / "2.qcow2", data=b"2"))
    # Made by hand on the alias (create_overlay would take the versioned file).
    overlay = qcow2(tmp_path / "hand.qcow2", None, backing=store / "os")
    usage = {"legacy": (overlay,)}
    with pytest.raises(ImagesError, match="default alias %s itself" % (store / "os")):
        run(store, usage=usage, name="os", version="2", state="default")
    assert os.readlink(store / "os") == "os-1.qcow2"
    listing = {i["ref"]: i for i in run(store, usage=usage, name="os")["images"]}
    assert listing["os-1"]["used_by"] == ["legacy"]


def test_unknown_image_and_bad_options(store, src):
    run(store, name="os", version="1", src=qcow2(src / "1.qcow2"))
    before = snapshot(str(store))
    cases = [
        (dict(name="nope"), "name: image nope is not installed"),
        (dict(name="os", version="9"), "name: image os version 9 is not installed"),
        (dict(name="os", version="9", state="default"), "not installed"),
        (dict(name="../x", version="1", src=str(src / "1.qcow2")), "name:"),
        (dict(name="", version="1"), "name: must not be empty"),
        (dict(name="x" * 200, version="1"), "name:"),
        (dict(name="has space"), "name:"),
        (dict(name="os", version="../1", src=str(src / "1.qcow2")), "version:"),
        (dict(name="os", version="2", src=str(src / "missing.qcow2")), "src:"),
        (dict(name="os", version="2", src=str(src)), "src: %s is not a regular file" % src),
        (dict(name="os", version="2", src="http://127.0.0.1:9/x.qcow2"), "checksum: required"),
        (dict(name="os", version="2", src="ftp://h/x.qcow2", checksum="sha256:" + "0" * 64),
         "src:"),
        (dict(name="os", version="2", src=str(src / "1.qcow2"), checksum="md5:00"),
         "checksum:"),
        (dict(name="os", src=str(src / "1.qcow2")), "version: required"),
        (dict(name="os", state="default"), "version: required"),
        (dict(name="os", state="absent", src=str(src / "1.qcow2")), "src: only used"),
        (dict(name="os", version="2", checksum="sha256:" + "0" * 64), "checksum: only used"),
        (dict(name="os", version="2", package="Bad Name"), "package:"),
        (dict(name="os", version="2", package="/nonexistent/x.deb"), "package:"),
        (dict(name="os", version="2", package_image="x.qcow2"), "package_image:"),
        (dict(name="os", version="2", src=str(src / "1.qcow2"), package="x"), "src:"),
    ]
    for params, words in cases:
        for check_mode in (True, False):
            with pytest.raises(ImagesError) as err:
                run(store, check_mode, **params)
            assert words in str(err.value), (params, str(err.value))
    assert snapshot(str(store)) == before


def test_name_collisions(store, src):
    run(store, name="a-b", version="1", src=qcow2(src / "1.qcow2"))
    with pytest.raises(ImagesError, match="share its file name with image a-b version 1"):
        run(store, name="a", version="b-1", src=qcow2(src / "2.qcow2"))
    with pytest.raises(ImagesError, match="read the same"):
        run(store, name="a-b-1", version="2", src=qcow2(src / "3.qcow2"))
    (store / "plain").write_text("someone's notes")
    with pytest.raises(ImagesError, match="not a default alias"):
        run(store, name="plain", version="1", src=qcow2(src / "4.qcow2"))


def test_store_that_is_a_file(tmp_path, src):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ImagesError, match="^store:"):
        run(tmp_path / "file", name="x", version="1", src=qcow2(src / "a.qcow2"))


def test_hand_placed_images_are_adopted_by_their_alias(store, src):
    store.mkdir()
    raw_disk(store / "dgx-kvm-image-4-0-5.raw")
    os.symlink("dgx-kvm-image-4-0-5.raw", store / "dgx-kvm-image")
    (store / "stray.qcow2").write_bytes(b"x")
    found, warnings = ImageStore(str(store)).scan()
    assert [(i.name, i.version, i.is_default, i.managed) for i in found] == [
        ("dgx-kvm-image", "4-0-5", True, False)]
    assert any("stray.qcow2" in w for w in warnings)
    # Installing the same bytes under that version is a no-op; other bytes need force.
    same = raw_disk(src / "same.raw")
    assert not run(store, name="dgx-kvm-image", version="4-0-5", src=same)["changed"]


def test_a_staging_failure_leaves_no_temp_file(store, src):
    run(store, name="x", version="1", src=qcow2(src / "a.qcow2"))
    before = snapshot(str(store))
    bad = src / "bad.raw"
    bad.write_bytes(b"\x01" * 1000)
    with pytest.raises(ImagesError):
        run(store, name="x", version="2", src=str(bad))
    assert snapshot(str(store)) == before


# ----------------------------------------------------------------------------- URLs


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, "http://127.0.0.1:%d" % server.server_address[1]
    server.shutdown()
    server.server_close()


def test_install_from_url(store, http_root):
    root, url = http_root
    image = qcow2(root / "os.qcow2", data=b"served")
    checksum = "sha256:" + sha256(image)
    facts = [run(store, cm, name="os", version="1", src=url + "/os.qcow2",
                 checksum=checksum)["changed"] for cm in (True, False, True, False)]
    assert facts == [True, True, False, False]
    assert sha256(store / "os-1.qcow2") == sha256(image)
    assert json.load(open(store / ".os-1.qcow2.json"))["source"] == url + "/os.qcow2"
    before = snapshot(str(store))
    with pytest.raises(ImagesError, match="src: cannot download .*404"):
        run(store, name="os", version="2", src=url + "/missing.qcow2", checksum=checksum)
    with pytest.raises(ImagesError, match="^checksum:"):
        run(store, name="os", version="2", src=url + "/os.qcow2",
            checksum="sha256:" + "1" * 64)
    (root / "page.qcow2").write_text("<html>Service unavailable</html>\n")
    with pytest.raises(ImagesError, match="looks like text"):
        run(store, name="os", version="2", src=url + "/page.qcow2",
            checksum="sha256:" + sha256(root / "page.qcow2"))
    assert snapshot(str(store)) == before


class _CutShort(http.server.BaseHTTPRequestHandler):
    """Promises a megabyte, sends a kilobyte and hangs up."""

    def do_GET(self):  # noqa: N802 (the name http.server calls)
        self.send_response(200)
        self.send_header("Content-Length", str(2 ** 20))
        self.end_headers()
        self.wfile.write(b"\0" * 1024)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_a_download_cut_short_is_an_error_and_leaves_the_store_as_it_was(store, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CutShort)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = "http://127.0.0.1:%d/os.qcow2" % server.server_address[1]
    try:
        with pytest.raises(ImagesError, match="src: the download of %s ended after 1024 of "
                           "the 1048576 bytes" % url):
            run(store, name="os", version="1", src=url, checksum="sha256:" + "0" * 64)
    finally:
        server.shutdown()
        server.server_close()
    assert snapshot(str(store)) is None  # no store folder, no temp file


# ----------------------------------------------------------------------------- packages


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


def test_deb_contents_and_image_choice(tmp_path):
    deb = build_deb(tmp_path, {
        "/usr/share/img/a.qcow2": qcow2,
        "/usr/share/img/b.img": raw_disk,
        "/usr/share/doc/x/README": lambda p: p.write_text("x"),
    })
    packages = DebianPackages()
    assert packages.deb_fields(deb) == ("gpuvirt-unit-image", "1.0")
    files = packages.deb_files(deb)
    assert "/usr/share/img/a.qcow2" in files and "/usr/share/doc/x/README" in files
    with pytest.raises(ImagesError, match="several images .*package_image"):
        pick_image_file(files, deb)
    assert pick_image_file(files, deb, "b.img") == "/usr/share/img/b.img"
    with pytest.raises(ImagesError, match="^package_image:"):
        pick_image_file(files, deb, "c.img")
    with pytest.raises(ImagesError, match="ships no image"):
        pick_image_file(["/usr/share/doc/x/README"], deb)
    bogus = tmp_path / "bogus.deb"
    bogus.write_text("not an archive")
    with pytest.raises(ImagesError, match="not a Debian package"):
        packages.deb_fields(str(bogus))


def test_package_check_mode_installs_nothing(store, tmp_path):
    deb = build_deb(tmp_path, {"/usr/share/gpuvirt-unit-image/a.qcow2": qcow2},
                    name="gpuvirt-unit-never-installed")
    result = run(store, True, name="x", version="1", package=deb)
    assert result["changed"]
    assert "would install package gpuvirt-unit-never-installed 1.0 from %s" % deb \
        in result["actions"]
    assert DebianPackages().status("gpuvirt-unit-never-installed") is None
    assert snapshot(str(store)) is None
    with pytest.raises(ImagesError, match="^package_image:"):
        run(store, True, name="x", version="1", package=deb, package_image="zz.qcow2")


def test_one_file_is_read_out_of_a_deb_without_installing_it(tmp_path):
    image = qcow2(tmp_path / "a.qcow2", data=b"inside the package")
    deb = build_deb(tmp_path, {"/usr/share/gpuvirt-unit-image/a.qcow2":
                               lambda p: shutil.copy(image, p)})
    packages = DebianPackages()
    with packages.open_member(deb, "/usr/share/gpuvirt-unit-image/a.qcow2") as reader:
        assert hashlib.sha256(reader.read()).hexdigest() == sha256(image)
    with pytest.raises(ImagesError, match="^package: %s: it holds no file /usr/b.qcow2" % deb):
        with packages.open_member(deb, "/usr/b.qcow2"):
            pass
    cut = tmp_path / "cut.deb"
    cut.write_bytes(open(deb, "rb").read()[:-200])
    with pytest.raises(ImagesError, match="^package: %s: " % cut):
        with packages.open_member(str(cut), "/usr/share/gpuvirt-unit-image/a.qcow2") as reader:
            reader.read()


def _dpkg_usable():
    """Whether this run may install and purge test packages (root, dpkg and its database)."""
    if os.geteuid() != 0 or not (shutil.which("dpkg") and shutil.which("dpkg-deb")):
        return False
    return os.access("/var/lib/dpkg/status", os.W_OK)


needs_dpkg = pytest.mark.skipif(not _dpkg_usable(),
                                reason="installs test packages: needs root and dpkg")


def purge(*names):
    subprocess.run(["dpkg", "--purge", *names], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)


class RecordingPackages(DebianPackages):
    """The real dpkg, with every install recorded."""

    def __init__(self):
        self.installed = []

    def install_deb(self, path):
        self.installed.append(path)
        super().install_deb(path)


def not_a_disk(path):
    path.write_text("this is a text file, not a disk image\n")


def corrupt_qcow2(path):
    qcow2(path)
    with open(path, "r+b") as out:
        out.seek(40)
        out.write(struct.pack(">Q", 0x10000 * 50))  # the L1 table lies past the end


@needs_dpkg
@pytest.mark.parametrize("maker, words", [(not_a_disk, "looks like text"),
                                          (corrupt_qcow2, "corrupt qcow2")])
def test_a_bad_image_in_a_deb_is_refused_before_the_package_is_installed(
        store, src, tmp_path, maker, words):
    name = "gpuvirt-unit-verify-bad"
    deb = build_deb(tmp_path, {"/usr/share/%s/image.qcow2" % name: maker}, name=name)
    run(store, name="os", version="1", src=qcow2(src / "1.qcow2"))
    before = snapshot(str(store))
    packages = RecordingPackages()
    try:
        with pytest.raises(ImagesError) as err:
            ImageTask({"name": "x", "version": "1", "package": deb, "store": str(store)},
                      packages=packages).run()
        message = str(err.value)
        assert message.startswith("package: /usr/share/%s/image.qcow2 in %s " % (name, deb))
        assert words in message and "nothing was installed" in message
        assert packages.installed == []
        assert DebianPackages().status(name) is None
        assert snapshot(str(store)) == before  # no staged copy left behind either
    finally:
        purge(name)


@needs_dpkg
def test_a_deb_with_the_wrong_checksum_is_not_installed_and_a_rerun_installs_nothing(
        store, src, tmp_path):
    name = "gpuvirt-unit-verify-sum"
    image = qcow2(src / "a.qcow2", data=b"package content")
    member = "/usr/share/%s/image.qcow2" % name
    deb = build_deb(tmp_path, {member: lambda p: shutil.copy(image, p)}, name=name)
    packages = RecordingPackages()

    def go(checksum):
        return ImageTask({"name": "x", "version": "1", "package": deb, "checksum": checksum,
                          "store": str(store)}, packages=packages).run()

    try:
        with pytest.raises(ImagesError) as err:
            go("sha256:" + "0" * 64)
        message = str(err.value)
        expected = "checksum: %s in %s has sha256:%s" % (member, deb, sha256(image))
        assert message.startswith(expected)
        assert "nothing was installed: package %s 1.0 and the store" % name in message
        assert packages.installed == [] and DebianPackages().status(name) is None
        assert snapshot(str(store)) is None  # not even the store folder
        result = go("sha256:" + sha256(image))
        assert result["changed"] and packages.installed == [deb]
        assert "installed package %s 1.0 from %s" % (name, deb) in result["actions"]
        assert DebianPackages().status(name) == "1.0"
        assert sha256(store / "x-1.qcow2") == sha256(image) == sha256(member)
        assert result["image"]["source"] == "package %s (%s)" % (deb, member)
        # The rerun: the package is installed and the store holds the image; nothing happens.
        for checksum in ("sha256:" + sha256(image), None):
            assert not go(checksum)["changed"]
        assert packages.installed == [deb]
    finally:
        purge(name)


@needs_dpkg
def test_a_package_is_compared_with_the_installed_version_before_it_is_installed(
        store, src, tmp_path):
    image = qcow2(src / "a.qcow2", data=b"installed first")
    run(store, name="x", version="1", src=image)
    before = snapshot(str(store))
    other = build_deb(tmp_path, {"/usr/share/gpuvirt-unit-verify-other/x.qcow2":
                                 lambda p: qcow2(p, data=b"something else")},
                      name="gpuvirt-unit-verify-other")
    same = build_deb(tmp_path, {"/usr/share/gpuvirt-unit-verify-same/x.qcow2":
                                lambda p: shutil.copy(image, p)},
                     name="gpuvirt-unit-verify-same")
    try:
        with pytest.raises(ImagesError, match="^version: x-1 is installed with different "
                           "content.*nothing was installed"):
            run(store, name="x", version="1", package=other)
        assert DebianPackages().status("gpuvirt-unit-verify-other") is None
        assert snapshot(str(store)) == before
        # The same bytes as the installed version: the package is installed, the store kept.
        result = run(store, name="x", version="1", package=same)
        assert result["actions"] == ["installed package gpuvirt-unit-verify-same 1.0 from %s"
                                     % same]
        assert DebianPackages().status("gpuvirt-unit-verify-same") == "1.0"
        assert snapshot(str(store)) == before
    finally:
        purge("gpuvirt-unit-verify-other", "gpuvirt-unit-verify-same")


FAKE_APT_GET = """#!/bin/sh
# apt-get for the tests: 'download NAME' copies $FAKE_APT_DEB into the current folder, as
# apt-get download fetches from a repository; 'install ... FILE' installs FILE with dpkg -i.
echo "$@" >> "$FAKE_APT_LOG"
case "$1" in
  download) exec cp "$FAKE_APT_DEB" . ;;
  install) for last; do :; done; exec dpkg -i "$last" ;;
esac
exit 100
"""


@needs_dpkg
def test_a_package_apt_get_would_install_is_downloaded_and_checked_first(
        store, src, tmp_path, monkeypatch):
    name = "gpuvirt-unit-verify-apt"
    image = qcow2(src / "a.qcow2", data=b"from the repository")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(FAKE_APT_GET)
    (bin_dir / "apt-get").chmod(0o755)
    log = tmp_path / "apt.log"
    log.write_text("")
    monkeypatch.setenv("PATH", "%s:%s" % (bin_dir, os.environ["PATH"]))
    monkeypatch.setenv("FAKE_APT_LOG", str(log))
    (tmp_path / "bad").mkdir()  # the same package name and version: another folder
    bad = build_deb(tmp_path / "bad", {"/usr/share/%s/x.qcow2" % name: corrupt_qcow2},
                    name=name)
    good = build_deb(tmp_path, {"/usr/share/%s/x.qcow2" % name:
                                lambda p: shutil.copy(image, p)}, name=name)
    try:
        monkeypatch.setenv("FAKE_APT_DEB", bad)
        with pytest.raises(ImagesError) as err:
            run(store, name="x", version="1", package=name)
        message = str(err.value)
        assert message.startswith("package: /usr/share/%s/x.qcow2 in package %s 1.0 "
                                  "(downloaded by apt-get) is a corrupt qcow2" % (name, name))
        assert "nothing was installed" in message
        assert log.read_text() == "download -q %s\n" % name
        assert DebianPackages().status(name) is None
        assert snapshot(str(store)) is None  # neither the download folder nor the store
        monkeypatch.setenv("FAKE_APT_DEB", good)
        log.write_text("")
        result = run(store, name="x", version="1", package=name)
        assert result["changed"]
        assert "installed package %s 1.0 with apt-get" % name in result["actions"]
        calls = log.read_text().splitlines()
        assert calls[0] == "download -q %s" % name and calls[1].startswith("install ")
        assert calls[1].endswith("/%s_1.0_all.deb" % name) and str(store) in calls[1]
        assert DebianPackages().status(name) == "1.0"
        assert sha256(store / "x-1.qcow2") == sha256(image)
        assert sorted(os.listdir(store)) == [".x-1.qcow2.json", "x", "x-1.qcow2"]
        log.write_text("")
        assert not run(store, name="x", version="1", package=name)["changed"]
        assert log.read_text() == ""  # an installed package is neither downloaded nor installed
    finally:
        purge(name)


# ----------------------------------------------------------------------------- libvirt usage


def test_disk_paths_reads_nested_backing_stores():
    xml = """<domain type='kvm'><name>v</name><devices>
      <disk type='file' device='disk'><source file='/d/top.qcow2'/>
        <backingStore type='file'><format type='qcow2'/><source file='/s/base.qcow2'/>
          <backingStore type='block'><source dev='/dev/vg/lv'/><backingStore/></backingStore>
        </backingStore><target dev='vda'/></disk>
      <disk type='network' device='disk'><source protocol='rbd' name='pool/img'/></disk>
      <disk type='volume' device='disk'><source pool='p' volume='v1'/></disk>
      <disk type='file' device='cdrom'><target dev='sda'/></disk>
    </devices></domain>"""
    dom = Domain.from_xml(xml)
    assert disk_paths(dom) == ("/d/top.qcow2", "/s/base.qcow2", "/dev/vg/lv")
    assert disk_paths(dom, lambda pool, vol: "/pools/%s/%s" % (pool, vol))[-1] == "/pools/p/v1"


@pytest.mark.libvirt
@pytest.mark.skipif(not has_libvirt(), reason="libvirt-python is not installed")
def test_usage_from_a_real_libvirt_domain(store, src, tmp_path):
    run(store, name="os", version="1", src=qcow2(src / "1.qcow2"))
    overlay = create_overlay(str(store / "os"), tmp_path / "vm.qcow2")
    xml = ("<domain type='test'><name>gpuvirt-unit-usage</name><memory>65536</memory>"
           "<os><type>hvm</type></os><devices><disk type='file' device='disk'>"
           "<source file='%s'/><target dev='vda'/></disk></devices></domain>" % overlay.path)
    with LibvirtGateway("test:///default") as gateway:
        dom = gateway.conn.defineXML(xml)
        try:
            def reader():
                return disk_chains(gateway.list_domains(live=True), gateway.volume_path)

            chains = reader()
            assert chains["gpuvirt-unit-usage"] == (overlay.path,)
            usage, warnings = disk_usage(chains)
            assert usage[str(store / "os-1.qcow2")] == ["gpuvirt-unit-usage"]
            assert any("/guest/diskimage1" in w for w in warnings)  # the driver's own domain
            with pytest.raises(ImagesError, match="used by domain gpuvirt-unit-usage"):
                ImageTask({"name": "os", "state": "absent", "store": str(store)},
                          usage_reader=reader).run()
        finally:
            dom.undefine()
    assert (store / "os-1.qcow2").exists()


def test_changes_wait_for_the_host_lock_but_reruns_do_not(store, src, tmp_path):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._lock import HostLock, HostLockError

    image = qcow2(src / "a.qcow2")
    lock_path = str(tmp_path / "alloc.lock")
    run(store, name="x", version="1", src=image)
    before = snapshot(str(store))
    with HostLock(lock_path, timeout=1, owner="kvm_vm other-run"):
        rerun = ImageTask({"name": "x", "version": "1", "src": image, "store": str(store)},
                          lock=HostLock(lock_path, timeout=0)).run()
        assert not rerun["changed"]
        with pytest.raises(HostLockError, match="kvm_vm other-run"):
            ImageTask({"name": "x", "version": "2", "src": image, "store": str(store)},
                      lock=HostLock(lock_path, timeout=0)).run()
    assert snapshot(str(store)) == before  # the staged copy was removed

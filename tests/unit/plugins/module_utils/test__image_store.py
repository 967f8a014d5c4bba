# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""The versioned image store (_image_store), through kvm_image's task, from files and URLs."""

import hashlib
import http.server
import json
import os
import struct
import threading

import pytest
from image_helpers import MIB, qcow2, raw_disk, run, sha256, snapshot

from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_store import (
    ImageStore,
    parse_checksum,
    validate_name,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._qemu_img import (
    ImagesError,
    create_overlay,
)


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

# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""The .deb package source (_deb_packages): real packages built with dpkg-deb."""

import hashlib
import os
import shutil
import struct
import subprocess

import pytest
from image_helpers import build_deb, qcow2, raw_disk, run, sha256, snapshot

from ansible_collections.gpuvirt.kvm.plugins.module_utils._deb_packages import (
    DebianPackages,
    pick_image_file,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_task import ImageTask
from ansible_collections.gpuvirt.kvm.plugins.module_utils._qemu_img import (
    ImagesError,
)

# ----------------------------------------------------------------------------- packages


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

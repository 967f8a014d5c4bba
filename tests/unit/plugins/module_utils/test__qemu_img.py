# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""The qemu-img gateway (_qemu_img) on tiny real images made with the real qemu-img."""

import os
import struct
import subprocess

import pytest
from image_helpers import MIB, qcow2, raw_disk

from ansible_collections.gpuvirt.kvm.plugins.module_utils._qemu_img import (
    ImagesError,
    chain_paths,
    check,
    create_disk,
    create_overlay,
    info,
    resize,
)

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

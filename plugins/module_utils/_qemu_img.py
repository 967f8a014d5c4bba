# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The qemu-img gateway: reading, creating and growing disk images. Private to this collection.

This is the collection's only ``qemu-img`` caller: every call goes through :func:`_run` with
``LANG=C`` so that errors carry qemu-img's own (English) words (_deb_packages runs dpkg through
the same :func:`_run`). It reads images (info, chain_paths, check, and disk_usage, which domain
uses which file), creates them (create_overlay, create_disk) and grows them (resize, undo_grow).
ImagesError, the error of every image module_util, is defined here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from dataclasses import dataclass

from ansible_collections.gpuvirt.kvm.plugins.module_utils._units import GIB

# The formats disks are made in, and the only ones the image store takes (_image_store).
SUPPORTED_FORMATS = ("qcow2", "raw")


class ImagesError(Exception):
    """An image operation failed; the message names the option or carries qemu-img's words."""


def _c_env():
    env = dict(os.environ)
    env.update(LANG="C", LC_ALL="C", LANGUAGE="C")
    return env


def _run(argv, ok=(0,), cwd=None):
    """Run a tool with LANG=C; return (rc, stdout, stderr) or raise ImagesError with stderr."""
    try:
        # Not AnsibleModule.run_command: these functions also run without a module (unit tests,
        # kvm_vm's and kvm_layout's worker threads), and this is the one place that runs tools
        # (but for DebianPackages.open_member, which streams what is too large for memory).
        proc = subprocess.run(  # pylint: disable=ansible-bad-function
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_c_env(), check=False,
            cwd=cwd)
    except FileNotFoundError as exc:
        hint = {"qemu-img": "install qemu-utils (Debian, Ubuntu) or qemu-img (RHEL)"}.get(
            argv[0], "install it")
        raise ImagesError("%s is not installed on this host: %s" % (argv[0], hint)) from exc
    out = proc.stdout.decode("utf-8", "replace")
    err = proc.stderr.decode("utf-8", "replace").strip()
    if proc.returncode not in ok:
        raise ImagesError(err or "%s exited with status %d" % (" ".join(argv[:2]),
                                                               proc.returncode))
    return proc.returncode, out, err


# ----------------------------------------------------------------------------- qemu-img


@dataclass(frozen=True)
class ImageInfo:
    """What qemu-img reports about one image file."""

    path: str
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str = None  # as written in the image header
    backing_path: str = None  # resolved against the image's folder
    backing_format: str = None
    encrypted: bool = False
    corrupt: bool = False
    data_file: str = None  # qcow2 external data file, if any
    backing_chain: tuple = ()  # ImageInfo of each backing file, nearest first


def _resolve_backing(image_path, backing):
    if backing is None:
        return None
    if backing.startswith("json:") or "://" in backing:
        return backing  # a protocol, never a file in the store
    if os.path.isabs(backing):
        return os.path.normpath(backing)
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(image_path)), backing))


def _info_from_json(path, data):
    specific = (data.get("format-specific") or {}).get("data") or {}
    backing = data.get("backing-filename")
    return ImageInfo(
        path=path,
        format=data.get("format", ""),
        virtual_size=int(data.get("virtual-size", 0)),
        actual_size=int(data.get("actual-size", 0)),
        backing_file=backing,
        backing_path=_resolve_backing(path, backing),
        backing_format=data.get("backing-filename-format"),
        encrypted=bool(data.get("encrypted", False)),
        corrupt=bool(specific.get("corrupt", False)),
        data_file=specific.get("data-file"),
    )


def info(path, backing_chain=True, force_share=True):
    """qemu-img info of ``path`` (and its backing chain): format, sizes, backing files.

    ``force_share`` (-U) reads images that a running VM holds locked, as libvirt's own probing
    does; it never writes.
    """
    path = os.path.abspath(path)
    argv = ["qemu-img", "info", "--output=json"]
    if backing_chain:
        argv.append("--backing-chain")
    if force_share:
        argv.append("-U")
    _rc, out, _err = _run(argv + [path])
    try:
        data = json.loads(out)
    except ValueError as exc:
        raise ImagesError("qemu-img info %s printed no JSON: %s" % (path, out[:200])) from exc
    if not backing_chain:
        return _info_from_json(path, data)
    items = data if isinstance(data, list) else [data]
    top = _info_from_json(path, items[0])
    chain, parent = [], top
    for item in items[1:]:
        child = _info_from_json(parent.backing_path or item.get("filename", ""), item)
        chain.append(child)
        parent = child
    return dataclasses.replace(top, backing_chain=tuple(chain))


def chain_paths(path):
    """``path`` and every backing file below it, as the images name them (nearest first)."""
    path = os.path.abspath(path)
    try:
        top = info(path, backing_chain=True)
        return [path] + [link.path for link in top.backing_chain]
    except ImagesError:
        pass
    # A missing or unreadable link breaks --backing-chain; walk it by hand as far as it goes.
    paths, current = [path], path
    for _depth in range(64):
        try:
            step = info(current, backing_chain=False)
        except ImagesError:
            break
        if not step.backing_path or step.backing_path in paths:
            break
        paths.append(step.backing_path)
        current = step.backing_path
    return paths


def check(path):
    """qemu-img check of a qcow2 image: raise ImagesError on corruption, return the report."""
    rc, out, err = _run(["qemu-img", "check", "--output=json", "-U", os.path.abspath(path)],
                        ok=(0, 1, 2, 3))
    try:
        report = json.loads(out) if out.strip() else {}
    except ValueError:
        report = {}
    # 0: clean; 3: leaked clusters only (wasted space, data intact); 1 and 2: unusable.
    if rc in (1, 2) or report.get("corruptions") or report.get("check-errors"):
        detail = err or "%d corruptions" % report.get("corruptions", 0)
        raise ImagesError("qemu-img check: %s" % detail)
    return report


def _size_arg(size_gb, what):
    if isinstance(size_gb, bool) or not isinstance(size_gb, (int, float)) or size_gb <= 0:
        raise ImagesError("%s: must be a positive number of GiB, got %r" % (what, size_gb))
    # Whole MiB: qemu-img rounds odd sizes up to its cluster or sector size anyway.
    mib = -(-int(size_gb * 1024 * 1024 * 1024) // (1024 * 1024))
    return mib * 1024 * 1024


def create_overlay(base, path, size_gb=None, base_format=None, read_back=True):
    """A qcow2 overlay at ``path`` on the versioned ``base`` (O(1) in the base's size).

    ``base_format`` (known from the store's records) spares probing the base when no size is
    asked for; ``read_back=False`` spares reading the new overlay back (returns None).
    """
    # realpath: an overlay on the default alias would change under a VM when the default moves.
    base = os.path.realpath(base)
    path = os.path.abspath(path)
    if os.path.lexists(path):
        raise ImagesError("cannot create overlay %s: the file exists" % path)
    base_info = None
    if base_format is None or size_gb is not None:
        base_info = info(base, backing_chain=False)
        base_format = base_info.format
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", base_format, path]
    if size_gb is not None:
        size = _size_arg(size_gb, "size")
        if size < base_info.virtual_size:
            raise ImagesError(
                "size: %s GiB is smaller than the image %s (%.1f GiB); an OS disk can only be "
                "as large as its image or larger" % (size_gb, base, base_info.virtual_size / GIB))
        argv.append(str(size))
    try:
        _run(argv)
    except ImagesError as exc:
        raise ImagesError("cannot create overlay %s on %s: %s" % (path, base, exc)) from exc
    return info(path, backing_chain=False) if read_back else None


def create_disk(path, size_gb, fmt="qcow2"):
    """An empty ``fmt`` disk of ``size_gb`` GiB at ``path`` (sparse; refuses to overwrite)."""
    if fmt not in SUPPORTED_FORMATS:
        raise ImagesError("disk format must be one of %s, got %r"
                          % (", ".join(SUPPORTED_FORMATS), fmt))
    path = os.path.abspath(path)
    if os.path.lexists(path):
        raise ImagesError("cannot create disk %s: the file exists" % path)
    size = _size_arg(size_gb, "size")
    try:
        _run(["qemu-img", "create", "-q", "-f", fmt, path, str(size)])
    except ImagesError as exc:
        raise ImagesError("cannot create disk %s: %s" % (path, exc)) from exc
    return info(path, backing_chain=False)


def resize(path, size_gb):
    """Grow the image at ``path`` to ``size_gb`` GiB; shrinking is refused (it loses data)."""
    current = info(path, backing_chain=False)
    size = _size_arg(size_gb, "size")
    if size < current.virtual_size:
        raise ImagesError("size: %s GiB is smaller than %s (%.1f GiB); disks are never shrunk"
                          % (size_gb, path, current.virtual_size / GIB))
    if size == current.virtual_size:
        return current
    _run(["qemu-img", "resize", "-q", "-f", current.format, os.path.abspath(path), str(size)])
    return info(path, backing_chain=False)


def undo_grow(path, size_bytes):
    """Shrink ``path`` back to ``size_bytes`` right after resize() grew it (the rollback of a
    failed run: nothing can have been written to the new space yet)."""
    current = info(path, backing_chain=False)
    if current.virtual_size <= size_bytes:
        return
    _run(["qemu-img", "resize", "-q", "-f", current.format, "--shrink", os.path.abspath(path),
          str(int(size_bytes))])


def disk_usage(domain_disks):
    """{path: sorted domain names} for every file in every domain's disk chains, and warnings.

    ``domain_disks`` is ``_holdings.disk_chains()``: {domain: disk paths}. Each path is
    followed down its backing chain with qemu-img; every link is recorded both as named and as
    its real path, so an image counts as used through its default alias too.
    """
    usage, warnings, chains = {}, [], {}
    for domain in sorted(domain_disks):
        for path in domain_disks[domain]:
            if path not in chains:
                if os.path.exists(path):
                    chains[path] = chain_paths(path)
                else:
                    chains[path] = [path]
                    warnings.append("domain %s names disk %s, which does not exist"
                                    % (domain, path))
            for link in chains[path]:
                for key in (link, os.path.realpath(link)):
                    usage.setdefault(key, set()).add(domain)
    return {key: sorted(names) for key, names in usage.items()}, warnings

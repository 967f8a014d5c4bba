# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Disk images and the image store. Private to this collection.

This is the collection's only ``qemu-img`` caller: every call goes through :func:`_run` with
``LANG=C`` so that errors carry qemu-img's own (English) words. It also owns the image store, a
folder of versioned base images with one default alias per name::

    /var/lib/gpuvirt/images/
        dgx-os-6.1.qcow2
        dgx-os-6.2.qcow2
        dgx-os -> dgx-os-6.2.qcow2          (the default alias, a relative symlink)
        .dgx-os-6.2.qcow2.json              (what was installed: name, version, digests, source)

VM disks are qcow2 overlays on the versioned file (never on the alias), so moving the default
never changes a VM's disk, and an image stays in the store while any disk's backing chain uses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field

DEFAULT_STORE = "/var/lib/gpuvirt/images"
SUPPORTED_FORMATS = ("qcow2", "raw")
CHECKSUM_ALGORITHMS = {"sha256": 64, "sha512": 128}
# Files a package may ship as its image (the store then names it .qcow2 or .raw by content).
PACKAGE_IMAGE_SUFFIXES = (".qcow2", ".qcow", ".img", ".raw")
MAX_NAME_LENGTH = 64
NAME_PATTERN = "[A-Za-z0-9][A-Za-z0-9._+-]*"
_NAME_RE = re.compile(r"^%s$" % NAME_PATTERN)
_DEB_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_CHUNK = 4 * 1024 * 1024
# Runs of zeros this long (and aligned) become holes in the copy.
_HOLE = 64 * 1024
_ZEROS = bytes(_HOLE)
_SECTOR = 512
GIB = 1024 ** 3
# Magic numbers of compressed files, a common mistake (an image.qcow2.xz given as src).
_COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2",
    b"PK\x03\x04": "zip",
}


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

    ``domain_disks`` is ``LibvirtGateway.disk_chains()``: {domain: disk paths}. Each path is
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


# ----------------------------------------------------------------------------- names, checksums


def validate_name(value, option):
    """Raise ImagesError unless ``value`` is a usable image name or version."""
    if not isinstance(value, str) or not value:
        raise ImagesError("%s: must not be empty" % option)
    if len(value) > MAX_NAME_LENGTH:
        raise ImagesError("%s: %r is %d characters long; at most %d are allowed"
                          % (option, value[:20] + "...", len(value), MAX_NAME_LENGTH))
    if not _NAME_RE.match(value) or ".." in value:
        raise ImagesError(
            "%s: %r is not a valid image %s; use letters, digits and '.', '_', '+', '-', "
            "starting with a letter or digit, without '..' (for example dgx-os or 6.2.1)"
            % (option, value, option))
    return value


def parse_checksum(text, option="checksum"):
    """'sha256:<hex>' or 'sha512:<hex>' -> (algorithm, lowercase hex)."""
    algo, sep, digest = (text or "").strip().partition(":")
    algo, digest = algo.lower(), digest.strip().lower()
    if not sep or algo not in CHECKSUM_ALGORITHMS:
        raise ImagesError("%s: %r must be 'sha256:<64 hex digits>' or 'sha512:<128 hex digits>'"
                          % (option, text))
    if len(digest) != CHECKSUM_ALGORITHMS[algo] or not re.match(r"^[0-9a-f]+$", digest):
        raise ImagesError("%s: the %s digest must be %d hex digits, got %r"
                          % (option, algo, CHECKSUM_ALGORITHMS[algo], digest))
    return algo, digest


def file_digests(path, algorithms=("sha256",)):
    """{algorithm: hex digest} of a file, read once."""
    hashes = {algo: hashlib.new(algo) for algo in algorithms}
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(_CHUNK)
            if not chunk:
                break
            for digest in hashes.values():
                digest.update(chunk)
    return {algo: digest.hexdigest() for algo, digest in hashes.items()}


def _copy_hashing(reader, fd, algorithms):
    """Copy a stream into ``fd``, hashing it; runs of zeros become holes (raw images are sparse)."""
    hashes = {algo: hashlib.new(algo) for algo in algorithms}
    total = 0
    while True:
        chunk = reader.read(_CHUNK)
        if not chunk:
            break
        for digest in hashes.values():
            digest.update(chunk)
        view = memoryview(chunk)
        for offset in range(0, len(chunk), _HOLE):
            block = view[offset:offset + _HOLE]
            if block == _ZEROS[:len(block)]:
                os.lseek(fd, len(block), os.SEEK_CUR)
            else:
                while block:
                    block = block[os.write(fd, block):]
        total += len(chunk)
    os.ftruncate(fd, total)
    return total, {algo: digest.hexdigest() for algo, digest in hashes.items()}


def _sniff_raw(path, size):
    """Why a file qemu-img calls raw is not a disk image, or None."""
    if size == 0:
        return "it is empty"
    with open(path, "rb") as handle:
        head = handle.read(4096)
    for magic, kind in _COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            return "it is %s-compressed; decompress it first" % kind
    if b"\0" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
            return "it looks like text, not a disk (starts with %r)" % text[:40]
    if size % _SECTOR:
        return ("its size (%d bytes) is not a whole number of %d-byte sectors"
                % (size, _SECTOR))
    return None


# ----------------------------------------------------------------------------- the store


@dataclass
class Image:
    """One installed image version."""

    name: str
    version: str
    format: str
    path: str
    size: int = 0
    virtual_size: int = 0
    digests: dict = field(default_factory=dict)
    source: str = ""
    backing: str = None  # a backing file in the store, for an image that is itself an overlay
    installed: str = ""
    is_default: bool = False
    managed: bool = True  # has the store's metadata; False for a file adopted by its name
    used_by: tuple = ()  # domains whose disk chains use it
    base_of: tuple = ()  # store images whose backing file it is

    @property
    def ref(self):
        return "%s-%s" % (self.name, self.version)

    def to_dict(self):
        """The public view, as the module returns it."""
        return {
            "name": self.name, "version": self.version, "ref": self.ref, "path": self.path,
            "format": self.format, "size": self.size, "virtual_size": self.virtual_size,
            "sha256": self.digests.get("sha256"), "source": self.source,
            "is_default": self.is_default, "used_by": list(self.used_by),
            "base_of": list(self.base_of),
        }


@dataclass
class Staged:
    """Content copied into the store under a temporary name, verified, not yet installed."""

    path: str
    size: int
    digests: dict
    source: str
    info: ImageInfo = None
    created_root: bool = False  # the store folder was made for it (removed again on discard)
    committed: bool = False


class ImageStore:
    """The folder of versioned images and their default aliases."""

    def __init__(self, root=DEFAULT_STORE):
        self.root = os.path.abspath(root)

    # -- naming
    @staticmethod
    def filename(name, version, fmt):
        return "%s-%s.%s" % (name, version, fmt)

    def alias_path(self, name):
        return os.path.join(self.root, name)

    def _meta_path(self, filename):
        return os.path.join(self.root, ".%s.json" % filename)

    def contains(self, path):
        """Whether ``path`` (resolved) lies inside the store folder."""
        real = os.path.realpath(path)
        return real.startswith(os.path.realpath(self.root) + os.sep)

    # -- reading
    def _entries(self):
        try:
            return sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ImagesError("store: cannot read %s: %s" % (self.root, exc.strerror)) from exc

    def _load_meta(self, filename):
        try:
            with open(self._meta_path(filename), "r", encoding="utf-8") as handle:
                meta = json.load(handle)
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def aliases(self):
        """{name: file name the alias points to} for every default alias in the store."""
        result = {}
        for entry in self._entries():
            full = os.path.join(self.root, entry)
            if entry.startswith(".") or not os.path.islink(full):
                continue
            target = os.readlink(full)
            if os.path.dirname(target) in ("", self.root, os.path.realpath(self.root)):
                result[entry] = os.path.basename(target)
        return result

    def scan(self):
        """(images, warnings): every image file with its name, version and default flag."""
        images, warnings = [], []
        aliases = self.aliases()
        seen = {}
        for entry in self._entries():
            full = os.path.join(self.root, entry)
            stem, dot, ext = entry.rpartition(".")
            if entry.startswith(".") or not dot or ext not in SUPPORTED_FORMATS:
                continue
            if os.path.islink(full) or not os.path.isfile(full):
                continue
            st = os.stat(full)
            meta = self._load_meta(entry)
            if meta and self.filename(meta.get("name"), meta.get("version"), ext) == entry:
                digests = dict(meta.get("digests") or {})
                if meta.get("size") != st.st_size:
                    # Changed behind the store's back: the recorded digests no longer hold.
                    warnings.append("image %s changed size since it was installed" % entry)
                    digests = {}
                image = Image(
                    name=meta["name"], version=meta["version"], format=ext, path=full,
                    size=st.st_size, virtual_size=int(meta.get("virtual_size") or 0),
                    digests=digests, source=meta.get("source", ""),
                    backing=meta.get("backing"), installed=meta.get("installed", ""))
            else:
                image = self._adopt(entry, stem, ext, full, st.st_size, aliases)
                if image is None:
                    warnings.append("file %s in the store has no metadata and matches no "
                                    "default alias; it is ignored" % entry)
                    continue
            if (image.name, image.version) in seen:
                warnings.append("image %s version %s exists as both %s and %s"
                                % (image.name, image.version, seen[(image.name, image.version)],
                                   entry))
                continue
            seen[(image.name, image.version)] = entry
            image.is_default = aliases.get(image.name) == entry
            images.append(image)
        for name, target in sorted(aliases.items()):
            if not os.path.isfile(os.path.join(self.root, target)):
                warnings.append("default alias %s points to %s, which does not exist"
                                % (name, target))
        images.sort(key=lambda i: (i.name, _natural(i.version)))
        return images, warnings

    def _adopt(self, entry, stem, ext, full, size, aliases):
        """An image put into the store by hand, named by the longest alias that prefixes it."""
        names = [n for n in aliases if stem.startswith(n + "-") and len(stem) > len(n) + 1]
        if not names:
            return None
        name = max(names, key=len)
        version = stem[len(name) + 1:]
        try:
            validate_name(version, "version")
            detail = info(full, backing_chain=False)
        except ImagesError:
            return None
        return Image(name=name, version=version, format=ext, path=full, size=size,
                     virtual_size=detail.virtual_size, backing=detail.backing_path,
                     source="found in the store", managed=False)

    def list(self, usage=None):
        """Every installed image with used_by filled from ``usage`` ({path: domain names})."""
        images, _warnings = self.scan()
        return self.annotate(images, usage)

    def annotate(self, images, usage=None):
        """Fill used_by (domains, from ``usage``) and base_of (store images) in ``images``."""
        usage = usage or {}
        by_path = {os.path.realpath(i.path): i for i in images}
        bases = {}
        for image in images:
            if image.backing:
                base = by_path.get(os.path.realpath(image.backing))
                if base is not None:
                    bases.setdefault(base.path, []).append(image.ref)
        for image in images:
            users = set(usage.get(image.path, ())) | set(usage.get(os.path.realpath(image.path),
                                                                   ()))
            image.used_by = tuple(sorted(users))
            image.base_of = tuple(sorted(bases.get(image.path, ())))
        return images

    def get(self, name, version, images=None):
        """The installed image ``name`` ``version``, or None."""
        for image in images if images is not None else self.scan()[0]:
            if image.name == name and image.version == version:
                return image
        return None

    def versions(self, name, images=None):
        """Installed versions of ``name``, oldest first (natural order)."""
        return [i for i in (images if images is not None else self.scan()[0]) if i.name == name]

    def default_version(self, name, images=None):
        """The version the default alias of ``name`` points to, or None."""
        for image in self.versions(name, images):
            if image.is_default:
                return image.version
        return None

    def describe(self, images=None):
        """A one-line inventory for error messages."""
        images = images if images is not None else self.scan()[0]
        if not images:
            return "the store %s holds no images" % self.root
        names = []
        for name in sorted({i.name for i in images}):
            versions = [i.version for i in self.versions(name, images)]
            default = self.default_version(name, images)
            names.append("%s (%sversions %s)" % (
                name, "default %s; " % default if default else "no default; ",
                ", ".join(versions)))
        return "installed in %s: %s" % (self.root, "; ".join(names))

    def resolve(self, ref):
        """The image a reference names: a name (its default alias) or name-version."""
        if not isinstance(ref, str) or not ref or len(ref) > 2 * MAX_NAME_LENGTH + 1 \
                or not _NAME_RE.match(ref) or ".." in ref:
            raise ImagesError("image: %r is not a valid image name or name-version" % (ref,))
        images = self.scan()[0]
        named = self.versions(ref, images)
        if named:
            default = self.default_version(ref, images)
            if default is None:
                raise ImagesError(
                    "image: %s has no default version (%s); give name-version, or make one "
                    "the default with gpuvirt.kvm.kvm_image state=default"
                    % (ref, ", ".join(i.version for i in named)))
            return self._inside(self.get(ref, default, images), images)
        for image in images:
            if image.ref == ref:
                return self._inside(image, images)
        raise ImagesError("image: %r is not installed; %s. Install it with gpuvirt.kvm.kvm_image"
                          % (ref, self.describe(images)))

    def _inside(self, image, images):
        """``image`` if its whole backing chain is in the store, else ImagesError."""
        # A file put into the store by hand is adopted without kvm_image's checks; an overlay
        # on it would depend on a file the store does not manage (and may change or vanish).
        by_path = {os.path.realpath(i.path): i for i in images}
        current, seen = image, set()
        while current is not None and current.backing and current.path not in seen:
            seen.add(current.path)
            backing = os.path.realpath(os.path.join(os.path.dirname(current.path),
                                                    current.backing))
            if backing not in by_path:
                raise ImagesError(
                    "image: %s (%s) is built on %s, which is not an image in the store %s; "
                    "install that base with gpuvirt.kvm.kvm_image, or use another image"
                    % (image.ref, image.path, backing, self.root))
            current = by_path[backing]
        return image

    # -- staging (content into the store under a temporary name)
    def _make_root(self):
        created = not os.path.isdir(self.root)
        if os.path.exists(self.root) and created:
            raise ImagesError("store: %s exists and is not a folder" % self.root)
        try:
            os.makedirs(self.root, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise ImagesError("store: cannot create %s: %s" % (self.root, exc.strerror)) from exc
        return created

    def _temp(self):
        fd, path = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".partial")
        return fd, path

    def scratch_folder(self):
        """(a private hidden folder in the store, whether the store folder was made for it).

        For what must lie on disk before it is checked (a .deb apt-get downloads): the store's
        file system holds the image anyway, where /tmp may be memory. The caller removes it.
        """
        created = self._make_root()
        try:
            return tempfile.mkdtemp(dir=self.root, prefix=".tmp-", suffix=".pkg"), created
        except OSError as exc:
            raise ImagesError("store: cannot create a temporary folder in %s: %s"
                              % (self.root, exc.strerror)) from exc

    def stage_file(self, src, algorithms=("sha256",)):
        """Copy a local file into the store under a temporary name, hashing it on the way."""
        return self._stage(lambda: open(src, "rb"), src, algorithms)

    def stage_url(self, url, algorithms=("sha256",), timeout=60):
        """Download ``url`` into the store under a temporary name, hashing it on the way."""
        # Imported here: only URL sources need them, and they cost every other module run
        # (kvm_vm, kvm_layout) their import time (ssl, http, email) for nothing.
        import http.client
        import urllib.error

        try:
            from ansible.module_utils.urls import ConnectionError as UrlConnectionError
            from ansible.module_utils.urls import open_url
        except ImportError as exc:  # the rest of this module works without ansible
            raise ImagesError("src: downloading needs ansible.module_utils.urls") from exc

        def opener():
            try:
                return open_url(url, timeout=timeout, http_agent="gpuvirt.kvm kvm_image")
            except urllib.error.HTTPError as exc:
                raise ImagesError("src: cannot download %s: HTTP %s %s"
                                  % (url, exc.code, exc.reason)) from exc
            except (urllib.error.URLError, UrlConnectionError, http.client.HTTPException,
                    OSError) as exc:  # socket.timeout is an OSError
                raise ImagesError("src: cannot download %s: %s"
                                  % (url, getattr(exc, "reason", exc))) from exc
        return self._stage(opener, url, algorithms, errors=(OSError, http.client.HTTPException))

    def stage_stream(self, opener, source, algorithms=("sha256",), option="src"):
        """Copy what ``opener()`` reads (a context manager) into the store, hashing it."""
        return self._stage(opener, source, algorithms, option=option)

    def _stage(self, opener, source, algorithms, errors=(OSError,), option="src"):
        algorithms = tuple(sorted(set(algorithms) | {"sha256"}))
        created = self._make_root()
        fd, path = self._temp()
        staged = False
        try:
            with opener() as reader:
                size, digests = _copy_hashing(reader, fd, algorithms)
                # http.client ends a body cut short by the server as if it were complete; what
                # it still expected of the Content-Length is left in .length.
                missing = getattr(reader, "length", None)
            if isinstance(missing, int) and missing > 0:
                raise ImagesError(
                    "src: the download of %s ended after %d of the %d bytes the server "
                    "announced (the connection was closed early); try again"
                    % (source, size, size + missing))
            os.fchmod(fd, 0o644)
            staged = True
        except errors as exc:  # a read cut short: OSError (socket.timeout too), HTTPException
            raise ImagesError("%s: cannot copy %s into the store %s: %s"
                              % (option, source, self.root,
                                 getattr(exc, "strerror", None) or exc)) from exc
        finally:
            os.close(fd)
            if not staged:  # any failure, Ctrl-C included, leaves no temp file behind
                self._discard_path(path, created)
        return Staged(path=path, size=size, digests=digests, source=source, created_root=created)

    def _discard_path(self, path, created_root):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        if created_root:
            try:
                os.rmdir(self.root)  # only if still empty: leave the host as it was
            except OSError:
                pass

    def discard(self, staged):
        """Remove staged content that was not installed (and a store folder made for it)."""
        if staged is not None and not staged.committed:
            self._discard_path(staged.path, staged.created_root)

    def verify(self, path, option="src", label=None, images=None):
        """qemu-img's verdict on a candidate image; ImageInfo, or ImagesError naming ``option``.

        A relative backing file is resolved against the store folder, where the image will live.
        """
        label = label or path
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ImagesError("%s: cannot read %s: %s" % (option, label, exc.strerror)) from exc
        try:
            detail = info(path, backing_chain=False)
        except ImagesError as exc:
            raise ImagesError("%s: %s is not a usable disk image: %s" % (option, label, exc)
                              ) from exc
        if detail.format not in SUPPORTED_FORMATS:
            raise ImagesError(
                "%s: %s is a %s image; the store takes qcow2 or raw. Convert it first: "
                "qemu-img convert -O qcow2 %s image.qcow2" % (option, label, detail.format, label))
        if detail.encrypted:
            raise ImagesError("%s: %s is encrypted; the store takes unencrypted images"
                              % (option, label))
        if detail.format == "raw":
            why = _sniff_raw(path, st.st_size)
            if why:
                raise ImagesError("%s: %s is not a disk image: qemu-img reads it as raw data, "
                                  "but %s" % (option, label, why))
            return detail
        if detail.corrupt:
            raise ImagesError("%s: %s is a qcow2 image marked corrupt; repair it with "
                              "qemu-img check -r all" % (option, label))
        try:
            check(path)
        except ImagesError as exc:
            raise ImagesError("%s: %s is a corrupt qcow2 image: %s" % (option, label, exc)
                              ) from exc
        if detail.data_file:
            raise ImagesError("%s: %s keeps its data in an external file (%s); the store takes "
                              "self-contained images" % (option, label, detail.data_file))
        if detail.backing_file:
            backing = detail.backing_file
            if not (backing.startswith("json:") or "://" in backing) and \
                    not os.path.isabs(backing):
                backing = os.path.join(self.root, backing)
            known = images if images is not None else self.scan()[0]
            inside = any(os.path.realpath(i.path) == os.path.realpath(backing) for i in known)
            if not inside:
                raise ImagesError(
                    "%s: %s has the backing file %s, which is not an image in the store %s. "
                    "Flatten it first (qemu-img convert -O qcow2 %s flat.qcow2), or install "
                    "its base into the store and rebase onto that file"
                    % (option, label, detail.backing_file, self.root, label))
            detail = dataclasses.replace(detail, backing_path=os.path.realpath(backing))
        return detail

    # -- changing
    def _write_meta(self, image, staged):
        meta = {
            "name": image.name, "version": image.version, "format": image.format,
            "size": staged.size, "virtual_size": staged.info.virtual_size,
            "digests": staged.digests, "source": staged.source,
            "backing": staged.info.backing_path,
            "installed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        fd, tmp = self._temp()
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(meta, handle, indent=2, sort_keys=True)
                handle.write("\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self._meta_path(os.path.basename(image.path)))
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise ImagesError("store: cannot write metadata in %s: %s"
                              % (self.root, exc.strerror)) from exc

    def commit(self, staged, name, version, replace=None):
        """Install staged content as ``name`` ``version`` (atomic rename); returns the Image.

        ``replace`` is the installed Image this content replaces (force), or None.
        """
        if staged.info is None:
            raise ImagesError("internal: staged content was not verified")
        path = os.path.join(self.root, self.filename(name, version, staged.info.format))
        if os.path.lexists(path) and (replace is None or replace.path != path):
            raise ImagesError("version: %s already exists in the store" % path)
        image = Image(name=name, version=version, format=staged.info.format, path=path,
                      size=staged.size, virtual_size=staged.info.virtual_size,
                      digests=dict(staged.digests), source=staged.source,
                      backing=staged.info.backing_path)
        # Metadata first: a crash in between leaves metadata without a file, which is ignored.
        self._write_meta(image, staged)
        os.replace(staged.path, path)
        staged.committed = True
        if replace is not None and replace.path != path:
            # Same version in another format: the new file takes over the old one's alias.
            if self.aliases().get(name) == os.path.basename(replace.path):
                self._point_alias(name, os.path.basename(path))
            self.unlink_image(replace.path)
        return image

    def _point_alias(self, name, filename):
        alias = self.alias_path(name)
        tmp = os.path.join(self.root, ".tmp-alias-%d-%s" % (os.getpid(), name))
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(filename, tmp)  # relative: the store may be mounted elsewhere
        os.replace(tmp, alias)  # atomic: a reader sees the old or the new default, never none

    def set_default(self, name, version, usage=None):
        """Point the default alias of ``name`` at ``version``; refuse if disks use the alias."""
        images = self.scan()[0]
        image = self.get(name, version, images)
        if image is None:
            raise ImagesError("version: %s %s is not installed; %s"
                              % (name, version, self.describe(images)))
        blockers = self.alias_blockers(name, usage)
        current = self.default_version(name, images)
        if current != version and blockers:
            raise ImagesError(self.alias_message(name, blockers))
        self._point_alias(name, os.path.basename(image.path))

    def alias_blockers(self, name, usage=None):
        """Domains whose disk chains name the default alias itself (not a versioned file)."""
        return sorted(set((usage or {}).get(self.alias_path(name), ())))

    def alias_message(self, name, blockers):
        return ("state: the disks of %s use the default alias %s itself as a backing file, so "
                "moving or removing it would change their disks; rebase them onto a versioned "
                "file (qemu-img rebase -u -b %s-VERSION.qcow2) first"
                % (", ".join(blockers), self.alias_path(name), self.alias_path(name)))

    def removal_blockers(self, image):
        """Why ``image`` (annotated by list/annotate) cannot be removed: its users."""
        reasons = []
        if image.used_by:
            reasons.append("used by domain%s %s" % ("s" if len(image.used_by) > 1 else "",
                                                    ", ".join(image.used_by)))
        if image.base_of:
            reasons.append("the backing file of image%s %s" % (
                "s" if len(image.base_of) > 1 else "", ", ".join(image.base_of)))
        return reasons

    def remove(self, name, version, usage=None):
        """Remove one version; refuses while any disk chain or store image uses it."""
        images = self.annotate(self.scan()[0], usage)
        image = self.get(name, version, images)
        if image is None:
            return False
        reasons = self.removal_blockers(image)
        if reasons:
            raise ImagesError("state: %s is %s; remove those first" % (image.ref,
                                                                       "; ".join(reasons)))
        if image.is_default:
            others = [i.version for i in self.versions(name, images) if i is not image]
            if others:
                raise ImagesError(
                    "version: %s is the default of %s and %s remain%s; make another version "
                    "the default first (state=default, version=%s)"
                    % (version, name, ", ".join(others), "s" if len(others) == 1 else "",
                       others[-1]))
            blockers = self.alias_blockers(name, usage)
            if blockers:
                raise ImagesError(self.alias_message(name, blockers))
            os.unlink(self.alias_path(name))
        self.unlink_image(image.path)
        return True

    def remove_alias(self, name):
        """Remove the default alias of ``name`` (when no version is left to point at)."""
        try:
            os.unlink(self.alias_path(name))
        except FileNotFoundError:
            pass

    def unlink_image(self, path):
        """Delete an image file and its metadata (no checks: callers decide)."""
        os.unlink(path)
        try:
            os.unlink(self._meta_path(os.path.basename(path)))
        except FileNotFoundError:
            pass


def _natural(version):
    """Sort key: 6.10 after 6.9."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", version) if part]


# ----------------------------------------------------------------------------- Debian packages


def _deb_path(name):
    """A path as a .deb's data archive names it (./usr/...) -> as installed (/usr/...)."""
    return os.path.normpath("/" + name.lstrip("./"))


class DebianPackages:
    """Installs packages that ship an image (as NVIDIA shipped dgx-kvm-image-*), and lists them.

    Nothing is installed unchecked: ImageTask reads the image out of the .deb (open_member),
    checks it, and only then installs that same .deb (install_deb, install_file).
    """

    @staticmethod
    def is_deb_path(package):
        return package.endswith(".deb") and (os.sep in package or os.path.exists(package))

    def deb_fields(self, path):
        """(package name, version) of a .deb file."""
        if not os.path.isfile(path):
            raise ImagesError("package: %s does not exist" % path)
        try:
            _rc, out, _err = _run(["dpkg-deb", "--show", "--showformat=${Package}\t${Version}\n",
                                   path])
        except ImagesError as exc:
            raise ImagesError("package: %s is not a Debian package: %s" % (path, exc)) from exc
        name, _tab, version = out.strip().partition("\t")
        return name, version

    def deb_files(self, path):
        """Regular files a .deb ships (absolute paths), read from the archive."""
        _rc, out, _err = _run(["dpkg-deb", "--contents", path])
        files = []
        for line in out.splitlines():
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[0].startswith("-"):
                files.append(_deb_path(parts[5]))
        return files

    @contextlib.contextmanager
    def open_member(self, deb, path):
        """A reader of the file ``path`` (as installed, /usr/...) inside the .deb file ``deb``.

        Read straight from ``dpkg-deb --fsys-tarfile``: nothing is unpacked to disk or installed.
        """
        with tempfile.TemporaryFile() as errors:
            try:
                # Not _run: an image is too large to hold in memory, so this streams.
                proc = subprocess.Popen(  # pylint: disable=ansible-bad-function
                    ["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE, stderr=errors,
                    env=_c_env())
            except FileNotFoundError as exc:
                raise ImagesError("dpkg-deb is not installed on this host: install dpkg"
                                  ) from exc
            try:
                with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                    for member in tar:
                        if member.isfile() and _deb_path(member.name) == path:
                            yield tar.extractfile(member)
                            return
                problem = "it holds no file %s" % path
            except tarfile.TarError as exc:  # the archive is cut short or damaged
                problem = "cannot read %s from it: %s" % (path, exc)
            finally:
                proc.stdout.close()  # dpkg-deb stops at the closed pipe once the file is read
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            errors.seek(0)
            detail = errors.read().decode("utf-8", "replace").strip()
            raise ImagesError("package: %s: %s%s" % (deb, problem,
                                                     " (%s)" % detail if detail else ""))

    def status(self, name):
        """The installed version of package ``name``, or None."""
        rc, out, _err = _run(["dpkg-query", "--show", "--showformat=${db:Status-Status}\t"
                              "${Version}\n", name], ok=(0, 1))
        if rc != 0:
            return None
        state, _tab, version = out.strip().partition("\t")
        return version if state == "installed" else None

    def files(self, name):
        """Regular files the installed package ``name`` put on the host."""
        _rc, out, _err = _run(["dpkg-query", "--listfiles", name])
        return [line for line in out.splitlines() if line.startswith("/")
                and os.path.isfile(line) and not os.path.islink(line)]

    def install_deb(self, path):
        env_run = ["env", "DEBIAN_FRONTEND=noninteractive", "dpkg", "-i", path]
        try:
            _run(env_run)
        except ImagesError as exc:
            raise ImagesError("package: dpkg -i %s failed: %s (missing dependencies: "
                              "apt-get -f install)" % (path, exc)) from exc

    def download(self, name, folder):
        """The .deb of ``name`` that apt-get would install, fetched into ``folder`` (only)."""
        try:
            _run(["apt-get", "download", "-q", name], cwd=folder)
        except ImagesError as exc:
            raise ImagesError("package: apt-get could not download %s: %s"
                              % (name, str(exc)[-600:])) from exc
        debs = sorted(f for f in os.listdir(folder) if f.endswith(".deb"))
        if len(debs) != 1:
            raise ImagesError("package: apt-get download %s fetched %s, not one .deb file"
                              % (name, ", ".join(debs) or "nothing"))
        return os.path.join(folder, debs[0])

    def install_file(self, path):
        """Install the .deb file ``path`` with apt-get, which also installs its dependencies."""
        argv = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q",
                "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300",
                os.path.abspath(path)]
        try:
            _run(argv)
        except ImagesError as exc:
            raise ImagesError("package: apt-get could not install %s: %s"
                              % (path, str(exc)[-600:])) from exc


def pick_image_file(files, package, package_image=None):
    """The one qcow2/raw file among a package's ``files``, or the one ``package_image`` names."""
    candidates = [f for f in files if f.lower().endswith(PACKAGE_IMAGE_SUFFIXES)]
    if package_image:
        chosen = [f for f in files if f == package_image or os.path.basename(f) == package_image]
        if len(chosen) != 1:
            raise ImagesError("package_image: %s ships no file %s; its images: %s"
                              % (package, package_image, ", ".join(candidates) or "none"))
        return chosen[0]
    if not candidates:
        raise ImagesError("package: %s ships no image file (%s); files: %s"
                          % (package, ", ".join("*" + s for s in PACKAGE_IMAGE_SUFFIXES),
                             ", ".join(files[:10]) or "none"))
    if len(candidates) > 1:
        raise ImagesError("package: %s ships several images (%s); name one with package_image"
                          % (package, ", ".join(candidates)))
    return candidates[0]


# ----------------------------------------------------------------------------- kvm_image backend


def _human(size):
    for unit, factor in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if size >= factor:
            return "%.1f %s" % (size / factor, unit)
    return "%d B" % size


def summary(images):
    """The store as the diff shows it: {name: {default, versions: {version: description}}}."""
    result = {}
    for image in images:
        entry = result.setdefault(image.name, {"default": None, "versions": {}})
        digest = image.digests.get("sha256")
        entry["versions"][image.version] = "%s, %s virtual, %s" % (
            image.format, _human(image.virtual_size) if image.virtual_size else "size unknown",
            "sha256:%s" % digest[:16] if digest else "from %s" % (image.source or "?"))
        if image.is_default:
            entry["default"] = image.version
    return result


_CONTENT_OPS = ("install", "replace", "compare")


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


class ImageTask:
    """One kvm_image run: validate, decide from one comparison, act (unless check mode), report.

    ``usage_reader()`` returns {domain: disk paths} (LibvirtGateway.disk_chains); ``lock`` is
    a context manager held from reading usage to changing the store (module_utils._lock).
    """

    def __init__(self, params, check_mode=False, usage_reader=None, lock=None, packages=None):
        self.p = dict(params)
        self.state = self.p.get("state") or "present"
        self.check_mode = check_mode
        self.store = ImageStore(self.p.get("store") or DEFAULT_STORE)
        self.usage_reader = usage_reader or dict
        self.lock = lock
        self.packages = packages or DebianPackages()
        self.actions = []  # the one record of what changed (or would): changed derives from it
        self.warnings = []
        self.src_kind = None  # "url" | "file" | "package" | None
        self.checksum = None  # (algorithm, hex)
        self._usage = {}
        self._staged = None
        self._src_digests = None
        self._package_file = None  # the package's image file as installed on the host
        self._package_pending = None  # (kind, name, version, package) until it is installed
        self._package_member = None  # the image's path in the pending package (as installed)
        self._package_deb = None  # the .deb to install: the given file or apt-get's download
        self._package_staged = None  # its image read out of that .deb into the store, unchecked
        self._package_tmp = None  # (apt-get download folder, whether the store was made for it)

    # -- input
    def validate(self):
        """Check the options before touching anything; ImagesError names the option."""
        p = self.p
        validate_name(p.get("name"), "name")
        if p.get("version") is not None:
            validate_name(p["version"], "version")
        given = [o for o in ("src", "package", "checksum", "package_image")
                 if p.get(o) not in (None, "")]
        if self.state not in ("present", "absent", "default"):
            raise ImagesError("state: must be present, absent or default, got %r" % self.state)
        if self.state == "absent" and given:
            raise ImagesError("%s: only used with state=present or state=default; state=absent "
                              "removes images" % given[0])
        if p.get("src") and p.get("package"):
            raise ImagesError("src: give src or package, not both")
        if p.get("package_image") and not p.get("package"):
            raise ImagesError("package_image: only used with package")
        if (p.get("src") or p.get("package") or self.state == "default") and not p.get("version"):
            raise ImagesError("version: required to install an image or make it the default")
        if p.get("checksum") not in (None, ""):
            if not (p.get("src") or p.get("package")):
                raise ImagesError("checksum: only used with src or package")
            self.checksum = parse_checksum(p["checksum"])
        if p.get("src") not in (None, ""):
            self._validate_src()
        elif p.get("package") not in (None, ""):
            pkg = p["package"]
            if DebianPackages.is_deb_path(pkg):
                p["package"] = os.path.abspath(os.path.expanduser(pkg))
                self.packages.deb_fields(p["package"])  # raises for a missing or bad file
            elif not _DEB_NAME_RE.match(pkg):
                raise ImagesError("package: %r is neither a Debian package name nor a path to "
                                  "a .deb file" % pkg)
            self.src_kind = "package"
        if os.path.lexists(self.store.root) and not os.path.isdir(self.store.root):
            raise ImagesError("store: %s exists and is not a folder" % self.store.root)

    def _validate_src(self):
        src = self.p["src"]
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", src):
            if not src.lower().startswith(("http://", "https://")):
                raise ImagesError("src: %r: only http:// and https:// URLs or local paths are "
                                  "supported" % src)
            if self.checksum is None:
                raise ImagesError("checksum: required when src is a URL (%s); give "
                                  "sha256:<hex> or sha512:<hex> of the image" % src)
            self.src_kind = "url"
            return
        src = os.path.abspath(os.path.expanduser(src))
        if not os.path.exists(src):
            raise ImagesError("src: %s does not exist" % src)
        if not os.path.isfile(src):
            raise ImagesError("src: %s is not a regular file" % src)
        self.p["src"] = src
        self.src_kind = "file"

    @property
    def _option(self):
        return "package" if self.src_kind == "package" else "src"

    # -- content
    def _installed_digest(self, image, algo):
        if algo not in image.digests:
            image.digests.update(file_digests(image.path, (algo,)))
        return image.digests[algo]

    def _content_matches(self, image, path=None):
        """Whether installed ``image`` holds the wanted content; None when not known yet."""
        if self.checksum is not None:
            algo, digest = self.checksum
            return self._installed_digest(image, algo) == digest
        if path is None:
            return None  # a package not installed yet (check mode): unknown
        if os.path.getsize(path) != image.size:
            return False
        if self._src_digests is None:
            self._src_digests = file_digests(path, ("sha256",))
        return self._installed_digest(image, "sha256") == self._src_digests["sha256"]

    def _package_source(self):
        """(path of the package's image file or None, what is to install first or None)."""
        pkg = self.p["package"]
        if DebianPackages.is_deb_path(pkg):
            name, version = self.packages.deb_fields(pkg)
            if self.packages.status(name) != version:
                # Not installed (or another version): choose the image from the archive now,
                # so that a bad package_image fails before anything is installed.
                self._package_member = pick_image_file(self.packages.deb_files(pkg), pkg,
                                                       self.p.get("package_image"))
                return None, ("deb", name, version, pkg)
        else:
            name = pkg
            if self.packages.status(name) is None:
                return None, ("apt", name, None, pkg)
        files = self.packages.files(name)
        return pick_image_file(files, name, self.p.get("package_image")), None

    def _source_path(self):
        """The local file with the wanted content. Never installs a package.

        For a package that is not installed yet, a real run reads its image out of the .deb
        into the store's staging area (_fetch_package) and returns that copy; check mode reads
        nothing and returns None. _stage installs the package once that copy passed.
        """
        if self.src_kind == "file":
            return self.p["src"]
        if self.src_kind != "package":
            return None
        if self._package_file is None and self._package_pending is None:
            self._package_file, self._package_pending = self._package_source()
        if self._package_pending is not None:
            if self.check_mode:
                return None
            if self._package_staged is None:
                self._fetch_package()
            return self._package_staged.path
        return self._package_file

    def _fetch_package(self):
        """Read the pending package's image out of its .deb into the store; installs nothing."""
        kind, name, version, pkg = self._package_pending
        deb = pkg
        if kind == "apt":
            # The exact .deb apt-get would install, into a private folder: checked, then
            # installed from there (_install_package), so what was checked is what is installed.
            self._package_tmp = self.store.scratch_folder()
            deb = self.packages.download(name, self._package_tmp[0])
            version = self.packages.deb_fields(deb)[1]
            self._package_pending = (kind, name, version, pkg)
            self._package_member = pick_image_file(self.packages.deb_files(deb), name,
                                                   self.p.get("package_image"))
        self._package_deb = deb
        member = self._package_member
        algos = ("sha256",) + ((self.checksum[0],) if self.checksum else ())
        self._package_staged = self.store.stage_stream(
            lambda: self.packages.open_member(deb, member), self._package_label(), algos,
            option="package")
        self._src_digests = dict(self._package_staged.digests)

    def _package_label(self):
        """The pending package's image, as error messages name it."""
        kind, name, version, pkg = self._package_pending
        where = pkg if kind == "deb" else "package %s %s (downloaded by apt-get)" % (name, version)
        return "%s in %s" % (self._package_member, where)

    def _install_package(self):
        """Install the pending package from the very .deb whose image was checked."""
        kind, name, version, pkg = self._package_pending
        self._package_pending = None  # from here on a failure may have changed the host
        if kind == "deb":
            self.packages.install_deb(self._package_deb)
            self.actions.append("installed package %s %s from %s" % (name, version, pkg))
        else:
            self.packages.install_file(self._package_deb)
            self.actions.append("installed package %s %s with apt-get" % (name, version))
        self._package_file = pick_image_file(self.packages.files(name), name,
                                             self.p.get("package_image"))

    def _cleanup_package(self):
        """Remove what reading a pending package left behind: its image copy, the download."""
        self.store.discard(self._package_staged)
        self._package_staged = None
        if self._package_tmp is not None:
            folder, created_root = self._package_tmp
            self._package_tmp = None
            shutil.rmtree(folder, ignore_errors=True)
            if created_root:
                try:
                    os.rmdir(self.store.root)  # only if still empty: leave the host as it was
                except OSError:
                    pass

    def _not_installed(self, exc):
        """``exc`` with what a real run left untouched, while the package is not installed."""
        _kind, name, version, _pkg = self._package_pending
        return ImagesError("%s; nothing was installed: package %s and the store %s are as "
                           "they were" % (exc, " ".join(filter(None, (name, version))),
                                          self.store.root))

    def _check_digest(self, label, digests):
        algo, digest = self.checksum
        if digests[algo] != digest:
            raise ImagesError("checksum: %s has %s:%s, expected %s:%s"
                              % (label, algo, digests[algo], algo, digest))

    def _stage(self, images):
        """Copy (or download) the wanted content into the store and verify it there."""
        algos = (self.checksum[0],) if self.checksum else ("sha256",)
        # A package that is not installed: its image is read out of its .deb into the store
        # (by _source_path), checked there, and the package installed only when it passes.
        source = self._source_path()
        pending = self.src_kind == "package" and self._package_pending is not None
        if self.src_kind == "url":
            label = self.p["src"]
            staged = self.store.stage_url(label, algos)
        elif pending:
            staged, self._package_staged = self._package_staged, None
            label = self._package_label()
        else:
            label = source
            staged = self.store.stage_file(label, algos)
        try:
            if self.checksum is not None:
                self._check_digest(label, staged.digests)
            staged.info = self.store.verify(staged.path, option=self._option, label=label,
                                            images=images)
            if pending:
                self._install_package()
        except ImagesError:
            self.store.discard(staged)
            raise
        if self.src_kind == "package":
            # The file as the package installed it (for a package installed by this run, the
            # copy holds the same bytes, read from the .deb that was installed).
            staged.source = "package %s (%s)" % (self.p["package"], self._package_file)
        return staged

    def _verify_in_place(self, images):
        """Check mode: qemu-img's verdict on the source where it lies, copying nothing."""
        path = self._source_path() if self.src_kind in ("file", "package") else None
        if path is None:
            return None  # a URL is not downloaded in check mode; a package not installed
        # Hash as the real run would while copying, so the predicted diff shows the digest.
        algos = {"sha256"} | ({self.checksum[0]} if self.checksum else set())
        if self._src_digests is None or not algos <= set(self._src_digests):
            self._src_digests = file_digests(path, tuple(sorted(algos)))
        if self.checksum is not None:
            self._check_digest(path, self._src_digests)
        return self.store.verify(path, option=self._option, images=images)

    # -- deciding
    def _different_content_error(self, image):
        algo = self.checksum[0] if self.checksum else "sha256"
        wanted = self.checksum[1] if self.checksum else (self._src_digests or {}).get(algo, "?")
        return ImagesError(
            "version: %s is installed with different content (installed %s:%s, wanted %s:%s); "
            "an installed image is never replaced silently. Give a new version, or force=true "
            "to replace it (refused while domains use it)"
            % (image.ref, algo, self._installed_digest(image, algo), algo, wanted))

    def _need_content(self, images):
        """('install' | 'replace' | 'compare' | None, installed image or None)."""
        name, version = self.p["name"], self.p["version"]
        existing = self.store.get(name, version, images)
        if existing is None:
            self._check_collisions(images)
            return "install", None
        if self.checksum is not None:
            same = self._content_matches(existing)
        else:
            same = self._content_matches(existing, self._source_path())
        if same is None:
            return "compare", existing  # check mode, package not installed: cannot know
        if same:
            return None, existing
        if not self.p.get("force"):
            raise self._different_content_error(existing)
        reasons = self.store.removal_blockers(existing)
        if reasons:
            raise ImagesError("force: %s is %s; an image in use is never replaced"
                              % (existing.ref, "; ".join(reasons)))
        return "replace", existing

    def _check_collisions(self, images):
        name, version = self.p["name"], self.p["version"]
        ref = "%s-%s" % (name, version)
        for image in images:
            if image.ref == ref and image.name != name:
                raise ImagesError("version: %s would share its file name with image %s version "
                                  "%s; choose another name or version"
                                  % (ref, image.name, image.version))
            if image.name == ref:
                raise ImagesError("version: %s would read the same as the image name %s; choose "
                                  "another version" % (ref, ref))
            if image.ref == name:
                raise ImagesError("name: %s would read the same as image %s version %s; choose "
                                  "another name" % (name, image.name, image.version))
        alias = self.store.alias_path(name)
        if os.path.lexists(alias) and not os.path.islink(alias):
            raise ImagesError("name: the store holds a file %s that is not a default alias; "
                              "choose another name" % alias)

    def plan(self, images, staged=None):
        """Operations that turn the store into the requested one; raises when refused."""
        if self.state == "absent":
            return self._plan_absent(images)
        name, version = self.p["name"], self.p.get("version")
        ops = []
        if self.src_kind is None:
            known = self.store.get(name, version, images) if version else \
                self.store.versions(name, images)
            if not known:
                raise ImagesError(
                    "name: image %s%s is not installed; %s. Give src or package to install it"
                    % (name, " version %s" % version if version else "",
                       self.store.describe(images)))
        else:
            what, _existing = self._need_content(images)
            if what is not None:
                ops.append((what, name, version, staged))
        current = self.store.default_version(name, images)
        if self.state == "default" and current != version:
            blockers = self.store.alias_blockers(name, self._usage)
            if blockers and current is not None:
                raise ImagesError(self.store.alias_message(name, blockers))
            ops.append(("default", name, version, current))
        elif current is None and any(op[0] == "install" for op in ops):
            ops.append(("default", name, version, None))  # the first version is the default
        return ops

    def _plan_absent(self, images):
        name, version = self.p["name"], self.p.get("version")
        versions = self.store.versions(name, images)
        targets = [i for i in versions if version is None or i.version == version]
        blocked = ["%s is %s" % (i.ref, "; ".join(self.store.removal_blockers(i)))
                   for i in targets if self.store.removal_blockers(i)]
        if blocked:
            raise ImagesError(
                "state: cannot remove %s: %s. Remove those VMs first (gpuvirt.kvm.kvm_vm "
                "state=absent), or the images built on it"
                % ("%s-%s" % (name, version) if version else "image %s" % name,
                   "; ".join(blocked)))
        default = self.store.default_version(name, images)
        removing_all = len(targets) == len(versions)
        if version is not None and default == version and not removing_all:
            others = [i.version for i in versions if i.version != version]
            raise ImagesError(
                "version: %s is the default of %s and %s remain%s; make another version the "
                "default first (state=default, version=%s), then remove it"
                % (version, name, ", ".join(others), "s" if len(others) == 1 else "",
                   others[-1]))
        ops = [("remove", name, i.version, i) for i in targets]
        if removing_all and os.path.islink(self.store.alias_path(name)):
            blockers = self.store.alias_blockers(name, self._usage)
            if blockers:
                raise ImagesError(self.store.alias_message(name, blockers))
            ops.append(("unalias", name, None, default))
        return ops

    # -- acting
    def _apply(self, ops, images):
        by_key = {(i.name, i.version): i for i in images}
        for op, name, version, arg in ops:
            if op in _CONTENT_OPS:
                replace = by_key.get((name, version)) if op == "replace" else None
                image = self.store.commit(arg, name, version, replace=replace)
                self.actions.append("%s %s from %s (%s, %s)" % (
                    "replaced" if replace else "installed", image.ref, arg.source,
                    image.format, _human(image.size)))
            elif op == "default":
                self.store.set_default(name, version, self._usage)
                self.actions.append("made %s-%s the default of %s%s" % (
                    name, version, name, " (was %s-%s)" % (name, arg) if arg else ""))
            elif op == "remove":
                self.store.unlink_image(arg.path)
                self.actions.append("removed %s (%s)" % (arg.ref, arg.path))
            elif op == "unalias":
                self.store.remove_alias(name)
                self.actions.append("removed the default alias %s" % self.store.alias_path(name))

    def _describe(self, ops):
        source = self.p.get("src") or "package %s" % self.p.get("package")
        for op, name, version, arg in ops:
            if op in _CONTENT_OPS:
                verb = {"install": "would install", "replace": "would replace",
                        "compare": "would install (or find unchanged)"}[op]
                self.actions.append("%s %s-%s from %s" % (verb, name, version, source))
            elif op == "default":
                self.actions.append("would make %s-%s the default of %s%s" % (
                    name, version, name, " (was %s-%s)" % (name, arg) if arg else ""))
            elif op == "remove":
                self.actions.append("would remove %s (%s)" % (arg.ref, arg.path))
            elif op == "unalias":
                self.actions.append("would remove the default alias %s"
                                    % self.store.alias_path(name))

    def _simulate(self, images, ops, checked):
        """The store after ``ops``, predicted for check mode (nothing is changed)."""
        after = [dataclasses.replace(i) for i in images]
        source = self.p.get("src") or "package %s" % self.p.get("package")
        for op, name, version, _arg in ops:
            if op in _CONTENT_OPS or op == "remove":
                after = [i for i in after if (i.name, i.version) != (name, version)]
            if op in _CONTENT_OPS:
                fmt = checked.format if checked else "qcow2"
                digests = dict(self._src_digests or {})
                if self.checksum:
                    digests[self.checksum[0]] = self.checksum[1]
                after.append(Image(
                    name=name, version=version, format=fmt, source=source, digests=digests,
                    path=os.path.join(self.store.root, ImageStore.filename(name, version, fmt)),
                    virtual_size=checked.virtual_size if checked else 0))
            elif op in ("default", "unalias"):
                for image in after:
                    if image.name == name:
                        image.is_default = op == "default" and image.version == version
        after.sort(key=lambda i: (i.name, _natural(i.version)))
        return after

    def _read_usage(self):
        usage, warnings = disk_usage(self.usage_reader())
        for warning in warnings:
            if warning not in self.warnings:
                self.warnings.append(warning)
        return usage

    def run(self):
        """Do the work; return the module's result (changed, actions, image, images, diff)."""
        self.validate()
        images, warnings = self.store.scan()
        self.warnings.extend(warnings)
        try:
            if self.check_mode:
                before, after = self._run_check(images)
            else:
                before, after = self._run_real(images)
        except ImagesError as exc:
            if self._package_pending is not None and not self.check_mode:
                raise self._not_installed(exc) from exc
            raise
        finally:
            self.store.discard(self._staged)
            self._cleanup_package()
        return self._result(before, after)

    def _run_check(self, images):
        self._usage = self._read_usage()
        images = self.store.annotate(images, self._usage)
        ops = self.plan(images)
        checked = None
        if any(op[0] in _CONTENT_OPS for op in ops):
            checked = self._verify_in_place(images)
        if self._package_pending is not None:
            kind, name, version, pkg = self._package_pending
            self.actions.append("would install package %s%s" % (
                name, " %s from %s" % (version, pkg) if kind == "deb" else " with apt-get"))
        self._describe(ops)
        return images, self._simulate(images, ops, checked)

    def _run_real(self, images):
        # Decide once without the lock: a run with nothing to do (the common rerun) never waits
        # for other runs, and bad input fails before anything is downloaded. The slow part
        # (download, copy, qemu-img check) also happens before the lock is taken, so a long
        # download does not hold up other runs' allocations.
        self._usage = self._read_usage()
        images = self.store.annotate(images, self._usage)
        ops = self.plan(images)
        if any(op[0] in _CONTENT_OPS for op in ops):
            self._staged = self._stage(images)  # checks the content, then installs a package
        elif self._package_pending is not None and self._package_staged is not None:
            # Deciding compared the package's image with the installed version: the same bytes,
            # checked when they were installed. Install the package, as check mode said.
            self._install_package()
        if not ops:
            return images, [dataclasses.replace(i) for i in images]
        with self.lock if self.lock is not None else _NoLock():
            # Decide again from what is true now: another run may have changed the store or
            # defined a domain on an image since.
            self._usage = self._read_usage()
            images = self.store.annotate(self.store.scan()[0], self._usage)
            before = [dataclasses.replace(i) for i in images]
            ops = self.plan(images, self._staged)
            if any(op[0] in _CONTENT_OPS for op in ops):
                if self._staged is None:
                    self._staged = self._stage(images)  # the store lost it meanwhile (rare)
                elif self._staged.info.backing_path:
                    # Its backing file must still be in the store now that it is installed.
                    self._staged.info = self.store.verify(
                        self._staged.path, option=self._option, label=self._staged.source,
                        images=images)
                ops = [(op, n, v, self._staged if op in _CONTENT_OPS else a)
                       for op, n, v, a in ops]
            self._apply(ops, images)
            after = self.store.annotate(self.store.scan()[0], self._usage)
        return before, after

    def _result(self, before, after):
        name, version = self.p["name"], self.p.get("version")
        image = None
        if self.state != "absent":
            if version is None:
                version = next((i.version for i in after if i.name == name and i.is_default),
                               None)
            found = [i for i in after if i.name == name and i.version == version]
            image = found[0].to_dict() if found else None
        return {
            "changed": bool(self.actions),
            "actions": list(self.actions),
            "image": image,
            "images": [i.to_dict() for i in after],
            "store": self.store.root,
            "diff": {"before": summary(before), "after": summary(after)},
            "warnings": list(self.warnings),
        }

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The versioned image store. Private to this collection.

A folder of versioned base images with one default alias per name, each installed with a
record of what it is (name, version, digests, source). VM disks are qcow2 overlays on the
versioned file (never on the alias), so moving the default never changes a VM's disk, and an
image stays in the store while any disk's backing chain uses it. qemu-img's verdict on an image
comes from _qemu_img::

    /var/lib/gpuvirt/images/
        dgx-os-6.1.qcow2
        dgx-os-6.2.qcow2
        dgx-os -> dgx-os-6.2.qcow2          (the default alias, a relative symlink)
        .dgx-os-6.2.qcow2.json              (what was installed: name, version, digests, source)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field

from ansible_collections.gpuvirt.kvm.plugins.module_utils import _qemu_img

# ImagesError and SUPPORTED_FORMATS are used here and re-exported (_image_store.ImagesError).
from ansible_collections.gpuvirt.kvm.plugins.module_utils._qemu_img import (
    SUPPORTED_FORMATS,
    ImageInfo,
    ImagesError,
)

DEFAULT_STORE = "/var/lib/gpuvirt/images"
CHECKSUM_ALGORITHMS = {"sha256": 64, "sha512": 128}
MAX_NAME_LENGTH = 64
NAME_PATTERN = "[A-Za-z0-9][A-Za-z0-9._+-]*"
_NAME_RE = re.compile(r"^%s$" % NAME_PATTERN)
_CHUNK = 4 * 1024 * 1024
# Runs of zeros this long (and aligned) become holes in the copy.
_HOLE = 64 * 1024
_ZEROS = bytes(_HOLE)
_SECTOR = 512
# Magic numbers of compressed files, a common mistake (an image.qcow2.xz given as src).
_COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2",
    b"PK\x03\x04": "zip",
}


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
            detail = _qemu_img.info(full, backing_chain=False)
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
            detail = _qemu_img.info(path, backing_chain=False)
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
            _qemu_img.check(path)
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
        """Delete an image file, its metadata and manifest (no checks: callers decide)."""
        os.unlink(path)
        stem = os.path.basename(path).rpartition(".")[0]
        # The metadata, and the manifest kvm_image_build writes next to an image it built.
        for extra in (self._meta_path(os.path.basename(path)),
                      os.path.join(self.root, stem + ".manifest.json")):
            try:
                os.unlink(extra)
            except FileNotFoundError:
                pass


def _natural(version):
    """Sort key: 6.10 after 6.9."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", version) if part]

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""kvm_image's backend, testable without Ansible. Private to this collection.

ImageTask validates the options, decides from one comparison of the store with what is asked,
acts (unless check mode) and reports; ``changed``, the actions and the diff (summary) all come
from that one decision. Content comes from a local file, a URL or a Debian package
(_deb_packages) into the store (_image_store); which domains use which image comes from
_qemu_img.disk_usage, under the host lock while the store changes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil

from ansible_collections.gpuvirt.kvm.plugins.module_utils import _qemu_img
from ansible_collections.gpuvirt.kvm.plugins.module_utils._deb_packages import (
    _DEB_NAME_RE,
    DebianPackages,
    pick_image_file,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_store import (
    DEFAULT_STORE,
    Image,
    ImageStore,
    _natural,
    file_digests,
    parse_checksum,
    validate_name,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._qemu_img import ImagesError
from ansible_collections.gpuvirt.kvm.plugins.module_utils._units import GIB


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

    ``usage_reader()`` returns {domain: disk paths} (``_holdings.disk_chains``); ``lock`` is
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
        usage, warnings = _qemu_img.disk_usage(self.usage_reader())
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

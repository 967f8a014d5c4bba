# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Debian packages that ship a disk image. Private to this collection.

kvm_image's package source, and the collection's only caller of the dpkg tools (through
_qemu_img's ``_run``, with ``LANG=C``): DebianPackages reads a package's image out of its .deb
without installing anything (open_member), installs that very .deb once the image passed its
checks (install_deb, install_file), and lists what an installed package put on the host;
pick_image_file chooses the image among a package's files. installed_versions asks dpkg-query
(else rpm, on the RHEL family) which versions of some packages are installed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile

from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_stack import (
    DPKG_FORMAT,
    RPM_FORMAT,
    parse_dpkg,
    parse_rpm,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._qemu_img import ImagesError, _c_env, _run

# Files a package may ship as its image (the store then names it .qcow2 or .raw by content).
PACKAGE_IMAGE_SUFFIXES = (".qcow2", ".qcow", ".img", ".raw")
_DEB_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")


def installed_versions(dpkg_names, rpm_names):
    """(package manager, {package: version} of the installed ones): dpkg-query with dpkg's
    globs where it is there, else rpm with exact names; (None, {}) with neither. Names that are
    not installed are left out (both tools then exit 1, and that is no error)."""
    if shutil.which("dpkg-query"):
        _rc, out, _err = _run(["dpkg-query", "-W", "-f=" + DPKG_FORMAT] + list(dpkg_names),
                              ok=(0, 1))
        return "dpkg", parse_dpkg(out)
    if shutil.which("rpm"):
        _rc, out, _err = _run(["rpm", "-q", "--qf", RPM_FORMAT] + list(rpm_names),
                              ok=tuple(range(256)))
        return "rpm", parse_rpm(out)
    return None, {}


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

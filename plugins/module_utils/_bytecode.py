# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Compile the collection's module_utils once per managed host, not on every module run.

A module runs from the zip that AnsiballZ sends, and Python writes no bytecode for code it
imports from a zip: every run compiles every module_util it imports from source, and Python
3.10-3.12 compile each one twice (once to find it, once to load it). For kvm_layout that was
about 0.2 s of a 0.7 s module run.

Importing this module puts a finder first on ``sys.meta_path`` that handles only this
collection's own module_utils, and only when they come from a zip. It reads a module's source
from the zip once, and takes the compiled code from a cache keyed by the SHA-256 of the
interpreter's bytecode magic, the module's name and its source; on a miss it compiles the
source once and stores the code. A different source or Python never matches an entry, and
anything unreadable in the cache is compiled again, so the cache can only save time.

The cache is off unless the admin turns it on (docs/bytecode.md): ``GPUVIRT_BYTECODE_CACHE=on``
uses ``~/.cache/gpuvirt.kvm/bytecode`` in the home folder of the user the module runs as (from
the password database, not ``$HOME``, which ``become`` may leave pointing at the login user's
home); a path uses that folder. Off, nothing is read or stored, and each module_util is still
compiled once per run rather than twice. The folder is made with mode 0700 and used only while
it is a real folder that the running user owns and nobody else can write; an entry is used only
if it is such a file too and holds code (code read from there runs as that user). An entry
(``_vm_plan.cpython-312-<sha256>.code``) takes 2-100 KB; storing a new source of a module_util
removes that module_util's older entries for the same Python.
"""

from __future__ import annotations

import hashlib
import importlib.util
import marshal
import os
import pwd
import stat
import sys
import types
import zipimport

PACKAGE = __name__.rpartition(".")[0]
ENV = "GPUVIRT_BYTECODE_CACHE"
OFF = ("", "off", "0", "false", "no")
ON = ("on", "1", "true", "yes")
SUFFIX = ".code"


def cache_dir():
    """The cache folder this process would use, or None when caching is off (the default)."""
    value = (os.environ.get(ENV) or "").strip()
    if value.lower() in OFF:
        return None
    if value.lower() not in ON:
        return value  # a folder of the admin's choosing
    try:
        home = pwd.getpwuid(os.geteuid()).pw_dir
    except KeyError:
        return None  # a user without a passwd entry: no home to cache in
    return os.path.join(home, ".cache", "gpuvirt.kvm", "bytecode")


def private(path, kind=stat.S_ISDIR):
    """True when ``path`` is a real folder (or file) of this user that nobody else can write."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return kind(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def key(fullname, source):
    """The cache key of one module's source under this interpreter."""
    digest = hashlib.sha256(importlib.util.MAGIC_NUMBER)
    digest.update(fullname.encode("utf-8") + b"\0")
    digest.update(source.encode("utf-8"))
    return digest.hexdigest()


def relocate(code, filename):
    """``code`` and every code object inside it, with co_filename set to ``filename``."""
    consts = tuple(relocate(c, filename) if isinstance(c, type(code)) else c
                   for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


class CachedLoader:
    """Loads one module_util from the zip, its code from the cache when the cache has it."""

    def __init__(self, importer, filename, folder):
        self.importer = importer
        self.filename = filename
        self.folder = folder

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module):
        exec(self.get_code(module.__name__), module.__dict__)  # pylint: disable=exec-used

    def get_source(self, fullname):
        return self.importer.get_source(fullname)

    def get_filename(self, fullname):
        return self.filename

    def is_package(self, fullname):
        return False

    def get_code(self, fullname):
        source = self.get_source(fullname)
        if source is None:  # bytecode only in the zip: nothing to compile or cache
            return self.importer.get_code(fullname)
        # One entry per module_util and Python (a host may run modules on several Pythons).
        stem = "%s.%s" % (fullname.rpartition(".")[2], sys.implementation.cache_tag)
        entry = None
        if self.folder is not None:
            entry = os.path.join(self.folder, "%s-%s%s" % (stem, key(fullname, source), SUFFIX))
            code = self._read(entry)
            if code is not None:
                return code if code.co_filename == self.filename else relocate(code,
                                                                               self.filename)
        code = compile(source, self.filename, "exec", dont_inherit=True)
        if entry is not None:
            self._write(entry, stem, code)
        return code

    @staticmethod
    def _read(entry):
        if not private(entry, stat.S_ISREG):
            return None
        try:
            with open(entry, "rb") as handle:
                code = marshal.loads(handle.read())
        except (OSError, EOFError, ValueError, TypeError):
            return None  # unreadable or cut short: compile again and overwrite it
        # Anything but a code object (a marshalled int, say) is compiled again too.
        return code if isinstance(code, types.CodeType) else None

    def _write(self, entry, stem, code):
        temp = "%s.%d.tmp" % (entry, os.getpid())
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(marshal.dumps(code))
            os.replace(temp, entry)
            for name in os.listdir(self.folder):  # this module_util's older sources
                other, _dash, digest = name[:-len(SUFFIX)].rpartition("-")
                path = os.path.join(self.folder, name)
                if name.endswith(SUFFIX) and other == stem and len(digest) == 64 \
                        and path != entry:
                    os.unlink(path)
        except OSError:
            try:
                os.unlink(temp)
            except OSError:
                pass


class ZipFinder:
    """Finds this collection's module_utils in an AnsiballZ zip; leaves everything else alone."""

    def __init__(self, folder):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if not path or not fullname.startswith(PACKAGE + ".") or \
                "." in fullname[len(PACKAGE) + 1:]:
            return None
        leaf = fullname.rpartition(".")[2]
        for entry in path:
            try:
                importer = zipimport.zipimporter(entry)
                if importer.is_package(fullname):
                    return None  # a package: zipimport's own business
            except zipimport.ZipImportError:
                continue  # not in a zip (a checkout, a test run), or not in this one
            loader = CachedLoader(importer, os.path.join(entry, leaf + ".py"), self.folder)
            spec = importlib.util.spec_from_loader(fullname, loader, origin=loader.filename)
            spec.has_location = True
            return spec
        return None

    def invalidate_caches(self):
        return None


def _usable(folder):
    if folder is None:
        return None
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError:
        return None
    return folder if private(folder) else None


def install():
    """Put the finder first on sys.meta_path (once); returns the cache folder or None."""
    for finder in sys.meta_path:
        if isinstance(finder, ZipFinder):
            return finder.folder
    if not isinstance(getattr(sys.modules.get(PACKAGE), "__loader__", None),
                      zipimport.zipimporter):
        return None  # not running from a zip: the normal importers cache bytecode themselves
    finder = ZipFinder(_usable(cache_dir()))
    sys.meta_path.insert(0, finder)
    return finder.folder


install()

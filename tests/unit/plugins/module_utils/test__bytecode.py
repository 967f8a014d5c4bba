# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""_bytecode: the collection's module_utils imported from a zip laid out as AnsiballZ lays it out.

Each case runs a fresh Python with the zip first on sys.path, as the AnsiballZ wrapper does,
and imports the real ``_bytecode`` from the zip and then a sample module_util.
"""

import glob
import json
import marshal
import os
import pwd
import shutil
import stat
import subprocess
import sys
import zipfile

import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils import _bytecode

PACKAGE = "ansible_collections/gpuvirt/kvm/plugins/module_utils"
SAMPLE = '''from __future__ import annotations

VERSION = %d


def outer(n):
    def inner(m):
        return [m * k for k in range(n)]
    return inner(2)


def boom():
    raise ValueError("boom from the sample")
'''

# Imports _bytecode, counts the compile() calls for the sample, imports it (a compile() of it
# fails when FORBID_COMPILE is set: the code must come from the cache) and reports.
PROBE = r'''
import builtins, json, os, sys, traceback
sys.path.insert(0, ZIP)
from ansible_collections.gpuvirt.kvm.plugins.module_utils import _bytecode
compiles = []
real_compile = builtins.compile
def counting_compile(source, filename, *args, **kwargs):
    if str(filename).endswith("_sample.py"):
        if os.environ.get("FORBID_COMPILE"):
            raise AssertionError("compiled %s although the cache has it" % filename)
        compiles.append(filename)
    return real_compile(source, filename, *args, **kwargs)
builtins.compile = counting_compile
from ansible_collections.gpuvirt.kvm.plugins.module_utils import _sample
try:
    _sample.boom()
except ValueError:
    tb = traceback.format_exc()
finders = [type(f).__name__ for f in sys.meta_path]
print(json.dumps({
    "folder": _bytecode.install(), "compiles": len(compiles), "file": _sample.__file__,
    "outer": _sample.outer(3), "version": _sample.VERSION,
    "inner_filename": _sample.outer.__code__.co_consts[1].co_filename
    if hasattr(_sample.outer.__code__.co_consts[1], "co_filename") else None,
    "traceback": tb, "finders": finders,
}))
'''


def make_zip(path, version=1):
    """A payload zip: the package's __init__ files, the real _bytecode, a sample module_util."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        parts = PACKAGE.split("/")
        for i in range(1, len(parts) + 1):
            zf.writestr("/".join(parts[:i]) + "/__init__.py", "")
        zf.write(_bytecode.__file__, PACKAGE + "/_bytecode.py")
        zf.writestr(PACKAGE + "/_sample.py", SAMPLE % version)
    return str(path)


def probe(zip_path, cache, python=sys.executable, forbid_compile=False):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTHON") and k != "GPUVIRT_BYTECODE_CACHE"}
    if cache is not None:
        env["GPUVIRT_BYTECODE_CACHE"] = str(cache)
    if forbid_compile:
        env["FORBID_COMPILE"] = "1"
    proc = subprocess.run([python, "-I", "-c", "ZIP = %r\n" % zip_path + PROBE], env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def entries(cache):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(str(cache), "*")))


def sample_entries(cache):
    return [e for e in entries(cache) if e.startswith("_sample.")]


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "home" / ".cache" / "gpuvirt.kvm" / "bytecode"


def test_the_first_run_compiles_once_and_stores_later_runs_compile_nothing(tmp_path, cache):
    first = probe(make_zip(tmp_path / "a.zip"), cache)
    assert first["compiles"] == 1  # zipimport alone compiles twice on Python 3.10-3.12
    assert first["folder"] == str(cache) and first["finders"][0] == "ZipFinder"
    assert first["outer"] == [0, 2, 4] and first["version"] == 1
    tag = sys.implementation.cache_tag
    [entry] = sample_entries(cache)
    assert entry.startswith("_sample.%s-" % tag) and entry.endswith(".code")
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(str(cache), entry)).st_mode) == 0o600

    # The next module run unpacks its payload somewhere else: same source, another path.
    second_zip = make_zip(tmp_path / "b.zip")
    second = probe(second_zip, cache, forbid_compile=True)
    assert second["compiles"] == 0 and second["outer"] == [0, 2, 4]
    # Paths in the cached code follow the zip it was imported from this time, nested code too.
    assert second["file"] == os.path.join(second_zip, PACKAGE, "_sample.py")
    assert second["inner_filename"] == second["file"]
    assert 'File "%s", line 13, in boom' % second["file"] in second["traceback"]
    assert 'raise ValueError("boom from the sample")' in second["traceback"]
    assert sample_entries(cache) == [entry]


def test_a_new_source_gets_a_new_entry_and_the_old_one_goes(tmp_path, cache):
    probe(make_zip(tmp_path / "v1.zip", version=1), cache)
    [old] = sample_entries(cache)
    result = probe(make_zip(tmp_path / "v2.zip", version=2), cache)
    assert result["version"] == 2 and result["compiles"] == 1
    [new] = sample_entries(cache)
    assert new != old
    assert "_bytecode" not in " ".join(entries(cache))  # imported before the finder existed


def test_an_unreadable_entry_is_compiled_again_and_replaced(tmp_path, cache):
    zip_path = make_zip(tmp_path / "a.zip")
    probe(zip_path, cache)
    [entry] = sample_entries(cache)
    path = os.path.join(str(cache), entry)
    with open(path, "r+b") as handle:
        handle.truncate(7)
    result = probe(zip_path, cache)
    assert result["compiles"] == 1 and result["outer"] == [0, 2, 4]
    assert os.path.getsize(path) > 7
    assert probe(zip_path, cache, forbid_compile=True)["compiles"] == 0


def test_an_entry_that_is_not_code_is_compiled_again(tmp_path, cache):
    # A marshalled int is readable but no module: it used to fail every later run.
    zip_path = make_zip(tmp_path / "a.zip")
    probe(zip_path, cache)
    [entry] = sample_entries(cache)
    path = os.path.join(str(cache), entry)
    with open(path, "wb") as handle:
        handle.write(marshal.dumps(42))
    result = probe(zip_path, cache)
    assert result["compiles"] == 1 and result["outer"] == [0, 2, 4]
    assert probe(zip_path, cache, forbid_compile=True)["compiles"] == 0


@pytest.mark.parametrize("setting", [None, "off", "", "0"])
def test_off_by_default_it_compiles_once_and_stores_nothing(tmp_path, cache, setting):
    result = probe(make_zip(tmp_path / "a.zip"), setting)
    assert result["folder"] is None and result["compiles"] == 1 and result["version"] == 1
    assert not os.path.exists(str(cache))


@pytest.mark.parametrize("setting, folder", [
    (None, None), ("off", None), ("no", None), ("on", "home"), ("YES", "home"),
    ("/srv/cache", "/srv/cache")])
def test_the_admin_turns_it_on(monkeypatch, setting, folder):
    if setting is None:
        monkeypatch.delenv("GPUVIRT_BYTECODE_CACHE", raising=False)
    else:
        monkeypatch.setenv("GPUVIRT_BYTECODE_CACHE", setting)
    home = os.path.join(pwd.getpwuid(os.geteuid()).pw_dir, ".cache", "gpuvirt.kvm", "bytecode")
    assert _bytecode.cache_dir() == (home if folder == "home" else folder)


def test_a_folder_others_can_write_is_neither_read_nor_written(tmp_path, cache):
    zip_path = make_zip(tmp_path / "a.zip")
    probe(zip_path, cache)
    [entry] = sample_entries(cache)
    os.chmod(str(cache), 0o777)
    result = probe(zip_path, cache)
    assert result["folder"] is None and result["compiles"] == 1
    os.chmod(str(cache), 0o700)
    os.chmod(os.path.join(str(cache), entry), 0o666)  # an entry others could have written
    assert probe(zip_path, cache)["compiles"] == 1
    # The unsafe entry was replaced by this user's own compile.
    assert stat.S_IMODE(os.stat(os.path.join(str(cache), entry)).st_mode) == 0o600
    link = tmp_path / "link"
    link.symlink_to(cache)
    assert probe(zip_path, link)["folder"] is None  # a symlink is not a folder of ours


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_an_entry_owned_by_another_user_is_not_read(tmp_path, cache):
    zip_path = make_zip(tmp_path / "a.zip")
    probe(zip_path, cache)
    [entry] = sample_entries(cache)
    os.chown(os.path.join(str(cache), entry), 4242, 4242)
    assert probe(zip_path, cache)["compiles"] == 1


def test_each_python_keeps_its_own_entry(tmp_path, cache):
    pythons = sorted(set(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3"))))
    other = next((p for p in pythons
                  if subprocess.run([p, "-c", "import sys; print(sys.implementation.cache_tag)"],
                                    capture_output=True, text=True, check=False).stdout.strip()
                  != sys.implementation.cache_tag), None)
    if other is None:
        pytest.skip("needs a second Python version")
    zip_path = make_zip(tmp_path / "a.zip")
    probe(zip_path, cache)
    probe(zip_path, cache, python=other)
    assert len(sample_entries(cache)) == 2
    assert probe(zip_path, cache, forbid_compile=True)["compiles"] == 0
    assert probe(zip_path, cache, python=other, forbid_compile=True)["compiles"] == 0


def test_outside_a_zip_it_leaves_the_import_system_alone(tmp_path):
    # This process imported the collection from a checkout: no finder was installed.
    assert not any(isinstance(f, _bytecode.ZipFinder) for f in sys.meta_path)
    assert _bytecode.install() is None
    # Nor does the finder take a module that is not in a zip, or not one of ours.
    finder = _bytecode.ZipFinder(str(tmp_path))
    package = os.path.dirname(_bytecode.__file__)
    assert finder.find_spec(_bytecode.PACKAGE + "._units", [package]) is None
    assert finder.find_spec("json.decoder", [os.path.dirname(json.__file__)]) is None
    shutil.rmtree(str(tmp_path))

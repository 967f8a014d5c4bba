# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Fixtures of the image tests (a store folder, a source folder, a local HTTP server) and of the
fabric tests (a stand-in Fabric Manager behind the stand-in fmpm); the folder of collection files
that a host command (the libvirt hook, gpuvirt-health) runs with."""

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils._fabric import FabricManager

FABRIC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))), "fixtures", "fabric")
FMPM = os.path.join(FABRIC, "fmpm")


def host_lib(root, names):
    """A folder (``root``/lib) holding only the collection files ``names`` (a HOST_FILES list),
    laid out as kvm_host installs them for a command that runs without Ansible; its path."""
    import ansible_collections.gpuvirt.kvm.plugins.module_utils._fabric as fabric

    lib = os.path.join(str(root), "lib")
    where = os.path.join(lib, "ansible_collections", "gpuvirt", "kvm", "plugins", "module_utils")
    os.makedirs(where)
    source = os.path.dirname(os.path.abspath(fabric.__file__))
    for name in names:
        shutil.copy(os.path.join(source, name + ".py"), where)
    return lib


@pytest.fixture
def fm_state(tmp_path):
    """fm_state(board, *init_args, **FabricManager_kwargs) starts a stand-in FM and returns a
    FabricManager for it; .make, .control, .state and .path reach the rest."""
    path = str(tmp_path / "fm" / "state.json")
    env = dict(os.environ, FMPM_STATE=path)

    def control(*args):
        subprocess.run([sys.executable, os.path.join(FABRIC, "fake_fm.py"), "--state", path]
                       + [str(a) for a in args], check=True, stdout=subprocess.PIPE)

    def start(board="h100", *extra, **kwargs):
        control("init", "--board", board, *extra)
        return make(**kwargs)

    def make(**kwargs):
        kwargs.setdefault("fmpm", FMPM)
        kwargs.setdefault("retry_interval", 0.1)
        kwargs.setdefault("starting_wait", 0.0)
        return FabricManager(env=env, **kwargs)

    def state():
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)

    start.make, start.control, start.state, start.path = make, control, state, path
    return start


@pytest.fixture
def store(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    return folder


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, "http://127.0.0.1:%d" % server.server_address[1]
    server.shutdown()
    server.server_close()

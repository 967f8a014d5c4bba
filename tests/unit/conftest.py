# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Fixture hosts: kernel-shaped sysfs and procfs trees built by tests/fixtures/sysfs_builder.py.

    def test_x(host_tree):
        sysfs_root, proc_root = host_tree("dgx2")        # built once per session; do not change it

    def test_y(fresh_host_tree):
        sysfs_root, proc_root = fresh_host_tree("dgx2")  # a private copy the test may write to
"""

import os
import shutil
import sys
import tempfile

import pytest

_FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
if _FIXTURES not in sys.path:
    sys.path.insert(0, _FIXTURES)

import sysfs_builder  # noqa: E402  (lives in tests/fixtures, put on sys.path just above)


def _scratch(fallback):
    # A tree is some 5,000 small files; on a disk-backed /tmp that can take seconds per host,
    # in memory a tenth of that. Use a tmpfs when the machine has one.
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return tempfile.mkdtemp(prefix="gpuvirt-sysfs-", dir=shm), True
    return str(fallback), False


@pytest.fixture(scope="session")
def host_tree(tmp_path_factory):
    """host_tree(name) -> (sysfs_root, proc_root) of a fixture host, built once per session."""
    base, own = _scratch(tmp_path_factory.mktemp("hosts"))
    built = {}

    def get(name):
        if name not in built:
            built[name] = sysfs_builder.build_host(name, os.path.join(base, name))
        return built[name]

    yield get
    if own:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fresh_host_tree(tmp_path):
    """fresh_host_tree(name) -> (sysfs_root, proc_root) of a private tree the test may change."""
    base, own = _scratch(tmp_path)

    def get(name):
        return sysfs_builder.build_host(name, os.path.join(base, name))

    yield get
    if own:
        shutil.rmtree(base, ignore_errors=True)

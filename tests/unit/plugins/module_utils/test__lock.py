# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""The host-wide lock, exercised by real processes contending for a real flock."""

import multiprocessing
import os
import signal
import time

import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils._lock import (
    HostLock,
    HostLockError,
    held,
    holder,
)

# fork: the children need no import of this test module, and flock semantics are per process.
CTX = multiprocessing.get_context("fork")


def _hold(path, ready, release, owner="holder"):
    with HostLock(path, timeout=5, owner=owner):
        ready.set()
        release.wait(10)


def _critical_section(path, log, rounds):
    for _round in range(rounds):
        with HostLock(path, timeout=30):
            # Each entry is written in two steps with a pause between: an overlap would show
            # up as two "in" lines in a row.
            with open(log, "a") as out:
                out.write("in %d\n" % os.getpid())
            time.sleep(0.005)
            with open(log, "a") as out:
                out.write("out %d\n" % os.getpid())


def _hold_and_die(path, ready):
    lock = HostLock(path, timeout=5)
    lock.acquire()
    ready.set()
    time.sleep(30)


def _raise_inside(path):
    with HostLock(path, timeout=5):
        raise RuntimeError("boom")


def test_creates_folder_and_releases(tmp_path):
    path = str(tmp_path / "run" / "gpuvirt" / "alloc.lock")
    with HostLock(path, timeout=1) as lock:
        assert lock.locked
        assert os.path.isdir(os.path.dirname(path))
        assert held(path)
        assert "pid %d" % os.getpid() in holder(path)
    assert not lock.locked
    assert not held(path)


def test_held_is_false_for_a_missing_file(tmp_path):
    assert not held(str(tmp_path / "nothing.lock"))


def test_mutual_exclusion_between_processes(tmp_path):
    path = str(tmp_path / "alloc.lock")
    log = str(tmp_path / "log")
    procs = [CTX.Process(target=_critical_section, args=(path, log, 5)) for _proc in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    lines = open(log).read().splitlines()
    assert len(lines) == 4 * 5 * 2
    # Strict alternation in/out by the same process: no two holders at once.
    for entered, left in zip(lines[0::2], lines[1::2], strict=True):
        assert entered.startswith("in ") and left == "out " + entered[3:]


def test_timeout_names_the_path_and_the_holder(tmp_path):
    path = str(tmp_path / "alloc.lock")
    ready, release = CTX.Event(), CTX.Event()
    proc = CTX.Process(target=_hold, args=(path, ready, release, "kvm_vm train-a"))
    proc.start()
    try:
        assert ready.wait(10)
        assert held(path)
        started = time.monotonic()
        with pytest.raises(HostLockError) as err:
            HostLock(path, timeout=0.3).acquire()
        assert time.monotonic() - started >= 0.3
        message = str(err.value)
        assert path in message
        assert "another gpuvirt run" in message
        assert "kvm_vm train-a" in message and "pid %d" % proc.pid in message
        assert "lock_timeout" in message
    finally:
        release.set()
        proc.join(10)
    assert not held(path)


def test_waiter_gets_the_lock_when_the_holder_finishes(tmp_path):
    path = str(tmp_path / "alloc.lock")
    ready, release = CTX.Event(), CTX.Event()
    proc = CTX.Process(target=_hold, args=(path, ready, release))
    proc.start()
    assert ready.wait(10)
    release_timer = CTX.Process(target=_set_later, args=(release, 0.2))
    release_timer.start()
    with HostLock(path, timeout=10) as lock:
        assert lock.waited > 0.1
    proc.join(10)
    release_timer.join(10)


def _set_later(event, delay):
    time.sleep(delay)
    event.set()


def test_killed_holder_leaves_no_stale_lock(tmp_path):
    path = str(tmp_path / "alloc.lock")
    ready = CTX.Event()
    proc = CTX.Process(target=_hold_and_die, args=(path, ready))
    proc.start()
    assert ready.wait(10)
    assert held(path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert not held(path)
    with HostLock(path, timeout=1):
        pass


def test_released_when_the_body_raises(tmp_path):
    path = str(tmp_path / "alloc.lock")
    with pytest.raises(RuntimeError):
        _raise_inside(path)
    assert not held(path)
    proc = CTX.Process(target=_raise_inside, args=(path,))
    proc.start()
    proc.join(10)
    assert proc.exitcode != 0
    assert not held(path)


def test_reentrant_on_the_same_object_only(tmp_path):
    path = str(tmp_path / "alloc.lock")
    lock = HostLock(path, timeout=1)
    with lock:
        with lock:
            assert held(path)
        assert held(path), "the inner exit must not drop the outer hold"
        # A second object is a second holder and must wait (here: time out).
        with pytest.raises(HostLockError):
            HostLock(path, timeout=0).acquire()
    assert not held(path)


def test_bad_timeout_and_unwritable_path(tmp_path):
    with pytest.raises(HostLockError, match="lock_timeout"):
        HostLock(str(tmp_path / "x.lock"), timeout=-1)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(HostLockError, match="lock_path") as err:
        HostLock(str(blocker / "alloc.lock"), timeout=0).acquire()
    assert str(blocker) in str(err.value)

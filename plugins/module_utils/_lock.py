# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The host-wide allocation lock. Private to this collection.

Two Ansible runs on one host (two AWX jobs, two playbooks, kvm_layout threads) must never read
the same free GPUs and define two domains on them, nor remove an image while another run
builds an overlay on it. Every run that reads allocations and then changes them holds this
exclusive ``flock`` from the read to the change.

``flock`` rather than a pid file: the kernel drops the lock when its holder exits, however it
exits (SIGKILL, OOM), so there is never a stale lock to clean up by hand.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

DEFAULT_LOCK_PATH = "/run/gpuvirt/alloc.lock"
DEFAULT_LOCK_TIMEOUT = 300


class HostLockError(Exception):
    """The lock could not be taken: another run holds it past the timeout, or the path is bad."""


def lock_argspec():
    """Options of the gpuvirt.kvm.lock doc fragment."""
    return dict(
        lock_path=dict(type="path", default=DEFAULT_LOCK_PATH),
        lock_timeout=dict(type="int", default=DEFAULT_LOCK_TIMEOUT),
    )


def _open(path):
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise HostLockError(
            "lock_path: cannot open the host lock file %s: %s; give a lock_path in a folder "
            "this user may write" % (path, exc.strerror or exc)
        ) from exc


def holder(path):
    """What the current (or last) holder wrote into the lock file: pid and owner, or ''."""
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            return handle.read(512).strip()
    except OSError:
        return ""


def held(path=DEFAULT_LOCK_PATH):
    """Whether some open file description (any process, this one included) holds the lock."""
    if not os.path.exists(path):
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class HostLock:
    """An exclusive flock on ``path``, waited for up to ``timeout`` seconds.

    Use it as a context manager. It is re-entrant on the same object (kvm_layout hands one
    lock to the code that converges each VM), never across objects: a second HostLock on the
    same path in the same process waits like any other holder would.
    """

    def __init__(self, path=DEFAULT_LOCK_PATH, timeout=DEFAULT_LOCK_TIMEOUT, owner=None,
                 poll=0.05):
        if timeout is None or timeout < 0:
            raise HostLockError("lock_timeout: must be 0 or more seconds, got %r" % (timeout,))
        self.path = path
        self.timeout = timeout
        self.owner = owner or "gpuvirt.kvm"
        self.poll = poll
        self.waited = 0.0
        self._fd = None
        self._depth = 0

    @property
    def locked(self):
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self):
        """Take the lock, waiting up to the timeout; raise HostLockError naming the holder."""
        if self._fd is not None:
            self._depth += 1
            return self
        fd = _open(self.path)
        start = time.monotonic()
        deadline = start + self.timeout
        delay = self.poll
        taken = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise HostLockError("lock_path: cannot lock %s: %s"
                                            % (self.path, exc.strerror)) from exc
                now = time.monotonic()
                if now >= deadline:
                    who = holder(self.path)
                    raise HostLockError(
                        "another gpuvirt run holds the host-wide allocation lock %s%s; waited "
                        "%g s (lock_timeout). Let that run finish, or raise lock_timeout"
                        % (self.path, " (%s)" % who if who else "", self.timeout))
                # Back off gently so many waiters do not spin, but keep the hand-over quick.
                time.sleep(min(delay, max(deadline - now, 0.001)))
                delay = min(delay * 1.5, 0.5)
            taken = True
        finally:
            if not taken:  # timed out, failed, or interrupted (Ctrl-C): no descriptor leaks
                os.close(fd)
        self.waited = time.monotonic() - start
        self._fd = fd
        self._depth = 1
        # Tell waiters who holds it: their timeout message quotes this line.
        stamp = "pid %d, %s, since %s" % (os.getpid(), self.owner,
                                          time.strftime("%Y-%m-%dT%H:%M:%S"))
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, stamp.encode("utf-8", "replace") + b"\n", 0)
        except OSError:
            pass  # informative only; a read-only lock file still locks
        return self

    def release(self):
        """Drop the lock (the outermost release of a re-entered lock drops it)."""
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()
        return False

# SPDX-License-Identifier: GPL-3.0-or-later
"""tools/subreaper.py: daemons started under it are its children, and so are their orphans."""

import os
import signal
import subprocess
import sys
import time

SUBREAPER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "tools",
                         "subreaper.py")

# A daemon as libvirtd makes QEMU one: fork, the middle process exits, the grandchild lives on.
DAEMON = r"""
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # a daemon lets go of its caller's terminal and pipes
            os.dup2(null, fd)
        with open(sys.argv[1], "w") as handle:
            handle.write(str(os.getpid()))
        time.sleep(120)
    os._exit(0)
os.wait()
"""


def stat_fields(pid):
    try:
        with open("/proc/%d/stat" % pid, encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        # ESRCH instead of ENOENT: the process was being reaped while /proc was read.
        return None


def wait_until(predicate, limit=20.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def run(*argv):
    return subprocess.run([sys.executable, SUBREAPER, *argv], capture_output=True, text=True,
                          timeout=60, check=False)


def test_it_returns_the_first_failing_status_of_its_commands():
    assert run("true", "--", "true").returncode == 0
    assert run("true", "--", "sh", "-c", "exit 3", "--", "false").returncode == 3
    missing = run("/nonexistent/daemon")
    assert missing.returncode == 127 and "cannot run /nonexistent/daemon" in missing.stderr
    assert run().returncode == 2


def test_a_daemons_orphans_are_its_children_and_are_reaped(tmp_path):
    pidfile = tmp_path / "daemon.pid"
    result = run(sys.executable, "-c", DAEMON, str(pidfile))
    assert result.returncode == 0, result.stderr
    pid = int(pidfile.read_text())
    reaper = int(stat_fields(pid)[1])  # the daemon's parent
    assert reaper != 1
    with open("/proc/%d/cmdline" % reaper, "rb") as handle:
        assert SUBREAPER.encode() in handle.read()
    os.kill(pid, signal.SIGKILL)
    # Reaped by the subreaper: the process is gone, not a zombie left for PID 1.
    assert wait_until(lambda: stat_fields(pid) is None)
    # With nothing left to reap, the subreaper ends too.
    assert wait_until(lambda: (stat_fields(reaper) or ["Z"])[0] == "Z")


def test_it_does_not_keep_the_callers_folder(tmp_path):
    pidfile = tmp_path / "daemon.pid"
    work = tmp_path / "checkout"
    work.mkdir()
    result = subprocess.run([sys.executable, SUBREAPER, sys.executable, "-c", DAEMON,
                             str(pidfile)], cwd=str(work), capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    pid = int(pidfile.read_text())
    reaper = int(stat_fields(pid)[1])
    try:
        assert os.readlink("/proc/%d/cwd" % reaper) == "/"
    finally:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: stat_fields(pid) is None)

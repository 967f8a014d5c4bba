#!/usr/bin/env python
# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Converge benchmark: N tiny VMs created, re-run and torn down with kvm_layout, against floors.

Usage: .venv/bin/python bench/converge.py [--quick] [--vms 16] [--rounds R] [--no-peer]
                                          [--exclusive] [--keep] [--collections-path DIR]

Runs on this machine's real libvirt (qemu:///system) and QEMU/KVM. Measured in the same run,
interleaved round by round (floor, ours, in-process, peer) so that load from other work on
the host hits them alike, best of R rounds:

  floor  the same steps done directly, 16 threads: `qemu-img create -b BASE` + `virsh define`
         + `virsh start` per VM; `virsh destroy` + `virsh undefine` + rm overlay to tear down.
         The domain XML is the one kvm_layout defines (read back from libvirt, per-VM name,
         overlay and MAC; uuid left to libvirt; gpuvirt metadata dropped so that no kvm_layout
         run with exclusive: true elsewhere on the host takes these domains for its own).
  ours   one `ansible-playbook` run of gpuvirt.kvm.kvm_layout with the N VMs (create), the same
         run again (no-op: must report changed=false), and a teardown run (every VM
         state: absent with force: true, timeout: 0 - an OS-less guest ignores ACPI, so the
         shutdown is a power-off at once, as `virsh destroy` in the floor). Not
         `exclusive: true, vms: []`: that also removes every other gpuvirt VM on the host
         (other people's test VMs on a shared machine); --exclusive uses it when none exist.
  in-process  what kvm_layout runs, without Ansible: module_utils._vm_apply.converge() called in
         this process with the same options (shows the collection's own cost apart from
         Ansible's fixed cost per run: start-up, AnsiballZ, the module's imports).
  peer   the same job as users write it today with community.libvirt (pip package `ansible`,
         in a separate venv at .build/bench-venv): loops of `command: qemu-img create`,
         `template` of the domain XML, `virt: command=define`, `virt: state=running`; teardown
         with `virt: state=destroyed`, `virt: command=undefine`, `file: state=absent`.

Every VM: 64 MiB, 1 vCPU, cpu_policy shared, QEMU user networking (no vhost-net here),
host-passthrough CPU with arch-capabilities disabled (this host's KVM cannot virtualise that
MSR), an OS disk overlay on a 64 MiB base image in a scratch store. No guest OS: the base
image's boot sector halts the vCPU, so each guest idles after its firmware (SeaBIOS) has run,
which is all that creating, starting and removing them needs. After each create the bench
waits until the guests' firmware has finished (their QEMU processes together under 5 % of a
CPU for a second) before the no-op and the teardown: the firmware costs 3-5 CPU-seconds per
guest on this machine's software KVM, and a rerun on a real host finds its guests booted.

Wall times are of the whole `ansible-playbook` process (what a user waits for); the module
task alone comes from task start and end times (a small stdout callback). An ansible-playbook
with one debug task is timed too, and ours is shown raw and minus that fixed start-up cost.
So is an ansible-playbook with one ansible.builtin.ping task: the least that running any
module costs, which gives the least ratio any Ansible module can reach against the floor.
Targets are judged on raw times: create within 1.3x the floor, no-op rerun under 2 s with
changed=false, teardown within 1.5x the floor.

Then: creating the OS disk overlay (module_utils._qemu_img.create_overlay) on a 20 GiB base
holding real data takes as long as on a 64 MiB one (target: within 1.5x), next to a full copy
(`qemu-img convert`) of each.

Exit status 1 when a target is missed, 2 when the benchmark cannot run. Domains named
bench-gv-* are removed at the start and at the end, also on failure or SIGTERM.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URI = "qemu:///system"
PREFIX = "bench-gv-"
VIRSH = ["virsh", "-q", "-c", URI]
OUR_VENV = os.path.join(REPO, ".venv")
PEER_VENV = os.path.join(REPO, ".build", "bench-venv")
FARM = os.path.join(REPO, ".build", "pytest")  # same symlink farm as tests/conftest.py
SCRATCH_PARENT = "/var/tmp"  # libvirt's qemu user must traverse it (not a private /tmp)
RUN_LOCK = os.path.join(SCRATCH_PARENT, "gpuvirt-bench.lock")
GPUVIRT_NS = "https://gpuvirt.invalid/xmlns/kvm/1"
IMAGE = "benchtiny"
TARGETS = {"create": 1.3, "teardown": 1.5}
NOOP_LIMIT_S = 2.0
OVERLAY_RATIO_LIMIT = 1.5


class BenchError(Exception):
    """The benchmark cannot go on (the message says what failed)."""


def _import_collection(path):
    """Make ansible_collections.gpuvirt.kvm importable (and findable by ansible-playbook)."""
    link = os.path.join(path, "ansible_collections", "gpuvirt", "kvm")
    if path == FARM and not os.path.islink(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        try:
            os.symlink(REPO, link)
        except FileExistsError:
            pass
    if not os.path.isdir(link):
        raise BenchError("%s holds no ansible_collections/gpuvirt/kvm" % path)
    sys.path.insert(0, path)


def sh(argv, check=True, **kw):
    """Run a command in C.UTF-8 (Ansible needs UTF-8); raise BenchError with stderr if it fails."""
    env = dict(os.environ, LANG="C.UTF-8", LC_ALL="C.UTF-8")
    env.update(kw.pop("env", {}))
    # When the benchmark is stopped, the whole tree goes (an ansible-playbook's module process
    # would otherwise go on defining VMs after the cleanup).
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True, **kw)
    try:
        out, err = proc.communicate()
    except BaseException:  # SystemExit from SIGTERM, KeyboardInterrupt: stop the tree, re-raise
        _kill_tree(proc)
        raise
    proc = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise BenchError("%s failed (%d): %s" % (" ".join(argv), proc.returncode,
                                                 (proc.stderr or proc.stdout).strip()[-2000:]))
    return proc


def _process_tree(pid):
    """``pid`` and its descendants, from /proc (parents before children)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, encoding="utf-8") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop(0)
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def _signal(pid, signum):
    try:
        os.kill(pid, signum)
        return True
    except ProcessLookupError:
        return False


def _kill_tree(proc):
    """SIGKILL ``proc`` and every descendant, and wait until they are gone (10 s at most).

    By tree, not by process group: ansible-playbook's workers call setsid(), so a group kill
    would leave the module process running.
    """
    stopped = []
    for _dummy in range(5):  # stop top-down until no new child appears, so none escapes
        fresh = [p for p in _process_tree(proc.pid) if p not in stopped]
        if not fresh:
            break
        stopped += [p for p in fresh if _signal(p, signal.SIGSTOP)]
    for pid in stopped:
        _signal(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
            os.path.exists("/proc/%d" % p) and _process_state(p) not in ("Z", None)
            for p in stopped):
        time.sleep(0.05)


def _process_state(pid):
    try:
        with open("/proc/%d/stat" % pid, encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


# --- the host -------------------------------------------------------------------------------

def bench_domains():
    names = sh(VIRSH + ["list", "--all", "--name"]).stdout.split()
    return sorted(n for n in names if n.startswith(PREFIX))


def running_domains():
    return set(sh(VIRSH + ["list", "--state-running", "--name"]).stdout.split())


def cleanup_domains():
    """Power off and undefine every bench-gv-* domain (leftovers of a killed run too)."""
    names = bench_domains()
    for name in names:
        sh(VIRSH + ["destroy", name], check=False)
        sh(VIRSH + ["undefine", name], check=False)
    left = bench_domains()
    if left:
        raise BenchError("could not remove domains %s" % ", ".join(left))
    return names


def cleanup_stale_scratch():
    """Remove scratch folders of earlier runs whose process is gone."""
    for entry in os.listdir(SCRATCH_PARENT):
        match = re.match(r"^gpuvirt-bench-(\d+)-", entry)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(SCRATCH_PARENT, entry), ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def host_facts():
    cpu = "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    with open("/proc/meminfo", encoding="utf-8") as handle:
        mem_kib = int(handle.readline().split()[1])
    versions = sh(VIRSH + ["version"], check=False).stdout.strip().splitlines()
    qemu = sh(["qemu-img", "--version"], check=False).stdout.splitlines()[:1]
    return ("host: %d CPU(s) (%s), %.1f GiB RAM, kernel %s, Python %s\n%s; %s" % (
        os.cpu_count(), cpu, mem_kib / 2 ** 20, platform.release(), platform.python_version(),
        "; ".join(v.strip() for v in versions), "; ".join(qemu)))


def loadavg():
    return os.getloadavg()[0]


# A boot sector that halts the vCPU (cli; hlt; jmp back to hlt) and the signature the BIOS
# looks for: the guest then idles like a booted tenant waiting for work. An empty disk instead
# leaves SeaBIOS and iPXE retrying the boot, about 0.1 CPU-second per second per guest.
HALT_MBR = bytes([0xFA, 0xF4, 0xEB, 0xFD]) + bytes(506) + b"\x55\xaa"


def write_halting_base(path, size_mib=64):
    """A qcow2 image whose first sector is HALT_MBR (the rest reads as zeros)."""
    raw = path + ".raw"
    with open(raw, "wb") as handle:
        handle.write(HALT_MBR)
        handle.truncate(size_mib * 1024 * 1024)
    try:
        sh(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, path])
    finally:
        os.unlink(raw)


def guest_cpu_seconds(names):
    """CPU seconds used so far by the QEMU processes of the running domains ``names``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for name in names:
        try:
            with open("/run/libvirt/qemu/%s.pid" % name, encoding="ascii") as handle:
                pid = int(handle.read().strip())
            with open("/proc/%d/stat" % pid, encoding="ascii") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue  # not running (any more)
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def qemu_reaper(names):
    """Who reaps the guests' QEMU processes when they end: "pid N (command)", or None.

    libvirtd daemonizes QEMU, so its parent is the nearest subreaper, or PID 1. libvirt's
    destroy waits until the process is gone, zombie included: a PID 1 that is no init and
    reaps on a timer (containers, micro-VMs) adds its delay to every destroy.
    """
    for name in names:
        try:
            with open("/run/libvirt/qemu/%s.pid" % name, encoding="ascii") as handle:
                pid = int(handle.read().strip())
            with open("/proc/%d/stat" % pid, encoding="ascii") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open("/proc/%d/cmdline" % ppid, "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except (OSError, ValueError, IndexError):
            continue
        return "pid %d (%s)" % (ppid, command[:100])
    return None


def settle(names, quiet=0.05, window=1.0, limit=180.0):
    """Wait until the guests' firmware has booted: their QEMU processes together use less
    than ``quiet`` of one CPU over ``window`` seconds. Returns the seconds waited.

    Starting a guest costs 3-5 CPU-seconds of firmware (SeaBIOS) on this machine's software
    KVM. Measured right after a create, a no-op or a teardown of 16 VMs would compete with
    that boot for the 2 cores, which measures the boot, not the tool: a rerun on a real host
    finds its guests booted.
    """
    start = time.perf_counter()
    used = guest_cpu_seconds(names)
    while time.perf_counter() - start < limit:
        time.sleep(window)
        now = guest_cpu_seconds(names)
        if now - used < quiet * window:
            break
        used = now
    return time.perf_counter() - start


# --- domain XML: what kvm_layout defines, templated per VM ----------------------------------

def vm_names(count):
    return ["%s%02d" % (PREFIX, i) for i in range(count)]


def vm_mac(index):
    return "52:54:00:be:%02x:%02x" % (index // 256, index % 256)


def xml_template(xml_text):
    """kvm_layout's inactive XML with @@NAME@@, @@DISK@@, @@MAC@@ placeholders, no uuid."""
    root = ET.fromstring(xml_text)
    for tag in ("uuid", "metadata"):
        for element in root.findall(tag):
            root.remove(element)
    root.find("name").text = "@@NAME@@"
    disks = [d for d in root.iter("disk") if d.get("device") == "disk"]
    if len(disks) != 1 or disks[0].find("source") is None:
        raise BenchError("expected one OS disk in kvm_layout's XML, found %d" % len(disks))
    disks[0].find("source").set("file", "@@DISK@@")
    nics = root.findall("./devices/interface")
    if len(nics) != 1:
        raise BenchError("expected one NIC in kvm_layout's XML, found %d" % len(nics))
    nics[0].find("mac").set("address", "@@MAC@@")
    return ET.tostring(root, encoding="unicode")


def render_xml(template, name, disk, mac):
    return template.replace("@@NAME@@", name).replace("@@DISK@@", disk).replace("@@MAC@@", mac)


# --- ansible-playbook runs ------------------------------------------------------------------

# ansible-core ships no json stdout callback (that is ansible.posix.json), so the benchmark
# brings a small one, written into the scratch folder and used by both venvs alike: task start
# and end times, each task's result, and the play recap.
CALLBACK = '''
from __future__ import annotations

import json
import sys
import time

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "bench_json"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tasks = []

    def v2_playbook_on_task_start(self, task, is_conditional):
        self.tasks.append({"name": task.get_name(), "start": time.time(), "end": None,
                           "result": {}})

    def _done(self, result, **extra):
        if self.tasks:
            self.tasks[-1]["end"] = time.time()
            self.tasks[-1]["result"] = dict(result._result, **extra)

    def v2_runner_on_ok(self, result):
        self._done(result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._done(result, failed=True)

    def v2_runner_on_skipped(self, result):
        self._done(result, skipped=True)

    def v2_runner_on_unreachable(self, result):
        self._done(result, failed=True, unreachable=True)

    def v2_playbook_on_stats(self, stats):
        recap = {h: stats.summarize(h) for h in sorted(stats.processed)}
        sys.stdout.write(json.dumps({"tasks": self.tasks, "stats": recap}, default=str))
'''


class Run:
    """One ansible-playbook process: wall time, task durations, changed count."""

    def __init__(self, wall, result):
        self.wall = wall
        self.result = result
        self.tasks = [(t["name"], (t["end"] - t["start"]) if t["end"] else None, t["result"])
                      for t in result.get("tasks", [])]
        stats = next(iter(result.get("stats", {}).values()), {})
        self.changed = stats.get("changed", 0)

    @property
    def task_time(self):
        """Seconds spent in tasks (module runs, loops included), from the callback."""
        return sum(t[1] or 0.0 for t in self.tasks)


class Ansible:
    """Runs playbooks with one venv's ansible-playbook, timing the whole process."""

    def __init__(self, venv, workdir, collections_path=None):
        self.bin = os.path.join(venv, "bin", "ansible-playbook")
        self.inventory = os.path.join(workdir, "inventory-%s.ini" % os.path.basename(venv))
        with open(self.inventory, "w", encoding="utf-8") as handle:
            handle.write("bench ansible_connection=local ansible_python_interpreter=%s\n"
                         % os.path.join(venv, "bin", "python"))
        plugins = os.path.join(workdir, "callback_plugins")
        if not os.path.isdir(plugins):
            os.makedirs(plugins)
            with open(os.path.join(plugins, "bench_json.py"), "w", encoding="utf-8") as handle:
                handle.write(CALLBACK)
        self.env = {
            "ANSIBLE_CALLBACK_PLUGINS": plugins,
            "ANSIBLE_STDOUT_CALLBACK": "bench_json",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_LOCALHOST_WARNING": "false",
            "ANSIBLE_DEPRECATION_WARNINGS": "false",
            "ANSIBLE_RETRY_FILES_ENABLED": "false",
        }
        if collections_path:
            self.env["ANSIBLE_COLLECTIONS_PATH"] = collections_path

    def run(self, playbook):
        start = time.perf_counter()
        proc = sh([self.bin, "-i", self.inventory, playbook], check=False, env=self.env)
        wall = time.perf_counter() - start
        try:
            result = json.loads(proc.stdout)
        except ValueError as exc:
            raise BenchError("%s printed no JSON (rc %d): %s %s" % (
                playbook, proc.returncode, proc.stdout[-1500:], proc.stderr[-1500:])) from exc
        run = Run(wall, result)
        if proc.returncode != 0:
            failed = [(name, host.get("msg"), host.get("results"))
                      for name, _s, host in run.tasks if host.get("failed")]
            msgs = []
            for name, msg, results in failed:
                if results:  # a loop: the items carry the messages
                    msg = "; ".join(sorted({str(r["msg"]) for r in results if r.get("msg")}))
                msgs.append("%s: %s" % (name, msg))
            raise BenchError("%s failed (rc %d): %s" % (
                os.path.basename(playbook), proc.returncode,
                " | ".join(msgs) or proc.stderr[-1500:]))
        return run


def write_playbook(path, tasks, play_vars=None):
    """A one-play playbook on host 'bench' (JSON is YAML)."""
    play = {"name": os.path.basename(path), "hosts": "bench", "gather_facts": False,
            "tasks": tasks}
    if play_vars:
        play["vars"] = play_vars
    with open(path, "w", encoding="utf-8") as handle:
        json.dump([play], handle, indent=1)
    return path


# --- the four ways measured (floor, ours, in-process, peer) and timing them -----------------

class Floor:
    """qemu-img and virsh, one thread per VM: the least any tool can do."""

    def __init__(self, names, template, base, disk_dir, workers):
        self.names = names
        self.template = template
        self.base = base
        self.disk_dir = disk_dir
        self.workers = workers

    def _overlay(self, name):
        return os.path.join(self.disk_dir, "%s-os.qcow2" % name)

    def _pool(self, fn):
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.workers) as pool:
            list(pool.map(fn, range(len(self.names))))

    def create(self):
        def one(i):
            name = self.names[i]
            overlay = self._overlay(name)
            xml_path = os.path.join(self.disk_dir, "%s.xml" % name)
            with open(xml_path, "w", encoding="utf-8") as handle:
                handle.write(render_xml(self.template, name, overlay, vm_mac(i)))
            sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", self.base, "-F", "qcow2",
                overlay])
            sh(VIRSH + ["define", xml_path])
            sh(VIRSH + ["start", name])

        return timed(lambda: self._pool(one))

    def noop(self):
        """What a checker must at least do: read each VM's state and see its overlay."""
        def one(i):
            name = self.names[i]
            state = sh(VIRSH + ["domstate", name]).stdout.strip()
            if state != "running" or not os.path.exists(self._overlay(name)):
                raise BenchError("floor: %s is %s" % (name, state))

        return timed(lambda: self._pool(one))

    def teardown(self):
        def one(i):
            name = self.names[i]
            sh(VIRSH + ["destroy", name])
            sh(VIRSH + ["undefine", name])
            os.unlink(self._overlay(name))

        return timed(lambda: self._pool(one))


class Ours:
    """gpuvirt.kvm.kvm_layout: one task converges every VM."""

    def __init__(self, ansible, workdir, names, common, exclusive):
        self.ansible = ansible
        self.changed_noop = None
        layout = dict(common)
        vm_defaults = layout.pop("defaults")
        self.create_pb = write_playbook(os.path.join(workdir, "ours-create.yml"), [{
            "name": "layout", "gpuvirt.kvm.kvm_layout": dict(
                layout, defaults=vm_defaults, vms=[{"name": n} for n in names])}])
        if exclusive:
            teardown = dict(layout, exclusive=True, vms=[],
                            defaults={"force": True, "timeout": 0})
        else:
            teardown = dict(layout, defaults={"force": True, "timeout": 0},
                            vms=[{"name": n, "state": "absent"} for n in names])
        self.teardown_pb = write_playbook(os.path.join(workdir, "ours-teardown.yml"), [{
            "name": "layout", "gpuvirt.kvm.kvm_layout": teardown}])

    def create(self):
        run = self.ansible.run(self.create_pb)
        if not run.changed:
            raise BenchError("ours: the create run reported changed=false")
        return run

    def noop(self):
        run = self.ansible.run(self.create_pb)
        self.changed_noop = run.changed
        if run.changed:
            print("  ours no-op rerun reported changed: %s" % json.dumps(
                [t[2].get("actions") for t in run.tasks])[:2000])
        return run

    def teardown(self):
        return self.ansible.run(self.teardown_pb)


class InProcess:
    """kvm_layout's own work without Ansible: module_utils._vm_apply.converge() in this
    process."""

    def __init__(self, names, common, disk_dir):
        from ansible_collections.gpuvirt.kvm.plugins.module_utils import (
            _argspec,
            _host_context,
            _image_store,
            _libvirt,
            _lock,
            _vm_apply,
            _vm_request,
        )

        self.apply, self.request, self.context = _vm_apply, _vm_request, _host_context
        self.store, self.libvirt, self.lock = _image_store, _libvirt, _lock
        params = {}
        for spec in (_argspec.host_argspec(), _argspec.libvirt_argspec(), _lock.lock_argspec()):
            params.update({k: v.get("default") for k, v in spec.items()})
        params.update(common, disk_dir=disk_dir, exclusive=False)
        self.create_p = dict(params, vms=[{"name": n} for n in names])
        self.teardown_p = dict(params, defaults={"force": True, "timeout": 0},
                               vms=[{"name": n, "state": "absent"} for n in names])
        self.changed_noop = None

    def _converge(self, params):
        requests, exclusive = self.request.layout_requests(params)
        with self.libvirt.LibvirtGateway(URI) as gateway:
            results = self.apply.converge(
                gateway, self.context.host_context(
                    params, store=self.store.ImageStore(params["store"])), requests,
                lock=self.lock.HostLock(params["lock_path"], params["lock_timeout"],
                                        owner="bench"),
                workers=params["workers"], exclusive=exclusive, whole=True)
        errors = [r["error"] for r in results if r.get("error")]
        if errors:
            raise BenchError("in-process converge: %s" % "; ".join(errors))
        return any(r["changed"] for r in results)

    def create(self):
        return timed(lambda: self._converge(self.create_p))

    def noop(self):
        start = time.perf_counter()
        self.changed_noop = self._converge(self.create_p)
        return time.perf_counter() - start

    def teardown(self):
        return timed(lambda: self._converge(self.teardown_p))


class Peer:
    """community.libvirt, written as its users write it: loops over the VMs, task by task."""

    def __init__(self, ansible, workdir, names, template, base, disk_dir):
        self.ansible = ansible
        self.changed_noop = None
        jinja = render_xml(template, "{{ item.name }}",
                           "{{ disk_dir }}/{{ item.name }}-os.qcow2", "{{ item.mac }}")
        with open(os.path.join(workdir, "domain.xml.j2"), "w", encoding="utf-8") as handle:
            handle.write(jinja)
        play_vars = {"disk_dir": disk_dir, "base": base,
                     "vms": [{"name": n, "mac": vm_mac(i)} for i, n in enumerate(names)]}
        loop = {"loop": "{{ vms }}", "loop_control": {"label": "{{ item.name }}"}}
        self.create_pb = write_playbook(os.path.join(workdir, "peer-create.yml"), [
            dict(loop, name="OS disk overlay", **{"ansible.builtin.command": {
                "cmd": "qemu-img create -q -f qcow2 -b {{ base }} -F qcow2 "
                       "{{ disk_dir }}/{{ item.name }}-os.qcow2",
                "creates": "{{ disk_dir }}/{{ item.name }}-os.qcow2"}}),
            dict(loop, name="domain XML", **{"ansible.builtin.template": {
                "src": "domain.xml.j2", "dest": "{{ disk_dir }}/{{ item.name }}.xml",
                "mode": "0644"}}),
            dict(loop, name="define", **{"community.libvirt.virt": {
                "command": "define", "uri": URI,
                "xml": "{{ lookup('ansible.builtin.file', disk_dir ~ '/' ~ item.name ~ "
                       "'.xml') }}"}}),
            dict(loop, name="start", **{"community.libvirt.virt": {
                "name": "{{ item.name }}", "state": "running", "uri": URI}}),
        ], play_vars)
        self.teardown_pb = write_playbook(os.path.join(workdir, "peer-teardown.yml"), [
            dict(loop, name="power off", **{"community.libvirt.virt": {
                "name": "{{ item.name }}", "state": "destroyed", "uri": URI}}),
            dict(loop, name="undefine", **{"community.libvirt.virt": {
                "name": "{{ item.name }}", "command": "undefine", "uri": URI}}),
            dict(loop, name="remove OS disk", **{"ansible.builtin.file": {
                "path": "{{ disk_dir }}/{{ item.name }}-os.qcow2", "state": "absent"}}),
        ], play_vars)

    def create(self):
        return self.ansible.run(self.create_pb)

    def noop(self):
        run = self.ansible.run(self.create_pb)
        self.changed_noop = run.changed
        return run

    def teardown(self):
        return self.ansible.run(self.teardown_pb)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def wall(value):
    """Seconds of a floor call (float) or an ansible-playbook Run."""
    return value.wall if isinstance(value, Run) else value


# --- setup ----------------------------------------------------------------------------------

def setup(scratch, ours_ansible, names, common):
    """A tiny base image in a scratch store (kvm_image) and kvm_layout's XML for one VM."""
    raw = os.path.join(scratch, "benchtiny.qcow2")
    write_halting_base(raw)
    probe = "%stemplate" % PREFIX
    layout = dict(common)
    vm_defaults = layout.pop("defaults")
    pb = write_playbook(os.path.join(scratch, "setup.yml"), [
        {"name": "image", "gpuvirt.kvm.kvm_image": {
            "name": IMAGE, "version": "1", "src": raw, "store": common["store"],
            "lock_path": common["lock_path"]}},
        {"name": "probe", "gpuvirt.kvm.kvm_layout": dict(
            layout, defaults=dict(vm_defaults, state="present"), vms=[{"name": probe}])},
    ])
    ours_ansible.run(pb)
    xml = sh(VIRSH + ["dumpxml", "--inactive", probe]).stdout
    sh(VIRSH + ["undefine", probe])
    os.unlink(os.path.join(common["disk_dir"], "%s-os.qcow2" % probe))
    base = os.path.realpath(os.path.join(common["store"], IMAGE))
    return xml_template(xml), base


def check_running(names, what):
    missing = sorted(set(names) - running_domains())
    if missing:
        raise BenchError("%s: %d VM(s) not running after create: %s" % (
            what, len(missing), ", ".join(missing)))


def check_gone(names, disk_dir, what):
    left = [n for n in bench_domains() if n in names]
    files = [f for f in os.listdir(disk_dir) if f.endswith(".qcow2")]
    if left or files:
        raise BenchError("%s: teardown left domains %s and files %s" % (what, left, files))


def other_managed_domains():
    """Domains not named bench-gv-* that carry gpuvirt metadata (exclusive would remove them)."""
    others = []
    for name in sh(VIRSH + ["list", "--all", "--name"]).stdout.split():
        if name.startswith(PREFIX):
            continue
        xml = sh(VIRSH + ["dumpxml", "--inactive", name], check=False).stdout
        if GPUVIRT_NS in xml:
            others.append(name)
    return others


# --- the VM benchmark -----------------------------------------------------------------------

def converge_bench(args, scratch):
    names = vm_names(args.vms)
    dirs = {k: os.path.join(scratch, k)
            for k in ("store", "floor", "ours", "inproc", "peer", "lock")}
    for path in dirs.values():
        os.makedirs(path)
    ours_ansible = Ansible(OUR_VENV, scratch, collections_path=args.collections_path)
    peer_ansible = None
    peer_note = None
    if args.no_peer:
        peer_note = "peer skipped (--no-peer)"
    elif not os.path.exists(os.path.join(PEER_VENV, "bin", "ansible-playbook")):
        peer_note = ("peer skipped: %s has no ansible-playbook; create it with: "
                     "/root/.pyenv/versions/3.12.1/bin/python3.12 -m venv %s && "
                     "%s/bin/pip install ansible libvirt-python" % (PEER_VENV, PEER_VENV,
                                                                    PEER_VENV))
    else:
        peer_ansible = Ansible(PEER_VENV, scratch)
        probe = sh([os.path.join(PEER_VENV, "bin", "ansible-doc"), "-l", "community.libvirt"],
                   check=False)
        if "community.libvirt.virt" not in probe.stdout:
            peer_note = "peer skipped: community.libvirt is not installed in %s" % PEER_VENV
            peer_ansible = None
    common = {
        "uri": URI, "store": dirs["store"], "disk_dir": dirs["ours"],
        "lock_path": os.path.join(dirs["lock"], "alloc.lock"), "reserved_cpus": "",
        "workers": args.vms,
        "defaults": {
            "image": IMAGE, "memory": 64, "vcpus": 1, "cpu_policy": "shared",
            "cpu_disable_features": ["arch-capabilities"], "networks": [{"user": True}],
            "domain_type": "kvm", "state": "running"},
    }
    template, base = setup(scratch, ours_ansible, names, common)
    if args.exclusive:
        others = other_managed_domains()
        if others:
            raise BenchError("--exclusive: kvm_layout exclusive: true would also remove %s "
                             "(gpuvirt domains of someone else on this host); run without "
                             "--exclusive" % ", ".join(others))
    floor = Floor(names, template, base, dirs["floor"], args.vms)
    ours = Ours(ours_ansible, scratch, names, common, args.exclusive)
    inproc = InProcess(names, common, dirs["inproc"])
    peer = None
    if peer_ansible is not None:
        peer = Peer(peer_ansible, scratch, names, template, base, dirs["peer"])
    startup_pb = write_playbook(os.path.join(scratch, "startup.yml"), [
        {"name": "one debug task", "ansible.builtin.debug": {"msg": "hello"}}])
    ping_pb = write_playbook(os.path.join(scratch, "ping.yml"), [
        {"name": "one ping task", "ansible.builtin.ping": {}}])

    rows = {}  # (variant, phase) -> [value per round]

    def record(variant, phase, value):
        rows.setdefault((variant, phase), []).append(value)

    print("\n== %d VMs: create, no-op rerun, teardown; %d round(s), variants interleaved" % (
        args.vms, args.rounds))
    for rnd in range(1, args.rounds + 1):
        print("round %d (load average %.2f):" % (rnd, loadavg()), end="", flush=True)
        record("startup", "ours", ours_ansible.run(startup_pb))
        record("ping", "ours", ours_ansible.run(ping_pb))
        if peer_ansible is not None:
            record("startup", "peer", peer_ansible.run(startup_pb))
        for variant, impl, disk_dir in (("floor", floor, dirs["floor"]),
                                        ("ours", ours, dirs["ours"]),
                                        ("inproc", inproc, dirs["inproc"]),
                                        ("peer", peer, dirs["peer"])):
            if impl is None:
                continue
            record(variant, "create", impl.create())
            check_running(names, variant)
            if rnd == 1 and variant == "floor":
                print(" [QEMU's parent, which reaps it: %s]" % qemu_reaper(names), end="")
            record(variant, "settle", settle(names))
            record(variant, "noop", impl.noop())
            record(variant, "teardown", impl.teardown())
            check_gone(names, disk_dir, variant)
            last = [wall(rows[(variant, p)][-1]) for p in ("create", "noop", "teardown")]
            print(" %s %.2f/%.2f/%.2f s (guests booted %.0f s)" % (
                variant, *last, rows[(variant, "settle")][-1]), end="", flush=True)
        print()
    return report(args, rows, ours, inproc, peer, peer_note)


def best(values):
    return min(wall(v) for v in values)


def report(args, rows, ours, inproc_run, peer, peer_note):
    """Print the table and the verdicts; return the list of missed targets."""
    phases = ("create", "noop", "teardown")
    start_ours = best(rows[("startup", "ours")])
    ping = best(rows[("ping", "ours")])
    start_peer = best(rows[("startup", "peer")]) if ("startup", "peer") in rows else None
    floor = {p: best(rows[("floor", p)]) for p in phases}
    our = {p: best(rows[("ours", p)]) for p in phases}
    inproc = {p: best(rows[("inproc", p)]) for p in phases}
    # The round whose whole process was fastest, for the task-only time of that same run.
    our_task = {p: min(rows[("ours", p)], key=lambda r: r.wall).task_time for p in phases}
    peer_t = {p: best(rows[("peer", p)]) for p in phases} if peer is not None else None
    peer_task = {p: min(rows[("peer", p)], key=lambda r: r.wall).task_time
                 for p in phases} if peer is not None else None

    def line(label, values, fmt="%8.2f"):
        cells = [fmt % v if v is not None else "%8s" % "-" for v in values]
        print("%-58s %s" % (label, " ".join(cells)))

    print("\nwall seconds, best of %d round(s); %d VMs of 64 MiB, 1 vCPU"
          % (args.rounds, args.vms))
    print("%-58s %8s %8s %8s" % ("", "create", "no-op", "teardown"))
    line("ansible-playbook start-up, one debug task (project venv)", [start_ours] * 3)
    line("ansible-playbook, one ansible.builtin.ping task (any module)", [ping] * 3)
    if start_peer is not None:
        line("ansible-playbook start-up, one debug task (bench-venv)", [start_peer] * 3)
    line("floor: qemu-img + virsh, %d threads (no-op: virsh domstate)" % args.vms,
         [floor[p] for p in phases])
    line("ours: kvm_layout, whole ansible-playbook (raw)", [our[p] for p in phases])
    line("ours: kvm_layout task alone (callback timing)", [our_task[p] for p in phases])
    line("ours: raw minus ansible-playbook start-up", [our[p] - start_ours for p in phases])
    line("ours: converge() in-process, no Ansible (module_utils)",
         [inproc[p] for p in phases])
    if peer is not None:
        line("peer: community.libvirt, whole ansible-playbook (raw)",
             [peer_t[p] for p in phases])
        line("peer: its tasks alone (callback timing)", [peer_task[p] for p in phases])
        line("peer: raw minus ansible-playbook start-up",
             [peer_t[p] - start_peer for p in phases])
    line("ratio ours / floor (raw)", [our[p] / floor[p] for p in phases], "%7.2fx")
    line("ratio ours / floor (both minus start-up; floor has none)",
         [(our[p] - start_ours) / floor[p] for p in phases], "%7.2fx")
    line("ratio in-process converge() / floor", [inproc[p] / floor[p] for p in phases],
         "%7.2fx")
    # A module whose own work took exactly the floor's time still runs inside an
    # ansible-playbook process that costs at least the ping playbook.
    line("least for any Ansible module: (ping playbook + floor) / floor",
         [(ping + floor[p]) / floor[p] for p in phases], "%7.2fx")
    if peer is not None:
        line("ratio ours / peer (raw)", [our[p] / peer_t[p] for p in phases], "%7.2fx")
        print("peer no-op rerun reported changed=%s (changed tasks: %s)" % (
            str(bool(peer.changed_noop)).lower(), peer.changed_noop))
    else:
        print(peer_note)
    if inproc_run.changed_noop:
        print("NOTE: the in-process no-op converge reported changed=true")
    if len(rows[("ours", "create")]) > 1:
        for variant in ("floor", "ours", "inproc"):
            print("every round, %s create/no-op/teardown: %s" % (variant, ", ".join(
                "%.2f/%.2f/%.2f" % tuple(wall(rows[(variant, p)][i]) for p in phases)
                for i in range(len(rows[(variant, "create")])))))

    missed = []
    print("\ntargets (judged on raw wall times):")
    for phase in ("create", "teardown"):
        ratio = our[phase] / floor[phase]
        ok = ratio <= TARGETS[phase]
        print("  %-8s within %.1fx the floor: %.2f s / %.2f s = %.2fx: %s" % (
            phase, TARGETS[phase], our[phase], floor[phase], ratio, "met" if ok else "MISSED"))
        if not ok:
            missed.append("%s %.2fx the floor (target %.1fx)" % (phase, ratio, TARGETS[phase]))
    ok = our["noop"] < NOOP_LIMIT_S and not ours.changed_noop
    print("  no-op rerun under %.0f s with changed=false: %.2f s, changed=%s: %s" % (
        NOOP_LIMIT_S, our["noop"], str(bool(ours.changed_noop)).lower(),
        "met" if ok else "MISSED"))
    if not ok:
        missed.append("no-op rerun %.2f s, changed=%s (target < %.0f s, changed=false)" % (
            our["noop"], str(bool(ours.changed_noop)).lower(), NOOP_LIMIT_S))
    return missed


# --- OS disk overlay vs full copy -----------------------------------------------------------

def overlay_bench(args, scratch):
    """create_overlay on a 20 GiB and a 64 MiB base, next to a full copy of each."""
    from ansible_collections.gpuvirt.kvm.plugins.module_utils import _qemu_img

    data_mib = 256 if args.quick else 1024
    folder = os.path.join(scratch, "overlay")
    os.makedirs(folder)
    free_gib = shutil.disk_usage(folder).free / 2 ** 30
    need_gib = 2.5 * data_mib / 1024 + 0.5
    print("\n== OS disk: overlay vs full copy (%s has %.0f GiB free, needs ~%.1f GiB)" % (
        folder, free_gib, need_gib))
    if free_gib < need_gib:
        print("skipped: not enough free disk space")
        return ["overlay: skipped, %.1f GiB free < %.1f GiB needed" % (free_gib, need_gib)]
    bases = {"64M": (os.path.join(folder, "base64m.qcow2"), "64M", 32),
             "20G": (os.path.join(folder, "base20g.qcow2"), "20G", data_mib)}
    for path, size, mib in bases.values():
        sh(["qemu-img", "create", "-q", "-f", "qcow2", path, size])
        sh(["qemu-io", "-f", "qcow2", "-c", "write -q -P 0xab 0 %dM" % mib, path])
    repeat = 3 if args.quick else 7
    times = {}
    for key, (path, _size, mib) in bases.items():
        detail = _qemu_img.info(path, backing_chain=False)
        overlay = os.path.join(folder, "overlay-%s.qcow2" % key)
        over = []
        for _dummy in range(repeat):
            over.append(timed(lambda p=path, o=overlay: _qemu_img.create_overlay(p, o)))
            overlay_bytes = os.stat(overlay).st_size
            os.unlink(overlay)
        copy = os.path.join(folder, "copy-%s.qcow2" % key)
        copies = []
        for _dummy in range(1 if args.quick else 2):
            copies.append(timed(lambda p=path, c=copy: sh(
                ["qemu-img", "convert", "-O", "qcow2", p, c])))
            copy_bytes = os.stat(copy).st_size
            os.unlink(copy)
        times[key] = (min(over), min(copies))
        print("base %-3s: virtual %5.1f GiB, %5d MiB of data, file %6.0f MiB | overlay "
              "(create_overlay) %.3f s, %.0f KiB | full copy (qemu-img convert) %.2f s, %.0f MiB"
              % (key, detail.virtual_size / 2 ** 30, mib, os.stat(path).st_size / 2 ** 20,
                 min(over), overlay_bytes / 1024, min(copies), copy_bytes / 2 ** 20))
        os.unlink(path)
    o_ratio = times["20G"][0] / times["64M"][0]
    c_ratio = times["20G"][1] / times["64M"][1]
    ok = o_ratio <= OVERLAY_RATIO_LIMIT
    print("overlay 20G / overlay 64M = %.2fx (target within %.1fx: %s); full copy 20G / 64M = "
          "%.1fx" % (o_ratio, OVERLAY_RATIO_LIMIT, "met" if ok else "MISSED", c_ratio))
    if ok:
        return []
    return ["overlay 20G / 64M = %.2fx (target %.1fx)" % (o_ratio, OVERLAY_RATIO_LIMIT)]


# --- main -----------------------------------------------------------------------------------

def _sigterm(_signum, _frame):
    raise SystemExit(143)  # so that the finally clauses clean up


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one round, less data in the 20 GiB image")
    parser.add_argument("--vms", type=int, default=16, help="VMs per layout (default 16)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 1)")
    parser.add_argument("--no-peer", action="store_true", help="skip community.libvirt")
    parser.add_argument("--exclusive", action="store_true",
                        help="tear ours down with exclusive: true, vms: [] (refused when "
                             "other gpuvirt domains exist on the host: it would remove them)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--collections-path", default=FARM, metavar="DIR",
                        help="benchmark the gpuvirt.kvm under DIR/ansible_collections/gpuvirt/"
                             "kvm (default: this checkout, via %(default)s)")
    args = parser.parse_args(argv)
    if args.vms < 1:
        parser.error("--vms: give 1 or more")
    args.rounds = args.rounds or (1 if args.quick else 3)
    signal.signal(signal.SIGTERM, _sigterm)
    args.collections_path = os.path.abspath(args.collections_path)
    try:
        _import_collection(args.collections_path)
    except BenchError as exc:
        parser.error("--collections-path: %s" % exc)
    started = time.perf_counter()
    for tool in ("virsh", "qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            print("error: %s is not installed" % tool, file=sys.stderr)
            return 2
    # One run at a time: the start-up cleanup would remove another run's VMs.
    lock_fd = os.open(RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("error: another bench/converge.py holds %s; wait for it to finish" % RUN_LOCK,
              file=sys.stderr)
        return 2
    missed = []
    scratch = None
    try:
        print(host_facts())
        print("load average at start: %s" % " ".join("%.2f" % x for x in os.getloadavg()))
        removed = cleanup_domains()
        if removed:
            print("removed leftover domains: %s" % ", ".join(removed))
        cleanup_stale_scratch()
        scratch = tempfile.mkdtemp(prefix="gpuvirt-bench-%d-" % os.getpid(),
                                   dir=SCRATCH_PARENT)
        os.chmod(scratch, 0o755)  # libvirt's qemu user opens the disks inside
        missed += converge_bench(args, scratch)
        missed += overlay_bench(args, scratch)
    except BenchError as exc:
        print("\nerror: %s" % exc, file=sys.stderr)
        return 2
    finally:
        try:
            cleanup_domains()
        except BenchError as exc:
            print("cleanup: %s" % exc, file=sys.stderr)
        if scratch and not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        elif scratch:
            print("scratch kept: %s" % scratch)
    print("\nload average at end: %s; total wall time %.0f s" % (
        " ".join("%.2f" % x for x in os.getloadavg()), time.perf_counter() - started))
    for item in missed:
        print("MISSED: " + item)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

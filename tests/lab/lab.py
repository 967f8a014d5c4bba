#!/usr/bin/env python
# SPDX-License-Identifier: GPL-3.0-or-later
"""The lab: a mini GPU server VM on this machine's libvirt (see tests/lab/README.md).

    tests/lab/lab.py up       build the image if needed, define and start the lab, wait for SSH,
                              write the Ansible inventory (a no-op when the lab already runs)
    tests/lab/lab.py down     destroy and undefine the lab, remove its overlay (never the image)
    tests/lab/lab.py status   say what runs, where, and how to reach it
    tests/lab/lab.py xml      print the domain XML that `up` would define
    tests/lab/lab.py ssh [COMMAND...]   run a command in the lab (a shell without one)

Settings come from the environment (the Makefile passes its LAB_* variables):
LAB_NAME (gpuvirt-lab), LAB_URI (qemu:///system), LAB_SSH_PORT (2299), LAB_DOMAIN_TYPE
(auto: kvm where /proc/cpuinfo has vmx or svm and /dev/kvm exists, else qemu = TCG),
LAB_MEMORY_MB (2560) and LAB_VCPUS (2), both split over the two NUMA cells, LAB_KERNEL_ARGS
(empty: a plain server; e.g. 'intel_iommu=on iommu=pt' edits GRUB_CMDLINE_LINUX and reboots the
lab once),
LAB_SSH_TIMEOUT (900 s), LAB_STATE (tests/lab/.state, or tests/lab/.state/LAB_NAME for another
name), GPUVIRT_LAB_CACHE (/var/cache/gpuvirt-lab).
"""

import argparse
import fcntl
import os
import shlex
import shutil
import socket
import string
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import libvirt

HERE = os.path.dirname(os.path.abspath(__file__))
METADATA_NS = "http://gpuvirt.kvm/lab/1"
# Bump when the first-boot steps change: the grub-installed image is cached under this version.
FIRSTBOOT_VERSION = 1
LAB_MAC = "52:54:00:4c:41:42"  # build-image.sh's systemd-networkd file matches it
PLATFORM_IN_LAB = "/etc/gpuvirt-lab/platform.yml"
# The lab's NICs (gpu-server.xml's NVMe stand-ins, platform.yml's nic_ids) for kvm_host: the
# three rails whole (one beside GPUs 0-1, one each beside GPUs 2 and 3), so every GPU tenant gets
# its rail; the NIC on a root port of its own (no GPU's rail) with two SR-IOV VFs, which the
# kernel makes and vfio-pci binds at every boot (docs/networking.md).
GROUP_VARS = (
    "# Written by tests/lab/lab.py (make lab-up): the lab's NIC stand-ins for kvm_host.\n"
    "# Removed by make lab-down.\n"
    "kvm_host_nics:\n"
    "  - {nic: \"0000:45:00.0\", vfs: 0}\n"
    "  - {nic: \"0000:85:00.0\", vfs: 0}\n"
    "  - {nic: \"0000:86:00.0\", vfs: 0}\n"
    "  - {nic: \"0000:49:00.0\", vfs: 2}\n"
)
# The shared-NVSwitch profile (platform-shared.yml): the README's main job converts with it.
PLATFORM_SHARED_IN_LAB = "/etc/gpuvirt-lab/platform-shared.yml"
TCG_CPU_MODEL = "Skylake-Server-noTSX-IBRS"


class LabError(Exception):
    """Something the user must fix; printed without a traceback."""


def log(msg):
    print("lab: %s" % msg, flush=True)


class Settings:
    def __init__(self, env):
        self.name = env.get("LAB_NAME") or "gpuvirt-lab"
        self.uri = env.get("LAB_URI") or "qemu:///system"
        self.ssh_port = int(env.get("LAB_SSH_PORT") or 2299)
        self.domain_type = env.get("LAB_DOMAIN_TYPE") or "auto"
        self.memory_mib = int(env.get("LAB_MEMORY_MB") or 2560)
        self.vcpus = int(env.get("LAB_VCPUS") or 2)
        self.kernel_args = (env.get("LAB_KERNEL_ARGS") or "").split()
        self.ssh_timeout = int(env.get("LAB_SSH_TIMEOUT") or 900)
        # A second lab (another LAB_NAME) gets its own overlay, console log and inventory.
        default_state = os.path.join(HERE, ".state")
        if self.name != "gpuvirt-lab":
            default_state = os.path.join(default_state, self.name)
        self.state = os.path.abspath(env.get("LAB_STATE") or default_state)
        self.cache = os.path.abspath(env.get("GPUVIRT_LAB_CACHE") or "/var/cache/gpuvirt-lab")
        if self.domain_type == "auto":
            self.domain_type = "kvm" if hardware_virt() else "qemu"
        if self.domain_type not in ("kvm", "qemu"):
            raise LabError("LAB_DOMAIN_TYPE must be auto, kvm or qemu, not %r" % self.domain_type)
        if self.memory_mib < 1024 or self.memory_mib > 6144 or self.memory_mib % 2:
            raise LabError("LAB_MEMORY_MB must be an even number from 1024 to 6144")
        if self.vcpus < 2 or self.vcpus > 8 or self.vcpus % 2:
            raise LabError("LAB_VCPUS must be 2, 4, 6 or 8 (half of them in each NUMA cell)")
        self.key = os.path.join(self.cache, "ssh", "id_ed25519")
        self.overlay = os.path.join(self.state, "lab.qcow2")
        self.console_log = os.path.join(self.state, "console.log")
        self.inventory = os.path.join(self.state, "inventory.ini")
        self.group_vars = os.path.join(self.state, "group_vars", "gpuvirt_lab.yml")


def hardware_virt():
    """True when the CPU has VT-x/AMD-V and /dev/kvm exists (a software KVM has neither flag)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags") and ({"vmx", "svm"} & set(line.split())):
                    return os.path.exists("/dev/kvm")
    except OSError:
        return False
    return False


# --- the domain ---------------------------------------------------------------------------------


def domain_xml(settings, name, disk, image_key, ssh_port, console_log, firstboot=None):
    """The lab's domain XML from gpu-server.xml; firstboot=(kernel, initrd, root_uuid) boots the
    kernel directly (before grub is in the boot sector), else the disk boots through grub."""
    if firstboot:
        kernel, initrd, root_uuid = firstboot
        os_boot = ("    <kernel>%s</kernel>\n    <initrd>%s</initrd>\n"
                   "    <cmdline>root=UUID=%s ro console=ttyS0,115200</cmdline>"
                   % (kernel, initrd, root_uuid))
    else:
        os_boot = "    <boot dev='hd'/>"
    if settings.domain_type == "qemu":
        # TCG's "max" CPU says AuthenticAMD and offers SVM; a server with VT-d has an Intel CPU,
        # and TCG cannot emulate VT-x. A Xeon model (DGX-2 has Skylake-SP Xeons) keeps
        # vendor-driven choices (intel_iommu=on) in line with the vIOMMU; TCG drops the features
        # it cannot emulate (AVX-512 and the like). Nested guests in the lab run on TCG too.
        cpu = ("<cpu mode='custom' match='exact' check='none'>\n"
               "    <model fallback='allow'>%s</model>" % TCG_CPU_MODEL)
    else:
        cpu = "<cpu mode='host-passthrough' check='none'>"
    with open(os.path.join(HERE, "gpu-server.xml"), encoding="utf-8") as handle:
        template = string.Template(handle.read())
    return template.substitute(
        domain_type=settings.domain_type,
        cpu=cpu, vcpus=settings.vcpus, cores=settings.vcpus // 2,
        cell0_cpus=_cpu_range(0, settings.vcpus // 2),
        cell1_cpus=_cpu_range(settings.vcpus // 2, settings.vcpus),
        name=name, metadata_ns=METADATA_NS, image_key=image_key, ssh_port=ssh_port,
        memory_mib=settings.memory_mib, cell_mib=settings.memory_mib // 2, os_boot=os_boot,
        disk=disk, console_log=console_log,
    )


def _cpu_range(first, end):
    return str(first) if end - first == 1 else "%d-%d" % (first, end - 1)


def lookup(conn, name):
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        return None


def lab_metadata(dom):
    """(image key, SSH port) recorded in a lab domain, or (None, None)."""
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
    except libvirt.libvirtError:
        return None, None
    root = ET.fromstring(text)
    image = root.findtext("{*}image") or root.findtext("image")
    port = root.findtext("{*}ssh_port") or root.findtext("ssh_port")
    return image, int(port) if port else None


def remove_domain(dom):
    if dom.isActive():
        dom.destroy()
    if dom.isPersistent():
        dom.undefine()


def connect(uri):
    # A failed lookup is an answer here, not an error for libvirt to print on stderr.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise LabError(
            "cannot connect to %s: %s\nstart the daemons first (no systemd here: "
            "'bash tools/start-libvirt.sh', as .ci/run does)" % (uri, exc)) from exc


# --- SSH ----------------------------------------------------------------------------------------


def ssh_base(settings, port):
    return ["ssh", "-i", settings.key, "-p", str(port), "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=10", "root@127.0.0.1"]


def ssh(settings, port, command, check=True, capture=False, timeout=600):
    argv = ssh_base(settings, port) + [command]
    result = subprocess.run(argv, check=False, timeout=timeout, text=True,
                            stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.PIPE if capture else None)
    if check and result.returncode != 0:
        raise LabError("in the lab, %r failed (exit %d)%s" % (
            command, result.returncode, ": " + result.stderr.strip() if capture else ""))
    return result


def ssh_ready(settings, port):
    try:
        return ssh(settings, port, "true", check=False, capture=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def last_console_line(path):
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - 4096))
            lines = [ln.strip() for ln in handle.read().decode("utf-8", "replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln and ln.isprintable()]
    return lines[-1][:100] if lines else ""


def wait_for_ssh(settings, dom, port, console_log, what):
    """Poll SSH until it answers, printing progress; fail early if the domain stops."""
    started = time.monotonic()
    next_report = started + 15
    while True:
        if ssh_ready(settings, port):
            return time.monotonic() - started
        now = time.monotonic()
        if not dom.isActive():
            raise LabError("%s: the domain stopped before SSH answered; console log: %s\n%s" % (
                what, console_log, tail(console_log)))
        if now - started > settings.ssh_timeout:
            raise LabError("%s: no SSH on 127.0.0.1:%d after %d s; console log: %s\n%s" % (
                what, port, settings.ssh_timeout, console_log, tail(console_log)))
        if now >= next_report:
            log("%s: waiting for SSH on 127.0.0.1:%d, %d s [console: %s]" % (
                what, port, now - started, last_console_line(console_log)))
            next_report = now + 15
        time.sleep(3)


def tail(path, lines=25):
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return "(no console log)"
    return "\n".join(text.splitlines()[-lines:])


def port_free(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --- image: build, first boot ------------------------------------------------------------------


def run(argv, **kwargs):
    try:
        return subprocess.run(argv, check=True, **kwargs)
    except subprocess.CalledProcessError as exc:
        raise LabError("%s failed (exit %d)" % (" ".join(argv), exc.returncode)) from exc


def image_key(settings):
    env = dict(os.environ, GPUVIRT_LAB_CACHE=settings.cache)
    out = run(["bash", os.path.join(HERE, "build-image.sh"), "--key"], env=env, text=True,
              stdout=subprocess.PIPE).stdout
    return "%s-fb%d" % (out.strip(), FIRSTBOOT_VERSION)


def build_base(settings):
    env = dict(os.environ, GPUVIRT_LAB_CACHE=settings.cache)
    out = run(["bash", os.path.join(HERE, "build-image.sh")], env=env, text=True,
              stdout=subprocess.PIPE).stdout
    return out.strip().splitlines()[-1]


def lab_image_path(settings, key):
    return os.path.join(settings.cache, "lab-%s.qcow2" % key)


def first_boot(settings, conn, base, key):
    """Boot the base image once by direct kernel boot, install grub into its boot sector, power
    off, and flatten the result into the cached lab image that every later run boots from."""
    target = lab_image_path(settings, key)
    name = settings.name + "-firstboot"
    old = lookup(conn, name)
    if old is not None:
        remove_domain(old)
    work = os.path.join(settings.cache, "firstboot-%s.qcow2" % key)
    console = os.path.join(settings.state, "firstboot-console.log")
    if os.path.exists(work):
        os.unlink(work)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
         os.path.join(base, "disk.qcow2"), work])
    with open(os.path.join(base, "root-uuid"), encoding="ascii") as handle:
        root_uuid = handle.read().strip()
    port = settings.ssh_port + 1
    if not port_free(port):
        raise LabError("127.0.0.1:%d (first boot's SSH port) is in use" % port)
    xml = domain_xml(settings, name, work, key, port, console, firstboot=(
        os.path.join(base, "vmlinuz"), os.path.join(base, "initrd.img"), root_uuid))
    started = time.monotonic()
    dom = conn.createXML(xml, 0)  # transient: gone once it powers off
    try:
        waited = wait_for_ssh(settings, dom, port, console, "first boot")
        log("first boot: SSH after %d s; grub-install + update-grub" % waited)
        # The first boot wrote a machine-id: empty it again so that every copy makes its own.
        ssh(settings, port, "set -e; grub-install --target=i386-pc /dev/vda 2>&1 | tail -n 1; "
                            "update-grub 2>&1 | tail -n 1; truncate -s 0 /etc/machine-id; "
                            "rm -f /var/lib/systemd/random-seed; sync")
        ssh(settings, port, "systemctl poweroff", check=False, capture=True, timeout=60)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if not dom.isActive():
                    break
            except libvirt.libvirtError:
                break  # a transient domain vanishes when it stops
            time.sleep(2)
        else:
            raise LabError("first boot: the lab did not power off within 180 s")
    except BaseException:
        try:
            dom.destroy()
        except libvirt.libvirtError:
            pass
        raise
    log("first boot: powered off after %d s; flattening into %s" % (
        time.monotonic() - started, target))
    run(["qemu-img", "convert", "-O", "qcow2", work, target + ".tmp"])
    os.chmod(target + ".tmp", 0o644)
    os.replace(target + ".tmp", target)
    os.unlink(work)


# --- up / down ----------------------------------------------------------------------------------


def write_inventory(settings, port):
    text = (
        "# Written by tests/lab/lab.py (make lab-up): the lab VM %(name)s, reached over\n"
        "# 127.0.0.1 only. Removed by make lab-down.\n"
        "[gpuvirt_lab]\n"
        "lab ansible_host=127.0.0.1 ansible_port=%(port)d\n\n"
        "[gpuvirt_lab:vars]\n"
        "ansible_user=root\n"
        "ansible_ssh_private_key_file=%(key)s\n"
        "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
        "-o IdentitiesOnly=yes'\n"
        "ansible_python_interpreter=/usr/bin/python3\n"
        "# one SSH round trip per task, not four (root: no requiretty); the lab runs under TCG\n"
        "ansible_pipelining=true\n"
        "# tests/lab/platform.yml, copied into the lab: the stand-ins as GPUs and NVSwitches\n"
        "gpuvirt_lab_platform=%(platform)s\n"
        "# tests/lab/platform-shared.yml: the same stand-ins, switches kept for Fabric Manager\n"
        "gpuvirt_lab_platform_shared=%(shared)s\n"
        "gpuvirt_lab_domain=%(name)s\n"
        "# tests/lab on the controller (the lab's playbooks and helpers)\n"
        "gpuvirt_lab_dir=%(here)s\n"
    ) % {"name": settings.name, "port": port, "key": settings.key, "platform": PLATFORM_IN_LAB,
         "shared": PLATFORM_SHARED_IN_LAB,
         "here": HERE}
    tmp = settings.inventory + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, settings.inventory)
    # Beside the inventory, so that every play on the lab reads it: what kvm_host makes of the
    # lab's rail NIC stand-ins.
    os.makedirs(os.path.dirname(settings.group_vars), exist_ok=True)
    with open(settings.group_vars + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(GROUP_VARS)
    os.replace(settings.group_vars + ".tmp", settings.group_vars)


def install_platform_file(settings, port):
    for name, dest in (("platform.yml", PLATFORM_IN_LAB),
                       ("platform-shared.yml", PLATFORM_SHARED_IN_LAB)):
        with open(os.path.join(HERE, name), "rb") as handle:
            data = handle.read()
        argv = ssh_base(settings, port) + [
            "mkdir -p %s && cat > %s" % (shlex.quote(os.path.dirname(dest)), shlex.quote(dest))]
        result = subprocess.run(argv, input=data, check=False, timeout=120)
        if result.returncode != 0:
            raise LabError("could not copy %s into the lab (exit %d)" % (name, result.returncode))


def apply_kernel_args(settings, dom, port):
    """LAB_KERNEL_ARGS: add them to GRUB_CMDLINE_LINUX and reboot once, as a role would.
    True when it rebooted."""
    if not settings.kernel_args:
        return False
    cmdline = ssh(settings, port, "cat /proc/cmdline", capture=True).stdout.split()
    missing = [a for a in settings.kernel_args if a not in cmdline]
    if not missing:
        log("kernel: /proc/cmdline already has %s" % " ".join(settings.kernel_args))
        return False
    started = time.monotonic()
    script = (
        "set -e; . /etc/default/grub; new=\"$GRUB_CMDLINE_LINUX %s\"; "
        "sed -i \"s|^GRUB_CMDLINE_LINUX=.*|GRUB_CMDLINE_LINUX=\\\"${new# }\\\"|\" "
        "/etc/default/grub; "
        "update-grub 2>&1 | tail -n 1; sync" % " ".join(missing))
    ssh(settings, port, script)
    ssh(settings, port, "systemctl reboot", check=False, capture=True, timeout=60)
    # Wait until SSH goes away, then for it to come back.
    deadline = time.monotonic() + 120
    while ssh_ready(settings, port) and time.monotonic() < deadline:
        time.sleep(2)
    wait_for_ssh(settings, dom, port, settings.console_log, "reboot")
    cmdline = ssh(settings, port, "cat /proc/cmdline", capture=True).stdout.split()
    still = [a for a in settings.kernel_args if a not in cmdline]
    if still:
        raise LabError("kernel: after the reboot /proc/cmdline still lacks %s" % " ".join(still))
    log("kernel: rebooted with %s (%d s)" % (" ".join(missing), time.monotonic() - started))
    return True


def up(settings):
    total = time.monotonic()
    conn = connect(settings.uri)
    os.makedirs(settings.state, exist_ok=True)
    os.chmod(settings.state, 0o755)  # libvirt's QEMU user opens the overlay in here
    key = image_key(settings)
    dom = lookup(conn, settings.name)
    if dom is not None and dom.isActive():
        running_key, port = lab_metadata(dom)
        if port is None:
            raise LabError("a domain named %s runs but was not made by lab.py; set LAB_NAME"
                           % settings.name)
        if ssh_ready(settings, port):
            # The tree's platform files may be newer than the lab's copies.
            install_platform_file(settings, port)
            rebooted = apply_kernel_args(settings, dom, port)
            write_inventory(settings, port)
            if running_key != key:
                log("note: the running lab boots image %s; this tree would build %s "
                    "(make lab-down && make lab-up to switch)" % (running_key, key))
            log("already running: %s, SSH 127.0.0.1:%d, inventory %s (%.1f s%s)"
                % (settings.name, port, settings.inventory, time.monotonic() - total,
                   "" if rebooted else ", nothing to do"))
            return
        log("%s runs but SSH on 127.0.0.1:%d does not answer yet" % (settings.name, port))
        wait_for_ssh(settings, dom, port, settings.console_log, "boot")
        write_inventory(settings, port)
        return

    step = time.monotonic()
    image = lab_image_path(settings, key)
    # Labs with other names share the image cache: one builder at a time.
    with open(os.path.join(settings.cache, "build.lock"), "w", encoding="ascii") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(image):
            log("build: cached image %s (%.1f s)" % (image, time.monotonic() - step))
        else:
            base = build_base(settings)
            log("build: base image %s (%d s)" % (base, time.monotonic() - step))
            step = time.monotonic()
            first_boot(settings, conn, base, key)
            log("first boot + grub: %s (%d s)" % (image, time.monotonic() - step))

    if dom is not None:
        defined_key = lab_metadata(dom)[0]
        if defined_key != key or not os.path.exists(settings.overlay):
            log("replacing the stopped %s (image %s)" % (settings.name, defined_key))
            remove_domain(dom)
            dom = None
    if dom is None:
        if os.path.exists(settings.overlay):
            os.unlink(settings.overlay)
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", image,
             settings.overlay])
        dom = conn.defineXML(domain_xml(settings, settings.name, settings.overlay, key,
                                        settings.ssh_port, settings.console_log))
    port = lab_metadata(dom)[1]
    if not port_free(port):
        raise LabError("127.0.0.1:%d is in use; set LAB_SSH_PORT to a free port" % port)
    step = time.monotonic()
    dom.create()
    log("boot: %s started (%s, %d MiB, %d vCPUs in 2 NUMA cells) in %.1f s" % (
        settings.name, "KVM" if settings.domain_type == "kvm" else "TCG", settings.memory_mib,
        settings.vcpus, time.monotonic() - step))
    waited = wait_for_ssh(settings, dom, port, settings.console_log, "boot")
    log("ssh: answered %d s after start" % waited)
    install_platform_file(settings, port)
    apply_kernel_args(settings, dom, port)
    write_inventory(settings, port)
    log("up in %d s: ansible -i %s gpuvirt_lab -m ping" % (
        time.monotonic() - total, settings.inventory))


def down(settings):
    started = time.monotonic()
    conn = connect(settings.uri)
    for name in (settings.name, settings.name + "-firstboot"):
        dom = lookup(conn, name)
        if dom is None:
            continue
        if lab_metadata(dom)[1] is None:
            raise LabError("%s was not made by lab.py; not touching it" % name)
        remove_domain(dom)
        log("removed domain %s" % name)
    for path in (settings.overlay, settings.inventory, settings.group_vars, settings.console_log,
                 os.path.join(settings.state, "firstboot-console.log")):
        if os.path.exists(path):
            os.unlink(path)
    log("down in %.1f s (images in %s kept)" % (time.monotonic() - started, settings.cache))


def status(settings):
    conn = connect(settings.uri)
    dom = lookup(conn, settings.name)
    if dom is None:
        log("%s: not defined (make lab-up)" % settings.name)
        return 1
    key, port = lab_metadata(dom)
    state = "running" if dom.isActive() else "stopped"
    reach = ""
    if dom.isActive() and port:
        reach = ", SSH %s" % ("answers" if ssh_ready(settings, port) else "does not answer")
    log("%s: %s (image %s, 127.0.0.1:%s%s)" % (settings.name, state, key, port, reach))
    log("inventory: %s" % (settings.inventory if os.path.exists(settings.inventory) else "none"))
    return 0 if dom.isActive() else 1


def ssh_command(settings, command):
    conn = connect(settings.uri)
    dom = lookup(conn, settings.name)
    if dom is None or not dom.isActive():
        raise LabError("%s is not running (make lab-up)" % settings.name)
    port = lab_metadata(dom)[1]
    argv = ssh_base(settings, port) + ([" ".join(command)] if command else [])
    if not command:
        argv.insert(1, "-t")
    os.execvp(argv[0], argv)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("action", choices=("up", "down", "status", "xml", "ssh"))
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        settings = Settings(os.environ)
        for tool in ("qemu-img", "ssh"):
            if shutil.which(tool) is None:
                raise LabError("%s is missing; run 'make system-deps'" % tool)
        if args.action in ("up", "down"):
            # Two `make lab-up` at once (parallel test jobs) must not both define the lab.
            os.makedirs(settings.state, exist_ok=True)
            with open(os.path.join(settings.state, "lock"), "w", encoding="ascii") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                (up if args.action == "up" else down)(settings)
        elif args.action == "status":
            return status(settings)
        elif args.action == "xml":
            print(domain_xml(settings, settings.name, settings.overlay, image_key(settings),
                             settings.ssh_port, settings.console_log))
        else:
            ssh_command(settings, args.command)
    except LabError as exc:
        print("lab: error: %s" % exc, file=sys.stderr)
        return 1
    except libvirt.libvirtError as exc:
        print("lab: libvirt: %s" % exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

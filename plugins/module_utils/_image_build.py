# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Guest image builds: a Debian guest from debootstrap or a cloud image, GPU-ready. Private.

kvm_image_build's engine. A build runs, with no loop device and no mount of the image:

1. debootstrap the suite with the base packages (cloud-init, openssh, the serial getty, ...)
   into a scratch folder; the result is cached as a tar file per base (suite, mirror,
   components, base packages), so the next build of that base starts from the same files;
2. add the user's apt repositories with their keys, pin the packages that carry a version
   (and the NVIDIA driver branch), ``apt-get install`` the rest, inside a chroot;
3. configure the guest: an empty machine-id, no SSH host keys (cloud-init makes them), the
   NoCloud datasource, systemd-networkd and -resolved, a getty on ttyS0;
4. write a GPT disk into a sparse raw file: an EFI system partition holding a standalone GRUB
   (``grub-mkstandalone``) whose built-in grub.cfg boots /vmlinuz with ``console=ttyS0``,
   and an ext4 root written from the folder (``mkfs.ext4 -d``); convert it to qcow2 in the
   store, check it with qemu-img and install it there as name-version, with a manifest
   ``<name>-<version>.manifest.json`` (inputs, their digest, the base's Release digest, every
   installed package and its version).

A rerun with the same inputs finds the manifest and changes nothing; the same version built
from other inputs is refused. Nothing is registered unless every step passed.

What a request is and what follows from it alone (its inputs and their digest, the apt files,
grub.cfg and cloud-init configuration it puts into the guest, apt's errors read against it) is
``_image_request``'s, pure. Here: ``validate`` (it reads the repositories' key files and looks at
the base image), the manifest next to the image, and the builder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid

from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_request import (
    _ARMOR,
    BASE_PACKAGES,
    CLOUD_CFG,
    DEBOOTSTRAP_PACKAGES,
    DEFAULT_MIRROR,
    IMAGE_BASE_PACKAGES,
    BaseImage,
    BuildError,
    BuildRequest,
    Repository,
    apt_install_error,
    apt_update_error,
    grub_cfg,
    preferences,
    repository_files,
    sources_list,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_store import (
    ImagesError,
    Staged,
    file_digests,
    parse_checksum,
    validate_name,
)

DEFAULT_CACHE = "/var/cache/gpuvirt/image-build"
ESP_MIB = 64
_SECTOR = 512
_FIRST_SECTOR = 2048

_PKG_RE = re.compile(r"^([a-z0-9][a-z0-9+.-]+)(?:=([A-Za-z0-9.+~:_*-]+))?$")
_SUITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$|^\./?$|^/$")
_COMPONENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_DRIVER_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_URI_RE = re.compile(r"^(https?|file)://\S+$")
_KERNEL_ARG_RE = re.compile(r"^[^\s'\"\\;]+$")

# Host tools a build needs, and the Debian package of each.
HOST_TOOLS = {
    "debootstrap": "debootstrap", "chroot": "coreutils", "mount": "mount",
    "sfdisk": "fdisk", "mkfs.ext4": "e2fsprogs", "mkfs.fat": "dosfstools", "mcopy": "mtools",
    "mmd": "mtools", "grub-mkstandalone": "grub-common", "qemu-img": "qemu-utils",
    "tar": "tar", "debugfs": "e2fsprogs", "unshare": "util-linux",
}
# GPT partition types of a root file system: x86-64 root (discoverable partitions), Linux data.
_GPT_ROOT_TYPES = ("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", "0FC63DAF-8483-4772-8E79-3D69D8477DE4")
GRUB_EFI_DIR = "/usr/lib/grub/x86_64-efi"


# A private mount namespace (the mounts vanish with it) and PID namespace: when a timeout kills
# unshare, --kill-child takes its child, the namespace's init, and with it every process of the
# build (dpkg, maintainer scripts, a DKMS compile), so none outlives the error.
_UNSHARE = ["unshare", "--fork", "--pid", "--kill-child", "--mount", "--propagation", "private",
            "--"]
# Run under _UNSHARE: mount what package scripts need, then chroot.
_CHROOT_SCRIPT = (
    'root=$1; shift; '
    'mount -t proc proc "$root/proc" && mount -t sysfs sysfs "$root/sys" && '
    'mount --bind /dev "$root/dev" && mount --bind /dev/pts "$root/dev/pts" && '
    'exec chroot "$root" "$@"')


# ----------------------------------------------------------------------------- validation


def _read_key(value, option):
    """A repository key: armored text, or the path of a key file (armored or binary)."""
    if not isinstance(value, str) or not value.strip():
        raise BuildError("%s: give the repository's OpenPGP public key, as ASCII-armored text "
                         "or the path of a key file on the managed host" % option)
    text = value.strip()
    if text.startswith(_ARMOR):
        if "-----END PGP PUBLIC KEY BLOCK-----" not in text:
            raise BuildError("%s: the ASCII-armored key has no END line; paste the whole key "
                             "block" % option)
        return text.encode("utf-8") + b"\n", "inline"
    if "\n" in text or not text.startswith("/"):
        raise BuildError("%s: neither an ASCII-armored OpenPGP public key (it starts with %s) "
                         "nor an absolute path of a key file" % (option, _ARMOR))
    try:
        with open(text, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise BuildError("%s: cannot read the key file %s: %s"
                         % (option, text, exc.strerror)) from exc
    if not data.strip():
        raise BuildError("%s: the key file %s is empty" % (option, text))
    return data, text


def validate(params):
    """BuildRequest from the module's parameters, or BuildError naming the option."""
    try:
        validate_name(params["name"], "name")
        validate_name(params["version"], "version")
    except ImagesError as exc:
        raise BuildError(str(exc)) from exc
    suite, base_image = params.get("suite"), None
    if params.get("base_image"):
        if suite:
            raise BuildError("suite: give a debootstrap suite or base_image, not both (a cloud "
                             "image brings its own suite)")
        base_image = _base_image(params["base_image"])
    elif not suite or not _COMPONENT_RE.match(suite) or "/" in suite:
        raise BuildError("suite: %r is not a Debian suite name (such as bookworm or "
                         "trixie); give one, or a cloud image as base_image" % (suite,))
    mirror = (params.get("mirror") or DEFAULT_MIRROR).rstrip("/")
    if not _URI_RE.match(mirror):
        raise BuildError("mirror: %r is not an http://, https:// or file:// URL" % (mirror,))
    components = params.get("components")
    components = tuple(("main",) if components is None else components)
    if not components:
        raise BuildError("components: give at least one archive component (such as main)")
    for comp in components:
        if not _COMPONENT_RE.match(comp):
            raise BuildError("components: %r is not an archive component (such as main or "
                             "non-free-firmware)" % (comp,))
    repos, seen = [], set()
    for i, repo in enumerate(params.get("repositories") or []):
        opt = "repositories[%d]" % i
        name = repo.get("name") or ""
        if not re.match(r"^[a-z0-9][a-z0-9._-]*$", name):
            raise BuildError("%s.name: %r must be lower-case letters, digits, '.', '_' or '-' "
                             "(it names the files in /etc/apt)" % (opt, name))
        if name in seen:
            raise BuildError("%s.name: %s is given twice" % (opt, name))
        seen.add(name)
        uri = (repo.get("uri") or "").rstrip("/")
        if not _URI_RE.match(uri):
            raise BuildError("%s.uri: %r is not an http://, https:// or file:// URL"
                             % (opt, repo.get("uri")))
        rsuite = repo.get("suite") or "./"
        if not _SUITE_RE.match(rsuite) or ".." in rsuite:
            raise BuildError("%s.suite: %r is not a suite (a name such as bookworm, or a path "
                             "ending in / for a flat repository such as ./)" % (opt, rsuite))
        rcomps = tuple(repo.get("components") or ())
        if rsuite.endswith("/") and rcomps:
            raise BuildError("%s.components: a flat repository (suite %s) has no components; "
                             "leave them out" % (opt, rsuite))
        if not rsuite.endswith("/") and not rcomps:
            raise BuildError("%s.components: the suite %s needs its components (such as "
                             "[main]); a flat repository's suite ends in /" % (opt, rsuite))
        for comp in rcomps:
            if not _COMPONENT_RE.match(comp):
                raise BuildError("%s.components: %r is not an archive component" % (opt, comp))
        key, key_source = (None, "")
        if repo.get("key") is not None:
            key, key_source = _read_key(repo.get("key"), opt + ".key")
        repos.append(Repository(name=name, uri=uri, suite=rsuite, components=rcomps, key=key,
                                key_source=key_source))
    packages = []
    for spec in params.get("packages") or []:
        if not isinstance(spec, str) or not _PKG_RE.match(spec.strip()):
            raise BuildError("packages: %r is not a package name, or name=version (such as "
                             "htop or nvidia-container-toolkit=1.17.8-1)" % (spec,))
        packages.append(spec.strip())
    names = [p.partition("=")[0] for p in packages]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BuildError("packages: %s given more than once" % ", ".join(twice))
    profile = params.get("profile") or "gpu"
    driver = params.get("nvidia_driver")
    if driver is not None and not _DRIVER_RE.match(str(driver)):
        raise BuildError("nvidia_driver: %r is not a driver version (such as 550.163.01 or 550)"
                         % (driver,))
    if profile == "gpu" and not driver:
        raise BuildError(
            "nvidia_driver: a GPU image needs the NVIDIA driver version pinned (on a "
            "shared-NVSwitch host it must equal the host's Fabric Manager version, which "
            "gpu_topology reports); set it, or profile=minimal for an image without the driver")
    if profile != "gpu" and driver:
        raise BuildError("nvidia_driver: only the gpu profile installs the driver; drop it, or "
                         "use profile=gpu")
    engine = params.get("container_engine") or "docker"
    size = params.get("disk_size_gb")
    size = 8 if size is None else size
    if not isinstance(size, int) or size < 2 or size > 4096:
        raise BuildError("disk_size_gb: %r must be a whole number of GiB from 2 to 4096"
                         % (size,))
    kargs = tuple(params.get("kernel_args") or ())
    for arg in kargs:
        if not isinstance(arg, str) or not _KERNEL_ARG_RE.match(arg):
            raise BuildError("kernel_args: %r is not one kernel argument (no spaces, quotes or "
                             "';')" % (arg,))
    return BuildRequest(name=params["name"], version=params["version"], suite=suite,
                        base_image=base_image, mirror=mirror, components=components,
                        repositories=repos, packages=tuple(packages), profile=profile,
                        nvidia_driver=str(driver) if driver else None,
                        container_engine=engine, disk_size_gb=size, kernel_args=kargs)


def _base_image(value):
    src = (value.get("src") or "").strip()
    if not src or not (src.startswith("/") or re.match(r"^https?://\S+$", src)):
        raise BuildError("base_image.src: %r is neither an absolute path on the managed host nor "
                         "an http(s):// URL of a cloud image" % (value.get("src"),))
    try:
        algorithm, digest = parse_checksum(value.get("checksum"), "base_image.checksum")
    except ImagesError as exc:
        raise BuildError("%s (the digest the image's publisher gives, such as the line of its "
                         "SHA512SUMS)" % exc) from exc
    if src.startswith("/") and not os.path.isfile(src):
        raise BuildError("base_image.src: %s is not a file on the managed host" % src)
    return BaseImage(src=src, algorithm=algorithm, digest=digest)


def check_base_digest(base, digests=None):
    """BuildError unless the base image's content has the digest given (a local file is read
    when ``digests`` is None)."""
    if digests is None:
        digests = file_digests(base.src, (base.algorithm,))
    if digests[base.algorithm] != base.digest:
        raise BuildError(
            "base_image.checksum: %s has %s:%s, not the %s:%s given; it is not the image you "
            "named (or a download was damaged); nothing was built"
            % (base.src, base.algorithm, digests[base.algorithm], base.algorithm, base.digest))


def root_partition(table):
    """(start sector, size in sectors) of the root file system in ``sfdisk --json`` output:
    a GPT root partition (x86-64 root, else the largest Linux one), else the largest MBR Linux
    partition; (0, None) for a disk without a partition table (a bare file system)."""
    if not table:
        return 0, None
    parts = table.get("partitiontable", {}).get("partitions") or []
    for types in (_GPT_ROOT_TYPES[:1], _GPT_ROOT_TYPES[1:], ("83",)):
        found = [p for p in parts if str(p.get("type", "")).upper() in types]
        if found:
            best = max(found, key=lambda p: int(p["size"]))
            return int(best["start"]), int(best["size"])
    raise BuildError("base_image.src: no Linux root partition in its partition table (%s); "
                     "only ext4 roots on GPT or MBR disks are read"
                     % ", ".join(str(p.get("type")) for p in parts))


def parse_debugfs_ls(output):
    """{name: (mode, uid, gid)} from ``debugfs -R 'ls -p DIR'`` (/inode/mode/uid/gid/name/size/)."""
    entries = {}
    for line in output.splitlines():
        fields = line.split("/")
        if len(fields) >= 7 and fields[0] == "" and fields[2].isdigit():
            name = "/".join(fields[5:-2])
            if name not in (".", ".."):
                entries[name] = (int(fields[2], 8), int(fields[3]), int(fields[4]))
    return entries


def missing_host_tools(which=shutil.which, isdir=os.path.isdir):
    """Debian packages to install on the build host, for tools it lacks."""
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if not which(tool)})
    if not isdir(GRUB_EFI_DIR):
        missing.append("grub-efi-amd64-bin")
    return missing


# ----------------------------------------------------------------------------- the builder


def manifest_path(store, name, version):
    return os.path.join(store.root, "%s-%s.manifest.json" % (name, version))


def read_manifest(store, name, version):
    try:
        with open(manifest_path(store, name, version), "r", encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Builder:
    """Runs one build in a scratch folder under the store; ``run`` returns the manifest."""

    def __init__(self, request, store, cache_dir=DEFAULT_CACHE, log=None, timeout=3600):
        self.request = request
        self.store = store
        self.cache_dir = cache_dir
        self.timeout = timeout
        self.log = log or (lambda msg: None)
        self.work = None
        self.rootfs = None
        self.timings = {}

    # -- commands
    def _run(self, argv, step, error=None, env=None, timeout=None, cwd=None):
        full_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "LC_ALL": "C",
                    "DEBIAN_FRONTEND": "noninteractive", "MTOOLS_SKIP_CHECK": "1"}
        full_env.update(env or {})
        try:
            proc = _exec(argv, env=full_env, cwd=cwd, timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired as exc:
            raise BuildError("%s: %s did not finish within %d s"
                             % (step, argv[0], exc.timeout)) from exc
        except OSError as exc:
            raise BuildError("%s: cannot run %s: %s" % (step, argv[0], exc.strerror)) from exc
        out = proc.stdout.decode("utf-8", "replace")
        if proc.returncode != 0:
            if error is not None:
                raise error(out)
            tail = [ln for ln in out.splitlines() if ln.strip()][-8:]
            raise BuildError("%s: %s failed (exit %d): %s"
                             % (step, " ".join(argv[:3]), proc.returncode, " | ".join(tail)))
        return out

    def _chroot(self, argv, step, error=None, timeout=None):
        """``argv`` in the chroot, with /proc, /sys, /dev and /dev/pts mounted for package
        scripts, all in a private mount namespace: the mounts exist only while it runs and
        vanish with it however it ends (killed, timed out), so nothing is ever left mounted
        under the scratch folder that a clean-up could delete through."""
        for sub in ("proc", "sys", "dev"):
            os.makedirs(self._path(sub), exist_ok=True)
        argv = _UNSHARE + ["sh", "-c", _CHROOT_SCRIPT, "chroot", self.rootfs] + argv
        return self._run(argv, step, error=error, timeout=timeout)

    def _step(self, name, started):
        self.timings[name] = round(time.monotonic() - started, 1)
        self.log("%s: %.1f s" % (name, self.timings[name]))
        return time.monotonic()

    # -- files inside the guest
    def _path(self, inside):
        return os.path.join(self.rootfs, inside.lstrip("/"))

    def _write(self, inside, data, mode=0o644):
        path = self._path(inside)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.islink(path):
            os.unlink(path)
        with open(path, "wb") as handle:
            handle.write(data if isinstance(data, bytes) else data.encode("utf-8"))
        os.chmod(path, mode)

    def _not_mounted(self, step):
        """Refuse to go on (copy, archive, delete) while anything is mounted under the
        scratch folder; the build mounts nothing there outside its namespaces."""
        if _mounted_under(self.work):
            raise BuildError("%s: something is mounted under %s; unmount it (umount -R) and "
                             "remove the folder by hand" % (step, self.work))

    def cleanup(self):
        if self.work is None:
            return
        if _mounted_under(self.work):
            raise BuildError("cleanup: something is still mounted under %s; unmount it and "
                             "remove the folder by hand" % self.work)
        shutil.rmtree(self.work, ignore_errors=True)
        self.work = None

    # -- steps
    def _base_from_image(self):
        """The cloud image's root file system in self.rootfs, read without mounting it."""
        base = self.request.base_image
        os.makedirs(self.rootfs)
        src, staged = base.src, None
        if base.is_url:
            try:
                staged = self.store.stage_url(base.src, algorithms=(base.algorithm,))
            except ImagesError as exc:
                raise BuildError("base_image.src: %s" % exc) from exc
            src, digests = staged.path, staged.digests
        else:
            digests = file_digests(src, (base.algorithm,))
        raw = os.path.join(self.work, "base.raw")
        try:
            check_base_digest(base, digests)
            self._run(["qemu-img", "convert", "-O", "raw", src, raw], "base_image")
        finally:
            if staged is not None:
                self.store.discard(staged)
        proc = _exec(["sfdisk", "--json", raw], timeout=120)
        out = proc.stdout.decode("utf-8", "replace")
        table = json.loads(out) if proc.returncode == 0 and out.lstrip().startswith("{") else None
        start, _size = root_partition(table)
        device = "%s?offset=%d" % (raw, start * _SECTOR)
        unreadable = ("base_image.src: cannot read the root file system of %s (only ext2, ext3 "
                      "and ext4 can be read without mounting): %%s" % base.src)
        out = self._run(["debugfs", "-R", 'rdump / "%s"' % self.rootfs, device], "base_image",
                        error=lambda out: BuildError(unreadable % " | ".join(
                            out.splitlines()[-3:])))
        # debugfs exits 0 even when rdump fails part way (a full disk): any line but its
        # banner is an error.
        errors = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith("debugfs ")]
        if errors:
            raise BuildError(unreadable % " | ".join(errors[:3]))
        self._restore_modes(device)
        os.unlink(raw)
        if not os.path.isdir(self._path("/etc/apt")):
            raise BuildError("base_image.src: %s is not a Debian image (no /etc/apt)"
                             % base.src)
        return digests[base.algorithm]

    def _check_driver(self, installed):
        """The gpu profile's driver is the version asked for (a pin that matches nothing
        available does not stop apt from installing another)."""
        req = self.request
        if req.profile != "gpu":
            return
        have = installed.get("nvidia-driver")
        upstream = re.sub(r"^\d+:", "", have or "").split("-")[0]
        if upstream != req.nvidia_driver and not upstream.startswith(req.nvidia_driver + "."):
            raise BuildError(
                "nvidia_driver: the repositories installed nvidia-driver %s, not %s; give a "
                "version they have (apt-cache policy nvidia-driver in the image lists them); "
                "no image was registered" % (have or "(none)", req.nvidia_driver))

    def _restore_modes(self, device):
        """debugfs rdump chowns after chmod, which clears setuid and setgid bits (sudo would
        not work): read every directory's modes in one debugfs run and put those bits back."""
        dirs = []
        for top, subdirs, _files in os.walk(self.rootfs):
            rel = os.path.relpath(top, self.rootfs)
            dirs.append("/" if rel == "." else "/" + rel)
            subdirs[:] = [d for d in subdirs if not os.path.islink(os.path.join(top, d))]
        cmds = os.path.join(self.work, "ls.cmds")
        with open(cmds, "w", encoding="utf-8") as handle:
            for rel in dirs:
                handle.write('ls -p "%s"\n' % rel)
        out = self._run(["debugfs", "-f", cmds, device], "base_image")
        current, blocks = None, {}
        for line in out.splitlines():
            if line.startswith('debugfs: ls -p "'):
                current = line[len('debugfs: ls -p "'):-1]
                blocks[current] = []
            elif current is not None:
                blocks[current].append(line)
        for rel, lines in blocks.items():
            for name, (mode, _uid, _gid) in parse_debugfs_ls("\n".join(lines)).items():
                if mode & 0o7000 and (mode & 0o170000) in (0o100000, 0o040000):
                    path = os.path.join(self._path(rel), name)
                    if os.path.exists(path) and not os.path.islink(path):
                        os.chmod(path, mode & 0o7777)

    def _base(self):
        """The debootstrapped base in self.rootfs, from the cache when it is there."""
        req = self.request
        cache = os.path.join(self.cache_dir, "base-%s.tar" % req.base_key())
        os.makedirs(self.rootfs)
        if os.path.isfile(cache):
            self._run(["tar", "-C", self.rootfs, "--numeric-owner", "-xpf", cache], "base")
            return cache, True
        argv = ["debootstrap", "--variant=minbase", "--merged-usr",
                "--components=%s" % ",".join(req.components),
                "--include=%s" % ",".join(DEBOOTSTRAP_PACKAGES), req.suite, self.rootfs,
                req.mirror]
        # debootstrap mounts /proc and /sys in the target while it installs: in a private mount
        # namespace too, so that a failed or killed run leaves no mount behind.
        self._run(_UNSHARE + argv, "suite",
                  error=lambda out: BuildError(
                      "suite: debootstrap of %s from %s failed: %s" % (
                          req.suite, req.mirror,
                          " | ".join([ln for ln in out.splitlines() if ln.strip()][-6:]))))
        saved = self._configure_apt(base=True)
        self._chroot(["apt-get", "-q", "update", "--error-on=any"], "mirror",
                     error=lambda out: apt_update_error(out, req))
        rest = [p for p in BASE_PACKAGES if p not in DEBOOTSTRAP_PACKAGES]
        self._chroot(["apt-get", "-q", "-y", "--no-install-recommends", "install"] + rest,
                     "suite", error=lambda out: BuildError(
                         "suite: %s lacks base packages the build needs: %s" % (
                             req.suite, apt_install_error(out, req))))
        self._chroot(["apt-get", "clean"], "suite")
        self._restore_apt(saved)
        self._not_mounted("base")
        os.makedirs(self.cache_dir, mode=0o755, exist_ok=True)
        tmp = cache + ".partial-%d" % os.getpid()
        try:
            self._run(["tar", "-C", self.rootfs, "--one-file-system", "--numeric-owner",
                       "-cpf", tmp, "."], "base")
            os.replace(tmp, cache)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return cache, False

    def _release_digest(self):
        """(sha256, Date) of the suite's Release file debootstrap fetched: the base's digest."""
        lists = self._path("/var/lib/apt/lists")
        for entry in sorted(os.listdir(lists)) if os.path.isdir(lists) else ():
            suite = "_dists_%s_" % self.request.suite
            if entry.endswith(("_InRelease", "_Release")) and suite in entry:
                path = os.path.join(lists, entry)
                date = ""
                with open(path, "r", encoding="utf-8", errors="replace") as handle:
                    for ln in handle:
                        if ln.startswith("Date:"):
                            date = ln.split(":", 1)[1].strip()
                            break
                return file_digests(path)["sha256"], date
        return None, None

    def _configure_apt(self, base=False):
        """sources.list (and with base=False the repositories and pins), no services, a
        resolver; returns what /etc/resolv.conf linked to, for _restore_apt."""
        req = self.request
        if req.base_image is None:  # a cloud image keeps its own sources
            self._write("/etc/apt/sources.list", sources_list(req))
        for repo in [] if base else req.repositories:
            for inside, data in repository_files(repo).items():
                self._write(inside, data)
        prefs = "" if base else preferences(req)
        if prefs:
            self._write("/etc/apt/preferences.d/gpuvirt-pins", prefs)
        # No service starts inside the build; apt needs a resolver that works in the chroot.
        self._write("/usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n", mode=0o755)
        resolv = self._path("/etc/resolv.conf")
        saved = None
        if os.path.islink(resolv):
            saved = ("link", os.readlink(resolv))
        elif os.path.isfile(resolv):
            with open(resolv, "rb") as handle:
                saved = ("file", handle.read())
        if os.path.lexists(resolv):
            os.unlink(resolv)
        try:
            shutil.copyfile("/etc/resolv.conf", resolv)
        except OSError as exc:
            raise BuildError("repositories: the build host has no usable /etc/resolv.conf (%s); "
                             "apt in the image needs the host's resolver" % exc.strerror) from exc
        return saved

    def _install(self):
        req = self.request
        self._chroot(["apt-get", "-q", "update", "--error-on=any"], "repositories",
                     error=lambda out: apt_update_error(out, req))
        extra = req.extra_packages()
        if req.base_image is not None:
            extra = list(IMAGE_BASE_PACKAGES) + [p for p in extra if p not in IMAGE_BASE_PACKAGES]
        if extra:
            self._chroot(["apt-get", "-q", "-y", "--no-install-recommends", "install"] + extra,
                         "packages", error=lambda out: apt_install_error(out, req))
        out = self._chroot(["dpkg-query", "-W", "-f",
                            "${Package}\t${Version}\t${db:Status-Abbrev}\n"], "packages")
        installed = {}
        for ln in out.splitlines():
            parts = ln.split("\t")
            if len(parts) == 3 and parts[2].startswith("ii"):
                installed[parts[0]] = parts[1]
        kernels = sorted(n[len("linux-image-"):] for n in installed
                         if re.match(r"^linux-image-\d", n))
        return installed, kernels

    def _restore_apt(self, saved):
        """Undo _configure_apt's policy-rc.d and resolver; ``saved`` is what it returned."""
        os.unlink(self._path("/usr/sbin/policy-rc.d"))
        resolv = self._path("/etc/resolv.conf")
        os.unlink(resolv)
        # On a debootstrap build, systemd-resolved's package links it to its stub while
        # installing (replacing the build's copy of the host's resolver), and the build enables
        # resolved: the guest must end up with that link. A cloud image gets its own back.
        if self.request.base_image is None and os.path.exists(
                self._path("/usr/lib/systemd/systemd-resolved")):
            saved = ("link", "../run/systemd/resolve/stub-resolv.conf")
        if saved and saved[0] == "link":
            os.symlink(saved[1], resolv)
        elif saved:
            self._write("/etc/resolv.conf", saved[1])
        # An image that had none gets none.

    def _finish_rootfs(self, saved, root_uuid, esp_id):
        self._chroot(["apt-get", "clean"], "configure")
        self._restore_apt(saved)
        for sub in ("/var/lib/apt/lists",):
            path = self._path(sub)
            for entry in os.listdir(path) if os.path.isdir(path) else ():
                full = os.path.join(path, entry)
                if os.path.isfile(full):
                    os.unlink(full)
        # Every copy gets its own identity on first boot.
        self._write("/etc/machine-id", "")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path("/var/lib/dbus/machine-id"))
        ssh = self._path("/etc/ssh")
        for entry in os.listdir(ssh) if os.path.isdir(ssh) else ():
            if entry.startswith("ssh_host_"):
                os.unlink(os.path.join(ssh, entry))
        self._write("/etc/hostname", "localhost\n")
        self._write("/etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost "
                    "ip6-loopback\n")
        self._write("/etc/fstab", "UUID=%s\t/\text4\terrors=remount-ro\t0\t1\n"
                    "UUID=%s\t/boot/efi\tvfat\tumask=0077\t0\t1\n" % (root_uuid, esp_id))
        os.makedirs(self._path("/boot/efi"), exist_ok=True)
        from_image = self.request.base_image is not None
        # A cloud image keeps its own network stack (netplan, ifupdown or networkd).
        self._write("/etc/cloud/cloud.cfg.d/90-gpuvirt.cfg",
                    CLOUD_CFG.split("system_info:", maxsplit=1)[0] if from_image else CLOUD_CFG)
        units = ["serial-getty@ttyS0.service"]
        if not from_image:
            units += ["systemd-networkd.service", "systemd-resolved.service"]
        for unit in units:
            self._run(["systemctl", "--root=%s" % self.rootfs, "--quiet", "enable", unit],
                      "configure")
        self._run(["systemctl", "--root=%s" % self.rootfs, "--quiet", "mask",
                   "apt-daily.timer", "apt-daily-upgrade.timer"], "configure")
        # /vmlinuz and /initrd.img, which the built-in grub.cfg boots (and kernel updates move).
        for link, prefix in (("/vmlinuz", "vmlinuz-"), ("/initrd.img", "initrd.img-")):
            if not os.path.exists(self._path(link)):
                found = sorted(e for e in os.listdir(self._path("/boot")) if e.startswith(prefix))
                if not found:
                    if self.request.base_image is not None:
                        raise BuildError(
                            "base_image.src: %s has no %s* in /boot on its root file system "
                            "(a separate /boot partition is not read)"
                            % (self.request.base_image.src, prefix))
                    raise BuildError("suite: the image has no %s* in /boot; is linux-image-"
                                     "amd64 in %s?" % (prefix, self.request.suite))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(link))
                os.symlink("boot/" + found[-1], self._path(link))

    def _disk(self, root_uuid, esp_id, out_path):
        req = self.request
        raw = os.path.join(self.work, "disk.raw")
        total = req.disk_size_gb * 1024 * 1024 * 1024
        with open(raw, "wb") as handle:
            handle.truncate(total)
        esp_sectors = ESP_MIB * 1024 * 1024 // _SECTOR
        root_start = _FIRST_SECTOR + esp_sectors
        layout = ("label: gpt\n"
                  "label-id: %s\n"
                  "start=%d, size=%d, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=ESP\n"
                  "start=%d, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n"
                  % (str(uuid.uuid5(uuid.NAMESPACE_URL, root_uuid)).upper(), _FIRST_SECTOR,
                     esp_sectors, root_start))
        proc = _exec(["sfdisk", "--quiet", raw], stdin=layout.encode(), timeout=120)
        if proc.returncode != 0:
            raise BuildError("disk: sfdisk failed: %s" % proc.stdout.decode(errors="replace"))
        table = json.loads(self._run(["sfdisk", "--json", raw], "disk"))
        parts = table["partitiontable"]["partitions"]
        root_sectors = int(parts[1]["size"])
        # The root file system straight from the folder into its partition.
        self._run(["mkfs.ext4", "-q", "-F", "-L", "root", "-U", root_uuid,
                   "-E", "offset=%d" % (root_start * _SECTOR), "-d", self.rootfs, raw,
                   "%dk" % (root_sectors * _SECTOR // 1024)], "disk",
                  error=lambda out: BuildError(
                      "disk_size_gb: the image's files do not fit in a %d GiB disk, or mkfs.ext4 "
                      "failed: %s; give a larger disk_size_gb" % (
                          req.disk_size_gb, " | ".join(out.splitlines()[-3:]))))
        # The ESP: a FAT file with the standalone GRUB, copied into partition 1.
        cfg = os.path.join(self.work, "grub.cfg")
        with open(cfg, "w", encoding="utf-8") as handle:
            handle.write(grub_cfg(root_uuid, req.kernel_args))
        efi = os.path.join(self.work, "BOOTX64.EFI")
        self._run(["grub-mkstandalone", "-O", "x86_64-efi", "-o", efi, "--locales=",
                   "--fonts=", "--themes=",
                   "--modules=part_gpt ext2 fat search search_fs_uuid linux normal serial "
                   "terminal echo", "boot/grub/grub.cfg=%s" % cfg], "disk")
        esp = os.path.join(self.work, "esp.img")
        self._run(["mkfs.fat", "-C", "-n", "ESP", "-i", esp_id.replace("-", ""), esp,
                   str(ESP_MIB * 1024)], "disk")
        self._run(["mmd", "-i", esp, "::/EFI", "::/EFI/BOOT"], "disk")
        self._run(["mcopy", "-i", esp, efi, "::/EFI/BOOT/BOOTX64.EFI"], "disk")
        with open(esp, "rb") as src, open(raw, "r+b") as dst:
            dst.seek(_FIRST_SECTOR * _SECTOR)
            shutil.copyfileobj(src, dst, 4 * 1024 * 1024)
        self._run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out_path], "disk")
        os.unlink(raw)

    def run(self, out_path):
        """Build into ``out_path`` (a qcow2 in the store); returns the manifest (dict)."""
        req = self.request
        started = time.monotonic()
        self.work = tempfile.mkdtemp(dir=self.store.root, prefix=".tmp-build-")
        os.chmod(self.work, 0o755)
        self.rootfs = os.path.join(self.work, "rootfs")
        step = time.monotonic()
        if req.base_image is not None:
            base_sha = self._base_from_image()
            cache, cached, release_sha, release_date = None, False, None, None
        else:
            base_sha = None
            cache, cached = self._base()
            release_sha, release_date = self._release_digest()
        step = self._step("base", step)
        saved = self._configure_apt()
        installed, kernels = self._install()
        self._check_driver(installed)
        step = self._step("packages", step)
        root_uuid = str(uuid.uuid4())
        esp_id = "%04X-%04X" % tuple(divmod(int(root_uuid[:8], 16), 0x10000))
        self._finish_rootfs(saved, root_uuid, esp_id)
        step = self._step("configure", step)
        self._not_mounted("disk")
        self._disk(root_uuid, esp_id, out_path)
        self._step("disk", step)
        self.timings["total"] = round(time.monotonic() - started, 1)
        return {
            "name": req.name, "version": req.version, "built_by": "gpuvirt.kvm.kvm_image_build",
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "inputs": req.inputs(), "inputs_digest": req.inputs_digest(),
            "base": {"suite": req.suite, "mirror": None if req.base_image else req.mirror,
                     "release_sha256": release_sha, "release_date": release_date,
                     "cache": os.path.basename(cache) if cache else None, "from_cache": cached,
                     "image": req.base_image.src if req.base_image else None,
                     "image_digest": ("%s:%s" % (req.base_image.algorithm, base_sha)
                                      if req.base_image else None)},
            "boot": {"firmware": "uefi", "root_uuid": root_uuid, "esp_id": esp_id,
                     "console": "ttyS0,115200n8", "kernels": kernels},
            "packages": installed, "seconds": dict(self.timings),
        }


def _exec(argv, env=None, cwd=None, timeout=None, stdin=None):
    """Run a command, stdout and stderr together; the CompletedProcess (never raises on exit
    status). The build's commands run for minutes with output kept for errors, outside any
    AnsibleModule (the unit tests and the module share this), hence subprocess."""
    return subprocess.run(  # pylint: disable=ansible-bad-function
        argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
        timeout=timeout, check=False)


def _mounted_under(path):
    prefix = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", "r", encoding="utf-8") as handle:
            for ln in handle:
                mount_point = ln.split()[4].replace("\\040", " ")
                if mount_point == prefix or mount_point.startswith(prefix + "/"):
                    return True
    except OSError:
        return True  # cannot tell: never delete or copy on a guess
    return False


def build_and_register(request, store, cache_dir=DEFAULT_CACHE, log=None, lock=None):
    """Build, verify with qemu-img and install as name-version with its manifest.

    Returns (image, manifest). Nothing is registered when any step fails; the scratch folder
    and the partial image are removed.
    """
    created = store._make_root()  # pylint: disable=protected-access
    builder = Builder(request, store, cache_dir=cache_dir, log=log)
    fd, partial = tempfile.mkstemp(dir=store.root, prefix=".tmp-", suffix=".partial")
    os.close(fd)
    staged = None
    try:
        try:
            manifest = builder.run(partial)
        except OSError as exc:
            raise BuildError("build: %s: %s" % (getattr(exc, "filename", None) or "",
                                                exc.strerror or exc)) from exc
        except subprocess.TimeoutExpired as exc:
            raise BuildError("build: %s did not finish within %d s"
                             % (exc.cmd[0], exc.timeout)) from exc
        builder.cleanup()
        digests = file_digests(partial)
        origin = ("on %s" % request.base_image.src if request.base_image else
                  "debootstrap %s from %s" % (request.suite, request.mirror))
        staged = Staged(path=partial, size=os.path.getsize(partial), digests=digests,
                        source="built by kvm_image_build (%s)" % origin, created_root=created)
        staged.info = store.verify(partial, option="name", label="the built image")
        manifest["image_sha256"] = digests["sha256"]
        if lock is not None:
            lock.acquire()
        try:
            if store.get(request.name, request.version) is not None:
                raise BuildError("version: %s-%s appeared in the store while it was being "
                                 "built; choose another version"
                                 % (request.name, request.version))
            _write_json(manifest_path(store, request.name, request.version), manifest)
            try:
                image = store.commit(staged, request.name, request.version)
            finally:
                if not staged.committed:  # however the commit failed: no manifest alone
                    with contextlib.suppress(OSError):
                        os.unlink(manifest_path(store, request.name, request.version))
            if store.default_version(request.name) is None:
                store.set_default(request.name, request.version)
                image = store.get(request.name, request.version)
        finally:
            if lock is not None:
                lock.release()
        return image, manifest
    finally:
        try:
            builder.cleanup()
        finally:
            if staged is None or not staged.committed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(partial)
                if created:  # a store folder made for this build goes again (if still empty)
                    with contextlib.suppress(OSError):
                        os.rmdir(store.root)


def _write_json(path, data):
    tmp = path + ".partial"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What an image build is asked for, and what follows from the request alone. Private, pure.

kvm_image_build's request: a :class:`BuildRequest` (with its :class:`Repository` entries and
its :class:`BaseImage`), which ``_image_build.validate`` makes from the module's options (it
reads key files and looks at the base image on the managed host, so it lives there). From a
request follow, as plain values:

- the packages each build installs (the base's, the profile's, the user's) and the apt pins;
- its inputs, as the manifest stores them, and their digest; the debootstrap cache's key;
- the files the build writes into the guest: sources.list, each repository's deb822 source and
  key, apt preferences, the standalone GRUB's grub.cfg, cloud-init's configuration;
- apt-get's failures read back as a :class:`BuildError` that names the option at fault;
- which inputs differ between two manifests, and which of them the user made.

The builder (``_image_build``) runs the commands and writes the files.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

# Bumped whenever the build recipe changes what an image holds: part of the inputs' digest.
RECIPE_VERSION = 1
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# What every built guest has: a kernel that boots on virtio and the serial console, cloud-init
# (NoCloud seed from kvm_vm) with growpart, SSH, networkd and resolved for cloud-init's network
# config, the QEMU guest agent (kvm_vm_message), and the tools a tenant and the tests use
# (ethtool for multiqueue, pciutils for GPUs).
# debootstrap installs the first part (its own dependency order is weak: cloud-init's Python
# packages fail to configure there), apt-get the second, in the chroot.
DEBOOTSTRAP_PACKAGES = (
    "linux-image-amd64", "systemd", "systemd-sysv", "udev", "dbus", "libpam-systemd", "kmod",
    "iproute2", "procps", "netbase", "ca-certificates",
)
BASE_PACKAGES = DEBOOTSTRAP_PACKAGES + (
    "systemd-resolved", "openssh-server", "cloud-init", "cloud-guest-utils", "sudo", "ethtool",
    "pciutils", "gpg", "e2fsprogs", "util-linux", "less", "locales", "qemu-guest-agent",
)
# The GPU profile: the NVIDIA driver (pinned to nvidia_driver), headers for its DKMS module,
# the container toolkit; plus the container engine.
# The kernel goes with its headers: the base's kernel may be older than the archive's headers,
# and DKMS would then build the driver for a kernel that is not installed.
GPU_PACKAGES = ("linux-image-amd64", "linux-headers-amd64", "nvidia-driver",
                "nvidia-container-toolkit")
ENGINE_PACKAGES = {"docker": ("docker.io",), "podman": ("podman",), "none": ()}
# Packages the NVIDIA driver pin covers (apt preferences globs). The container toolkit has
# versions of its own (1.x) that never match a driver version, so the pin leaves it alone.
NVIDIA_PIN_GLOBS = ("nvidia-* libnvidia-* libcuda* libnvcuvid* libnvoptix* "
                    "xserver-xorg-video-nvidia* firmware-nvidia-*")
# What a cloud image base gets on top of its own packages (kernel, network stack and resolver
# stay the image's).
IMAGE_BASE_PACKAGES = ("cloud-init", "openssh-server", "sudo", "ethtool", "pciutils", "gpg",
                       "qemu-guest-agent")
_ARMOR = "-----BEGIN PGP PUBLIC KEY BLOCK-----"


class BuildError(Exception):
    """A build that cannot run or failed; the message names the option where one is at fault."""


@dataclass
class Repository:
    name: str
    uri: str
    suite: str
    components: tuple
    key: bytes = None  # the key's bytes (armored or binary), None: the image's own keyring
    key_source: str = ""

    @property
    def key_sha256(self):
        return hashlib.sha256(self.key).hexdigest() if self.key else None

    @property
    def flat(self):
        return self.suite.endswith("/")

    def public(self):
        return {"name": self.name, "uri": self.uri, "suite": self.suite,
                "components": list(self.components), "key_sha256": self.key_sha256}


@dataclass
class BaseImage:
    """A cloud image to build on instead of a debootstrap suite."""

    src: str
    algorithm: str
    digest: str

    @property
    def is_url(self):
        return self.src.startswith(("http://", "https://"))

    def public(self):
        return {"src": self.src, "checksum": "%s:%s" % (self.algorithm, self.digest)}


@dataclass
class BuildRequest:
    name: str
    version: str
    suite: str = None
    base_image: BaseImage = None
    mirror: str = DEFAULT_MIRROR
    components: tuple = ("main",)
    repositories: list = field(default_factory=list)
    packages: tuple = ()  # the user's, as given (name or name=version)
    profile: str = "gpu"
    nvidia_driver: str = None
    container_engine: str = "docker"
    disk_size_gb: int = 8
    kernel_args: tuple = ()

    def extra_packages(self):
        """What apt-get installs after the base, in order: the profile's, then the user's."""
        names = []
        if self.profile == "gpu":
            names += list(GPU_PACKAGES) + list(ENGINE_PACKAGES[self.container_engine])
        names += list(self.packages)
        seen, result = set(), []
        for spec in names:
            if spec not in seen:
                seen.add(spec)
                result.append(spec)
        return result

    def pins(self):
        """[(package glob, version pattern)] for apt preferences: the driver branch, and every
        package given with a version."""
        pins = []
        if self.profile == "gpu" and self.nvidia_driver:
            # 550.163.01 pins 550.163.01-<revision>; a branch (550) pins 550.<anything>.
            full = self.nvidia_driver.count(".") >= 2
            pins.append((NVIDIA_PIN_GLOBS, "%s%s*" % (self.nvidia_driver, "-" if full else ".")))
        for spec in self.packages:
            pkg, _sep, ver = spec.partition("=")
            if ver:
                pins.append((pkg, ver))
        return pins

    def inputs(self):
        """Everything that decides what the image holds, as plain data (the manifest's)."""
        return {
            "recipe": RECIPE_VERSION, "suite": self.suite, "mirror": self.mirror,
            "components": list(self.components),
            "base_image": self.base_image.public() if self.base_image else None,
            "base_packages": list(IMAGE_BASE_PACKAGES if self.base_image else BASE_PACKAGES),
            "repositories": [r.public() for r in self.repositories],
            "packages": list(self.packages), "profile": self.profile,
            "nvidia_driver": self.nvidia_driver,
            "container_engine": self.container_engine if self.profile == "gpu" else None,
            "disk_size_gb": self.disk_size_gb, "kernel_args": list(self.kernel_args),
        }

    def inputs_digest(self):
        return _digest(self.inputs())

    def base_key(self):
        """The debootstrap cache's key: what the base folder depends on."""
        return _digest({"recipe": RECIPE_VERSION, "suite": self.suite, "mirror": self.mirror,
                        "components": list(self.components),
                        "packages": list(BASE_PACKAGES)})[:16]


def _digest(data):
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- apt files


def sources_list(request):
    return "deb %s %s %s\n" % (request.mirror, request.suite, " ".join(request.components))


def repository_files(repo):
    """{path inside the guest: content} for one repository (deb822 with its own key)."""
    files = {}
    lines = ["Types: deb", "URIs: %s" % repo.uri, "Suites: %s" % repo.suite]
    if repo.components:
        lines.append("Components: %s" % " ".join(repo.components))
    if repo.key:
        ext = "asc" if repo.key.lstrip().startswith(_ARMOR.encode()) else "gpg"
        key_path = "/etc/apt/keyrings/gpuvirt-%s.%s" % (repo.name, ext)
        files[key_path] = repo.key
        lines.append("Signed-By: %s" % key_path)
    files["/etc/apt/sources.list.d/gpuvirt-%s.sources" % repo.name] = (
        "\n".join(lines) + "\n").encode("utf-8")
    return files


def preferences(request):
    """apt preferences pinning the driver branch and the packages given with a version."""
    blocks = []
    for pkgs, ver in request.pins():
        blocks.append("Package: %s\nPin: version %s\nPin-Priority: 1001\n" % (pkgs, ver))
    return "\n".join(blocks)


def grub_cfg(root_uuid, kernel_args=()):
    """The standalone GRUB's built-in config: serial and screen, no menu, /vmlinuz by UUID."""
    args = " ".join(("ro", "console=tty0", "console=ttyS0,115200n8") + tuple(kernel_args))
    return (
        "set timeout=0\n"
        "serial --unit=0 --speed=115200\n"
        "terminal_input serial console\n"
        "terminal_output serial console\n"
        "search --no-floppy --fs-uuid --set=root %s\n"
        "linux /vmlinuz root=UUID=%s %s\n"
        "initrd /initrd.img\n"
        "boot\n" % (root_uuid, root_uuid, args))


CLOUD_CFG = """\
# gpuvirt.kvm: kvm_vm gives every VM a NoCloud seed; probe nothing else.
datasource_list: [NoCloud, None]
# The hostname kvm_vm gives resolves (sudo asks for it).
manage_etc_hosts: true
# Built into glibc; cloud-init's default (en_US.UTF-8) would need locale-gen first, which its
# locale module does not run on Debian 12. A user_data "locale" overrides it.
locale: C.UTF-8
system_info:
  network:
    renderers: [networkd]
"""


# ----------------------------------------------------------------------------- apt errors


def apt_update_error(output, request):
    """A BuildError naming the repository (and option) that apt-get update failed on."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    bad = [ln for ln in lines if re.search(
        r"NO_PUBKEY|is not signed|couldn't be verified|BADSIG|EXPKEYSIG|Signed-By|"
        r"not signed|invalid signature|OpenPGP", ln)]
    for i, repo in enumerate(request.repositories):
        for ln in bad:
            if repo.uri in ln or repo.uri.split("://", 1)[-1] in ln:
                return BuildError(
                    "repositories[%d].key: apt could not verify %s (%s) with the key given "
                    "(%s): %s. Give the key that signs that repository's Release file"
                    % (i, repo.uri, repo.name, repo.key_source or "the image's keyring", ln))
    for i, repo in enumerate(request.repositories):
        for ln in lines:
            if (repo.uri in ln or repo.uri.split("://", 1)[-1] in ln) and re.match(
                    r"^(E|W|Err):", ln):
                return BuildError("repositories[%d].uri: apt could not read %s (%s): %s"
                                  % (i, repo.uri, repo.name, ln))
    if bad:
        return BuildError("mirror: apt could not verify %s: %s" % (request.mirror, bad[0]))
    errors = [ln for ln in lines if ln.startswith(("E:", "Err:"))]
    return BuildError("mirror: apt-get update failed in the image: %s"
                      % "; ".join(errors[-3:] or lines[-3:]))


def apt_install_error(output, request):
    """A BuildError naming the package (and option) that apt-get install failed on."""
    profile = set(request.extra_packages()) - set(request.packages)
    for ln in output.splitlines():
        m = re.search(r"Unable to locate package (\S+)", ln) or re.search(
            r"Package '?([^' ]+)'? has no installation candidate", ln)
        if m:
            pkg = m.group(1)
            option = "packages"
            hint = "check its name, or add the repository that has it in repositories"
            if pkg in profile:
                option = "profile"
                hint = ("the gpu profile installs %s; add NVIDIA's CUDA and container-toolkit "
                        "repositories in repositories (docs/images.md), or use profile=minimal"
                        % pkg)
            return BuildError("%s: no repository has the package %s (%s); no image was "
                              "registered" % (option, pkg, hint))
        m = re.search(r"Version '([^']+)' for '([^']+)' was not found", ln)
        if m:
            return BuildError("packages: %s has no version %s in the repositories; no image "
                              "was registered" % (m.group(2), m.group(1)))
    tail = [ln for ln in output.splitlines() if ln.strip()][-6:]
    return BuildError("packages: apt-get install failed in the image; no image was "
                      "registered: %s" % " | ".join(tail))


# ----------------------------------------------------------------------------- manifests' inputs


# Inputs the collection decides, not the user: a newer collection may put more into every image
# (qemu-guest-agent came so). An image an earlier recipe built is kept as it is, not refused.
RECIPE_INPUTS = ("recipe", "base_packages")


def input_differences(old, new):
    """The inputs that differ between two manifests' inputs, by name."""
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


def user_input_differences(old, new):
    """The differences a user made (not the collection's recipe)."""
    return [k for k in input_differences(old, new) if k not in RECIPE_INPUTS]

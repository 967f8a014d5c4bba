#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: kvm_image_build
short_description: Build a GPU-ready Debian guest image into the image store
version_added: 0.2.0
description:
  - Builds a Debian guest OS image from a debootstrap suite, or on a Debian cloud image
    (O(base_image)), and installs it in the store of
    M(gpuvirt.kvm.kvm_image) as O(name) O(version), where M(gpuvirt.kvm.kvm_vm) puts VMs on
    it. NVIDIA shipped such images with the driver, CUDA and the container runtime already in
    them; this builds yours from repositories you name.
  - Every image has cloud-init (the NoCloud seed M(gpuvirt.kvm.kvm_vm) writes), OpenSSH (host
    keys made on first boot), ethtool and pciutils, and a getty on the serial console C(ttyS0)
    (a debootstrap build also systemd-networkd and -resolved, and growpart; a cloud image keeps
    its own network stack); the kernel's console is C(ttyS0) too, so
    C(virsh console NAME) shows boot messages and a login prompt.
  - With O(profile=gpu) (the default) it also gets the NVIDIA driver, pinned to
    O(nvidia_driver) with an apt preference (on a shared-NVSwitch host it must equal the host's
    Fabric Manager version), headers for the driver's DKMS module, the NVIDIA container
    toolkit and a container engine (O(container_engine)). These come from the repositories in
    O(repositories) (NVIDIA's CUDA and container-toolkit repositories, or a mirror of them).
  - The disk is GPT with an EFI system partition holding a standalone GRUB, and an ext4 root;
    the image boots with UEFI (the default firmware of GPU VMs). It does not boot with
    O(gpuvirt.kvm.kvm_vm#module:firmware=bios).
  - The build needs no loop device and mounts nothing of the image. It runs debootstrap into a
    scratch folder in the store, installs with apt-get in a chroot (with C(/proc), C(/sys)
    and C(/dev) mounted into it while it runs), writes the file systems into a sparse raw
    file (C(mkfs.ext4 -d), C(mkfs.fat), C(mcopy)) and converts it to qcow2.
  - The result is checked with C(qemu-img) and installed atomically, with a manifest
    C(<name>-<version>.manifest.json) next to it in the store, which records the inputs and
    their digest, the digest and date of the suite's Release file, and every installed package
    with its version. When any step fails, nothing is installed and the scratch folder is removed.
  - The debootstrapped base (suite, mirror, components and the base packages) is cached in
    O(cache_dir) as a tar file, so later builds on that base start from the same files, and
    a rebuild of the same inputs gets the same base packages.
author:
  - gpuvirt.kvm contributors (@gpuvirt)
extends_documentation_fragment:
  - gpuvirt.kvm.lock
  - gpuvirt.kvm.bytecode
attributes:
  check_mode:
    support: full
    description:
      - Checks the inputs, the repository keys, the host's tools, the store and the digest of a
        local O(base_image), and says whether a build would run, with the packages it would
        install. Builds nothing.
  diff_mode:
    support: full
    description: The image's name-version and the inputs' digest, before and after.
  idempotent:
    support: full
    description:
      - When O(name) O(version) is in the store with a manifest of the same inputs, nothing is
        built or changed. The same version built from other inputs is refused (a version
        should always mean the same image); build a new version instead.
      - A version an earlier release of this module built, from the same options, is kept as
        it is, with a warning and RV(outdated), though this release's recipe puts more into
        every image (this release added C(qemu-guest-agent)).
options:
  name:
    description: The image's name in the store, for example V(dl-guest). Same rules as
      M(gpuvirt.kvm.kvm_image)'s.
    type: str
    required: true
  version:
    description: The version to build, for example V(2026.12). Same rules as the name.
    type: str
    required: true
  suite:
    description:
      - The Debian suite debootstrap installs, for example V(bookworm). The package names of
        the base and the gpu profile (C(linux-image-amd64), C(nvidia-driver)) are Debian's;
        Ubuntu suites are not supported yet.
      - Give this or O(base_image).
    type: str
  base_image:
    description:
      - A Debian cloud image to build on instead of a debootstrap suite (such as
        C(debian-12-genericcloud-amd64.qcow2)). Its kernel must be on its root file system (a
        separate C(/boot) partition, as Ubuntu 24.04's images have, is not read). Its root file
        system (ext4, on a GPT or MBR disk) is read out of the image with C(debugfs), without
        mounting it; its kernel,
        apt sources and network stack are kept, and it gets cloud-init, OpenSSH, sudo, ethtool
        and pciutils when it lacks them, the serial console, and the new boot partition.
      - File capabilities (extended attributes) are not carried over; setuid and setgid bits
        are.
    type: dict
    suboptions:
      src:
        description: The image, a path on the managed host or an C(http(s)://) URL.
        type: str
        required: true
      checksum:
        description:
          - Its digest, V(sha256:<hex>) or V(sha512:<hex>), as its publisher gives it. Content
            with another digest fails the build, naming this option, before anything is built.
        type: str
        required: true
  mirror:
    description: The archive of O(suite). The image's C(/etc/apt/sources.list) names it too.
      Not used with O(base_image).
    type: str
    default: http://deb.debian.org/debian
  components:
    description: Archive components of O(suite), such as V([main, non-free-firmware]).
    type: list
    elements: str
    default: [main]
  repositories:
    description:
      - More apt repositories, each with its own key (C(Signed-By) in a deb822 C(.sources)
        file in the image). The build reaches nothing but O(mirror) and these.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: A short name for the repository's files in C(/etc/apt).
        type: str
        required: true
      uri:
        description: The repository's URL (C(http://), C(https://) or C(file://)).
        type: str
        required: true
      suite:
        description: Its suite, or a path ending in C(/) for a flat repository (V(./), or
          NVIDIA's V(/)).
        type: str
        default: ./
      components:
        description: Its components; none for a flat repository.
        type: list
        elements: str
      key:
        description:
          - The OpenPGP public key that signs its Release file, as ASCII-armored text or the
            path of a key file on the managed host. A key that does not verify the repository
            fails the build, naming this option.
          - Without it, apt trusts the image's own keyring (Debian's archive keys), which suits
            C(security.debian.org).
        type: str
  packages:
    description:
      - Packages to install after the base and the profile's, by name or as V(name=version).
        A version pins that package with an apt preference, so updates inside the guest keep
        it.
      - A package no repository has fails the build, naming it; nothing is registered.
    type: list
    elements: str
    default: []
  profile:
    description:
      - V(gpu) adds the NVIDIA driver (O(nvidia_driver)), C(linux-headers-amd64), the NVIDIA
        container toolkit and O(container_engine). V(minimal) adds nothing beyond the base.
    type: str
    choices: [gpu, minimal]
    default: gpu
  nvidia_driver:
    description:
      - The NVIDIA driver version the image carries, for example V(550.163.01), or a branch
        such as V(550). Required with O(profile=gpu). Every C(nvidia-*), C(libnvidia-*) and
        C(libcuda*) package is pinned to it (C(550.163.01-*), or C(550.*) for a branch), and
        the build fails, naming this option, when the C(nvidia-driver) it installed is another.
    type: str
  container_engine:
    description: The container engine of the gpu profile (C(docker.io) or C(podman)).
    type: str
    choices: [docker, podman, none]
    default: docker
  disk_size_gb:
    description: The image's virtual disk size in GiB. cloud-init grows the root partition to
      a VM's larger OS disk on first boot.
    type: int
    default: 8
  kernel_args:
    description: More kernel arguments, after C(console=ttyS0,115200n8).
    type: list
    elements: str
    default: []
  store:
    description: The image store.
    type: path
    default: /var/lib/gpuvirt/images
  cache_dir:
    description: Where debootstrapped bases are cached (one tar file per base).
    type: path
    default: /var/cache/gpuvirt/image-build
notes:
  - Runs as root on the build host (debootstrap, chroot). The host needs debootstrap,
    grub-efi-amd64-bin, mtools, dosfstools, fdisk, e2fsprogs and qemu-utils; the error names
    the missing ones.
  - Same inputs, same package set. The base comes from the cache and pinned packages are
    pinned. A package given without a version gets the repository's newest; pin it for a
    build that must not drift, or point O(mirror) at a snapshot (such as
    C(http://snapshot.debian.org/archive/debian/20261201T000000Z)).
  - Building takes minutes (2-4 on two cores here for a small image, most of it debootstrap
    the first time). The host lock is held only while the image is installed.
requirements:
  - debootstrap, grub-efi-amd64-bin, mtools, dosfstools, fdisk, e2fsprogs, qemu-utils
seealso:
  - module: gpuvirt.kvm.kvm_image
  - module: gpuvirt.kvm.kvm_vm
"""

EXAMPLES = r"""
- name: A GPU guest on Debian 12 with the driver the host's Fabric Manager runs
  gpuvirt.kvm.kvm_image_build:
    name: dl-guest
    version: "2026.12"
    suite: bookworm
    components: [main, contrib, non-free, non-free-firmware]
    nvidia_driver: "550.163.01"
    repositories:
      - name: cuda
        uri: https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64
        suite: /
        key: /etc/gpuvirt/keys/cuda-archive-keyring.gpg
      - name: nvidia-container-toolkit
        uri: https://nvidia.github.io/libnvidia-container/stable/deb/amd64
        suite: /
        key: "{{ lookup('ansible.builtin.file', 'nvidia-container-toolkit.asc') }}"
    packages: [htop, "nvidia-container-toolkit=1.17.8-1"]

- name: The same on Debian's cloud image
  gpuvirt.kvm.kvm_image_build:
    name: dl-guest-cloud
    version: "2026.12"
    base_image:
      src: https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2
      checksum: "sha512:{{ debian_cloud_sha512 }}"
    nvidia_driver: "550.163.01"
    repositories: "{{ nvidia_repositories }}"

- name: A small guest without the driver, for CPU tenants and tests
  gpuvirt.kvm.kvm_image_build:
    name: debian-min
    version: "1"
    suite: bookworm
    profile: minimal
"""

RETURN = r"""
image:
  description: The installed image (the keys of M(gpuvirt.kvm.kvm_image)'s RV(gpuvirt.kvm.kvm_image#module:image));
    in check mode before a build, what would be installed (size 0).
  returned: success
  type: dict
  sample: {name: dl-guest, version: "2026.12", ref: dl-guest-2026.12,
           path: /var/lib/gpuvirt/images/dl-guest-2026.12.qcow2, format: qcow2}
manifest:
  description: What went into the image, as written next to it (V(null) in check mode before a
    build). C(inputs) and C(inputs_digest); C(base) with the Release file's C(release_sha256)
    and C(release_date); C(packages) (name to version); C(boot); C(seconds) per step.
  returned: success
  type: dict
manifest_path:
  description: The manifest's file.
  returned: success
  type: str
  sample: /var/lib/gpuvirt/images/dl-guest-2026.12.manifest.json
packages:
  description: What apt-get installs after the base (the profile's, then O(packages)).
  returned: success
  type: list
  elements: str
  sample: [linux-headers-amd64, nvidia-driver, nvidia-container-toolkit, docker.io, htop]
outdated:
  description: When the version in the store was built from the same options by an earlier
    recipe of this module, the recipe's inputs that differ (it is kept as it is).
  returned: when the version was built by an earlier recipe
  type: list
  elements: str
  sample: [base_packages]
actions:
  description: What was done (or would be), one line each; empty when nothing changed.
  returned: success
  type: list
  elements: str
"""

import os

from ansible.module_utils.basic import AnsibleModule

# _bytecode first: it compiles the module_utils imported after it once per run (see there).
from ansible_collections.gpuvirt.kvm.plugins.module_utils import _bytecode  # noqa: F401 pylint: disable=unused-import
from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_build import (
    DEFAULT_CACHE,
    build_and_register,
    check_base_digest,
    manifest_path,
    missing_host_tools,
    read_manifest,
    validate,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_request import (
    BuildError,
    input_differences,
    user_input_differences,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_store import (
    DEFAULT_STORE,
    ImagesError,
    ImageStore,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._lock import (
    HostLock,
    HostLockError,
    lock_argspec,
)


def main():
    argument_spec = dict(
        name=dict(type="str", required=True),
        version=dict(type="str", required=True),
        suite=dict(type="str"),
        base_image=dict(type="dict", options=dict(
            src=dict(type="str", required=True),
            checksum=dict(type="str", required=True),
        )),
        mirror=dict(type="str", default="http://deb.debian.org/debian"),
        components=dict(type="list", elements="str", default=["main"]),
        repositories=dict(type="list", elements="dict", default=[], options=dict(
            name=dict(type="str", required=True),
            uri=dict(type="str", required=True),
            suite=dict(type="str", default="./"),
            components=dict(type="list", elements="str"),
            key=dict(type="str", no_log=False),
        )),
        packages=dict(type="list", elements="str", default=[]),
        profile=dict(type="str", choices=["gpu", "minimal"], default="gpu"),
        nvidia_driver=dict(type="str"),
        container_engine=dict(type="str", choices=["docker", "podman", "none"],
                              default="docker"),
        disk_size_gb=dict(type="int", default=8),
        kernel_args=dict(type="list", elements="str", default=[]),
        store=dict(type="path", default=DEFAULT_STORE),
        cache_dir=dict(type="path", default=DEFAULT_CACHE),
    )
    argument_spec.update(lock_argspec())
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True,
                           mutually_exclusive=[("suite", "base_image")],
                           required_one_of=[("suite", "base_image")])
    p = module.params
    try:
        request = validate(p)
    except BuildError as exc:
        module.fail_json(msg=str(exc))
    store = ImageStore(p["store"])
    ref = "%s-%s" % (request.name, request.version)
    digest = request.inputs_digest()
    result = dict(changed=False, actions=[], packages=request.extra_packages(),
                  manifest_path=manifest_path(store, request.name, request.version))
    try:
        existing = store.get(request.name, request.version)
    except ImagesError as exc:
        module.fail_json(msg=str(exc))
    if existing is not None:
        manifest = read_manifest(store, request.name, request.version)
        if manifest is None:
            module.fail_json(msg="version: %s is in the store %s but was not built by "
                             "kvm_image_build (it has no manifest); build another version"
                             % (ref, store.root))
        if manifest.get("inputs_digest") != digest:
            built_from = manifest.get("inputs")
            if not isinstance(built_from, dict) or not built_from:
                module.fail_json(msg="version: %s is in the store, but its manifest %s records no "
                                 "inputs to compare with; build a new version" % (
                                     ref, result["manifest_path"]))
            changed = user_input_differences(built_from, request.inputs())
            if changed:
                module.fail_json(
                    msg="version: %s was built from other inputs (%s differ); a version always "
                    "means the same image, so build a new version (and move VMs to it with "
                    "kvm_vm's image)" % (ref, ", ".join(changed) or "the recipe"))
            result["outdated"] = input_differences(built_from, request.inputs())
            module.warn("%s was built by an earlier recipe of kvm_image_build (%s differ) and is "
                        "kept as it is; build a new version to get what this recipe puts in "
                        "every image" % (ref, ", ".join(result["outdated"])))
        result.update(image=existing.to_dict(), manifest=manifest)
        if module._diff:
            result["diff"] = dict(before={ref: digest}, after={ref: digest})
        module.exit_json(**result)

    if os.geteuid() != 0:
        module.fail_json(msg="kvm_image_build runs debootstrap and chroot, which need root; "
                         "run it with become: true")
    missing = missing_host_tools()
    if missing:
        module.fail_json(msg="the build host lacks %s; install them (apt-get install %s)"
                         % (", ".join(missing), " ".join(missing)))
    result["changed"] = True
    origin = ("on %s" % request.base_image.src if request.base_image
              else "debootstrap %s" % request.suite)
    result["actions"] = ["built %s (%s, profile %s, %d more packages)"
                         % (ref, origin, request.profile, len(result["packages"]))]
    if module._diff:
        result["diff"] = dict(before={}, after={ref: digest})
    if module.check_mode:
        if request.base_image is not None and not request.base_image.is_url:
            try:  # check mode fails on a wrong digest as a build would
                check_base_digest(request.base_image)
            except BuildError as exc:
                module.fail_json(msg=str(exc))
        result.update(manifest=None, image=dict(
            name=request.name, version=request.version, ref=ref, format="qcow2", size=0,
            path=os.path.join(store.root, store.filename(request.name, request.version,
                                                         "qcow2"))))
        module.exit_json(**result)
    try:
        lock = HostLock(p["lock_path"], p["lock_timeout"], owner="kvm_image_build %s" % ref)
        image, manifest = build_and_register(request, store, cache_dir=p["cache_dir"],
                                             lock=lock)
    except (BuildError, ImagesError, HostLockError) as exc:
        module.fail_json(msg=str(exc))
    except OSError as exc:
        module.fail_json(msg="build: %s: %s; nothing was registered"
                         % (exc.filename or "", exc.strerror or exc))
    result.update(image=image.to_dict(), manifest=manifest)
    module.exit_json(**result)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: kvm_image
short_description: Install, remove and choose versioned guest OS images for GPU VMs
version_added: 0.1.0
description:
  - Keeps a store of versioned base images, the images that M(gpuvirt.kvm.kvm_vm) puts a
    qcow2 overlay on for every VM's OS disk, as C(nvidia-vm image) did on a DGX-2.
  - Each image is a file C(<name>-<version>.qcow2) or C(<name>-<version>.raw) in O(store).
    Each name has a default alias, a symlink C(<name>) to one of its versions (like
    C(dgx-kvm-image -> dgx-kvm-image-4-0-5)); a VM that names only the image gets the default.
    The first version installed becomes the default.
  - Installs from a local file, an http(s) URL or a Debian package that ships the image. The
    content is copied (or downloaded) into the store under a temporary name, verified with
    C(qemu-img info) and C(qemu-img check), and renamed into place, so the store never holds a
    half-written image.
  - Only qcow2 and raw images are accepted. A qcow2 image whose backing file is not an image in
    the store is refused, as are corrupt images, compressed files, text and anything else that
    is not a disk image.
  - Never removes or replaces an image while any libvirt domain's disk chain (the disk and its
    backing files) uses it, or while another image in the store is built on it.
author:
  - gpuvirt.kvm contributors (@gpuvirt)
extends_documentation_fragment:
  - gpuvirt.kvm.host.LIBVIRT
  - gpuvirt.kvm.lock
  - gpuvirt.kvm.bytecode
attributes:
  check_mode:
    support: full
    description:
      - Nothing is downloaded, copied, installed or removed. A local O(src) (or the image file
        of an already installed O(package)) is read where it lies, hashed and checked with
        C(qemu-img), so check mode fails on the same bad input as a real run.
      - A URL is not downloaded and a package not installed in check mode; the result then says
        what would be installed, and RV(images) shows the predicted store.
  diff_mode:
    support: full
    description: The store's images per name, with versions, formats, digests and the default,
      before and after.
  idempotent:
    support: full
    description:
      - An installed version whose content matches (the O(checksum), or the size and SHA-256
        of a local O(src) or package file) is left alone. With O(checksum) a rerun reads
        nothing but the store's metadata.
options:
  name:
    description:
      - The image's name, for example V(dgx-os). Letters, digits, C(.), C(_), C(+) and C(-),
        starting with a letter or digit, at most 64 characters, no C(..).
    type: str
    required: true
  version:
    description:
      - The image's version, for example V(6.2) or V(4-0-5). Same rules as O(name).
      - Required with O(src), O(package) and O(state=default).
      - With O(state=absent) and no version, every version of O(name) is removed.
    type: str
  src:
    description:
      - Where the image comes from, a local file on the managed host or an C(http://) or
        C(https://) URL. A URL needs O(checksum).
      - Mutually exclusive with O(package).
    type: str
  checksum:
    description:
      - The image's digest, V(sha256:<hex>) or V(sha512:<hex>). Required when O(src) is a URL.
      - The copied or downloaded content must match it, or nothing is installed. For
        O(package), that includes the package itself; see there.
      - It also makes reruns cheap. The installed version is compared with the digest
        recorded when it was installed, without reading the source.
    type: str
  package:
    description:
      - A Debian package that ships the image, as NVIDIA shipped C(dgx-kvm-image-*). Either a
        package name, fetched with C(apt-get download) from the host's repositories and
        installed from that C(.deb) with C(apt-get install) when it is not installed, or the
        path of a C(.deb) file, installed with C(dpkg -i) unless that version is installed.
      - The image is the one C(.qcow2), C(.qcow), C(.img) or C(.raw) file the package ships
        (O(package_image) chooses when it ships several). It is copied into the store, so
        removing or upgrading the package never pulls a base image from under a VM's disk.
      - A package is checked before it is installed. Its image is read out of the C(.deb)
        into the store under a temporary name and checked there (O(checksum), C(qemu-img),
        and the content of O(version) when the store already has it). Only when it passes is
        that same C(.deb) installed and the image put in place. When it fails, the package is not installed and
        the store is left as it was. The error says so and names the option.
      - A package that is already installed (that version, for a C(.deb) file) is not
        installed again; its image file is read where the package put it.
      - Mutually exclusive with O(src).
    type: str
  package_image:
    description:
      - The file to take when O(package) ships several images, by full path or file name.
    type: str
  store:
    description:
      - The folder of images. Created when the first image is installed.
    type: path
    default: /var/lib/gpuvirt/images
  state:
    description:
      - V(present) installs O(name) O(version) from O(src) or O(package) when it is not
        installed. Without a source it checks that the image is installed and fails if not.
      - V(default) does what V(present) does, then points the default alias of O(name) at
        O(version). Refused while a domain's disk names the alias itself as its backing file
        (a disk made on the alias would change under the VM).
      - V(absent) removes O(version) (or every version of O(name)). Refused while any domain's
        disk chain uses the image, or another image in the store is built on it. The default
        version is removed only together with the last version; while other versions remain,
        make one of them the default first.
    type: str
    choices: [present, absent, default]
    default: present
  force:
    description:
      - Replace an installed version whose content differs from the source. Without it that
        is an error, because a version name should always mean the same bytes.
      - An image that a domain uses, or that another image is built on, is never replaced,
        with or without O(force).
    type: bool
    default: false
notes:
  - VM disks are built on the versioned file, never on the alias, so changing the default
    changes only what new VMs get.
  - The store keeps a small hidden metadata file per image (C(.<file>.json)) with what was
    installed from where and its digests. Images put into the store by hand are recognised by
    their default alias and file name.
  - Which domains use an image is read from libvirt at O(uri) (every defined domain, running or
    not) and each disk's backing chain is followed with C(qemu-img info).
requirements:
  - qemu-img (C(qemu-utils) on Debian and Ubuntu) on the managed host
  - dpkg and apt-get for O(package)
seealso:
  - module: gpuvirt.kvm.kvm_vm
  - name: The image store guide
    description: How the store works, naming, sources and what is refused.
    link: https://example.invalid/gpuvirt/kvm/docs/images.md
"""

EXAMPLES = r"""
- name: Install a DGX OS image from the mirror (the first version becomes the default)
  gpuvirt.kvm.kvm_image:
    name: dgx-os
    version: "6.2"
    src: https://mirror.example.com/images/dgx-os-6.2.qcow2
    checksum: sha256:5f1c0b5fd1a1c4bce30a6a3d25c3a6e52f2e1d7b8fd0f9d1c2b3a4e5f6a7b8c9

- name: Install the image that NVIDIA's package ships, as nvidia-vm did
  gpuvirt.kvm.kvm_image:
    name: dgx-kvm-image
    version: 4-0-5
    package: dgx-kvm-image-4-0-5

- name: Install a locally built image and make it the default for new VMs
  gpuvirt.kvm.kvm_image:
    name: dgx-os
    version: "6.3"
    src: /srv/build/dgx-os-6.3.qcow2
    state: default

- name: List the store and which VMs use each image
  gpuvirt.kvm.kvm_image:
    name: dgx-os
  register: store

- name: Remove an old version (fails while a VM's disk is built on it)
  gpuvirt.kvm.kvm_image:
    name: dgx-os
    version: "6.1"
    state: absent
"""

RETURN = r"""
image:
  description: The image O(name) O(version) (or the default of O(name) when no version is
    given) after the run; V(null) with O(state=absent). In check mode, the predicted image.
  returned: success
  type: dict
  contains:
    name: {description: Image name., type: str, sample: dgx-os}
    version: {description: Version., type: str, sample: "6.2"}
    ref: {description: The name-version that M(gpuvirt.kvm.kvm_vm) accepts as its C(image)., type: str, sample: dgx-os-6.2}
    path: {description: The image file., type: str, sample: /var/lib/gpuvirt/images/dgx-os-6.2.qcow2}
    format: {description: V(qcow2) or V(raw)., type: str, sample: qcow2}
    size: {description: File size in bytes (0 when predicted in check mode)., type: int, sample: 912261120}
    virtual_size: {description: "Disk size the guest sees, in bytes.", type: int, sample: 21474836480}
    sha256: {description: SHA-256 of the file when known., type: str, sample: 9f2c...e1}
    source: {description: Where it was installed from., type: str, sample: https://mirror.example.com/images/dgx-os-6.2.qcow2}
    is_default: {description: Whether the default alias of its name points to it., type: bool, sample: true}
    used_by: {description: Domains whose disk chains use it., type: list, elements: str, sample: [train-a]}
    base_of: {description: Store images built on it (their backing file)., type: list, elements: str, sample: []}
images:
  description: Every image in the store after the run, with the keys of RV(image).
  returned: success
  type: list
  elements: dict
  sample:
    - {name: dgx-os, version: "6.1", ref: dgx-os-6.1, path: /var/lib/gpuvirt/images/dgx-os-6.1.qcow2,
       format: qcow2, size: 901775360, virtual_size: 21474836480, sha256: 3b0d...7a, source: /srv/dgx-os-6.1.qcow2,
       is_default: false, used_by: [dev-c], base_of: []}
    - {name: dgx-os, version: "6.2", ref: dgx-os-6.2, path: /var/lib/gpuvirt/images/dgx-os-6.2.qcow2,
       format: qcow2, size: 912261120, virtual_size: 21474836480, sha256: 9f2c...e1, source: /srv/dgx-os-6.2.qcow2,
       is_default: true, used_by: [train-a, train-b], base_of: []}
actions:
  description: What was done (or in check mode, would be done), one line each. Empty when
    nothing changed.
  returned: success
  type: list
  elements: str
  sample: ["installed dgx-os-6.2 from /srv/dgx-os-6.2.qcow2 (qcow2, 870.0 MiB)", "made dgx-os-6.2 the default of dgx-os"]
store:
  description: The store folder.
  returned: success
  type: str
  sample: /var/lib/gpuvirt/images
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

# _bytecode first: it compiles the module_utils imported after it once per run (see there).
from ansible_collections.gpuvirt.kvm.plugins.module_utils import _bytecode  # noqa: F401 pylint: disable=unused-import
from ansible_collections.gpuvirt.kvm.plugins.module_utils._argspec import libvirt_argspec
from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import DomainXmlError
from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import disk_chains
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_context import resolve_uri
from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_store import DEFAULT_STORE
from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_task import ImageTask
from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
    LibvirtGateway,
    LibvirtGatewayError,
    has_libvirt,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._lock import (
    HostLock,
    HostLockError,
    lock_argspec,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._qemu_img import ImagesError


def main():
    argument_spec = dict(
        name=dict(type="str", required=True),
        version=dict(type="str"),
        src=dict(type="str"),
        checksum=dict(type="str"),
        package=dict(type="str"),
        package_image=dict(type="str"),
        store=dict(type="path", default=DEFAULT_STORE),
        state=dict(type="str", choices=["present", "absent", "default"], default="present"),
        force=dict(type="bool", default=False),
    )
    argument_spec.update(libvirt_argspec())
    argument_spec.update(lock_argspec())
    module = AnsibleModule(
        argument_spec=argument_spec,
        mutually_exclusive=[("src", "package")],
        required_if=[("state", "default", ["version"])],
        required_by={"src": "version", "package": "version", "package_image": "package"},
        supports_check_mode=True,
    )
    p = module.params
    if not has_libvirt():
        module.fail_json(msg=missing_required_lib("libvirt-python"))
    uri = resolve_uri(p["uri"])

    def usage_reader():
        # Which domains use which files: read under the lock, right before the store changes.
        with LibvirtGateway(uri) as gateway:
            return disk_chains(gateway.list_domains(live=True), gateway.volume_path)

    try:
        lock = HostLock(p["lock_path"], p["lock_timeout"],
                        owner="kvm_image %s %s" % (p["name"], p["version"] or ""))
        task = ImageTask(p, check_mode=module.check_mode, usage_reader=usage_reader, lock=lock)
        result = task.run()
    except LibvirtGatewayError as exc:
        module.fail_json(msg="uri: %s; kvm_image reads which domains use an image from "
                         "libvirt" % exc)
    except (ImagesError, HostLockError, DomainXmlError) as exc:
        module.fail_json(msg=str(exc))
    for warning in result.pop("warnings"):
        module.warn(warning)
    diff = result.pop("diff")
    if module._diff:
        result["diff"] = diff
    module.exit_json(**result)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: kvm_image_info
short_description: List the images of a gpuvirt image store and the domains that use each
version_added: 0.1.0
description:
  - Lists every image in the store of M(gpuvirt.kvm.kvm_image) - name, version, format, sizes,
    digest, source, whether it is its name's default - with the libvirt domains whose disk
    chains use it and the store images built on it.
  - Reads only; takes no lock. Use it to see which images can go (those with empty
    RV(images[].used_by) and RV(images[].base_of)) before removing them with
    M(gpuvirt.kvm.kvm_image).
author:
  - gpuvirt.kvm contributors (@gpuvirt)
extends_documentation_fragment:
  - gpuvirt.kvm.host.LIBVIRT
  - gpuvirt.kvm.bytecode
attributes:
  check_mode:
    support: full
    description: Reads the same in check mode.
  diff_mode:
    support: none
    description: It changes nothing, so there is no difference to show.
  idempotent:
    support: full
    description: Never changes anything.
options:
  name:
    description: Only the versions of this image name. All images when not set.
    type: str
  store:
    description: The image store of M(gpuvirt.kvm.kvm_image).
    type: path
    default: /var/lib/gpuvirt/images
"""

EXAMPLES = r"""
- name: List the store
  gpuvirt.kvm.kvm_image_info:
  register: store

- name: Show the images no VM uses any more
  ansible.builtin.debug:
    msg: "{{ store.images | rejectattr('used_by') | rejectattr('base_of') | map(attribute='ref') }}"

- name: The versions of dgx-os
  gpuvirt.kvm.kvm_image_info:
    name: dgx-os
  register: dgx_os
"""

RETURN = r"""
images:
  description: The images, by name and version (natural order). Empty when the store does
    not exist yet.
  returned: always
  type: list
  elements: dict
  contains:
    name: {description: Image name., type: str, sample: dgx-os}
    version: {description: Version., type: str, sample: "6.2"}
    ref: {description: The name-version that M(gpuvirt.kvm.kvm_vm) accepts as its C(image)., type: str, sample: dgx-os-6.2}
    path: {description: The image file., type: str, sample: /var/lib/gpuvirt/images/dgx-os-6.2.qcow2}
    format: {description: V(qcow2) or V(raw)., type: str, sample: qcow2}
    size: {description: File size in bytes., type: int, sample: 912261120}
    virtual_size: {description: "Disk size the guest sees, in bytes.", type: int, sample: 21474836480}
    sha256: {description: SHA-256 of the file when recorded at install., type: str, sample: 9f2c...e1}
    source: {description: Where it was installed from., type: str, sample: /srv/dgx-os-6.2.qcow2}
    is_default: {description: Whether the default alias of its name points to it., type: bool, sample: true}
    used_by: {description: Domains whose disk chains use it., type: list, elements: str, sample: [train-a]}
    base_of: {description: Store images built on it (their backing file)., type: list, elements: str, sample: []}
store:
  description: The store folder.
  returned: always
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
from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_store import (
    DEFAULT_STORE,
    ImageStore,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
    LibvirtGateway,
    LibvirtGatewayError,
    has_libvirt,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._qemu_img import ImagesError, disk_usage


def main():
    argument_spec = dict(
        name=dict(type="str"),
        store=dict(type="path", default=DEFAULT_STORE),
    )
    argument_spec.update(libvirt_argspec())
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    p = module.params
    if not has_libvirt():
        module.fail_json(msg=missing_required_lib("libvirt-python"))
    store = ImageStore(p["store"])
    try:
        images, warnings = store.scan()
        with LibvirtGateway(resolve_uri(p["uri"])) as gateway:
            chains = disk_chains(gateway.list_domains(live=True), gateway.volume_path)
        usage, more = disk_usage(chains)
    except LibvirtGatewayError as exc:
        module.fail_json(msg="uri: %s; kvm_image_info reads which domains use an image from "
                         "libvirt" % exc)
    except (ImagesError, DomainXmlError) as exc:
        module.fail_json(msg=str(exc))
    for warning in warnings + [w for w in more if w not in warnings]:
        module.warn(warning)
    images = store.annotate(images, usage)
    if p["name"] is not None:
        images = [i for i in images if i.name == p["name"]]
    module.exit_json(changed=False, images=[i.to_dict() for i in images], store=store.root)


if __name__ == "__main__":
    main()

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: image_prune_candidates
short_description: The image versions that may be pruned from a store
version_added: 0.2.0
description:
  - From the store listing of M(gpuvirt.kvm.kvm_image) (its RV(gpuvirt.kvm.kvm_image#module:images)),
    returns the versions of the names in O(listed) that lie beyond the newest O(keep) of their
    name and that nothing needs - not the default of their name, not used by any domain, no
    other image built on them, and not listed themselves.
  - Versions compare part by part, numbers as numbers (C(4-0-10) > C(4-0-9) > C(4-0)).
  - Names not in O(listed) are never pruned.
positional: _input, keep, listed
options:
  _input:
    description: The store's images (RV(gpuvirt.kvm.kvm_image#module:images)).
    type: list
    elements: dict
    required: true
  keep:
    description: How many versions of each name to keep, newest first. V(0) keeps none but the
      protected ones.
    type: int
    required: true
  listed:
    description: The role's image entries (dicts with C(name) and C(version)).
    type: list
    elements: dict
    required: true
author:
  - gpuvirt.kvm contributors (@gpuvirt)
"""

EXAMPLES = r"""
- name: Prune
  gpuvirt.kvm.kvm_image:
    name: "{{ item.name }}"
    version: "{{ item.version }}"
    state: absent
  loop: "{{ store.images | gpuvirt.kvm.image_prune_candidates(2, images) }}"
"""

RETURN = r"""
_value:
  description: The images to remove, entries of O(_input), oldest first.
  type: list
  elements: dict
"""

import re

from ansible.errors import AnsibleFilterError


def version_key(version):
    """'4-0-10' -> ((1, 4), (1, 0), (1, 10)): numbers as numbers, text after numbers."""
    parts = re.findall(r"\d+|[A-Za-z]+", str(version))
    return tuple((1, int(p)) if p.isdigit() else (0, p) for p in parts)


def image_prune_candidates(images, keep, listed):
    if not isinstance(images, list) or not isinstance(listed, list):
        raise AnsibleFilterError("image_prune_candidates: expected the store's images and the "
                                 "listed entries as lists")
    try:
        keep = int(keep)
    except (TypeError, ValueError) as exc:
        raise AnsibleFilterError(
            "image_prune_candidates: keep must be a number, got %r" % (keep,)) from exc
    if keep < 0:
        raise AnsibleFilterError("image_prune_candidates: keep must be 0 or more, got %d" % keep)
    names = {str(e.get("name")) for e in listed if isinstance(e, dict)}
    wanted = {(str(e.get("name")), str(e.get("version"))) for e in listed if isinstance(e, dict)}
    out = []
    for name in sorted(names):
        versions = sorted((i for i in images if i.get("name") == name),
                          key=lambda i: version_key(i.get("version")), reverse=True)
        for image in versions[keep:]:
            if image.get("is_default") or image.get("used_by") or image.get("base_of"):
                continue
            if (name, str(image.get("version"))) in wanted:
                continue
            out.append(image)
    return sorted(out, key=lambda i: (i["name"], version_key(i.get("version"))))


class FilterModule:
    def filters(self):
        return {"image_prune_candidates": image_prune_candidates}

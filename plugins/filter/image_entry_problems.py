# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: image_entry_problems
short_description: What is wrong with a list of guest image entries, one message per problem
version_added: 0.2.0
description:
  - Checks the image entries of the C(gpuvirt.kvm.guest_image) role before anything is
    installed - each needs C(name) and C(version), exactly one of C(src) and C(package), a
    C(checksum) (C(sha256:<hex>) or C(sha512:<hex>)) with C(src), no unknown keys, no
    name-version twice, at most one C(default) per name - and returns one message per problem,
    naming the entry. An empty list means the entries are fine.
positional: _input
options:
  _input:
    description: The entries.
    type: list
    elements: dict
    required: true
author:
  - gpuvirt.kvm contributors (@gpuvirt)
"""

EXAMPLES = r"""
- name: Check the entries
  ansible.builtin.assert:
    that: images | gpuvirt.kvm.image_entry_problems | length == 0
    fail_msg: "{{ images | gpuvirt.kvm.image_entry_problems | join('; ') }}"
"""

RETURN = r"""
_value:
  description:
    - >-
      One message per problem, naming the entry, for example
      C(guest_image_images[1] (dgx-os 6.2\): checksum is missing; src needs one ...).
  type: list
  elements: str
"""

import re

KEYS = ("name", "version", "src", "checksum", "package", "package_image", "default")
CHECKSUM = re.compile(r"^(sha256:[0-9a-fA-F]{64}|sha512:[0-9a-fA-F]{128})$")


def image_entry_problems(entries, option="guest_image_images"):
    if not isinstance(entries, list):
        return ["%s: expected a list of image entries, got %r" % (option, entries)]
    problems = []
    seen = {}
    defaults = {}
    for n, entry in enumerate(entries):
        where = "%s[%d]" % (option, n)
        if not isinstance(entry, dict):
            problems.append("%s: expected a dict with name, version, src and checksum (or "
                            "package), got %r" % (where, entry))
            continue
        name, version = entry.get("name"), entry.get("version")
        if name is not None and version is not None:
            where += " (%s %s)" % (name, version)
        unknown = sorted(k for k in entry if k not in KEYS)
        if unknown:
            problems.append("%s: unknown key(s) %s; accepted: %s" % (
                where, ", ".join(unknown), ", ".join(KEYS)))
        for key in ("name", "version"):
            if entry.get(key) in (None, ""):
                problems.append("%s: %s is missing" % (where, key))
        has_src, has_pkg = bool(entry.get("src")), bool(entry.get("package"))
        if has_src == has_pkg:
            problems.append("%s: give exactly one of src (a path or URL) and package" % where)
        if has_src and not entry.get("checksum"):
            problems.append("%s: checksum is missing; src needs one, sha256:<hex> or "
                            "sha512:<hex> (sha256sum FILE prints the hex)" % where)
        elif entry.get("checksum") and not CHECKSUM.match(str(entry["checksum"])):
            problems.append("%s: checksum %r is not sha256:<64 hex> or sha512:<128 hex>"
                            % (where, entry["checksum"]))
        if name is not None and version is not None:
            key = (str(name), str(version))
            if key in seen:
                problems.append("%s: listed twice (also %s)" % (where, seen[key]))
            seen.setdefault(key, "%s[%d]" % (option, n))
            if entry.get("default"):
                defaults.setdefault(str(name), []).append(str(version))
    for name, versions in sorted(defaults.items()):
        if len(versions) > 1:
            problems.append("%s: %s has default: true on several versions (%s); mark one" % (
                option, name, ", ".join(versions)))
    return problems


class FilterModule:
    def filters(self):
        return {"image_entry_problems": image_entry_problems}

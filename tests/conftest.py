# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Make ``ansible_collections.gpuvirt.kvm`` importable when pytest runs from a plain checkout.

ansible-test puts the collection on sys.path itself; a plain ``pytest`` run from the repository
gets the same import path through a symlink farm under ``.build/`` (git-ignored).
"""

import os
import sys

try:
    import ansible_collections.gpuvirt.kvm.plugins.module_utils  # noqa: F401 pylint: disable=unused-import
except ImportError:
    _repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _farm = os.path.join(_repo, ".build", "pytest")
    _link = os.path.join(_farm, "ansible_collections", "gpuvirt", "kvm")
    if not os.path.islink(_link):
        os.makedirs(os.path.dirname(_link), exist_ok=True)
        try:
            os.symlink(_repo, _link)
        except FileExistsError:
            pass
    sys.path.insert(0, _farm)
    # ansible's collection loader is not needed for plain imports of module_utils.

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment:
    # module_utils._bytecode: the managed host's cache of the collection's compiled module_utils.
    # ansible-doc refuses a fragment without options or attributes: it has none of its own.
    DOCUMENTATION = r"""
options: {}
notes:
  - On the managed host, the module keeps the collection's compiled Python code (its
    module_utils) in C(~/.cache/gpuvirt.kvm/bytecode) of the user it runs as, so that later runs
    do not compile it again (about 0.15 s of each run). An entry is used only for the same
    source (by SHA-256) and Python, and only while the folder and the file belong to that user
    and nobody else can write them. Set the environment variable C(GPUVIRT_BYTECODE_CACHE) to
    another folder, or to V(off) to store nothing (the C(environment) keyword of a play or task
    does this).
"""

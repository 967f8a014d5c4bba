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
  - On the managed host, the module compiles the collection's Python code (its module_utils)
    once per run. Set the environment variable C(GPUVIRT_BYTECODE_CACHE) to V(on) (or to a
    folder) to keep the compiled code in C(~/.cache/gpuvirt.kvm/bytecode) of the user the module
    runs as, so that later runs do not compile it again (about 0.05 s of each run; the
    C(environment) keyword of a play or task sets it). An entry is used only for the same source
    (by SHA-256) and Python, and only while the folder and the file belong to that user and
    nobody else can write them. See the collection's docs/bytecode.md.
"""

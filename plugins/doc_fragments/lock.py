# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment:
    # The host-wide allocation lock (module_utils._lock.lock_argspec() is its argument spec).
    DOCUMENTATION = r"""
options:
  lock_path:
    description:
      - The file whose exclusive C(flock) serialises every gpuvirt run on the host that reads
        allocations or disk usage and then changes them, so that two runs (two AWX jobs, two
        playbooks) never hand out the same GPU or remove an image another run is building on.
      - The folder is created when missing. The kernel releases the lock when its holder exits,
        however it exits; there is never a stale lock to remove.
      - Every run on a host must use the same path for the lock to protect anything.
    type: path
    default: /run/gpuvirt/alloc.lock
  lock_timeout:
    description:
      - Seconds to wait for the lock while another run holds it. The error then names the
        lock file and the holder (its process ID and what it is doing).
      - V(0) tries once and fails at once when the lock is held.
    type: int
    default: 300
"""

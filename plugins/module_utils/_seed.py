# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""cloud-init NoCloud seed ISOs: the only caller of genisoimage (or mkisofs, xorrisofs).
Private to this collection. What goes into the seed is ``_cloud_init``'s (pure) work."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

ISO_TOOLS = ("genisoimage", "mkisofs", "xorrisofs")


class SeedError(Exception):
    """The seed ISO could not be written."""


def iso_tool():
    for tool in ISO_TOOLS:
        path = shutil.which(tool)
        if path:
            return path
    return None


def write_iso(path, files):
    """Write a NoCloud seed ISO (volume id cidata) atomically to path."""
    tool = iso_tool()
    if tool is None:
        raise SeedError("cloud_init needs genisoimage, mkisofs or xorrisofs on the host "
                        "(Debian: apt-get install genisoimage); none was found")
    folder = tempfile.mkdtemp(prefix=".seed-", dir=os.path.dirname(path) or ".")
    try:
        for name, text in files.items():
            with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
                handle.write(text)
        tmp_iso = os.path.join(folder, "seed.iso")
        argv = [tool, "-quiet", "-output", tmp_iso, "-volid", "cidata", "-joliet", "-rock"]
        argv += [os.path.join(folder, n) for n in sorted(files)]
        # Not AnsibleModule.run_command: this runs outside modules too (tests, tools).
        proc = subprocess.run(  # pylint: disable=ansible-bad-function
            argv, capture_output=True, text=True, check=False,
            env=dict(os.environ, LANG="C", LC_ALL="C"))
        if proc.returncode != 0:
            raise SeedError("%s failed (exit %d): %s" % (os.path.basename(tool), proc.returncode,
                                                         proc.stderr.strip()))
        # Only its owner (root; libvirt hands it to QEMU when the VM starts) may read it: it
        # can hold the password hash of cloud_init.
        os.chmod(tmp_iso, 0o600)
        os.replace(tmp_iso, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

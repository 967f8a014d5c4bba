#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# VMs that really start on this machine's libvirtd, driven from Python (files/test_real_vms.py):
# the libvirt gateway's lifecycle, and a VM pinned on this machine's own topology.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# ansible-test points ANSIBLE_COLLECTIONS_PATH at the folder that holds ansible_collections/.
collections=${ANSIBLE_COLLECTIONS_PATH%%:*}
[ -d "$collections/ansible_collections/gpuvirt/kvm" ] || {
  echo "real_vms: the collection is not under $collections" >&2; exit 1; }
cd "$(mktemp -d /tmp/gvt-real-vms.XXXXXX)"
PYTHONPATH="$collections" python -m pytest -q -p no:cacheprovider --rootdir . \
  "$here/files/test_real_vms.py"

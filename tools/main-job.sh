#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# The README's main job: plan a mixed day of GPU tenants (8 + 4 + 2 + 1 + 1 GPUs) on the bundled
# DGX-2 profile - a kernel-shaped sysfs tree of a DGX-2 (16 V100, 12 NVSwitches, 2 NUMA nodes)
# built from tests/fixtures/hosts/dgx2.yml - and print the allocation map. Nothing is created.
# Called by `make main` (which first sets up .venv); extra arguments go to ansible-playbook,
# e.g. `make main MAIN_ARGS='-e @my-day.yml'`.
set -euo pipefail
cd "$(dirname "$0")/.."
hosts=.build/hosts
if [ ! -d "$hosts/dgx2/sys" ]; then
  rm -rf "$hosts/dgx2"
  python tests/fixtures/sysfs_builder.py dgx2 "$hosts/dgx2" >/dev/null
fi
python=$(command -v python)
export ANSIBLE_COLLECTIONS_PATH="$PWD/.build"  # the synced copy: ansible_collections/gpuvirt/kvm
export ANSIBLE_CALLBACK_RESULT_FORMAT=yaml ANSIBLE_NOCOLOR=1 ANSIBLE_LOCALHOST_WARNING=0
export ANSIBLE_INVENTORY_UNPARSED_WARNING=0
# The libvirt test driver holds no domains: the plan starts from an empty DGX-2.
exec ansible-playbook -i localhost, -c local \
  -e "ansible_python_interpreter=$python" \
  -e "gpuvirt_sysfs_root=$PWD/$hosts/dgx2/sys gpuvirt_proc_root=$PWD/$hosts/dgx2/proc" \
  -e "gpuvirt_libvirt_uri=test:///default" \
  gpuvirt.kvm.plan_tenants "$@"

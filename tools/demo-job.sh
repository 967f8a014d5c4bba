#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# The offline demo (make demo): converge the demo layout (playbooks/demo.yml) on this machine's own
# libvirt - two CPU-only tenants run for real, pinned and tuned - and place a mixed day of GPU
# tenants (8+4+2+1+1 GPUs) on the bundled DGX-2 profile, a kernel-shaped sysfs tree of a DGX-2
# built from tests/fixtures/hosts/dgx2.yml, shown as a check-mode plan with domain XML.
# A second run is a no-op. `tools/demo-job.sh --down` removes the demo VMs.
# Called by `make demo` (after `make setup`); other arguments go to ansible-playbook.
set -euo pipefail
cd "$(dirname "$0")/.."
# Run from make (venv on PATH) or by hand: the project's venv has ansible and libvirt-python.
[ -x .venv/bin/ansible-playbook ] && PATH="$PWD/.venv/bin:$PATH"
state=running
if [ "${1:-}" = "--down" ]; then
  state=absent
  shift
fi
build=$PWD/.build
if [ ! -d "$build/hosts/dgx2/sys" ]; then
  rm -rf "$build/hosts/dgx2"
  python tests/fixtures/sysfs_builder.py dgx2 "$build/hosts/dgx2" >/dev/null
fi
bash tools/start-libvirt.sh >/dev/null
python=$(command -v python)
export ANSIBLE_COLLECTIONS_PATH="$build"  # the synced copy: ansible_collections/gpuvirt/kvm
export ANSIBLE_CALLBACK_RESULT_FORMAT=yaml ANSIBLE_NOCOLOR=1 ANSIBLE_LOCALHOST_WARNING=0
export ANSIBLE_INVENTORY_UNPARSED_WARNING=0
exec ansible-playbook -i localhost, -c local \
  -e "ansible_python_interpreter=$python" \
  -e "gpuvirt_demo_dir=$build/demo gpuvirt_demo_state=$state" \
  -e "gpuvirt_dgx2_sysfs_root=$build/hosts/dgx2/sys gpuvirt_dgx2_proc_root=$build/hosts/dgx2/proc" \
  gpuvirt.kvm.demo "$@"

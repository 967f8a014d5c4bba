#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# The offline demo (make demo): converge the demo layout (playbooks/demo.yml) on this machine's own
# libvirt - two CPU-only tenants run for real, pinned and tuned, and a Linux tenant boots a guest
# image built here (kvm_image_build) and is reached over SSH - and place a mixed day of GPU
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
# The Linux tenant's login key (the demo folder is libvirt-readable; the key's folder is not).
key=$build/demo-ssh/id_ed25519
if [ ! -s "$key" ]; then
  mkdir -p "$(dirname "$key")" && chmod 0700 "$(dirname "$key")"
  ssh-keygen -q -t ed25519 -N '' -C gpuvirt-demo -f "$key"
fi
ansible-playbook -i localhost, -c local \
  -e "ansible_python_interpreter=$python" \
  -e "gpuvirt_demo_dir=$build/demo gpuvirt_demo_state=$state gpuvirt_demo_ssh_key=$key.pub" \
  -e "gpuvirt_dgx2_sysfs_root=$build/hosts/dgx2/sys gpuvirt_dgx2_proc_root=$build/hosts/dgx2/proc" \
  gpuvirt.kvm.demo "$@"
[ "$state" = running ] || exit 0

# Reach the Linux tenant: SSH forwarded from 127.0.0.1 (QEMU user networking lets nothing in).
port=${GPUVIRT_DEMO_SSH_PORT:-2224}
python tools/demo-forward.py demo-linux "$port"
ssh_cmd=(ssh -i "$key" -p "$port" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
         -o LogLevel=ERROR demo@127.0.0.1)
# shellcheck disable=SC2016  # expanded in the guest
facts='echo "$(hostname), $(. /etc/os-release && echo "$PRETTY_NAME"), kernel $(uname -r),'\
' $(nproc) vCPUs, data disk $(findmnt -n -o SOURCE /data) on /data"'
echo "demo: waiting for demo-linux to boot (under TCG here, about a minute)..."
for _ in $(seq 1 100); do
  if "${ssh_cmd[@]}" -o ConnectTimeout=5 -o BatchMode=yes true 2>/dev/null; then
    echo "demo: demo-linux is up: $("${ssh_cmd[@]}" -o BatchMode=yes "$facts")"
    printf '\n  console:  %s\n  SSH:      %s\n  remove:   %s\n' \
      "virsh -c qemu:///system console demo-linux   (boot messages, a login prompt; Ctrl-] leaves)" \
      "${ssh_cmd[*]}" "make demo MAIN_ARGS=--down   (the data disks stay)"
    exit 0
  fi
  sleep 3
done
echo "demo: demo-linux did not answer SSH on 127.0.0.1:$port within 300 s;" \
  "see its console: virsh -c qemu:///system console demo-linux" >&2
exit 1

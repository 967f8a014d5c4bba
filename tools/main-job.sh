#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# The README's main job, on the lab (tests/lab/README.md): a mini GPU server VM on this machine
# whose GPUs are QEMU stand-ins, everything else about passthrough real.
#   1. lab up          build the lab's Debian image (first time only, ~2 min) and boot it
#   2. convert_host    the lab becomes a shared-NVSwitch KVM host, as an HGX H100 is run
#                      (tests/lab/platform-shared.yml): packages, IOMMU kernel arguments, the
#                      stand-in GPUs bound to vfio-pci, the NVSwitches kept for Fabric Manager
#                      (the lab's stand-in package, tests/lab/make-fm-package.sh) in shared mode,
#                      the libvirt hook; it reboots when it must (first time ~10 min)
#   3. install_images  a tiny guest image into the lab's image store
#   4. deploy_tenants  the day layout: 2-GPU, 1-GPU and CPU-only tenants start inside the lab,
#                      their stand-in GPUs passed through by vfio, each GPU tenant's Fabric
#                      Manager partition activated by the hook as it starts
#   5. the allocation map, GPU by GPU, with the active partitions, and what each step changed
# A second run changes nothing (each step reports changed=0). Called by `make main` after
# `make setup`; `tools/main-job.sh --down` tears the tenants down and reverts the lab to a plain
# server (`make lab-down` then removes the lab VM itself).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/ansible-playbook ] && PATH="$PWD/.venv/bin:$PATH"
bash tools/start-libvirt.sh >/dev/null
export ANSIBLE_COLLECTIONS_PATH="$PWD/.build" ANSIBLE_NOCOLOR=1 ANSIBLE_LOCALHOST_WARNING=0
export ANSIBLE_CALLBACK_RESULT_FORMAT=yaml
inventory=tests/lab/.state/inventory.ini
state=tests/lab/.state
started=$(date +%s)
summary=()

step() { printf '\n===== [%s, +%ss] %s\n' "$(date -u +%H:%M:%S)" "$(( $(date +%s) - started ))" "$*"; }

run() {  # run LABEL ansible-playbook ARGS...: show progress, keep the recap's changed count
  local label=$1 t0 rc changed
  shift
  t0=$(date +%s)
  set +e
  ansible-playbook -i "$inventory" "$@" 2>&1 | tee "$state/main-$label.log" |
    grep --line-buffered -E '^(TASK|PLAY|fatal|failed|changed:)' | sed -u 's/ \*\**$//'
  rc=${PIPESTATUS[0]}
  set -e
  changed=$(grep -oE 'changed=[0-9]+' "$state/main-$label.log" | awk -F= '{ n += $2 } END { print n + 0 }')
  summary+=("$(printf '%-16s rc=%s changed=%s %ss' "$label" "$rc" "${changed:-0}" \
    "$(( $(date +%s) - t0 ))")")
  if [ "$rc" != 0 ]; then
    echo "main-job: $label failed (rc $rc); the whole output is in $state/main-$label.log" >&2
    tail -n 30 "$state/main-$label.log" >&2
    exit "$rc"
  fi
}

if [ "${1:-}" = "--down" ]; then
  [ -f "$inventory" ] || { echo "main-job: no lab is up"; exit 0; }
  step "teardown_tenants on the lab"
  run teardown gpuvirt.kvm.teardown_tenants -e "@$state/tenants.yml"
  step "revert_host: the lab back to a plain server (reboots)"
  run revert gpuvirt.kvm.revert_host -e kvm_host_allow_reboot=true \
    -e "kvm_host_platform=$(sed -n 's/^gpuvirt_lab_platform_shared=//p' "$inventory")"
  printf '%s\n' "${summary[@]}"
  exit 0
fi

step "1/5 lab up (the first time builds a Debian image and boots it: about 5 minutes)"
t0=$(date +%s)
make --no-print-directory lab-up
summary+=("$(printf '%-16s %ss' lab-up "$(( $(date +%s) - t0 ))")")
platform=$(sed -n 's/^gpuvirt_lab_platform_shared=//p' "$inventory")

step "2/5 convert_host, shared NVSwitch (the first time installs QEMU/libvirt and the stand-in Fabric Manager in the lab and reboots it: ~10 min)"
run prepare_fabric tests/lab/prepare_fabric.yml
run convert_host gpuvirt.kvm.convert_host -e kvm_host_allow_reboot=true -e "@$state/fabric.yml"

step "3/5 install_images: a tiny guest image (its boot sector halts) into the lab's store"
run prepare tests/lab/prepare_tenants.yml -e "lab_tenants_platform=$platform"
run install_images gpuvirt.kvm.install_images -e "@$state/tenants.yml"

step "4/5 deploy_tenants -e layout=day: GPU tenants start in the lab, stand-ins passed through"
run deploy_tenants gpuvirt.kvm.deploy_tenants -e layout=day -e "@$state/tenants.yml"

step "5/5 the lab's allocation map, with Fabric Manager's active partitions"
ansible -i "$inventory" gpuvirt_lab -m gpuvirt.kvm.gpu_topology \
  -a "{\"platform\": \"$platform\", \"fabric_manager\": {}}" \
  -o 2>/dev/null > "$state/main-map.json" || true
python3 - "$state/main-map.json" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
result = json.loads(text[text.index("{"):])
print("\n".join(result["allocation_map"]))
PY
echo
printf '%s\n' "${summary[@]}"
echo "A second run of make main changes nothing (every step changed=0)."

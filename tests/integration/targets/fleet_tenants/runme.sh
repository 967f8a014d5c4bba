#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# A fleet of three hosts, each with its own topology and its own private libvirtd, driven by the
# collection's playbooks run by FQCN, as an admin or AWX runs them. See aliases for the hosts.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
setup=$here/../setup_kvm_vm/files
fixtures=$here/../../../fixtures
python=$(command -v python)
hosts=(gpu-a gpu-b cpu-c)
scratch=$(mktemp -d /tmp/gvt-fleet.XXXXXX)
chmod 0755 "$scratch"  # QEMU runs as libvirt-qemu and must reach the disks
inventory=$scratch/inventory.yml

cleanup() {
  for h in "${hosts[@]}"; do
    bash "$here/files/private_libvirtd.sh" stop "$scratch/$h/libvirt" || true
  done
  rm -rf "$scratch"
}
trap cleanup EXIT

step() { printf '\n=== fleet_tenants: %s\n' "$*"; }

step "three private libvirtds, two fixture topologies, a tiny image"
for h in "${hosts[@]}"; do
  bash "$here/files/private_libvirtd.sh" start "$scratch/$h/libvirt"
done
"$python" "$fixtures/sysfs_builder.py" dgx2 "$scratch/gpu-a/fx" >/dev/null
"$python" "$fixtures/sysfs_builder.py" dgx-a100 "$scratch/gpu-b/fx" >/dev/null
bash "$setup/make_halt_image.sh" "$scratch/tiny.qcow2"
checksum=$(sha256sum "$scratch/tiny.qcow2" | cut -d' ' -f1)
sed -e "s|SCRATCH|$scratch|g" -e "s|PYTHON|$python|g" -e "s|CHECKSUM|$checksum|g" \
  "$here/files/inventory.yml.j2" > "$inventory"
uris=()
for h in "${hosts[@]}"; do
  uris+=("$h=qemu:///system?socket=$scratch/$h/libvirt/run/libvirt-sock")
done
# A domain this collection did not make, on cpu-c: nothing may ever touch it.
cat > "$scratch/foreign.xml" <<XML
<domain type='qemu'><name>c-foreign</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type></os></domain>
XML
virsh -q -c "qemu:///system?socket=$scratch/cpu-c/libvirt/run/libvirt-sock" \
  define "$scratch/foreign.xml" >/dev/null

playbook() {  # playbook NAME [ARGS...]: run gpuvirt.kvm.NAME, keep its output and rc
  local name=$1
  shift
  set +e
  ansible-playbook -i "$inventory" "gpuvirt.kvm.$name" "$@" > "$scratch/$name.log" 2>&1
  rc=$?
  set -e
  echo "ansible-playbook gpuvirt.kvm.$name $* -> rc $rc"
}

check() {  # check STEP: compare every host's domains (and the reports) with what STEP expects
  "$python" "$here/files/fleet_state.py" "${uris[@]}" > "$scratch/state.json"
  if ! "$python" "$here/files/check_fleet.py" "$1" "$scratch/state.json" "$scratch/reports" \
      "$scratch"; then
    echo "--- what ansible-playbook printed:"
    tail -n 60 "$scratch"/*.log
    exit 1
  fi
}

step "install_images on every host"
playbook install_images
[ "$rc" = 0 ] || { tail -n 40 "$scratch/install_images.log"; exit 1; }
check images

step "install_images with an entry without a checksum: refused, nothing installed"
cat > "$scratch/bad-images.yml" <<YAML
guest_image_images:
  - {name: tiny, version: "2.0", src: $scratch/tiny.qcow2}
YAML
playbook install_images -e "@$scratch/bad-images.yml"
[ "$rc" = 2 ] || { tail -n 40 "$scratch/install_images.log"; exit 1; }
grep -q "guest_image_images\[0\] (tiny 2.0): checksum is missing" "$scratch/install_images.log" || {
  tail -n 40 "$scratch/install_images.log"; exit 1; }
if ls "$scratch"/*/images/tiny-2.0* >/dev/null 2>&1; then
  echo "install_images installed tiny 2.0 although its entry had no checksum" >&2
  exit 1
fi
check images

step "plan_tenants -e layout=day: the plan's page, nothing created"
playbook plan_tenants -e layout=day -e "gpuvirt_picture=$scratch/pictures/plan.html"
[ "$rc" = 0 ] || { tail -n 60 "$scratch/plan_tenants.log"; exit 1; }
check plan

step "deploy_tenants -e layout=day, with the fleet page written to gpuvirt_picture"
playbook deploy_tenants -e layout=day -e "gpuvirt_picture=$scratch/pictures/day.html"
[ "$rc" = 0 ] || { tail -n 60 "$scratch/deploy_tenants.log"; exit 1; }
check day

step "deploy_tenants again: nothing changes"
playbook deploy_tenants -e layout=day
[ "$rc" = 0 ] || { tail -n 60 "$scratch/deploy_tenants.log"; exit 1; }
check day-again

step "deploy_tenants with an unknown layout: every host refuses, nothing changes"
playbook deploy_tenants -e layout=weekend
[ "$rc" = 2 ] || { tail -n 60 "$scratch/deploy_tenants.log"; exit 1; }
grep -q "gpu-b has no layout named 'weekend' (gpu_vms_layouts has: day, night, night-fixed)" \
  "$scratch/deploy_tenants.log"
check unknown-layout

step "nightly_reprovision through ansible-runner, as AWX runs it: gpu-b's night does not fit"
"$python" "$here/files/awx_run.py" "$scratch/runner" "$inventory" gpuvirt.kvm.nightly_reprovision \
  gpuvirt_picture_artifact=true > "$scratch/awx.json"
check night-one-failed
"$python" - "$scratch/awx.json" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))
fleet = {e["host"]: e for e in job["artifact_data"]["gpuvirt_fleet"]}
reports = job["artifact_data"]["gpuvirt_reports"]
problems = []
if (job["status"], job["rc"]) != ("failed", 2):
    problems.append("status/rc %r/%r, expected failed/2" % (job["status"], job["rc"]))
if {h: e["status"] for h, e in fleet.items()} != {"gpu-a": "ok", "gpu-b": "failed", "cpu-c": "ok"}:
    problems.append("artifact gpuvirt_fleet: %r" % fleet)
if sorted(reports) != ["cpu-c", "gpu-a"] or reports["gpu-a"]["desired"][0]["name"] != "a-hpc":
    problems.append("artifact gpuvirt_reports: %r" % sorted(reports))
page = job["artifact_data"].get("gpuvirt_fleet_page") or ""
if not page.startswith("<!DOCTYPE html>") or 'data-host="gpu-b" data-status="failed"' not in page \
        or 'data-holder="a-hpc"' not in page:
    problems.append("artifact gpuvirt_fleet_page: not the page with gpu-b failed and a-hpc drawn:"
                    " %r" % page[:200])
# gpu-b's failure is rescued (the others go on); the fleet report's one failure ends the job.
if job["rescued"] != {"gpu-b": 1} or sum(job["failures"].values()) != 1:
    problems.append("stats: rescued %r failures %r" % (job["rescued"], job["failures"]))
for p in problems:
    print("awx artifacts: " + p)
if problems:
    sys.exit(1)
print("awx artifacts: status failed, rc 2, gpuvirt_fleet and gpuvirt_reports as expected")
PY

step "nightly_reprovision on gpu-b alone with a night that fits"
playbook nightly_reprovision -l gpu-b -e layout=night-fixed
[ "$rc" = 0 ] || { tail -n 60 "$scratch/nightly_reprovision.log"; exit 1; }
check night-fixed

step "teardown_tenants"
playbook teardown_tenants
[ "$rc" = 0 ] || { tail -n 60 "$scratch/teardown_tenants.log"; exit 1; }
check teardown

step "deploy_fleet: one tenant too many, nothing is touched anywhere"
cat > "$scratch/tenants.yml" <<'YAML'
gpuvirt_fleet_label_vars: [pool]
gpuvirt_fleet_tenants:
  - {name: f-big, gpus: 16, state: present}
  - {name: f-a100, gpus: 8, state: present, where: "platform == 'dgx-a100'"}
  - {name: f-cpu, gpus: 0, cpu_policy: shared, where: "labels.pool == 'cpu'"}
YAML
cp "$scratch/tenants.yml" "$scratch/too-many.yml"
echo '  - {name: f-extra, gpus: 1, state: present, where: "labels.pool == '"'gpu'"'"}' \
  >> "$scratch/too-many.yml"
playbook deploy_fleet -e "@$scratch/too-many.yml"
[ "$rc" = 2 ] || { tail -n 60 "$scratch/deploy_fleet.log"; exit 1; }
grep -q "1 tenant(s) do not fit the fleet: request 'f-extra'" "$scratch/deploy_fleet.log" || {
  tail -n 60 "$scratch/deploy_fleet.log"; exit 1; }
check teardown

step "deploy_fleet: planned once on the controller, each host converges its share"
playbook deploy_fleet -e "@$scratch/tenants.yml"
[ "$rc" = 0 ] || { tail -n 60 "$scratch/deploy_fleet.log"; exit 1; }
check fleet

step "all checks passed"

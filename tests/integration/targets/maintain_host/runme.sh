#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# playbooks/maintain_host.yml on this machine: the running tenants are recorded, shut down and
# brought back (nothing is updated and nothing reboots here), and a message to guests without an
# agent says who was not told; a guest that ignores the shutdown stops the run without force,
# and the tenants are started again; an unfinished run's record is finished by the next; a
# running VM the collection did not make refuses a run that may reboot.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
setup=$here/../setup_kvm_vm/files
python=$(command -v python)
scratch=$(mktemp -d /tmp/gvt-mh.XXXXXX)
chmod 0755 "$scratch"
cleanup() {
  bash "$setup/remove_domains.sh" gvt-mh- >/dev/null || true
  rm -rf "$scratch"
}
trap cleanup EXIT
export ANSIBLE_NOCOLOR=1 ANSIBLE_LOCALHOST_WARNING=0
inventory=$scratch/inventory.ini
printf 'localhost ansible_connection=local ansible_python_interpreter=%s\n' "$python" > "$inventory"
record=$scratch/maintenance.json
vars=(-e "gpu_vms_store=$scratch/store" -e "gpu_vms_disk_dir=$scratch/disks"
      -e "gpu_vms_lock_path=$scratch/alloc.lock" -e gpu_vms_uri=qemu:///system
      -e '{"gpu_vms_reserved_cpus": ""}' 
      -e maintain_host_upgrade=false -e maintain_host_timeout=2 -e "maintain_host_record=$record")
fail() { echo "maintain_host: $*" >&2; exit 1; }
domains() { "$python" "$here/files/domains.py"; }
maintain() {  # maintain LOG ARGS...: run the playbook; its rc in $rc
  local log=$1; shift
  set +e
  ansible-playbook -i "$inventory" gpuvirt.kvm.maintain_host "${vars[@]}" "$@" > "$scratch/$log" 2>&1
  rc=$?
  set -e
}

bash "$setup/make_halt_image.sh" "$scratch/base.qcow2" >/dev/null
ansible-playbook -i "$inventory" "$here/files/setup.yml" -e "scratch=$scratch" > "$scratch/setup.log" 2>&1 ||
  { tail -n 30 "$scratch/setup.log"; fail "setup failed"; }
before=$(domains)

echo "=== a guest that ignores the shutdown, without force: refused, tenants running again"
maintain refused.log -e maintain_host_reboot=never
[ "$rc" = 2 ] || { tail -n 40 "$scratch/refused.log"; fail "expected rc 2, got $rc"; }
grep -q "not every tenant of localhost shut down within 2 s" "$scratch/refused.log" ||
  { tail -n 40 "$scratch/refused.log"; fail "no clear refusal"; }
grep -q "nothing was updated" "$scratch/refused.log" || fail "the refusal does not say nothing was updated"
[ ! -e "$record" ] || fail "the record was left behind"
after=$(domains)
"$python" - "$after" <<'PY' || fail "after the refusal: $after"
import json, sys
d = json.loads(sys.argv[1])
assert d["gvt-mh-a"][0] == d["gvt-mh-b"][0] == "running" and d["gvt-mh-c"][0] == "shutoff", d
PY

echo "=== with force: the two running tenants are stopped and started again, the stopped one stays"
before=$(domains)
maintain forced.log -e maintain_host_reboot=never -e maintain_host_force=true \
  -e 'maintain_host_message=going down' -e maintain_host_message_wait=0
[ "$rc" = 0 ] || { tail -n 40 "$scratch/forced.log"; fail "expected rc 0, got $rc"; }
# (their boot sectors run no guest agent: asked, each is not told, and the run goes on)
grep -q "users told: none; not told (reasons in gpuvirt_maintenance): gvt-mh-a, gvt-mh-b" \
  "$scratch/forced.log" || { tail -n 40 "$scratch/forced.log"; fail "the run does not say who was told"; }
grep -q "tenants stopped and started again: gvt-mh-a, gvt-mh-b" "$scratch/forced.log" ||
  { tail -n 40 "$scratch/forced.log"; fail "the run does not say what it did"; }
[ ! -e "$record" ] || fail "the record was left behind"
after=$(domains)
"$python" - "$before" "$after" <<'PY' || fail "before $before, after $after"
import json, sys
b, a = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in ("gvt-mh-a", "gvt-mh-b"):
    assert a[name][0] == "running" and a[name][1] != b[name][1], (name, b, a)  # restarted
assert a["gvt-mh-c"] == b["gvt-mh-c"] == ["shutoff", -1]
PY

echo "=== an unfinished run's record: the next run brings back what it recorded"
printf '{"tenants": [{"name": "gvt-mh-c", "gpus": [], "nvswitches": []}]}\n' > "$record"
maintain resumed.log -e maintain_host_reboot=never -e maintain_host_force=true
[ "$rc" = 0 ] || { tail -n 40 "$scratch/resumed.log"; fail "expected rc 0, got $rc"; }
[ ! -e "$record" ] || fail "the record was left behind"
after=$(domains)
"$python" - "$after" <<'PY' || fail "after the resumed run: $after"
import json, sys
d = json.loads(sys.argv[1])
assert d["gvt-mh-c"][0] == "running", d
PY

echo "=== a running VM the collection did not make: a run that may reboot is refused, nothing changes"
sed -e 's/<name>[^<]*</<name>gvt-mh-foreign</' -e '/<uuid>/d' -e '/<metadata>/,/<\/metadata>/d' \
  <(virsh -c qemu:///system dumpxml --inactive gvt-mh-a) > "$scratch/foreign.xml"
sed -i -e "s#$scratch/disks/gvt-mh-a-os.qcow2#$scratch/foreign.qcow2#" "$scratch/foreign.xml"
qemu-img create -q -f qcow2 -b "$scratch/store/tiny-1.0.qcow2" -F qcow2 "$scratch/foreign.qcow2"
virsh -c qemu:///system define "$scratch/foreign.xml" >/dev/null
virsh -c qemu:///system start gvt-mh-foreign >/dev/null
before=$(domains)
maintain foreign.log -e maintain_host_reboot=auto -e maintain_host_force=false
[ "$rc" = 2 ] || { tail -n 40 "$scratch/foreign.log"; fail "expected rc 2, got $rc"; }
# (other VMs of this machine that run, such as the lab, are named too)
grep -qE "localhost runs ([^ ]+, )*gvt-mh-foreign(, [^ ]+)*, which this collection did not make" \
  "$scratch/foreign.log" ||
  { tail -n 40 "$scratch/foreign.log"; fail "no clear refusal"; }
[ "$(domains)" = "$before" ] || fail "the refused run changed the domains: $before -> $(domains)"
[ ! -e "$record" ] || fail "the refused run left a record"
echo "=== maintain_host: all checks passed"

#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# Image builds and a real Linux tenant on this machine (issue: guests that boot and are
# GPU-ready): files/build.yml builds two image versions; files/boot.yml boots a VM on the first
# under TCG; we log in over SSH as the cloud-init user and check the hostname, vCPUs, memory, the
# data disk and each NIC's queues against what kvm_vm reported; send a message through the guest
# agent (kvm_vm_message) to a logged-in SSH terminal; read the serial console through
# `virsh console` up to a login prompt; then move the VM to the second image (recreate) and
# check that the data disk's contents survived (the third version, built on the first one's file
# as a cloud image base). Domains are named gvt-gb*.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
setup=$here/../setup_kvm_vm/files
python=$(command -v python)
scratch=$(mktemp -d /tmp/gvt-gb.XXXXXX)
chmod 0755 "$scratch"
bridge=gvtbr0
made_bridge=
server=
cleanup() {
  bash "$setup/remove_domains.sh" gvt-gb >/dev/null || true
  [ -z "$server" ] || kill "$server" 2>/dev/null || true
  [ -z "$made_bridge" ] || ip link del "$bridge" 2>/dev/null || true
  rm -rf --one-file-system "$scratch"
}
trap cleanup EXIT
export ANSIBLE_NOCOLOR=1 ANSIBLE_LOCALHOST_WARNING=0
inventory=$scratch/inventory.ini
printf 'localhost ansible_connection=local ansible_python_interpreter=%s\n' "$python" >"$inventory"
fail() { echo "guest_boot: $*" >&2; exit 1; }
play() {  # play LOG PLAYBOOK ARGS...
  local log=$1 book=$2; shift 2
  ansible-playbook -i "$inventory" "$here/files/$book" -e "scratch=$scratch" \
    -e "store=$scratch/store" "$@" >"$scratch/$log" 2>&1 || {
    tail -n 40 "$scratch/$log"; fail "$book failed (see above)"; }
}
free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ssh_opts=(-i "$scratch/key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
          -o ConnectTimeout=5 -o BatchMode=yes -o LogLevel=ERROR)
port=
guest() { ssh "${ssh_opts[@]}" -p "$port" tenant@127.0.0.1 "$@"; }
boot_started=0
start() {  # start LOG IMAGE [ARGS]: the VM on IMAGE, running; SSH forwarded to $port
  boot_started=$SECONDS
  play "$1" boot.yml -e "image=$2" "${@:3}"
  port=$(free_port)
  "$python" "$here/files/guest.py" forward gvt-gb "$port"
}
wait_ssh() {  # until the VM that start started answers on SSH
  for _ in $(seq 1 100); do
    if guest true 2>/dev/null; then
      echo "guest_boot: SSH answered $((SECONDS - boot_started)) s after the start began"
      return 0
    fi
    sleep 3
  done
  virsh -c qemu:///system dumpxml gvt-gb | tail -n 20 >&2
  fail "no SSH login on 127.0.0.1:$port within 300 s"
}

echo "=== a signed local apt repository, served on 127.0.0.1"
bash "$here/files/make-apt-repo.sh" "$scratch/apt" >/dev/null
repo_port=$(free_port)
"$python" -m http.server --bind 127.0.0.1 --directory "$scratch/apt/repo" "$repo_port" \
  >"$scratch/http.log" 2>&1 &
server=$!
ssh-keygen -q -t ed25519 -N '' -C gvt-gb -f "$scratch/key"

echo "=== build version 1"
started=$SECONDS
play build-v1.log build.yml -e "repo_url=http://127.0.0.1:$repo_port" --tags v1

echo "=== start version 1 under TCG with UEFI (it boots while the next checks run)"
if ! ip link show "$bridge" >/dev/null 2>&1; then
  ip link add "$bridge" type bridge && ip link set "$bridge" up && made_bridge=1
fi
start boot1.log guest-1

echo "=== builds: a rerun, an earlier recipe's version, bad keys and packages, versions 2 and 3"
play build.log build.yml -e "repo_url=http://127.0.0.1:$repo_port" --tags rest
echo "guest_boot: seconds per step: $(tr -d ' \n' <"$scratch/build-seconds.json"); all build checks $((SECONDS - started)) s (with the start of version 1)"

echo "=== version 2 through the playbook gpuvirt.kvm.build_guest_image (the guest_image role), twice"
"$python" - "$scratch" "http://127.0.0.1:$repo_port" >"$scratch/builds.json" <<'PY'
import json, sys
scratch, url = sys.argv[1:3]
print(json.dumps({
    "guest_image_store": scratch + "/store", "guest_image_build_cache": scratch + "/cache",
    "guest_image_builds": [{
        "name": "guest", "version": "2", "suite": "bookworm", "profile": "minimal",
        "disk_size_gb": 4, "packages": ["gpuvirt-probe=2.0"],
        "repositories": [{"name": "vendor", "uri": url,
                          "key": open(scratch + "/apt/repo-key.asc").read()}]}]}))
PY
for run in first second; do
  ansible-playbook -i "$inventory" gpuvirt.kvm.build_guest_image -e "@$scratch/builds.json" \
    >"$scratch/build-$run.log" 2>&1 || { tail -n 30 "$scratch/build-$run.log"; fail "build_guest_image failed"; }
done
grep -q "changed=1 " "$scratch/build-first.log" || { tail -n 20 "$scratch/build-first.log"; fail "the first run built nothing"; }
grep -q "changed=0 " "$scratch/build-second.log" || { tail -n 20 "$scratch/build-second.log"; fail "the second run changed something"; }
play verify.log verify_v2.yml
echo "=== the role refuses an entry listed twice before building anything"
"$python" - "$scratch/builds.json" >"$scratch/builds-twice.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
data["guest_image_builds"] = data["guest_image_builds"] * 2
print(json.dumps(data))
PY
if ansible-playbook -i "$inventory" gpuvirt.kvm.build_guest_image -e "@$scratch/builds-twice.json" \
    >"$scratch/build-twice.log" 2>&1; then
  fail "build_guest_image accepted guest-2 listed twice"
fi
grep -q "guest_image_builds: listed more than once: guest-2. Nothing was built." "$scratch/build-twice.log" ||
  { tail -n 20 "$scratch/build-twice.log"; fail "no clear refusal of an entry listed twice"; }

echo "=== log in to version 1 over SSH"
wait_ssh
"$python" - "$scratch/vm.json" "$scratch/facts" <<'PY' >"$scratch/expect"
import json, sys
vm = json.load(open(sys.argv[1]))
print("hostname=gb-tenant")
print("vcpus=%d" % vm["vcpus"])
print("memory_mb=%d" % vm["memory_mb"])
for net in vm["spec"]["networks"]:
    print("queues_%s=%d" % (net["mac"], net.get("queues") or 1))
PY
# shellcheck disable=SC2016  # runs in the guest's shell
guest 'set -e
  echo "hostname=$(hostname)"
  echo "vcpus=$(nproc)"
  awk "/MemTotal/ {print \"memtotal_kb=\" \$2}" /proc/meminfo
  echo "data=$(findmnt -n -o SOURCE,FSTYPE /data | tr -s " " ,)"
  echo "cloud_init=$(cloud-init status --wait | tail -n 1 | tr -d " ")"
  echo "system=$(systemctl is-system-running --wait)"
  for dev in /sys/class/net/*; do
    [ -e "$dev/device" ] || continue
    echo "queues_$(cat "$dev/address")=$(/usr/sbin/ethtool -l "$(basename "$dev")" | awk "/^Combined/ {v=\$2} END {print v}")"
  done
  echo canary-$$ | sudo tee /data/canary >/dev/null
  cat /usr/share/gpuvirt-probe/version' >"$scratch/facts"
cat "$scratch/facts"
"$python" - "$scratch/expect" "$scratch/facts" <<'PY' || fail "the guest does not match what kvm_vm reported"
import sys
want = dict(l.strip().split("=", 1) for l in open(sys.argv[1]) if "=" in l)
got = dict(l.strip().split("=", 1) for l in open(sys.argv[2]) if "=" in l)
lines = open(sys.argv[2]).read().split()
assert got["hostname"] == want["hostname"], (got, want)
assert got["vcpus"] == want["vcpus"], (got, want)
# The kernel keeps some RAM for itself: MemTotal is a little below the VM's memory.
assert 0.80 * int(want["memory_mb"]) * 1024 < int(got["memtotal_kb"]) <= int(want["memory_mb"]) * 1024, (got, want)
assert got["data"] == "/dev/vdb,ext4", got
assert got["cloud_init"] == "status:done", got
assert got["system"] == "running", got
for key, value in want.items():
    if key.startswith("queues_"):
        assert got.get(key) == value, (key, got.get(key), value)
assert sum(1 for k in want if k.startswith("queues_")) == 2, want
assert any(v != "1" for k, v in want.items() if k.startswith("queues_")), "no multiqueue NIC"
assert lines[-1] == "1.0", lines[-1]
PY
canary=$(guest cat /data/canary)

echo "=== a message through the QEMU guest agent reaches a logged-in user's terminal"
message() {  # message LOG [ARGS]: kvm_vm_message to gvt-gb; its JSON result on stdout
  ansible localhost -i "$inventory" -o -m gpuvirt.kvm.kvm_vm_message "${@:2}" \
    -a '{"name": ["gvt-gb"], "uri": "qemu:///system", "text": "gvt-gb goes down at noon"}' \
    >"$scratch/$1" 2>&1 || { cat "$scratch/$1" >&2; fail "kvm_vm_message failed"; }
  sed -n 's/^localhost | [A-Z]* => //p' "$scratch/$1"
}
# (stdin stays open, so the session lasts until it is killed; not a pipeline, whose wait would
# wait for the sleep too)
guest -tt 'echo logged-in; sleep 120' < <(exec sleep 130 2>/dev/null) >"$scratch/wall.txt" 2>&1 &
watcher=$!
for _ in $(seq 1 150); do grep -q logged-in "$scratch/wall.txt" && break; sleep 0.2; done
grep -q logged-in "$scratch/wall.txt" || { cat "$scratch/wall.txt"; fail "the SSH session did not log in"; }
checked=$(message message-check.log --check)
told=$(message message.log)
for _ in $(seq 1 50); do grep -q "gvt-gb goes down at noon" "$scratch/wall.txt" && break; sleep 0.2; done
kill "$watcher" 2>/dev/null || true
wait "$watcher" 2>/dev/null || true
"$python" - "$checked" "$told" <<'PY' || fail "kvm_vm_message: check $checked, run $told"
import json, sys
checked, told = json.loads(sys.argv[1]), json.loads(sys.argv[2])
assert checked["told"] == ["gvt-gb"] and checked["changed"], checked
assert told["told"] == ["gvt-gb"] and told["not_told"] == [] and told["changed"], told
PY
[ "$(grep -c "gvt-gb goes down at noon" "$scratch/wall.txt")" = 1 ] ||
  { cat "$scratch/wall.txt"; fail "the message did not reach the logged-in terminal once"; }

echo "=== the serial console: virsh console up to a login prompt"
"$python" "$here/files/guest.py" console gvt-gb 120 >"$scratch/console.txt" ||
  { tail -n 20 "$scratch/console.txt"; fail "no login prompt on the serial console"; }
grep -q "gb-tenant login:" "$scratch/console.txt" || fail "the console's prompt is not the VM's hostname"

echo "=== move the running VM to version 3, built on a cloud image (recreate): the data disk survives"
start boot3.log guest-3 -e recreate=true
wait_ssh
[ "$(guest cat /data/canary)" = "$canary" ] || fail "the data disk lost its contents in the move"
[ "$(guest cat /usr/share/gpuvirt-probe/version)" = "2.0" ] || fail "the VM does not run version 3"
grep -q '"image_version": "3"' "$scratch/vm.json" || fail "kvm_vm does not report version 3"
# setuid bits survive reading the cloud image's file system (debugfs clears them; the build
# puts them back): sudo works.
guest sudo -n true || fail "sudo does not work on the image built on a cloud image"
echo "guest_boot: passed in $SECONDS s"

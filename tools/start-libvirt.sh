#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# Starts this machine's virtlogd and libvirtd where no init system does (containers, CI, no
# systemd), and waits until libvirtd answers on qemu:///system. Used by .ci/run, make main and
# make demo. Needs root. Does nothing to daemons that already run.
#
# It first gives /dev/kvm the group and mode that udev gives it on a booted Debian
# (50-udev-default.rules: GROUP="kvm", MODE="0660"). Without udev the node can be root:root
# 0600; QEMU then runs as libvirt-qemu without access to it, and libvirtd's probe of QEMU's
# capabilities fails and is retried for ever: every define and start hangs with no error.
# The daemons run under tools/subreaper.py, which reaps the QEMU processes they daemonize as soon
# as they end, as an init does (see there).
set -euo pipefail

if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
  if [ "$(stat -c %G /dev/kvm)" != kvm ] || (( ($(stat -c '0%a' /dev/kvm) & 0060) != 0060 )); then
    echo "start-libvirt: /dev/kvm was $(stat -c '%U:%G %a' /dev/kvm); giving it root:kvm 0660 as udev does"
    chgrp kvm /dev/kvm
    chmod 0660 /dev/kvm
  fi
fi

# Under a subreaper (tools/subreaper.py): where PID 1 is no init, it reaps QEMU's orphans late,
# and every destroy then waits one to two seconds for it.
missing=()
for daemon in virtlogd libvirtd; do
  if pgrep -x "$daemon" >/dev/null; then
    echo "start-libvirt: $daemon already running"
  else
    missing+=(-- "$daemon" -d)
  fi
done
if (( ${#missing[@]} )); then
  python3 "$(dirname "$0")/subreaper.py" "${missing[@]}"
  echo "start-libvirt: started${missing[*]//--/} under a subreaper"
fi
for _ in $(seq 1 30); do
  virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "start-libvirt: libvirtd does not answer on qemu:///system after 30 s" >&2
virsh -c qemu:///system version

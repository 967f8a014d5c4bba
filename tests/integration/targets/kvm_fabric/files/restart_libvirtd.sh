#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# Restart libvirtd so that it looks for hook scripts again (it does so only when it starts):
# through systemd where it runs the daemon, else as tools/start-libvirt.sh starts it (libvirtd -d
# under tools/subreaper.py, whose path is the argument, so that QEMU's orphans are reaped at once).
# Usage: restart_libvirtd.sh [SUBREAPER.PY]
set -euo pipefail
subreaper=${1:-}
if [ -d /run/systemd/system ]; then
  # The daemon that serves qemu:///system: the modular virtqemud, or the monolithic libvirtd.
  if systemctl is-active --quiet virtqemud 2>/dev/null; then
    systemctl restart virtqemud
  else
    systemctl restart libvirtd
  fi
else
  # The system daemon's own pid file: private daemons of other tests are left alone.
  if [ -s /run/libvirtd.pid ] && pid=$(cat /run/libvirtd.pid) && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  if [ -n "$subreaper" ] && [ -f "$subreaper" ]; then
    python3 "$subreaper" libvirtd -d
  else
    libvirtd -d
  fi
fi
for _ in $(seq 100); do
  virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 0.2
done
echo "libvirtd did not come back" >&2
exit 1

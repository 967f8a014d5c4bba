#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# A libvirtd of its own for one pretend host of a test fleet: its own domains, networks, logs and
# sockets, on this machine's QEMU. It runs in a private mount namespace where /run/libvirt,
# /etc/libvirt, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt are folders under DIR,
# so it never sees (or touches) the system libvirtd's state. Reach it with
#   qemu:///system?socket=DIR/run/libvirt-sock
#
# Usage: private_libvirtd.sh start DIR | stop DIR      (root; stop destroys its domains first)
set -euo pipefail
action=$1
dir=$(realpath -m "$2")

start() {
  mkdir -p "$dir"/{run,lib,log,cache}
  if [ ! -d "$dir/etc" ]; then
    cp -a /etc/libvirt "$dir/etc"
    # No domains, no autostarted networks: an empty host.
    rm -rf "$dir/etc/qemu/"*.xml "$dir/etc/qemu/autostart" "$dir/etc/qemu/networks/autostart" \
      "$dir/etc/storage"
  fi
  # Under the collection's subreaper when it is there (tools/subreaper.py: QEMU's orphans are
  # reaped at once, so a destroy does not wait for PID 1).
  local reaper=() subreaper
  subreaper=$(dirname "$0")/../../../../../tools/subreaper.py
  [ -f "$subreaper" ] && reaper=(python3 "$subreaper")
  # shellcheck disable=SC2016  # expanded by the inner bash
  unshare -m --propagation private "${reaper[@]}" bash -euc '
    d=$1
    mount --bind "$d/run" /run/libvirt
    mount --bind "$d/etc" /etc/libvirt
    mount --bind "$d/lib" /var/lib/libvirt
    mount --bind "$d/log" /var/log/libvirt
    mount --bind "$d/cache" /var/cache/libvirt
    virtlogd -d -p "$d/virtlogd.pid"
    libvirtd -d -p "$d/libvirtd.pid"
  ' private-libvirtd "$dir"
  for _ in $(seq 1 50); do
    virsh -q -c "qemu:///system?socket=$dir/run/libvirt-sock" version >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "private_libvirtd: libvirtd in $dir did not answer" >&2
  return 1
}

stop() {
  local uri="qemu:///system?socket=$dir/run/libvirt-sock" name
  if [ -S "$dir/run/libvirt-sock" ]; then
    while read -r name; do
      [ -n "$name" ] || continue
      virsh -q -c "$uri" destroy "$name" >/dev/null 2>&1 || true
      virsh -q -c "$uri" undefine --nvram "$name" >/dev/null 2>&1 ||
        virsh -q -c "$uri" undefine "$name" >/dev/null 2>&1 || true
    done < <(virsh -q -c "$uri" list --all --name 2>/dev/null || true)
  fi
  local pidfile
  for pidfile in "$dir/libvirtd.pid" "$dir/virtlogd.pid"; do
    if [ -s "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
    fi
  done
  for _ in $(seq 1 50); do
    [ -S "$dir/run/libvirt-sock" ] && pgrep -F "$dir/libvirtd.pid" >/dev/null 2>&1 || return 0
    sleep 0.2
  done
}

case $action in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start DIR | stop DIR" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# Destroys and undefines every domain of qemu:///system whose name starts with PREFIX: the
# clean-up of one integration target, which names all its domains PREFIX-something.
# Usage: remove_domains.sh PREFIX
set -uo pipefail
prefix=$1
case $prefix in
  gvt-*) ;;
  *) echo "remove_domains.sh: refusing prefix '$prefix' (test domains are named gvt-*)" >&2; exit 2 ;;
esac
virsh -c qemu:///system list --all --name | grep -F "$prefix" | while read -r d; do
  [[ $d == "$prefix"* ]] || continue
  virsh -c qemu:///system destroy "$d" >/dev/null 2>&1
  # --nvram: a GPU VM boots OVMF by default, and libvirt keeps a started one's NVRAM file.
  virsh -c qemu:///system undefine --nvram "$d" >/dev/null 2>&1 && echo "removed $d"
done
exit 0

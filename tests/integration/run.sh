#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# Runs every integration target with ansible-test on the controller's own Python (--local: the
# targets drive this machine's libvirt and qemu-img, and read fixture sysfs trees).
# Usage: tests/integration/run.sh [TARGET ...]     (called by `make integration`)
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)
collection=.build/ansible_collections/gpuvirt/kvm
[ -d "$collection" ] || { echo "run.sh: $collection is missing; run 'make sync' first" >&2; exit 1; }
python_version=$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
cd "$collection"
# A locale with UTF-8, as ansible-test wants; C.UTF-8 exists on every Debian.
export LC_ALL=C.UTF-8
ansible-test integration --local --python "$python_version" --color no "$@"
echo "integration: all targets passed (from $repo)"

#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# Checks the collection's execution-environment metadata offline, the way ansible-builder reads
# it when an admin builds an EE for AWX:
#   1. `ansible-builder introspect` over the installed tarball must list the collection's pip
#      and bindep requirements (meta/execution-environment.yml -> meta/ee-*.txt);
#   2. `ansible-builder create` must turn tests/ee/execution-environment.yml, with the tarball as
#      its galaxy requirement, into a build context (Containerfile + requirements).
# Usage: check-ee.sh TARBALL COLLECTIONS_DIR     (COLLECTIONS_DIR holds ansible_collections/)
set -euo pipefail
tarball=$(realpath "$1")
collections=$(realpath "$2")
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

ansible-builder introspect --sanitize "$collections" > "$work/introspect.txt"
for want in "jmespath>=1.0" "openssh-client [platform:dpkg]" "openssh-clients [platform:rpm]"; do
  if ! grep -qF "'${want}  # from collection gpuvirt.kvm'" "$work/introspect.txt"; then
    echo "check-ee: ansible-builder introspect does not list '$want' from gpuvirt.kvm:" >&2
    cat "$work/introspect.txt" >&2
    exit 1
  fi
done

cp "$here/execution-environment.yml" "$work/"
printf -- '---\ncollections:\n  - name: %s\n    type: file\n' "$tarball" > "$work/requirements.yml"
ansible-builder create -f "$work/execution-environment.yml" -c "$work/context" \
  --output-filename Containerfile > "$work/create.log"
test -s "$work/context/Containerfile" || { cat "$work/create.log" >&2; exit 1; }
grep -q "$(basename "$tarball")\|requirements.yml" "$work/context/Containerfile" \
  "$work/context/_build/requirements.yml" || {
  echo "check-ee: the build context does not carry the collection" >&2; exit 1; }
echo "check-ee: introspect lists the collection's pip and bindep requirements;" \
  "ansible-builder create wrote a build context"

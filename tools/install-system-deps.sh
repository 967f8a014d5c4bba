#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# Installs the Debian/Ubuntu packages the checks and the main job need, only those missing.
# Used by `make setup` and .ci/run. Needs root (or sudo) only when something is missing.
set -euo pipefail

# libvirt and QEMU for the integration tests; the -dev packages, pkg-config and a compiler to
# build libvirt-python; genisoimage for cloud-init seed ISOs; OVMF for UEFI guests; rsync and the
# linters the Makefile runs; python3-venv so the system Python can create .venv; debootstrap,
# grub-efi-amd64-bin, mtools and dosfstools for image builds (kvm_image_build, the lab); dpkg-dev
# and gpg for the signed apt repository the build test makes; chromium renders the fleet page
# (the picture's test, headless).
APT_PACKAGES=(
  libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils python3-libvirt libvirt-dev
  pkg-config libxml2-utils genisoimage ovmf
  rsync shellcheck make git gcc python3-dev python3-venv ca-certificates
  debootstrap fdisk e2fsprogs openssh-client
  grub-efi-amd64-bin mtools dosfstools dpkg-dev gpg chromium
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$pkg")
  fi
done
if (( ${#missing[@]} == 0 )); then
  echo "system packages: all ${#APT_PACKAGES[@]} present"
  exit 0
fi
sudo=()
if (( EUID != 0 )); then
  command -v sudo >/dev/null || {
    echo "system packages missing (${missing[*]}); run as root: apt-get install ${missing[*]}" >&2
    exit 1
  }
  sudo=(sudo)
fi
echo "system packages: installing ${missing[*]}"
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  "${missing[@]}"

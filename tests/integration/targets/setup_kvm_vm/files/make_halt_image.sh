#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# Writes a tiny qcow2 guest image whose boot sector only halts the CPU (cli; hlt; jmp back).
#
# Why not an empty image: with nothing to boot, SeaBIOS retries the boot every 60 seconds, and on
# a machine whose KVM is emulated in software that retry dies with a KVM emulation error that
# pauses the guest; the same happens when an ACPI shutdown request reaches its interrupt handler.
# A guest that sits in hlt with interrupts off stays "running", ignores ACPI (so stopping it
# needs force: true), and costs no CPU.
#
# Usage: make_halt_image.sh OUTPUT.qcow2 [SIZE]   (SIZE for qemu-img/truncate, default 64M)
set -euo pipefail
out=$1
size=${2:-64M}
raw=$(mktemp "${out}.XXXXXX.raw")
trap 'rm -f "$raw"' EXIT
printf '\xfa\xf4\xeb\xfd' > "$raw"                                   # cli; hlt; jmp short -3
truncate -s "$size" "$raw"
printf '\x55\xaa' | dd of="$raw" bs=1 seek=510 conv=notrunc status=none  # boot signature
qemu-img convert -q -f raw -O qcow2 "$raw" "$out"

#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# Builds the lab's base disk: a plain Debian 12 server (image-packages.txt) as a partitioned qcow2,
# without loop devices or mounts of the image: debootstrap into a folder, sfdisk on a sparse raw
# file, `mkfs.ext4 -E offset=... -d ROOTFS` writes the filesystem into the partition straight
# from the folder, `qemu-img convert` to qcow2. grub is installed in the image but not yet into
# its boot sector: tests/lab/lab.py does that on the first boot (direct kernel boot with the
# vmlinuz/initrd.img saved here) and caches the result.
#
# The image is cached under $GPUVIRT_LAB_CACHE (default /var/cache/gpuvirt-lab: libvirt's QEMU
# user must be able to read it, which rules out a home folder mode 0700) as base-<KEY>/, where KEY
# hashes this script, the package list, LAB_IMAGE_EXTRA_PACKAGES, the disk size and the lab's
# SSH public key: a rerun with the same inputs reuses it.
#
#   tests/lab/build-image.sh          build if missing; the last stdout line is the image folder
#   tests/lab/build-image.sh --key    print the key only (generates the SSH key if missing)
#
# Environment: GPUVIRT_LAB_CACHE, LAB_IMAGE_EXTRA_PACKAGES (space-separated, e.g. to pre-install
# "qemu-system-x86 libvirt-daemon-system" for faster role runs; empty by default so that the
# roles really install them), LAB_DISK_GB (virtual disk size, default 16), LAB_MIRROR.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${GPUVIRT_LAB_CACHE:-/var/cache/gpuvirt-lab}
extra=${LAB_IMAGE_EXTRA_PACKAGES:-}
disk_gb=${LAB_DISK_GB:-16}
mirror=${LAB_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
hostname=gpuvirt-lab

log() { printf 'lab: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

if ! [[ $disk_gb =~ ^[0-9]+$ ]] || (( disk_gb < 4 )); then
  die "LAB_DISK_GB must be a number >= 4"
fi

mkdir -p "$cache"
chmod 0755 "$cache"
# The key pair libvirt's QEMU never reads: only the public half goes into the image.
key=$cache/ssh/id_ed25519
if [ ! -s "$key" ]; then
  mkdir -p "$cache/ssh"
  chmod 0700 "$cache/ssh"
  ssh-keygen -q -t ed25519 -N '' -C gpuvirt-lab -f "$key"
fi

packages=$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/image-packages.txt" | tr -s ' \n' ' ')
read -r -a extra_list <<<"$extra"
content_key=$(
  {
    cat "$0" "$here/image-packages.txt"
    printf 'extra=%s\ndisk=%s\n' "${extra_list[*]:-}" "$disk_gb"
    cat "$key.pub"
  } | sha256sum | cut -c1-16
)
if [ "${1:-}" = "--key" ]; then
  echo "$content_key"
  exit 0
fi

out=$cache/base-$content_key
if [ -f "$out/done" ]; then
  log "image: cached $out"
  echo "$out"
  exit 0
fi

for tool in debootstrap sfdisk mkfs.ext4 qemu-img systemctl; do
  command -v "$tool" >/dev/null || die "$tool is missing; run 'make system-deps' (or apt-get" \
    "install debootstrap fdisk e2fsprogs qemu-utils systemd)"
done
(( EUID == 0 )) || die "debootstrap needs root"

work=$cache/work-$content_key.$$
rootfs=$work/rootfs
mkdir -p "$cache/logs"
build_log=$cache/logs/build-$content_key.log
cleanup() {
  # debootstrap mounts /proc and /sys in the target while it installs; never delete through them.
  local m
  for m in dev/pts dev proc sys; do
    if mountpoint -q "$rootfs/$m" 2>/dev/null; then umount -l "$rootfs/$m" || true; fi
  done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
mkdir -p "$work"

started=$(date +%s)
step_started=$started
step() {
  local now
  now=$(date +%s)
  log "image: $1 ($(( now - step_started )) s)"
  step_started=$now
}

log "image: building base-$content_key (debootstrap $suite, log in $build_log)"
includes=$(tr ' ' ',' <<<"$packages ${extra_list[*]:-}" | sed -e 's/,,*/,/g' -e 's/^,//' -e 's/,$//')
if ! DEBIAN_FRONTEND=noninteractive debootstrap --variant=minbase --components=main \
    --include="$includes" "$suite" "$rootfs" "$mirror" >"$build_log" 2>&1; then
  tail -n 30 "$build_log" >&2
  die "debootstrap failed (full log: $build_log)"
fi
step "debootstrap done"

# --- configure the root filesystem (plain files, plus systemctl --root for unit links) ---------
uuid=$(cat /proc/sys/kernel/random/uuid)
echo "$hostname" >"$rootfs/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
  "$hostname" >"$rootfs/etc/hosts"
printf 'UUID=%s\t/\text4\terrors=remount-ro\t0\t1\n' "$uuid" >"$rootfs/etc/fstab"
# An empty machine-id: systemd makes a new one on the first boot of every copy.
: >"$rootfs/etc/machine-id"
rm -f "$rootfs/var/lib/dbus/machine-id"
# debootstrap copied this machine's resolver; inside QEMU's user-mode network the DNS proxy is
# 10.0.2.3 (QEMU's own, in-process, not an address of this machine).
rm -f "$rootfs/etc/resolv.conf"
echo "nameserver 10.0.2.3" >"$rootfs/etc/resolv.conf"
cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb http://deb.debian.org/debian-security $suite-security main
EOF

# The lab's own NIC (virtio-net, lab.py gives it this MAC) takes DHCP; the stand-in NICs
# (e1000e, e1000, rtl8139 with their links down) stay unmanaged.
mkdir -p "$rootfs/etc/systemd/network"
cat >"$rootfs/etc/systemd/network/10-lab.network" <<'EOF'
[Match]
MACAddress=52:54:00:4c:41:42

[Network]
DHCP=ipv4
EOF
systemctl --root="$rootfs" --quiet enable systemd-networkd.service
# Timers that take the dpkg lock right after boot make role runs wait or fail.
systemctl --root="$rootfs" --quiet mask apt-daily.timer apt-daily-upgrade.timer

install -d -m 0700 "$rootfs/root/.ssh"
install -m 0600 "$key.pub" "$rootfs/root/.ssh/authorized_keys"
cat >"$rootfs/etc/ssh/sshd_config.d/gpuvirt-lab.conf" <<'EOF'
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
EOF

# grub: serial console, no menu delay. Kernel arguments for roles to edit stay in the plain
# /etc/default/grub (GRUB_CMDLINE_LINUX is left empty, as Debian ships it).
sed -i -e 's/^GRUB_CMDLINE_LINUX_DEFAULT=.*/GRUB_CMDLINE_LINUX_DEFAULT="console=ttyS0,115200"/' \
  -e 's/^GRUB_TIMEOUT=.*/GRUB_TIMEOUT=1/' "$rootfs/etc/default/grub"
mkdir -p "$rootfs/etc/default/grub.d"
cat >"$rootfs/etc/default/grub.d/50-gpuvirt-lab.cfg" <<'EOF'
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
EOF

vmlinuz=$(find "$rootfs/boot" -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -n 1)
initrd=$(find "$rootfs/boot" -maxdepth 1 -name 'initrd.img-*' | sort -V | tail -n 1)
if [ -z "$vmlinuz" ] || [ -z "$initrd" ]; then
  die "no kernel or initramfs in $rootfs/boot"
fi
chroot "$rootfs" apt-get clean
rm -rf "$rootfs/var/lib/apt/lists/"* "$rootfs/var/log/"*.log "$rootfs/tmp/"*
step "configured"

# --- partitioned raw file -> ext4 from the folder -> qcow2 ------------------------------------
raw=$work/disk.raw
truncate -s "${disk_gb}G" "$raw"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk --quiet "$raw"
offset=$(( 2048 * 512 ))
fs_kib=$(( (disk_gb * 1024 * 1024) - offset / 1024 ))
mkfs.ext4 -q -F -L "$hostname" -U "$uuid" -E "offset=$offset" -d "$rootfs" "$raw" "${fs_kib}k" \
  >>"$build_log" 2>&1 || { tail -n 20 "$build_log" >&2; die "mkfs.ext4 failed"; }
step "filesystem written"
mkdir -p "$work/out"
qemu-img convert -f raw -O qcow2 "$raw" "$work/out/disk.qcow2"
rm -f "$raw"
install -m 0644 "$vmlinuz" "$work/out/vmlinuz"
install -m 0644 "$initrd" "$work/out/initrd.img"
echo "$uuid" >"$work/out/root-uuid"
printf '%s\n' "$packages ${extra_list[*]:-}" >"$work/out/packages"
chmod 0755 "$work/out"
chmod 0644 "$work/out/disk.qcow2"
touch "$work/out/done"
rm -rf "$out"
mv "$work/out" "$out"
step "qcow2 written: $(du -h "$out/disk.qcow2" | cut -f1)"
log "image: built in $(( $(date +%s) - started )) s"
echo "$out"

#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# The lab's stand-in Fabric Manager package: make-fm-package.sh OUT_DIR [VERSION]
# writes OUT_DIR/nvidia-fabricmanager-570_VERSION_all.deb (VERSION default 570.133.20-1), laid
# out as NVIDIA's nvidia-fabricmanager-570 is: the nv-fabricmanager daemon, fmpm, the settings
# file /usr/share/nvidia/nvswitch/fabricmanager.cfg (FABRIC_MODE=0 as shipped) and the
# nvidia-fabricmanager.service unit (Type=forking). The daemon and fmpm are the stand-ins of
# tests/fixtures/fabric (fake_fm.py: FM's state in /run/gpuvirt-fake-fm/state.json, the lab's
# 4-GPU partition table), so that kvm_host's shared_nvswitch mode installs, configures and runs
# "Fabric Manager" in the lab exactly as on a real host (tests/lab/README.md).
set -euo pipefail
out=${1:?usage: make-fm-package.sh OUT_DIR [VERSION]}
version=${2:-570.133.20-1}
here=$(cd "$(dirname "$0")" && pwd)
name=nvidia-fabricmanager-570
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
chmod 0755 "$root"
mkdir -p "$root/DEBIAN" "$root/usr/bin" "$root/usr/lib/gpuvirt-lab-fm" \
  "$root/usr/share/nvidia/nvswitch" "$root/lib/systemd/system"
install -m 0644 "$here/../fixtures/fabric/fake_fm.py" "$root/usr/lib/gpuvirt-lab-fm/fake_fm.py"
cat > "$root/usr/bin/fmpm" <<'SH'
#!/bin/sh
# Stand-in for NVIDIA's fmpm 1.0.1 (gpuvirt lab): tests/fixtures/fabric/README.md.
exec python3 /usr/lib/gpuvirt-lab-fm/fake_fm.py --as-fmpm "$@"
SH
cat > "$root/usr/bin/nv-fabricmanager" <<'SH'
#!/bin/sh
# Stand-in for NVIDIA's nv-fabricmanager (gpuvirt lab): reads -c FILE, forks, stops on SIGTERM.
exec python3 /usr/lib/gpuvirt-lab-fm/fake_fm.py daemon "$@"
SH
chmod 0755 "$root/usr/bin/fmpm" "$root/usr/bin/nv-fabricmanager"
cat > "$root/usr/share/nvidia/nvswitch/fabricmanager.cfg" <<'CFG'
# Fabric Manager settings (the gpuvirt lab's stand-in reads FABRIC_MODE, FABRIC_MODE_RESTART
# and BIND_INTERFACE_IP; NVIDIA's file carries more, with these defaults).
# 0: bare metal or full passthrough, 1: shared NVSwitch, 2: vGPU
FABRIC_MODE=0
# 1: resume after a restart; the hypervisor declares the active partitions within 60 s
FABRIC_MODE_RESTART=0
BIND_INTERFACE_IP=127.0.0.1
STARTING_TCP_PORT=16000
LOG_FILE_NAME=/var/log/fabricmanager.log
CFG
cat > "$root/lib/systemd/system/nvidia-fabricmanager.service" <<'UNIT'
[Unit]
Description=NVIDIA fabric manager service (gpuvirt lab stand-in)
After=network.target

[Service]
User=root
Type=forking
TimeoutStartSec=240
RuntimeDirectory=nvidia-fabricmanager
RuntimeDirectoryPreserve=yes
PIDFile=/run/nvidia-fabricmanager/nv-fabricmanager.pid
ExecStart=/usr/bin/nv-fabricmanager -c /usr/share/nvidia/nvswitch/fabricmanager.cfg --board lab --pid-file /run/nvidia-fabricmanager/nv-fabricmanager.pid

[Install]
WantedBy=multi-user.target
UNIT
cat > "$root/DEBIAN/control" <<CTRL
Package: $name
Version: $version
Architecture: all
Depends: python3
Maintainer: gpuvirt lab <lab@localhost>
Description: Fabric Manager stand-in for the gpuvirt lab (not NVIDIA's)
 The nv-fabricmanager daemon and fmpm of tests/fixtures/fabric, over a state file.
CTRL
printf '/usr/share/nvidia/nvswitch/fabricmanager.cfg\n' > "$root/DEBIAN/conffiles"
mkdir -p "$out"
SOURCE_DATE_EPOCH=1735689600 dpkg-deb --root-owner-group --build "$root" "$out/${name}_${version}_all.deb" >/dev/null
echo "$out/${name}_${version}_all.deb"

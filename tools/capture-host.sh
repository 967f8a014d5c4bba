#!/usr/bin/env bash
# Captures what gpuvirt.kvm's topology discovery reads on a real host, for fixtures and bug
# reports: the PCI devices (with their sysfs symlinks), NUMA nodes, CPU topology, cmdline,
# and nvidia-smi topo -m. Usage: tools/capture-host.sh OUTDIR
set -u
out=${1:?usage: capture-host.sh OUTDIR}
mkdir -p "$out"
{
  echo "== uname"; uname -a
  echo "== cmdline"; cat /proc/cmdline
  echo "== lscpu"; lscpu 2>/dev/null
  echo "== nvidia-smi topo -m"; nvidia-smi topo -m 2>&1
  echo "== nvidia-smi -q (pci)"; nvidia-smi -q 2>&1 | grep -iE 'bus id|product name|module id|serial|numa' | head -40
  echo "== lspci -tv"; lspci -tv 2>&1 | head -80
  echo "== lspci -nn"; lspci -nn 2>&1 | head -200
} > "$out/host.txt" 2>&1
{
  for d in /sys/bus/pci/devices/*; do
    b=$(basename "$d")
    echo "DEV $b -> $(readlink "$d")"
    for f in vendor device class numa_node local_cpulist subsystem_vendor subsystem_device; do
      [ -r "$d/$f" ] && echo "  $f=$(cat "$d/$f" 2>/dev/null)"
    done
    [ -L "$d/driver" ] && echo "  driver -> $(readlink "$d/driver")"
    [ -L "$d/iommu_group" ] && echo "  iommu_group -> $(readlink "$d/iommu_group")"
    [ -r "$d/resource" ] && sed 's/^/  resource: /' "$d/resource" | grep -v '0x0000000000000000 0x0000000000000000 0x0000000000000000'
  done
} > "$out/pci.txt" 2>&1
{
  find /sys/bus/pci/devices -maxdepth 1 -printf '%p -> %l\n' | head -5
  find /sys/kernel/iommu_groups -mindepth 1 -maxdepth 1 | head -5
  for n in /sys/devices/system/node/node*; do
    echo "NODE $n cpulist=$(cat "$n/cpulist")"; head -3 "$n/meminfo"
    for h in "$n"/hugepages/hugepages-*; do
      [ -d "$h" ] && echo "  $h nr=$(cat "$h/nr_hugepages") free=$(cat "$h/free_hugepages")"
    done
  done
  echo "online=$(cat /sys/devices/system/cpu/online)"
  for c in /sys/devices/system/cpu/cpu[0-9]*; do
    t=$c/topology
    echo "$(basename "$c") pkg=$(cat "$t/physical_package_id" 2>/dev/null) core=$(cat "$t/core_id" 2>/dev/null) sib=$(cat "$t/thread_siblings_list" 2>/dev/null)"
  done | head -40
  echo "== class/iommu"; find /sys/class/iommu -mindepth 1 -maxdepth 1 2>&1
  echo "== acpi tables"; find /sys/firmware/acpi/tables -maxdepth 1 -type f -printf '%f\n' 2>&1 | head
} > "$out/system.txt" 2>&1
echo "captured into $out"

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What the kvm_host role does to rail NICs (``kvm_host_nics``). Private, pure.

Each entry names a NIC that gpu_topology lists (by PCI address, interface or RDMA device) and
either passes the whole function to VMs (``vfs: 0``) or creates that many SR-IOV VFs on it. This
module checks the entries against the host's ``nics`` (gpu_topology's return) and works out:

- the functions to bind to vfio-pci (the whole function, or its VFs: the PF keeps its driver,
  which runs the VFs' switch and, for InfiniBand, their GUIDs);
- the VFs' addresses before they exist (routing ID of the PF + offset + n * stride, PCIe base
  specification, SR-IOV capability; drivers/pci/iov.c pci_iov_virtfn_bus/devfn);
- the lines of /etc/gpuvirt/sriov.conf that ``gpuvirt-sriov apply`` reads at boot.

A NIC the host uses (its default route, a bond, a bridge) is refused, as are VFs the host had
before and this role did not make, when the entry would change their number, and VFs or a whole
function a VM holds. Nothing here touches the host.
"""

from __future__ import annotations

import re

from ansible_collections.gpuvirt.kvm.plugins.module_utils._bdf import (
    format_bdf,
    normalize_bdf,
    parse_bdf,
)

KEYS = ("nic", "vfs", "vf_settings")
ETHERNET_KEYS = ("mac", "vlan", "spoofchk")
INFINIBAND_KEYS = ("node_guid", "port_guid")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
GUID_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){7}$")

CONF_HEADER = (
    "# Managed by gpuvirt.kvm.kvm_host (kvm_host_nics): SR-IOV VFs that gpuvirt-sriov creates at\n"
    "# boot, before gpuvirt-vfio-bind binds them to vfio-pci. One line per NIC, then one per VF:\n"
    "#   pf BDF NUMVFS\n"
    "#   vf BDF INDEX key=value...   (mac vlan spoofchk | node_guid port_guid)\n"
)


def vf_bdf(pf_bdf, offset, stride, n):
    """The address of VF ``n`` (0-based) of ``pf_bdf``: the kernel's pci_iov_virtfn_bus/devfn."""
    domain, bus, slot, function = parse_bdf(pf_bdf)
    routing_id = (bus << 8) + (slot << 3) + function + offset + stride * n
    return format_bdf(domain, (routing_id >> 8) & 0xFF, (routing_id >> 3) & 0x1F, routing_id & 0x7)


def _find(nics, name, recorded=None):
    """The nics[] entry named by a PCI address, an interface or an RDMA device, or None. A
    function on vfio-pci has no interface left: an earlier run's record knows the name."""
    bdf = normalize_bdf(name)
    for old_bdf, old in (recorded or {}).items():
        if old.get("name") == name:
            bdf = old_bdf
    for nic in nics:
        names = nic.get("netdevs", []) + nic.get("rdma_devices", [])
        if nic["bdf"] == bdf or name in names:
            return nic
    return None


def _unquoted(where, key, value):
    """A problem when YAML read a PCI address, MAC or GUID as a number (0000:40:00.0 and
    52:54:00:12:34:56 are base-60 numbers to YAML 1.1), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ("%s: %s is the number %r, not text: YAML reads an unquoted 0000:40:00.0 or "
                "52:54:00:12:34:56 as a base-60 number; quote it (\"0000:40:00.0\")"
                % (where, key, value))
    return None


def _bool(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("yes", "true", "on", "1"):
        return True
    if text in ("no", "false", "off", "0"):
        return False
    return None


def _settings(where, nic, index, settings, problems):
    """The key=value words of one VF's line, or None after a problem."""
    if not isinstance(settings, dict):
        problems.append("%s: each VF's settings are a mapping (mac, vlan, spoofchk for Ethernet; "
                        "node_guid, port_guid for InfiniBand), got %r" % (where, settings))
        return None
    infiniband = nic.get("link_layer") == "InfiniBand"
    allowed = INFINIBAND_KEYS if infiniband else ETHERNET_KEYS
    other = ETHERNET_KEYS if infiniband else INFINIBAND_KEYS
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        wrong = [k for k in unknown if k in other]
        problems.append("%s: %s %s for %s VFs; an %s NIC's VFs take %s" % (
            where, ", ".join(unknown),
            ("is only" if len(unknown) == 1 else "are only") if wrong else "is not a setting",
            "InfiniBand" if not infiniband and wrong else ("Ethernet" if wrong else "any"),
            nic.get("link_layer") or "Ethernet", ", ".join(allowed)))
        return None
    words = []
    for key in allowed:
        if key not in settings or settings[key] is None:
            continue
        value = settings[key]
        if key != "vlan" and _unquoted(where, key, value):
            problems.append(_unquoted(where, key, value))
            return None
        if key == "mac":
            mac = str(value).strip().lower()
            if not MAC_RE.match(mac) or int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
                problems.append("%s: mac %r is not a unicast MAC address (write it like "
                                "52:54:00:12:34:56)" % (where, value))
                return None
            words.append("mac=" + mac)
        elif key == "vlan":
            if isinstance(value, bool) or not str(value).isdigit() or not 0 <= int(value) <= 4094:
                problems.append("%s: vlan %r is not a VLAN ID (1-4094, or 0 for none)"
                                % (where, value))
                return None
            words.append("vlan=%d" % int(value))
        elif key == "spoofchk":
            flag = _bool(value)
            if flag is None:
                problems.append("%s: spoofchk %r is not true or false" % (where, value))
                return None
            words.append("spoofchk=" + ("on" if flag else "off"))
        else:
            guid = str(value).strip().lower()
            if not GUID_RE.match(guid) or guid == "00:00:00:00:00:00:00:00":
                problems.append("%s: %s %r is not a GUID (eight bytes, like "
                                "0c:42:a1:03:00:24:00:01)" % (where, key, value))
                return None
            words.append("%s=%s" % (key, guid))
    return words


def host_nic_plan(entries, nics, recorded=None, option="kvm_host_nics"):
    """Checks ``entries`` against gpu_topology's ``nics``; ``recorded`` is the record's ``nics``
    ({PF: {vfs, numvfs_before, name}}) of an earlier run. Returns {problems, nics, bind, vfs,
    conf, record, dropped, release, made_vfs}; the rest is meaningless while problems is not
    empty."""
    recorded = recorded or {}
    problems = []
    planned = []
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        problem = "%s: expected a list of NICs ({nic: ..., vfs: N}), got %r" % (option, entries)
        return {"problems": [problem], "nics": [], "bind": [], "vfs": [], "conf": CONF_HEADER,
                "record": {}, "dropped": [], "release": [], "made_vfs": []}
    seen = {}
    used_ids = {}
    # Functions listed whole: a dual-function NIC without ACS may be passed whole if both are.
    whole = set()
    for entry in entries:
        if isinstance(entry, dict) and entry.get("nic") and str(entry.get("vfs", 0)) == "0":
            found = _find(nics, str(entry["nic"]).strip(), recorded)
            if found is not None:
                whole.add(found["bdf"])
    offered = ", ".join(
        "%s (%s)" % (n["bdf"], ", ".join(n.get("netdevs") or n.get("rdma_devices") or ["-"]))
        for n in nics) or "none"
    for i, entry in enumerate(entries):
        where = "%s[%d]" % (option, i)
        if not isinstance(entry, dict) or not entry.get("nic"):
            problems.append("%s: each entry is a mapping with nic (a PCI address, interface or "
                            "RDMA device) and vfs (0: the whole function), got %r" % (where, entry))
            continue
        unknown = sorted(set(entry) - set(KEYS))
        if unknown:
            problems.append("%s: unknown key(s) %s; an entry has %s"
                            % (where, ", ".join(unknown), ", ".join(KEYS)))
            continue
        if _unquoted(where, "nic", entry["nic"]):
            problems.append(_unquoted(where, "nic", entry["nic"]))
            continue
        name = str(entry["nic"]).strip()
        where = "%s[%d] (%s)" % (option, i, name)
        nic = _find(nics, name, recorded)
        if nic is None:
            problems.append("%s: no NIC of a model the collection offers is named %s on this "
                            "host; its NICs: %s. Name one by PCI address, interface or RDMA "
                            "device (or list a stand-in's ID in the platform file's nic_ids)"
                            % (where, name, offered))
            continue
        bdf = nic["bdf"]
        if bdf in seen:
            problems.append("%s: %s is named twice (also %s)" % (where, bdf, seen[bdf]))
            continue
        seen[bdf] = where
        vfs = entry.get("vfs", 0)
        if isinstance(vfs, bool) or not str(vfs).isdigit():
            problems.append("%s: vfs %r is not a count (0 passes the whole function; N creates N "
                            "SR-IOV VFs)" % (where, vfs))
            continue
        vfs = int(vfs)
        if nic.get("host_use"):
            problems.append("%s: %s is the host's own (%s); passing it or its VFs through would "
                            "take the host's network away, and VMs are never offered it. Leave it "
                            "out of %s" % (where, bdf, nic["host_use"], option))
            continue
        sriov = nic.get("sriov")
        numvfs = (sriov or {}).get("numvfs", 0)
        held_vfs = [vf for vf in (sriov or {}).get("vfs", []) if vf.get("allocated_to")]
        if vfs > 0 and sriov is None:
            problems.append("%s: %s has no SR-IOV capability (no sriov_totalvfs), so it cannot "
                            "have VFs; set vfs: 0 to pass the whole function" % (where, bdf))
            continue
        if sriov is not None and vfs > sriov["totalvfs"]:
            problems.append("%s: vfs %d is more than %s offers (sriov_totalvfs %d); the NIC's "
                            "firmware sets that limit (mlxconfig SRIOV_EN, NUM_OF_VFS)" % (
                                where, vfs, bdf, sriov["totalvfs"]))
            continue
        if vfs > 0 and nic.get("allocated_to"):
            problems.append("%s: VM %s holds the whole function %s; remove that VM first, then "
                            "give the NIC VFs" % (where, nic["allocated_to"], bdf))
            continue
        if vfs != numvfs:
            if held_vfs:
                problems.append("%s: changing %s from %d to %d VFs removes them all first, but "
                                "VM(s) %s hold %s; remove those VMs first" % (
                                    where, bdf, numvfs, vfs,
                                    ", ".join(sorted({vf["allocated_to"] for vf in held_vfs})),
                                    ", ".join(vf["bdf"] for vf in held_vfs)))
                continue
            ours = recorded.get(bdf, {})
            if numvfs > 0 and (not ours or numvfs != ours.get("vfs")
                               or ours.get("numvfs_before", 0) > 0):
                problems.append("%s: %s has %d VF(s) that this role did not make (sriov_numvfs); "
                                "changing that to %d would remove them. Set vfs: %d to take them "
                                "as they are, or remove them first (echo 0 > /sys/bus/pci/devices/"
                                "%s/sriov_numvfs)" % (where, bdf, numvfs, vfs, numvfs, bdf))
                continue
        settings = entry.get("vf_settings") or []
        if not isinstance(settings, list):
            problems.append("%s: vf_settings is a list, one mapping per VF (VF 0 first), got %r"
                            % (where, settings))
            continue
        if len(settings) > vfs:
            problems.append("%s: vf_settings has %d entries for %d VF(s)"
                            % (where, len(settings), vfs))
            continue
        lines = []
        bad = False
        for n, vf_settings in enumerate(settings):
            words = _settings("%s.vf_settings[%d]" % (where, n), nic, n, vf_settings, problems)
            if words is None:
                bad = True
                continue
            for word in words:
                key, value = word.split("=", 1)
                if key in ("mac", "node_guid", "port_guid"):
                    if value in used_ids:
                        problems.append("%s.vf_settings[%d]: %s %s is given twice (also %s)" % (
                            where, n, key, value, used_ids[value]))
                        bad = True
                    used_ids[value] = "%s.vf_settings[%d]" % (where, n)
            if words:
                lines.append("vf %s %d %s" % (bdf, n, " ".join(words)))
        if bad:
            continue
        if vfs == 0:
            # vfio-pci needs the whole IOMMU group: the other functions of a NIC without ACS.
            # (the switch port above it in its group is a bridge: it stays with the host)
            others = [m for m in nic.get("iommu_group_members", [])
                      if m != bdf and m not in nic.get("pcie_path", []) and m not in whole]
            if others:
                problems.append("%s: %s shares IOMMU group %s with %s, which would go to the VM "
                                "too; list those functions with vfs: 0 as well (one VM then gets "
                                "them all)" % (where, bdf, nic.get("iommu_group"),
                                               ", ".join(others)))
                continue
            vf_bdfs = []
        else:
            existing = [vf["bdf"] for vf in (sriov or {}).get("vfs", [])]
            offset, stride = sriov.get("offset") or 0, sriov.get("stride") or 0
            if len(existing) != vfs and (offset <= 0 or stride <= 0):
                problems.append("%s: %s does not say where its VFs will be (sriov_offset %d, "
                                "sriov_stride %d), so they cannot be listed for vfio-pci before "
                                "they exist" % (where, bdf, offset, stride))
                continue
            vf_bdfs = (existing if len(existing) == vfs else
                       [vf_bdf(bdf, offset, stride, n) for n in range(vfs)])
            if nic.get("driver") == "vfio-pci" and recorded.get(bdf, {}).get("vfs") != 0:
                problems.append("%s: %s is on vfio-pci, but not by this role, and only its own "
                                "driver can make VFs; give it back to that driver first" % (
                                    where, bdf))
                continue
        planned.append({
            "bdf": bdf,
            "name": name,
            "link_layer": nic.get("link_layer"),
            "netdev": (nic.get("netdevs") or [None])[0],
            "vfs": vfs,
            "numvfs_now": numvfs,
            "vf_bdfs": vf_bdfs,
            "bind": vf_bdfs if vfs else [bdf],
            "conf": ["pf %s %d" % (bdf, vfs)] + lines if vfs or numvfs else [],
        })
    conf = CONF_HEADER + "".join(line + "\n" for nic in planned for line in nic["conf"])
    # The record keeps, per NIC, how many VFs it had before the role first touched it; a NIC
    # taken out of the entries gets that number back now (``dropped``) and leaves the record.
    record = {}
    for nic in planned:
        before = recorded.get(nic["bdf"], {}).get("numvfs_before", nic["numvfs_now"])
        record[nic["bdf"]] = {"vfs": nic["vfs"], "numvfs_before": before, "name": nic["name"]}
    gone = sorted(set(recorded) - set(seen))  # named but refused: not dropped either
    # VF counts to give back (a NIC passed whole had none to change) ...
    dropped = ["%s=%d" % (bdf, int(recorded[bdf].get("numvfs_before", 0))) for bdf in gone
               if recorded[bdf].get("vfs") != recorded[bdf].get("numvfs_before")]
    # ... and functions passed whole before that are not now: back to their driver first.
    release = sorted(bdf for bdf, old in recorded.items()
                     if old.get("vfs") == 0 and (bdf in gone or record.get(bdf, {}).get("vfs")))
    # The VFs the role makes (VFs the host had before are taken as they are, and recorded with
    # their driver like any other function; these come and go with sriov_numvfs).
    made = sorted(vf for nic in planned for vf in nic["vf_bdfs"]
                  if record[nic["bdf"]]["numvfs_before"] == 0)
    for bdf in gone:
        nic = _find(nics, bdf)
        vfs = ((nic or {}).get("sriov") or {}).get("vfs", [])
        held = [vf for vf in vfs if vf.get("allocated_to")]
        if held and recorded[bdf].get("vfs") != recorded[bdf].get("numvfs_before"):
            problems.append("%s: %s is no longer listed, so its VFs would go back to %s, but "
                            "VM(s) %s hold %s; keep the NIC in %s, or remove those VMs first" % (
                                option, bdf, recorded[bdf].get("numvfs_before", 0),
                                ", ".join(sorted({vf["allocated_to"] for vf in held})),
                                ", ".join(vf["bdf"] for vf in held), option))
    return {
        "problems": problems,
        "nics": planned,
        "bind": sorted({b for nic in planned for b in nic["bind"]}),
        "vfs": sorted({b for nic in planned for b in nic["vf_bdfs"]}),
        "conf": conf,
        "record": record,
        "dropped": dropped,
        "release": release,
        "made_vfs": made,
    }

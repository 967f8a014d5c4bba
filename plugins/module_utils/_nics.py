# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Rail NICs: the InfiniBand and Ethernet adapters beside the GPUs. Private, pure.

A rail NIC is an allow-listed adapter (ConnectX, BlueField) whose nearest GPUs are at most a
PCIe switch away (``nvidia-smi topo -m``'s PIX or PXB): the topology says which GPUs it serves,
never a table alone. A NIC the host itself uses (a route through it, or enslaved to a bond or a
bridge) is never offered to a VM. :func:`classify` reads a :class:`HostTopology` into
:class:`Nic` records, which hold all that choosing a VM's rails needs: :func:`choose_nics` reads
them alone, on the host and on the controller (the fleet planner rebuilds them from
``gpu_topology``'s ``placement_state``, :meth:`Nic.to_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ansible_collections.gpuvirt.kvm.plugins.module_utils._topology import (
    LINK_ORDER,
    LINK_PIX,
    LINK_PXB,
    PCI_ACS_CR,
    PCI_ACS_DT,
    PCI_ACS_RR,
    PCI_ATS_CTRL_ENABLE,
    PCI_CLASS_BRIDGE_PCI,
)

MELLANOX = 0x15B3

# PCI classes (base << 8 | sub): Ethernet and InfiniBand controllers.
NIC_CLASSES = (0x0200, 0x0207)

# Physical functions this collection offers as rails. Names as in the PCI ID database (pci.ids,
# vendor 15b3); BlueField's integrated ConnectX functions are NICs too.
NIC_IDS = {
    (MELLANOX, 0x1013): "ConnectX-4",
    (MELLANOX, 0x1015): "ConnectX-4 Lx",
    (MELLANOX, 0x1017): "ConnectX-5",
    (MELLANOX, 0x1019): "ConnectX-5 Ex",
    (MELLANOX, 0x101B): "ConnectX-6",
    (MELLANOX, 0x101D): "ConnectX-6 Dx",
    (MELLANOX, 0x101F): "ConnectX-6 Lx",
    (MELLANOX, 0x1021): "ConnectX-7",
    (MELLANOX, 0x1023): "ConnectX-8",
    (MELLANOX, 0xA2D2): "BlueField ConnectX-5",
    (MELLANOX, 0xA2D6): "BlueField-2 ConnectX-6 Dx",
    (MELLANOX, 0xA2DC): "BlueField-3 ConnectX-7",
}
# Their virtual functions (what sriov_vf_device names).
NIC_VF_IDS = {
    (MELLANOX, 0x1014): "ConnectX-4 VF",
    (MELLANOX, 0x1016): "ConnectX-4 Lx VF",
    (MELLANOX, 0x1018): "ConnectX-5 VF",
    (MELLANOX, 0x101A): "ConnectX-5 Ex VF",
    (MELLANOX, 0x101C): "ConnectX-6 VF",
    (MELLANOX, 0x101E): "ConnectX mlx5Gen VF",
}

RAIL_LINKS = (LINK_PIX, LINK_PXB)

# Why a VF that a PF's virtfnN link names cannot be had when sysfs has no device for it.
NOT_IN_TREE = "it is not in the host's PCI tree"


@dataclass(frozen=True)
class Nic:
    """One physical network function and what it is to the placement."""

    bdf: str
    model: str
    rail_gpus: tuple  # the GPUs it serves (PCI order); () when it is no GPU's rail
    rail_link: str | None  # PIX or PXB to those GPUs; None when it is no rail
    host_use: str | None  # why the host keeps it (never offered), or None
    named: bool = True  # False: the platform names its rail NICs, and not this one
    sriov_totalvfs: int | None = None  # None: no SR-IOV
    vfs: tuple = ()  # its VFs (BDFs), virtfn order
    # VFs no VM can have, and why: ((VF, what the host uses it for), ...) and
    # ((VF, (other endpoints in its IOMMU group, ...)), ...).
    vf_host_use: tuple = ()
    vf_group_mates: tuple = ()

    @property
    def offered(self):
        return bool(self.rail_gpus) and self.host_use is None and self.named

    def usable_vf(self, vf):
        """Whether a VM may have this VF alone (held or not)."""
        return vf not in dict(self.vf_host_use) and vf not in dict(self.vf_group_mates)

    def to_dict(self):
        """Plain data (``placement_state.nics``), read back by :func:`nic_from_dict`."""
        return {
            "bdf": self.bdf, "model": self.model, "rail_gpus": list(self.rail_gpus),
            "rail_link": self.rail_link, "host_use": self.host_use, "named": self.named,
            "sriov_totalvfs": self.sriov_totalvfs, "vfs": list(self.vfs),
            "vf_host_use": [[vf, why] for vf, why in self.vf_host_use],
            "vf_group_mates": [[vf, list(mates)] for vf, mates in self.vf_group_mates],
        }


def nic_from_dict(data):
    """A :class:`Nic` from :meth:`Nic.to_dict`'s data. Raises KeyError, TypeError, ValueError."""
    total = data.get("sriov_totalvfs")
    return Nic(
        bdf=str(data["bdf"]), model=str(data["model"]),
        rail_gpus=tuple(str(g) for g in data.get("rail_gpus") or ()),
        rail_link=None if data.get("rail_link") is None else str(data["rail_link"]),
        host_use=None if data.get("host_use") is None else str(data["host_use"]),
        named=bool(data.get("named", True)),
        sriov_totalvfs=None if total is None else int(total),
        vfs=tuple(str(v) for v in data.get("vfs") or ()),
        vf_host_use=tuple((str(vf), str(why)) for vf, why in data.get("vf_host_use") or ()),
        vf_group_mates=tuple((str(vf), tuple(str(m) for m in mates))
                             for vf, mates in data.get("vf_group_mates") or ()))


def nic_model(id_pair):
    """The model name of a NIC function's (vendor, device), or "unknown vvvv:dddd"."""
    return NIC_IDS.get(id_pair) or NIC_VF_IDS.get(id_pair) or "unknown %04x:%04x" % id_pair


def host_nics(topology, platform=None):
    """The host's allow-listed NIC physical functions (VFs are listed under them), PCI order:
    the built-in models, or the platform's ``nic_ids`` and ``nic_classes``."""
    ids = getattr(platform, "nic_ids", ()) or NIC_IDS
    classes = getattr(platform, "nic_classes", ()) or NIC_CLASSES
    return [d for d in topology.devices_matching(ids, classes)
            if (topology.nics.get(d.bdf) is None or topology.nics[d.bdf].physfn is None)]


def nic_functions(topology, platform=None):
    """Every allow-listed NIC physical function and each of its VFs (BDFs): what a domain may
    hold of the host's rails."""
    found = set()
    for dev in host_nics(topology, platform):
        found.add(dev.bdf)
        net = topology.nics.get(dev.bdf)
        found.update(net.vfs if net else ())
    return found


def host_use(topology, bdf):
    """Why the host itself uses a NIC function (a route through one of its interfaces, or an
    interface enslaved to a bond or a bridge, and what goes through that), or None."""
    net = topology.nics.get(bdf)
    if net is None:
        return None
    reasons = []
    uppers = net.uppers or ((),) * len(net.netdevs)
    for name, master, stacked in zip(net.netdevs, net.masters or (None,) * len(net.netdevs),
                                     uppers):
        for what in topology.host_routes.get(name, ()):
            reasons.append("%s carries the host's %s" % (name, what))
        for upper in stacked:
            if upper == master:
                continue
            through = topology.host_routes.get(upper, ())
            reasons.append("%s has %s on it%s" % (
                name, upper, " (which carries the host's %s)" % ", ".join(through)
                if through else ""))
        if master:
            through = topology.host_routes.get(master, ())
            reasons.append("%s is enslaved to %s%s" % (
                name, master, " (which carries the host's %s)" % ", ".join(through)
                if through else ""))
    return "; ".join(reasons) or None


def _nearest_gpus(topology, nic_bdf, gpu_bdfs):
    """(link, GPUs at that link) for the GPUs nearest a NIC; (None, ()) without GPUs."""
    best = None
    near = []
    for gpu in gpu_bdfs:
        link = topology.link(nic_bdf, gpu)
        rank = LINK_ORDER.index(link)
        if best is None or rank < best:
            best, near = rank, [gpu]
        elif rank == best:
            near.append(gpu)
    if best is None:
        return None, ()
    return LINK_ORDER[best], tuple(sorted(near))


def rails(topology, gpus, nics):
    """{NIC BDF: (link, GPUs it serves)} for the NICs that share a PCIe switch with some GPU.

    NICs whose nearest GPUs are the same set share them out in PCI order: as many NICs as GPUs
    (DGX A100, DGX H100) gives one GPU each; fewer NICs (a DGX-2 switch: 2 GPUs, 1 NIC) gives
    each NIC a run of GPUs; more NICs than GPUs gives some GPUs several NICs.
    """
    gpu_bdfs = [g.bdf for g in gpus]
    groups = {}
    for nic in nics:
        link, near = _nearest_gpus(topology, nic.bdf, gpu_bdfs)
        if link in RAIL_LINKS:
            groups.setdefault((link, near), []).append(nic.bdf)
    result = {}
    for (link, near), members in groups.items():
        members.sort()
        count, width = len(members), len(near)
        for i, bdf in enumerate(members):
            if count >= width:
                served = (near[i * width // count],)
            else:
                served = near[i * width // count:(i + 1) * width // count]
            result[bdf] = (link, served)
    return result


def classify(topology, gpus, platform=None):
    """[Nic] for every allow-listed NIC physical function, PCI order."""
    nics = host_nics(topology, platform)
    rail_map = rails(topology, gpus, nics)
    named = set(getattr(platform, "rail_nics", ()) or ())
    result = []
    for n in nics:
        net = topology.nics.get(n.bdf)
        vfs = tuple(net.vfs) if net else ()
        kept, mates = [], []
        for vf in vfs:
            if vf not in topology.pci:
                kept.append((vf, NOT_IN_TREE))
                continue
            use = host_use(topology, vf)
            if use:
                kept.append((vf, use))
            others = _group_mates(topology, vf)
            if others:
                mates.append((vf, tuple(others)))
        result.append(Nic(
            bdf=n.bdf, model=nic_model(n.id_pair),
            rail_gpus=rail_map.get(n.bdf, (None, ()))[1],
            rail_link=rail_map.get(n.bdf, (None, ()))[0],
            host_use=host_use(topology, n.bdf), named=not named or n.bdf in named,
            sriov_totalvfs=net.sriov_totalvfs if net else None, vfs=vfs,
            vf_host_use=tuple(kept), vf_group_mates=tuple(mates)))
    return result


def platform_warnings(topology, gpus, nics, platform):
    """What is wrong with the rail NICs a platform names: not a NIC here, or no GPU's rail."""
    warnings = []
    by_bdf = {n.bdf: n for n in nics}
    for bdf in getattr(platform, "rail_nics", ()) or ():
        nic = by_bdf.get(bdf)
        if nic is None:
            warnings.append(
                "platform %s names rail NIC %s, which is no NIC of this host (its nic_ids and "
                "nic_classes, or the built-in ConnectX / BlueField list); it is not offered"
                % (platform.name, bdf))
        elif not nic.rail_gpus:
            link, _near = _nearest_gpus(topology, bdf, [g.bdf for g in gpus])
            warnings.append(
                "platform %s names rail NIC %s, but it shares no PCIe switch with a GPU (the "
                "nearest is %s); rails come from the topology, so it is not offered" % (
                    platform.name, bdf, link or "none"))
    return warnings


def gpu_rails(nics):
    """{GPU BDF: [offered NIC BDFs that serve it]}."""
    result = {}
    for nic in nics:
        if nic.offered:
            for gpu in nic.rail_gpus:
                result.setdefault(gpu, []).append(nic.bdf)
    return result


# --- choosing a VM's rails ------------------------------------------------------------------------

NICS_AUTO = "auto"
NIC_MODES = ("auto", "whole", "vf")


@dataclass(frozen=True)
class NicChoice:
    """One rail a VM gets: the NIC's physical function, or one of its VFs."""

    nic: str  # the physical function
    bdf: str  # what the VM gets: the physical function itself or a VF of it
    vf: bool
    gpus: tuple  # the VM's GPUs this rail serves


class NicChoiceError(ValueError):
    """A VM cannot get the rails it asks for; the message names the option to change."""


def choose_nics(nics, gpus, held, count=NICS_AUTO, mode="auto", allow_fewer=False, prefer=()):
    """The rails a VM that gets ``gpus`` (BDFs) should have, nearest GPU first.

    ``nics``: [Nic] (classify); ``held``: {BDF: holder} of NIC functions and VFs other VMs hold.
    ``count``: ``auto`` (every rail under the VM's GPUs), a number (that many of them), or 0.
    ``mode``: ``whole`` (physical functions only), ``vf`` (VFs only) or ``auto``: the whole
    function where the VM gets every GPU it serves and the NIC has no VFs (vfio-pci refuses a PF
    with SR-IOV enabled), else a VF. ``allow_fewer``: take what is free instead of failing.
    ``prefer``: what the VM holds now (kept where it still answers). Raises NicChoiceError.
    """
    if count == 0:
        return []
    if mode not in NIC_MODES:
        raise NicChoiceError("nic_mode: %r is not one of %s" % (mode, ", ".join(NIC_MODES)))
    offered = [n for n in nics if n.offered]
    if not offered and allow_fewer:
        return []
    if not offered:
        kept = [n.bdf for n in nics if n.rail_gpus and not n.offered]
        raise NicChoiceError(
            "nics: this host has no rail NIC to offer (%s); ask nics: 0, or see gpu_topology's "
            "nics for what it found (docs/networking.md)" % (
                "the host keeps its rail NICs %s" % ", ".join(kept) if kept
                else "no ConnectX or BlueField NIC sits beside a GPU"))
    order = {bdf: i for i, bdf in enumerate(gpus)}
    rails = sorted((n for n in offered if set(n.rail_gpus) & set(gpus)),
                   key=lambda n: (min(order[g] for g in n.rail_gpus if g in order), n.bdf))
    wanted = len(rails) if count == NICS_AUTO else int(count)
    if (wanted > len(rails) or not rails) and not allow_fewer:
        raise NicChoiceError(
            "nics: %s asked, but GPU(s) %s have %d rail NIC(s) the host does not use (%s); ask "
            "%s, or nics_allow_fewer: true" % (
                wanted if count != NICS_AUTO else "auto", ", ".join(gpus), len(rails),
                ", ".join(n.bdf for n in rails) or "none",
                "nics: 0" if not rails else "nics: auto or at most %d" % len(rails)))
    chosen, refusals = [], []
    for nic in rails:
        if len(chosen) == wanted:
            break
        choice = _rail_for(nic, gpus, held, mode, set(prefer))
        if isinstance(choice, NicChoice):
            chosen.append(choice)
        else:
            refusals.append(choice)  # the next rail may still do
    if len(chosen) < wanted and not allow_fewer:
        raise NicChoiceError(refusals[0])
    return chosen


def _group_mates(topology, bdf):
    """The other endpoints in a function's IOMMU group (bridges do not count): a VF in its PF's
    group (an endpoint without ACS) cannot be given to a VM while the PF stays on the host."""
    dev = topology.pci.get(bdf)
    if dev is None:
        return []
    return [m for m in dev.iommu_group_members if m != bdf and m in topology.pci
            and topology.pci[m].pci_class != PCI_CLASS_BRIDGE_PCI]


def _rail_for(nic, gpus, held, mode, prefer=frozenset()):
    """A NicChoice for one rail NIC, or the reason it cannot be had (a string)."""
    vfs = nic.vfs
    served = tuple(g for g in nic.rail_gpus if g in gpus)
    others = [g for g in nic.rail_gpus if g not in gpus]
    held_vfs = ["%s (%s)" % (vf, held[vf]) for vf in vfs if vf in held]
    if nic.bdf in held:
        return ("nics: rail NIC %s of GPU(s) %s is held whole by %s; free it, or set "
                "nics_allow_fewer: true" % (nic.bdf, ", ".join(served), held[nic.bdf]))
    if mode == "whole" or (mode == "auto" and not others and not vfs):
        if others:
            return ("nic_mode: whole, but rail NIC %s also serves GPU(s) %s, which this VM does "
                    "not get; use nic_mode: vf or auto (a VF of it)" % (nic.bdf, ", ".join(others)))
        if vfs:
            return ("nic_mode: whole, but rail NIC %s has %d VF(s) (sriov_numvfs), and vfio-pci "
                    "takes no physical function with SR-IOV enabled; set its sriov_numvfs to 0, "
                    "or use nic_mode: auto or vf%s" % (
                        nic.bdf, len(vfs), " (held: %s)" % ", ".join(held_vfs) if held_vfs
                        else ""))
        return NicChoice(nic=nic.bdf, bdf=nic.bdf, vf=False, gpus=served)
    if nic.sriov_totalvfs is None:
        return ("nics: rail NIC %s (GPU(s) %s) has no SR-IOV, so it has no VFs to share%s" % (
            nic.bdf, ", ".join(nic.rail_gpus),
            "; use nic_mode: whole" if not others else
            "; give one VM all of GPU(s) %s to have it whole" % ", ".join(nic.rail_gpus)))
    if not vfs:
        return ("nics: rail NIC %s has no VFs yet (sriov_numvfs is 0 of %d); create them with the "
                "kvm_host role (kvm_host_nics: [{nic: %s, vfs: N}], docs/networking.md), or use "
                "nic_mode: whole%s" % (
                    nic.bdf, nic.sriov_totalvfs, nic.bdf,
                    "" if not others else " with all of GPU(s) %s" % ", ".join(nic.rail_gpus)))
    mates = dict(nic.vf_group_mates)
    kept = dict(nic.vf_host_use)
    usable = [vf for vf in vfs if vf not in held and nic.usable_vf(vf)]
    if not usable and all(vf in mates for vf in vfs if kept.get(vf) != NOT_IN_TREE):
        return ("nics: the VFs of rail NIC %s share their IOMMU group with %s (no ACS between "
                "them), so vfio cannot give one to a VM alone; use nic_mode: whole with 0 VFs, "
                "or nics_allow_fewer: true" % (nic.bdf, ", ".join(mates.get(vfs[0], ()))
                                               or "other functions"))
    for vf in sorted(usable, key=lambda b: (b not in prefer, vfs.index(b))):
        return NicChoice(nic=nic.bdf, bdf=vf, vf=True, gpus=served)
    kept_text = ["%s (%s)" % (vf, kept[vf]) for vf in vfs
                 if vf not in held and vf in kept and kept[vf] != NOT_IN_TREE]
    return ("nics: no VF of rail NIC %s is free (held: %s%s); free one, create more, or set "
            "nics_allow_fewer: true" % (nic.bdf, ", ".join(held_vfs) or "none",
                                        "; the host uses %s" % ", ".join(kept_text)
                                        if kept_text else ""))


# --- what GPUDirect RDMA in a VM depends on -------------------------------------------------------

def _ats_state(topology, bdf):
    caps = topology.ext_caps.get(bdf)
    if caps is None or not caps.readable:
        return "unknown"
    if caps.ats_ctrl is None:
        return "absent"
    return "enabled" if caps.ats_ctrl & PCI_ATS_CTRL_ENABLE else "present"


def _ports_between(topology, a, b):
    """The bridges a peer-to-peer request crosses from a up to where a's and b's paths meet,
    and down to b (each side's bridges below the shared ones)."""
    pa, pb = topology.pci[a].bridges, topology.pci[b].bridges
    common = 0
    for x, y in zip(pa, pb):
        if x != y:
            break
        common += 1
    return list(pa[common:]) + list(pb[common:])


def gpudirect_rdma(topology, nics):
    """Per rail NIC: the ACS and ATS state GPUDirect RDMA between it and its GPUs depends on once
    both are passed through (the Linux and PCIe names: pci_regs.h).

    - ATS on the NIC and the GPUs: a passed-through device sends translated (host physical)
      addresses only when it has an ATS capability (ConnectX: ATS_ENABLED in its firmware).
    - ACS on the switch ports between them: P2P Request Redirect (RR) without Direct Translated
      P2P (DT) sends every peer-to-peer request up to the root complex; with DT set, translated
      requests go straight across the switch.
    """
    report = []
    for nic in nics:
        if not nic.rail_gpus:
            continue
        why = []
        ats = {nic.bdf: _ats_state(topology, nic.bdf)}
        ats.update({g: _ats_state(topology, g) for g in nic.rail_gpus
                    if g not in topology.pci or not topology.pci[g].missing})
        for bdf, state in ats.items():
            kind = "NIC" if bdf == nic.bdf else "GPU"
            if state == "unknown":
                why.append("%s %s: config space unreadable past 256 bytes; run gpu_topology as "
                           "root (become) to read ACS and ATS" % (kind, bdf))
            elif state == "absent":
                why.append("%s %s has no ATS capability%s" % (
                    kind, bdf, " (ConnectX: mlxconfig -d %s set ATS_ENABLED=true, then a cold "
                    "reset)" % bdf if kind == "NIC" else ""))
        ports = []
        seen = set()
        for gpu in nic.rail_gpus:
            for port in _ports_between(topology, nic.bdf, gpu):
                if port in seen:
                    continue
                seen.add(port)
                caps = topology.ext_caps.get(port)
                if caps is None or not caps.readable:
                    state, redirects = "unknown", None
                elif caps.acs_ctrl is None:
                    state, redirects = "absent", False
                else:
                    names = [n for bit, n in ((PCI_ACS_RR, "RR"), (PCI_ACS_CR, "CR"),
                                              (PCI_ACS_DT, "DT")) if caps.acs_ctrl & bit]
                    state = " ".join(names) or "none set"
                    redirects = bool(caps.acs_ctrl & PCI_ACS_RR) and not (
                        caps.acs_ctrl & PCI_ACS_DT)
                if redirects:
                    why.append("switch port %s redirects peer-to-peer requests to the root "
                               "complex (ACS RR without DT): set Direct Translated P2P (DT) "
                               "on it" % port)
                ports.append({"bdf": port, "acs": state, "redirects_p2p": redirects})
        report.append({
            "nic": nic.bdf, "gpus": list(nic.rail_gpus), "ats": ats, "ports": ports,
            "ready": not why, "why": why})
    return report

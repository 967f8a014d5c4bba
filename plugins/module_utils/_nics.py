# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Rail NICs: the InfiniBand and Ethernet adapters beside the GPUs. Private, pure.

A rail NIC is an allow-listed adapter (ConnectX, BlueField) whose nearest GPUs are at most a
PCIe switch away (``nvidia-smi topo -m``'s PIX or PXB): the topology says which GPUs it serves,
never a table alone. A NIC the host itself uses (a route through it, or enslaved to a bond or a
bridge) is never offered to a VM. Everything here reads a :class:`HostTopology`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ansible_collections.gpuvirt.kvm.plugins.module_utils._topology import (
    LINK_ORDER,
    LINK_PIX,
    LINK_PXB,
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


@dataclass(frozen=True)
class Nic:
    """One physical network function and what it is to the placement."""

    bdf: str
    model: str
    rail_gpus: tuple  # the GPUs it serves (PCI order); () when it is no GPU's rail
    rail_link: str | None  # PIX or PXB to those GPUs; None when it is no rail
    host_use: str | None  # why the host keeps it (never offered), or None

    @property
    def offered(self):
        return bool(self.rail_gpus) and self.host_use is None


def nic_model(id_pair):
    """The model name of a NIC function's (vendor, device), or "unknown vvvv:dddd"."""
    return NIC_IDS.get(id_pair) or NIC_VF_IDS.get(id_pair) or "unknown %04x:%04x" % id_pair


def host_nics(topology, ids=None):
    """The host's allow-listed NIC physical functions (VFs are listed under them), PCI order."""
    ids = NIC_IDS if ids is None else ids
    return [d for d in topology.devices_matching(ids, NIC_CLASSES)
            if (topology.nics.get(d.bdf) is None or topology.nics[d.bdf].physfn is None)]


def host_use(topology, bdf):
    """Why the host itself uses a NIC function (a route through one of its interfaces, or an
    interface enslaved to a bond or a bridge, and what goes through that), or None."""
    net = topology.nics.get(bdf)
    if net is None:
        return None
    reasons = []
    for name, master in zip(net.netdevs, net.masters or (None,) * len(net.netdevs)):
        for what in topology.host_routes.get(name, ()):
            reasons.append("%s carries the host's %s" % (name, what))
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
    """{NIC BDF: (link, GPUs it serves)} for the NICs within a PCIe switch of some GPU.

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


def classify(topology, gpus, ids=None):
    """[Nic] for every allow-listed NIC physical function, PCI order."""
    nics = host_nics(topology, ids)
    rail_map = rails(topology, gpus, nics)
    return [
        Nic(bdf=n.bdf, model=nic_model(n.id_pair),
            rail_gpus=rail_map.get(n.bdf, (None, ()))[1],
            rail_link=rail_map.get(n.bdf, (None, ()))[0],
            host_use=host_use(topology, n.bdf))
        for n in nics]


def gpu_rails(nics):
    """{GPU BDF: [offered NIC BDFs that serve it]}."""
    result = {}
    for nic in nics:
        if nic.offered:
            for gpu in nic.rail_gpus:
                result.setdefault(gpu, []).append(nic.bdf)
    return result

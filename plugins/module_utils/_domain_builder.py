# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""A VmSpec -> the libvirt domain that makes it a near-native GPU VM. Private, pure.

:func:`build_domain` applies the tuning of docs/hardware.md section 6: 1:1 vCPU pinning,
emulator and I/O threads on host-reserved CPUs, memory strict to the GPUs' nodes (hugepages
when reserved), guest NUMA cells and one PCIe expander bus per host node for multi-node VMs
(each GPU under its node's bus), whole IOMMU groups passed through, a 64-bit MMIO window sized
from the BARs, multiqueue virtio, and the collection's metadata. The result is a
``_domain.Domain``; ``VmSpec.from_domain`` reads it back.
"""

from __future__ import annotations

from ansible_collections.gpuvirt.kvm.plugins.module_utils._domain import (
    GUEST_AGENT_CHANNEL,
    Address,
    BackingStore,
    Channel,
    CharDevice,
    Clock,
    Controller,
    Cpu,
    CpuFeature,
    CpuTune,
    Disk,
    Domain,
    Features,
    GpuvirtMetadata,
    HostdevPci,
    HugePage,
    Interface,
    IOThreadPin,
    MemBalloon,
    MemNode,
    MemoryBacking,
    MetadataDisk,
    NumaCell,
    NumaTune,
    Os,
    QemuCommandline,
    Rng,
    Timer,
    Vcpu,
    VcpuPin,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._nics import rails
from ansible_collections.gpuvirt.kvm.plugins.module_utils._placement_model import (
    POLICY_DEDICATED,
    split_proportionally,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._vm_spec import (
    SpecError,
    guest_phys_bits,
)

BLK_QUEUES_MAX = 16  # see NET_QUEUES_MAX in _vm_spec

COLLECTION = "gpuvirt.kvm"
COLLECTION_VERSION = "0.1.0"  # galaxy.yml's version (a unit test keeps them equal)

DEFAULT_OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"  # Debian/Ubuntu ovmf package paths
DEFAULT_OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
DEFAULT_NVRAM_DIR = "/var/lib/libvirt/qemu/nvram"  # libvirt's own default for per-VM NVRAM
# OVMF's size of its 64-bit PCI window, in MiB, read from QEMU's fw_cfg (OvmfPkg PlatformInitLib).
OVMF_MMIO64_FWCFG = "opt/ovmf/X-PciMmio64Mb"

# Guest bus numbers of the PCIe expander buses (one per guest NUMA cell). Buses below the first
# one stay for the root ports libvirt adds on pcie-root (virtio disks, NICs); each expander
# needs one bus for itself plus one per root port below it.
EXPANDER_BUS_FIRST = 0x80
EXPANDER_BUS_SPACING = 0x20
_MAX_BUS = 0xFF


def _device_node(bdf, spec, topology):
    dev = topology.pci.get(bdf)
    if dev is not None and dev.numa_node in spec.numa_nodes:
        return dev.numa_node
    # numa_node -1 (the firmware does not say): the VM's first node, as placement counts it.
    return spec.numa_nodes[0] if spec.numa_nodes else None


def _passthrough_ports(spec, topology):
    """[(host node, [bdf, ...])]: the hostdevs each guest root port gets, in order.

    A GPU or NVSwitch is followed by the other members of its IOMMU group; functions of one
    host slot (a GPU and its audio function) share a port and keep their function numbers.
    """
    primaries = list(spec.gpus) + list(spec.nvswitches) + list(spec.nics)
    follows = {}
    for bdf in primaries:
        dev = topology.pci.get(bdf)
        for member in (dev.iommu_group_members if dev is not None else ()):
            follows.setdefault(member, bdf)
    ordered = []
    for bdf in primaries:
        ordered.append((bdf, bdf))
        ordered.extend((m, bdf) for m in spec.extra_hostdevs if follows.get(m) == bdf)
    ordered.extend((m, m) for m in spec.extra_hostdevs if m not in follows)
    ports = []
    slot_port = {}
    for bdf, primary in ordered:
        slot = bdf.rsplit(".", 1)[0]
        if slot in slot_port:
            ports[slot_port[slot]][1].append(bdf)
        else:
            slot_port[slot] = len(ports)
            ports.append((_device_node(primary, spec, topology), [bdf]))
    return ports


def _hostdevs_on(port_index, bdfs):
    functions = sorted(bdfs, key=lambda b: int(b.rsplit(".", 1)[1]))
    numbers = [int(b.rsplit(".", 1)[1]) for b in functions]
    if 0 not in numbers:
        numbers = list(range(len(functions)))  # a guest only scans a slot with function 0
    result = []
    for bdf, fn in zip(functions, numbers):
        address = Address(type="pci", domain=0, bus=port_index, slot=0, function=fn,
                          multifunction=True if fn == 0 and len(functions) > 1 else None)
        result.append(HostdevPci(source=Address.pci(bdf, with_type=False), managed=True,
                                 address=address))
    return result


def _expander_bus_numbers(count, need):
    """Guest bus numbers for `count` expander buses that each need `need` buses."""
    first, spacing = EXPANDER_BUS_FIRST, EXPANDER_BUS_SPACING
    if need > spacing or first + spacing * (count - 1) + need - 1 > _MAX_BUS:
        spacing = max(need, (_MAX_BUS + 1 - first) // count)
        if first + spacing * (count - 1) + need - 1 > _MAX_BUS:
            raise SpecError("the VM needs %d PCIe expander buses with %d buses each; a guest "
                            "has 256 buses: pass through fewer devices" % (count, need))
    return [first + spacing * k for k in range(count)]


def _rail_units(spec, topology, ports):
    """Group ports into units: each rail NIC's port with the ports of the VM's GPUs it serves
    (one emulated PCIe switch in the guest, so NCCL sees them PIX apart, as on the host), and
    every other port alone. NICs that share a port (two functions of one slot) or a GPU end up
    in one unit. [(host node, [port, ...])] in the order of their first port."""
    if not spec.nics:
        return [(node, [bdfs]) for node, bdfs in ports]
    gpu_devs = [topology.pci[g] for g in spec.gpus if g in topology.pci]
    nic_devs = [topology.pci[n] for n in spec.nics if n in topology.pci]
    served = {nic: gpus for nic, (_link, gpus) in rails(topology, gpu_devs, nic_devs).items()}
    port_of = {}
    for k, (_node, bdfs) in enumerate(ports):
        for bdf in bdfs:
            port_of[bdf] = k
    parent = list(range(len(ports)))

    def find(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    grouped = set()
    for nic in spec.nics:
        mates = [port_of[g] for g in served.get(nic, ()) if g in port_of]
        if nic not in port_of or not mates:
            continue  # no GPU of its own in this VM: a root port of its own
        for k in mates:
            parent[find(k)] = find(port_of[nic])
        grouped.update(mates + [port_of[nic]])
    members = {}
    for k in range(len(ports)):
        members.setdefault(find(k) if k in grouped else ("alone", k), []).append(k)
    result = []
    for unit in sorted(members.values(), key=lambda m: m[0]):
        result.append((ports[unit[0]][0], [ports[m][1] for m in unit]))
    return result


def _unit_controllers(first_index, root_address, members):
    """A root port (at root_address; None: libvirt places it on pcie-root), and for a unit of
    several ports an emulated switch below it: [Controller], [Hostdev], the next free index."""
    controllers = [Controller(type="pci", index=first_index, model="pcie-root-port",
                              address=root_address)]
    if len(members) == 1:
        return controllers, _hostdevs_on(first_index, members[0]), first_index + 1
    upstream = first_index + 1
    controllers.append(Controller(
        type="pci", index=upstream, model="pcie-switch-upstream-port",
        address=Address(type="pci", domain=0, bus=first_index, slot=0, function=0)))
    hostdevs = []
    index = upstream + 1
    for slot, bdfs in enumerate(members):
        controllers.append(Controller(
            type="pci", index=index, model="pcie-switch-downstream-port",
            address=Address(type="pci", domain=0, bus=upstream, slot=slot, function=0)))
        hostdevs.extend(_hostdevs_on(index, bdfs))
        index += 1
    return controllers, hostdevs, index


def _buses(members):
    """Guest buses a unit takes below its parent: its root port's, and with a switch the
    upstream port's and each downstream port's."""
    return 1 if len(members) == 1 else 2 + len(members)


def _pci_layout(spec, topology, cells):
    """Controllers and hostdevs: root ports on pcie-root, or under one expander bus per node;
    a rail NIC and the GPUs it serves share an emulated switch below their root port."""
    root = Controller(type="pci", index=0, model="pcie-root",
                      pcihole64_kib=spec.mmio64_mb * 1024 if spec.mmio64_mb else None)
    controllers = [root]
    hostdevs = []
    units = _rail_units(spec, topology, _passthrough_ports(spec, topology))
    if len(cells) <= 1:
        index = 1
        for _node, members in units:
            more, devs, index = _unit_controllers(index, None, members)
            controllers.extend(more)
            hostdevs.extend(devs)
        return controllers, hostdevs
    # One expander bus per guest cell that has devices, its <node> the cell: the guest then
    # sees each GPU on the NUMA node of its vCPUs and memory, as on the host (NCCL reads the
    # PCI/NUMA layout; a flat layout makes every GPU pair look like "PHB").
    cell_of = {node: k for k, node in enumerate(spec.numa_nodes)}
    by_cell = {}
    for node, members in units:
        by_cell.setdefault(cell_of.get(node, 0), []).append(members)
    used = sorted(by_cell)
    bus_numbers = _expander_bus_numbers(
        len(used), 1 + max(sum(_buses(m) for m in by_cell[c]) for c in used))
    expander_index = {}
    for k, cell in enumerate(used):
        expander_index[cell] = k + 1
        controllers.append(Controller(type="pci", index=k + 1, model="pcie-expander-bus",
                                      model_name="pxb-pcie", target_bus_nr=bus_numbers[k],
                                      target_node=cell))
    index = len(used) + 1
    for cell in used:
        for slot, members in enumerate(by_cell[cell]):
            more, devs, index = _unit_controllers(
                index, Address(type="pci", domain=0, bus=expander_index[cell], slot=slot,
                               function=0), members)
            controllers.extend(more)
            hostdevs.extend(devs)
    return controllers, hostdevs


def _cells(spec, topology):
    """Guest NUMA cells for a multi-node VM: [(host node, vCPU ids, MiB)]; [] for one node."""
    nodes = list(spec.numa_nodes)
    if len(nodes) <= 1:
        return []
    total = sum(spec.memory_by_node.get(n, 0) for n in nodes)
    if sorted(spec.memory_by_node) != sorted(nodes) or total != spec.memory_mb:
        raise SpecError("memory_by_node %r does not split memory %d MiB over numa_nodes %s" % (
            spec.memory_by_node, spec.memory_mb, nodes))
    vcpus = {n: [] for n in nodes}
    if spec.cpu_policy == POLICY_DEDICATED and len(spec.cpus) == spec.vcpus:
        for i, cpu in enumerate(spec.cpus):
            info = topology.cpus.get(cpu)
            node = info.node if info is not None and info.node in vcpus else nodes[0]
            vcpus[node].append(i)
    else:
        # Shared vCPUs float; give each cell vCPUs in proportion to its memory (which
        # placement split in proportion to the node's GPUs).
        start = 0
        weights = [spec.memory_by_node[n] for n in nodes]
        for node, count in zip(nodes, split_proportionally(spec.vcpus, weights)):
            vcpus[node] = list(range(start, start + count))
            start += count
    return [(n, tuple(vcpus[n]), spec.memory_by_node[n]) for n in nodes]


def _guest_topology(spec, topology, cells):
    """(sockets, cores, threads): host thread siblings stay siblings in the guest."""
    groups = [c[1] for c in cells] if cells else [tuple(range(spec.vcpus))]
    threads = 1
    if spec.cpu_policy == POLICY_DEDICATED and len(spec.cpus) == spec.vcpus:
        sizes = set(len(topology.cpus[c].siblings) for c in spec.cpus if c in topology.cpus)
        t = sizes.pop() if len(sizes) == 1 else 1
        if t > 1 and all(len(g) % t == 0 for g in groups):
            ok = True
            for g in groups:
                for k in range(0, len(g), t):
                    host = [spec.cpus[i] for i in g[k:k + t]]
                    if sorted(host) != sorted(topology.cpus[host[0]].siblings):
                        ok = False
            threads = t if ok else 1
    sockets = 1
    if cells and len(set(len(g) for g in groups)) == 1 and len(groups[0]) % threads == 0:
        sockets = len(cells)  # one guest socket per cell, as the host's sockets/nodes
    return sockets, spec.vcpus // (sockets * threads), threads


def build_domain(spec, topology, uuid=None, ovmf_code=DEFAULT_OVMF_CODE,
                 ovmf_vars=DEFAULT_OVMF_VARS, nvram_dir=DEFAULT_NVRAM_DIR,
                 created_by="%s %s" % (COLLECTION, COLLECTION_VERSION)):
    """The libvirt domain for a spec on this host (uuid: keep an existing domain's)."""
    cells = _cells(spec, topology)
    dedicated = spec.cpu_policy == POLICY_DEDICATED
    virtio_disks = [d for d in spec.disks if d.role != "seed"]
    dom = Domain(type=spec.domain_type, name=spec.name, uuid=uuid)
    dom.metadata = [GpuvirtMetadata(
        owner=COLLECTION, created_by=created_by, template=spec.template,
        cpu_policy=spec.cpu_policy, image=spec.image, image_version=spec.image_version,
        owner_tag=spec.owner_tag, seed_digest=spec.seed_digest,
        fm_partition=spec.fm_partition, gpus=tuple(spec.gpus),
        nvswitches=tuple(spec.nvswitches), nics=tuple(spec.nics),
        numa_nodes=tuple(spec.numa_nodes),
        disks=[MetadataDisk(target=t, role=d.role, size_gb=d.size_gb)
               for t, d in _disk_targets(spec.disks)])]
    dom.memory_kib = spec.memory_mb * 1024
    dom.current_memory_kib = spec.memory_mb * 1024
    if spec.hugepage_kb:
        dom.memory_backing = MemoryBacking(hugepages=[HugePage(
            size_kib=spec.hugepage_kb,
            nodeset=tuple(range(len(cells))) if cells else None)])
    dom.vcpu = Vcpu(count=spec.vcpus, placement="static",
                    cpuset=None if dedicated else tuple(spec.cpus) or None)
    dom.iothreads = len(virtio_disks) or None
    tune = CpuTune()
    if dedicated:
        tune.vcpupins = [VcpuPin(vcpu=i, cpuset=(cpu,)) for i, cpu in enumerate(spec.cpus)]
    if spec.emulator_cpus:
        # QEMU's main loop and the disks' I/O threads run on the host-reserved CPUs of the
        # VM's nodes, never on the vCPUs' cores.
        tune.emulatorpin = tuple(spec.emulator_cpus)
        tune.iothreadpins = [IOThreadPin(iothread=k + 1, cpuset=tuple(spec.emulator_cpus))
                             for k in range(len(virtio_disks))]
    dom.cputune = tune if (tune.vcpupins or tune.emulatorpin) else None
    if spec.numa_nodes:
        dom.numatune = NumaTune(mode="strict", nodeset=tuple(spec.numa_nodes), memnodes=[
            MemNode(cellid=k, mode="strict", nodeset=(node,))
            for k, (node, _v, _m) in enumerate(cells)])
    if spec.firmware == "ovmf" and spec.mmio64_mb:
        # OVMF sizes its 64-bit PCI window from this fw_cfg entry, not from the q35 host
        # bridge's pcihole64; libvirt reserves opt/ovmf/ names in <sysinfo type='fwcfg'>, so
        # it goes to QEMU as an argument.
        dom.qemu_commandline = QemuCommandline(args=[
            "-fw_cfg", "name=%s,string=%d" % (OVMF_MMIO64_FWCFG, spec.mmio64_mb)])
    dom.os = _os(spec, ovmf_code, ovmf_vars, nvram_dir)
    dom.features = Features(acpi=True, apic=True)
    dom.cpu = _cpu(spec, topology, cells)
    dom.clock = Clock(offset="utc", timers=[
        Timer(name="rtc", tickpolicy="catchup"), Timer(name="pit", tickpolicy="delay"),
        Timer(name="hpet", present=False)])
    dom.on_poweroff, dom.on_reboot, dom.on_crash = "destroy", "restart", "destroy"
    controllers, hostdevs = _pci_layout(spec, topology, cells)
    devices = _disks(spec)
    devices.extend(controllers)
    # libvirt would otherwise add a USB controller, taking a PCIe slot for nothing.
    devices.append(Controller(type="usb", index=0, model="none"))
    for net in spec.networks:
        devices.append(Interface(type=net.type, source=net.source, mac=net.mac, model="virtio",
                                 queues=net.queues))
    devices.extend(hostdevs)
    devices.append(CharDevice(kind="serial", type="pty"))
    devices.append(CharDevice(kind="console", type="pty", target_type="serial"))
    if spec.guest_agent:
        # The QEMU guest agent's port (libvirt picks the socket's path): kvm_vm_message (and
        # maintain_host's message to the guests) reaches a guest that runs the agent through it.
        devices.append(Channel(type="unix", target_type="virtio",
                               target_name=GUEST_AGENT_CHANNEL))
    # Ballooning cannot reclaim memory that VFIO has pinned for DMA, and a pinned VM's memory
    # is reserved for it anyway.
    devices.append(MemBalloon(model="none"))
    devices.append(Rng(model="virtio", backend_model="random", backend="/dev/urandom"))
    dom.devices = devices
    return dom


def _disk_targets(disks):
    """[(target dev, DiskSpec)]: virtio disks vda, vdb, ... in order; the seed ISO sda."""
    result = []
    virtio = 0
    for disk in disks:
        if disk.role == "seed":
            result.append(("sda", disk))
        else:
            result.append(("vd" + chr(ord("a") + virtio), disk))
            virtio += 1
    return result


def _disks(spec):
    queues = max(1, min(spec.vcpus, BLK_QUEUES_MAX))
    devices = []
    iothread = 0
    for target, disk in _disk_targets(spec.disks):
        if disk.role == "seed":
            devices.append(Disk(type="file", device="cdrom", driver_name="qemu",
                                driver_type="raw", source=disk.path, target_dev=target,
                                target_bus="sata", readonly=True))
            continue
        iothread += 1
        backing = None
        if disk.backing:
            # Written out so that the domain XML records the base image (kvm_image refuses to
            # remove images a domain's chain uses) and libvirt does not have to probe it.
            backing = BackingStore(type="file", format=disk.backing_format or "qcow2",
                                   source=disk.backing)
        devices.append(Disk(
            type="file", device="disk", driver_name="qemu", driver_type=disk.format,
            cache="none", io="native", discard="unmap", queues=queues, iothread=iothread,
            source=disk.path, backing=backing, target_dev=target, target_bus="virtio",
            boot_order=1 if disk.role == "os" else None))
    return devices


def _os(spec, ovmf_code, ovmf_vars, nvram_dir):
    has_boot_disk = any(d.role == "os" for d in spec.disks)
    os_ = Os(type="hvm", arch="x86_64", machine=spec.machine,
             # libvirt forbids <os><boot> next to per-device boot order (on the OS disk).
             boot=[] if has_boot_disk else ["hd"])
    if spec.firmware == "ovmf":
        os_.loader = ovmf_code
        os_.loader_readonly = True
        os_.loader_type = "pflash"
        os_.nvram = "%s/%s_VARS.fd" % (nvram_dir.rstrip("/"), spec.name)
        os_.nvram_template = ovmf_vars
    return os_


def _cpu(spec, topology, cells):
    sockets, cores, threads = _guest_topology(spec, topology, cells)
    cpu = Cpu(mode=spec.cpu_mode, sockets=sockets, cores=cores, threads=threads)
    if spec.cpu_mode in ("host-passthrough", "maximum"):
        # Nothing to check against a named model; a VM with host devices never migrates,
        # and migratable='off' lets it see host-only features such as invtsc.
        cpu.check = "none"
        cpu.migratable = False
    if spec.mmio64_mb:
        # The guest CPU must reach its RAM and the GPUs' BARs above it, whatever the CPU mode
        # (an emulated CPU has 40 bits, too few for large guests); never past the host's.
        bits = guest_phys_bits(spec.memory_mb, spec.mmio64_mb)
        host_bits = getattr(topology, "phys_bits", None)
        if host_bits and spec.domain_type == "kvm":
            bits = min(bits, host_bits)
        cpu.maxphysaddr_mode, cpu.maxphysaddr_bits = "emulate", bits
    cpu.features = [CpuFeature(policy="disable", name=n) for n in spec.cpu_disable_features]
    cpu.cells = [NumaCell(id=k, cpus=vcpus, memory_kib=mb * 1024)
                 for k, (_node, vcpus, mb) in enumerate(cells)]
    return cpu

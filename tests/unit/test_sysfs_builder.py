# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""The fixture builder writes trees shaped as the kernel writes sysfs, and refuses bad hosts."""

import os
import re

import pytest

import sysfs_builder

CAPTURED = os.path.join(sysfs_builder.FIXTURES_DIR, "captured", "h100-cloud-vm")
RESOURCE_LINE = re.compile(r"^0x[0-9a-f]{16} 0x[0-9a-f]{16} 0x[0-9a-f]{16}$")


def _read(path):
    with open(path) as handle:
        return handle.read()


def _dev(sysfs_root, bdf):
    return os.path.realpath(os.path.join(sysfs_root, "bus", "pci", "devices", bdf))


@pytest.mark.parametrize("name", sysfs_builder.list_hosts())
def test_every_symlink_is_relative_and_resolves_inside_the_root(host_tree, name):
    sysfs_root, proc_root = host_tree(name)
    root = os.path.realpath(os.path.dirname(sysfs_root))
    links = 0
    for top in (sysfs_root, proc_root):
        for dirpath, dirnames, filenames in os.walk(top):
            for entry in dirnames + filenames:
                path = os.path.join(dirpath, entry)
                if not os.path.islink(path):
                    continue
                links += 1
                target = os.readlink(path)
                assert not os.path.isabs(target), path
                real = os.path.realpath(path)
                assert real.startswith(root + os.sep), (path, target)
                assert os.path.exists(real), (path, target)
    assert links > 0


def test_cloud_vm_matches_the_capture(host_tree):
    """Every value capture-host.sh recorded on the real VM reads back the same from the fixture."""
    sysfs_root, proc_root = host_tree("h100-cloud-vm")
    devices = 0
    bdf = None
    resources = {}
    for line in _read(os.path.join(CAPTURED, "pci.txt")).splitlines():
        if line.startswith("DEV "):
            _dummy, bdf, _dummy2, link = line.split()
            devices += 1
            assert os.readlink(os.path.join(sysfs_root, "bus", "pci", "devices", bdf)) == link
            resources[bdf] = []
            continue
        line = line.strip()
        dev = _dev(sysfs_root, bdf)
        if line.startswith("driver -> "):
            assert os.readlink(os.path.join(dev, "driver")) == line[len("driver -> "):]
        elif line.startswith("resource: "):
            resources[bdf].append(line[len("resource: "):])
        else:
            key, value = line.split("=", 1)
            assert _read(os.path.join(dev, key)).strip() == value, (bdf, key)
    for bdf, captured in resources.items():
        lines = _read(os.path.join(_dev(sysfs_root, bdf), "resource")).splitlines()
        assert len(lines) == 7
        assert [x for x in lines if x != "0x%016x 0x%016x 0x%016x" % (0, 0, 0)] == captured
    assert devices == len(os.listdir(os.path.join(sysfs_root, "bus", "pci", "devices")))
    assert not os.path.exists(os.path.join(_dev(sysfs_root, "0000:00:00.0"), "driver"))

    host = _read(os.path.join(CAPTURED, "host.txt")).splitlines()
    assert _read(os.path.join(proc_root, "cmdline")).strip() == host[host.index("== cmdline") + 1]
    system = _read(os.path.join(CAPTURED, "system.txt")).splitlines()
    node0 = os.path.join(sysfs_root, "devices", "system", "node", "node0")
    at = system.index("NODE /sys/devices/system/node/node0 cpulist=0-15")
    assert _read(os.path.join(node0, "meminfo")).splitlines()[:3] == system[at + 1:at + 4]
    assert _read(os.path.join(node0, "cpulist")).strip() == "0-15"
    for line in system:
        m = re.match(r"^cpu(\d+) pkg=(\d+) core=(\d+) sib=(\S+)$", line)
        if m:
            topo = os.path.join(sysfs_root, "devices", "system", "cpu", "cpu" + m.group(1),
                                "topology")
            assert _read(os.path.join(topo, "physical_package_id")).strip() == m.group(2)
            assert _read(os.path.join(topo, "core_id")).strip() == m.group(3)
            assert _read(os.path.join(topo, "thread_siblings_list")).strip() == m.group(4)
    assert os.listdir(os.path.join(sysfs_root, "class", "iommu")) == []
    assert os.listdir(os.path.join(sysfs_root, "kernel", "iommu_groups")) == []


def test_dgx2_gpu_files_and_links_have_the_kernels_shape(host_tree):
    sysfs_root, _proc = host_tree("dgx2")
    link = os.readlink(os.path.join(sysfs_root, "bus", "pci", "devices", "0000:34:00.0"))
    assert link == ("../../../devices/pci0000:2e/0000:2e:00.0/0000:2f:00.0/0000:30:04.0/"
                    "0000:32:00.0/0000:33:00.0/0000:34:00.0")
    dev = _dev(sysfs_root, "0000:34:00.0")
    # Eight levels below sys/: devices, pci0000:2e and six device directories.
    assert os.readlink(os.path.join(dev, "driver")) == "../" * 8 + "bus/pci/drivers/vfio-pci"
    group = os.readlink(os.path.join(dev, "iommu_group"))
    assert re.match(r"^(\.\./){8}kernel/iommu_groups/\d+$", group)
    back = os.path.join(sysfs_root, "bus", "pci", "drivers", "vfio-pci", "0000:34:00.0")
    assert os.path.realpath(back) == dev
    members = os.path.join(os.path.realpath(os.path.join(dev, "iommu_group")), "devices")
    assert os.listdir(members) == ["0000:34:00.0"]
    assert os.path.realpath(os.path.join(members, "0000:34:00.0")) == dev
    expected = {
        "vendor": "0x10de", "device": "0x1db8", "class": "0x030200",
        "subsystem_vendor": "0x10de", "numa_node": "0", "local_cpulist": "0-23,48-71",
        "driver_override": "(null)", "enable": "0",
    }
    for name, value in expected.items():
        assert _read(os.path.join(dev, name)) == value + "\n", name
    lines = _read(os.path.join(dev, "resource")).splitlines()
    assert len(lines) == 13 and all(RESOURCE_LINE.match(x) for x in lines)
    flags = [int(x.split()[2], 16) for x in lines[:6]]
    assert flags == [0x40200, 0x14220C, 0, 0x14220C, 0, 0]
    sizes = [int(x.split()[1], 16) - int(x.split()[0], 16) + 1 for x in lines[:4]]
    assert sizes[0] == 16 << 20 and sizes[1] == 32 << 30 and sizes[3] == 32 << 20
    gpu8 = _dev(sysfs_root, "0000:b7:00.0")
    assert _read(os.path.join(gpu8, "local_cpulist")) == "24-47,72-95\n"
    assert _read(os.path.join(gpu8, "local_cpus")) == "ffffff00,0000ffff,ff000000\n"


def test_bridges_carry_windows_and_bus_numbers(host_tree):
    sysfs_root, _proc = host_tree("dgx2")
    bridge = _dev(sysfs_root, "0000:30:04.0")
    assert _read(os.path.join(bridge, "class")) == "0x060400\n"
    lines = _read(os.path.join(bridge, "resource")).splitlines()
    assert len(lines) == 17
    mem_lo, mem_hi = (int(x, 16) for x in lines[14].split()[:2])
    pref_lo, pref_hi = (int(x, 16) for x in lines[15].split()[:2])
    gpu = [int(x, 16) for x in _read(os.path.join(_dev(sysfs_root, "0000:34:00.0"),
                                                  "resource")).splitlines()[1].split()]
    assert pref_lo <= gpu[0] and gpu[1] <= pref_hi and mem_lo < mem_hi
    config = open(os.path.join(bridge, "config"), "rb").read()
    # PCIe: 4096 bytes, the extended capabilities from 0x100 (here ACS, ID 0x000d, version 1)
    assert len(config) == 4096
    assert int.from_bytes(config[0x100:0x104], "little") == 0x000D | 1 << 16
    assert int.from_bytes(config[0x106:0x108], "little") == 0x001D
    assert config[0:4] == bytes([0xB5, 0x10, 0x97, 0x97])
    assert config[0x0E] & 0x7F == 1  # a type-1 (bridge) header
    assert (config[0x18], config[0x19], config[0x1A]) == (0x30, 0x32, 0x36)
    assert os.path.isdir(os.path.join(bridge, "pci_bus", "0000:32"))


def test_cpu_and_node_files(host_tree):
    sysfs_root, proc_root = host_tree("dgx-a100")
    cpu = os.path.join(sysfs_root, "devices", "system", "cpu")
    assert _read(os.path.join(cpu, "online")) == "0-255\n"
    topo = os.path.join(cpu, "cpu176", "topology")
    assert _read(os.path.join(topo, "physical_package_id")) == "0\n"
    assert _read(os.path.join(topo, "core_id")) == "48\n"
    assert _read(os.path.join(topo, "thread_siblings_list")) == "48,176\n"
    assert _read(os.path.join(topo, "core_siblings_list")) == "0-63,128-191\n"
    nodes = os.path.join(sysfs_root, "devices", "system", "node")
    assert _read(os.path.join(nodes, "online")) == "0-7\n"
    assert _read(os.path.join(nodes, "node3", "cpulist")) == "48-63,176-191\n"
    assert _read(os.path.join(nodes, "node0", "distance")) == "10 12 12 12 32 32 32 32\n"
    assert _read(os.path.join(nodes, "node5", "distance")) == "32 32 32 32 12 10 12 12\n"
    assert os.path.realpath(os.path.join(nodes, "node3", "cpu48")) == os.path.join(cpu, "cpu48")
    meminfo = _read(os.path.join(nodes, "node2", "meminfo")).splitlines()
    assert meminfo[0] == "Node 2 MemTotal:       268435456 kB"
    assert _read(os.path.join(proc_root, "cpuinfo")).count("vendor_id\t: AuthenticAMD") == 256
    ivhd0 = os.path.join(sysfs_root, "class", "iommu", "ivhd0")
    assert os.path.realpath(ivhd0) == os.path.join(
        _dev(sysfs_root, "0000:00:00.2"), "iommu", "ivhd0")


def test_hugepages_and_meminfo(host_tree):
    sysfs_root, proc_root = host_tree("pcie-4gpu")
    hp = os.path.join(sysfs_root, "devices", "system", "node", "node0", "hugepages")
    assert _read(os.path.join(hp, "hugepages-1048576kB", "nr_hugepages")) == "8\n"
    assert _read(os.path.join(hp, "hugepages-1048576kB", "free_hugepages")) == "8\n"
    assert _read(os.path.join(hp, "hugepages-2048kB", "nr_hugepages")) == "0\n"
    meminfo = _read(os.path.join(proc_root, "meminfo")).splitlines()
    assert "MemTotal:       536870912 kB" in meminfo
    assert "HugePages_Total:       8" in meminfo
    assert "Hugepagesize:    1048576 kB" in meminfo
    assert "Hugetlb:         8388608 kB" in meminfo


@pytest.mark.parametrize("name, on", [("dgx2", True), ("dgx2-fresh", False)])
def test_iommu_on_and_off(host_tree, name, on):
    sysfs_root, _proc = host_tree(name)
    assert os.path.isdir(os.path.join(sysfs_root, "class", "iommu", "dmar0")) == on
    groups = os.listdir(os.path.join(sysfs_root, "kernel", "iommu_groups"))
    assert (len(groups) == 145) if on else (groups == [])
    gpu = _dev(sysfs_root, "0000:34:00.0")
    assert os.path.islink(os.path.join(gpu, "iommu_group")) == on
    assert os.readlink(os.path.join(gpu, "driver")).endswith("/vfio-pci" if on else "/nvidia")
    # vfio-pci enables a device only when a VM opens it; the nvidia driver at probe.
    assert _read(os.path.join(gpu, "enable")) == ("0\n" if on else "1\n")


def test_modules_follow_the_bound_drivers(host_tree):
    sysfs_root, proc_root = host_tree("dgx2")
    modules = [x.split()[0] for x in _read(os.path.join(proc_root, "modules")).splitlines()]
    assert {"vfio_pci", "vfio_iommu_type1", "kvm_intel", "nvme", "mlx5_core"} <= set(modules)
    assert "nvidia" not in modules
    assert _read(os.path.join(sysfs_root, "module", "vfio_pci", "initstate")) == "live\n"


# --- descriptions the builder refuses, with the reason named ----------------------------------


def _host(devices, **extra):
    desc = {
        "name": "bad",
        "cpu": {"sockets": 1, "cores_per_socket": 2, "threads_per_core": 1},
        "numa": {"memory_gib": 4},
        "pci": [{"host_bridge": "0000:00", "node": 0, "devices": devices}],
    }
    desc.update(extra)
    return desc


@pytest.mark.parametrize("devices, message", [
    (["01:00.0 nvme-disk"], "0000:01:00.0 sits directly on host bridge pci0000:00"),
    (["00:02.0 no-such-model"], "unknown model 'no-such-model'"),
    ([{"bdf": 1800.0, "model": "aspeed-vga"}], "must be a quoted string"),
    (["00:02.0 aspeed-vga", "00:02.0 aspeed-vga"], "0000:00:02.0 is listed twice"),
    ([{"bdf": "00:02.0", "model": "aspeed-vga", "children": ["01:00.0 aspeed-vga"]}],
     "is not a PCI bridge"),
    ([{"bdf": "00:01.0", "model": "amd-root-port",
       "children": ["01:00.0 aspeed-vga", "02:00.0 aspeed-vga"]}],
     "children of one bridge share its secondary bus"),
    ([{"bdf": "00:01.0", "model": "amd-root-port", "children": [
        {"bdf": "01:00.0", "model": "amd-root-port", "children": ["03:00.0 aspeed-vga"]}]},
      {"bdf": "00:02.0", "model": "amd-root-port", "children": ["02:00.0 aspeed-vga"]}],
     "overlap"),
    ([{"bdf": "00:02.0", "model": "aspeed-vga", "colour": "blue"}], "unknown keys colour"),
    ([{"bdf": "00:02.0", "model": "aspeed-vga", "bars": [{"index": 0, "size": "3M",
                                                          "kind": "mem32"}]}],
     "not a power of two"),
])
def test_bad_descriptions_are_refused_with_the_reason(tmp_path, devices, message):
    models = dict(sysfs_builder.load_models(), **{"nvme-disk": {
        "vendor": 0x144D, "device": 0xA808, "class": 0x010802}})
    with pytest.raises(sysfs_builder.FixtureError) as err:
        sysfs_builder.build(_host(devices), str(tmp_path), models=models)
    assert message in str(err.value)


def test_build_refuses_a_tree_that_is_already_there(host_tree):
    sysfs_root, _proc = host_tree("pcie-4gpu")
    with pytest.raises(sysfs_builder.FixtureError) as err:
        sysfs_builder.build_host("pcie-4gpu", os.path.dirname(sysfs_root))
    assert "already holds files" in str(err.value)


def test_unknown_host_lists_the_known_ones():
    with pytest.raises(sysfs_builder.FixtureError) as err:
        sysfs_builder.load_host("dgx-9000")
    assert "dgx2" in str(err.value) and "dgx-9000" in str(err.value)


def test_variant_extends_its_base():
    fresh = sysfs_builder.load_host("dgx2-fresh")
    base = sysfs_builder.load_host("dgx2")
    assert fresh["name"] == "dgx2-fresh"
    assert fresh["pci"] == base["pci"]
    assert fresh["iommu"]["enabled"] is False and base["iommu"]["enabled"] is True
    assert fresh["drivers"]["10de:1db8"] == "nvidia"


def test_command_line_lists_and_builds(tmp_path, capsys):
    assert sysfs_builder.main(["--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == sysfs_builder.list_hosts()
    out = tmp_path / "vm"
    assert sysfs_builder.main(["h100-cloud-vm", str(out)]) == 0
    assert "sysfs_root=%s" % (out / "sys") in capsys.readouterr().out
    assert sysfs_builder.main(["h100-cloud-vm", str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err

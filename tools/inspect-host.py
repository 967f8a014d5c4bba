#!/usr/bin/env python
# SPDX-License-Identifier: GPL-3.0-or-later
"""Print what gpuvirt.kvm discovers on a host, without Ansible: the same code gpu_topology runs.

    tools/inspect-host.py [--sysfs-root /sys] [--proc-root /proc] [--platform auto]
                          [--nvidia-smi-topo FILE] [--plan NAME:GPUS ...] [--json]

Useful on a new server model (does discovery see what nvidia-smi sees?) and for bug reports.
It reads only; libvirt allocations are not read (use the gpu_topology module for that).
"""

import argparse
import json
import os
import sys
import tempfile


def _import_collection():
    """Make ansible_collections.gpuvirt.kvm importable from this checkout (no Ansible needed)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    farm = tempfile.mkdtemp(prefix="gpuvirt-inspect-")
    link = os.path.join(farm, "ansible_collections", "gpuvirt", "kvm")
    os.makedirs(os.path.dirname(link))
    os.symlink(repo, link)
    sys.path.insert(0, farm)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--sysfs-root", default="/sys")
    parser.add_argument("--proc-root", default="/proc")
    parser.add_argument("--platform", default="auto")
    parser.add_argument("--nvidia-smi-topo", metavar="FILE",
                        help="a file holding the output of 'nvidia-smi topo -m'")
    parser.add_argument("--plan", nargs="*", default=[], metavar="NAME:GPUS")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = parser.parse_args()

    _import_collection()
    from ansible_collections.gpuvirt.kvm.plugins.module_utils import (
        _host_facts,
        _nvidia_smi,
        _platform_file,
        _platforms,
        _sysfs,
        _topology,
        _vm_request,
    )

    try:
        topo = _sysfs.read_host(args.sysfs_root, args.proc_root)
        platform = _platform_file.get_platform(args.platform, topo)
        reason = _platforms.detect(topo)[1]
        nvlinks = None
        smi = None
        if args.nvidia_smi_topo:
            with open(args.nvidia_smi_topo, encoding="utf-8") as handle:
                smi = _nvidia_smi.parse_topo_matrix(handle.read())
            nvlinks = smi.nvlink_matrix()
        requests = _vm_request.plan_requests([
            {"name": p.split(":", 1)[0], "gpus": int(p.split(":", 1)[1]) if ":" in p else 0}
            for p in args.plan
        ])
        result = _host_facts.build(topo, platform, reason, [], requests, nvlinks=nvlinks)
    except (_topology.TopologyError, _platforms.PlatformError, _nvidia_smi.NvidiaSmiTopoError,
            _vm_request.VmError, ValueError, OSError) as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print("\n".join(result["allocation_map"]))
        print("readiness: %s" % json.dumps(result["readiness"], sort_keys=True))
        gpus = [g["bdf"] for g in result["gpus"]]
        if smi is not None:
            agree = smi.gpu_count == len(gpus)
            print("nvidia-smi sees %d GPU(s), discovery %d: %s" % (
                smi.gpu_count, len(gpus), "agree" if agree else "DISAGREE"))
            for i, gpu in enumerate(result["gpus"]):
                print("GPU%d %s numa_node sysfs=%s nvidia-smi=%s cpu_affinity=%s" % (
                    i, gpu["bdf"], gpu["numa_node"], smi.numa_affinity.get(i),
                    smi.cpu_affinity.get(i)))
            for i in range(len(gpus)):
                for j in range(i + 1, len(gpus)):
                    print("GPU%d-GPU%d nvidia-smi %s, sysfs %s" % (
                        i, j, smi.links.get((i, j)), topo.link(gpus[i], gpus[j])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

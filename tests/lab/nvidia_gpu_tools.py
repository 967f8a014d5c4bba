# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Stand-in for NVIDIA gpu-admin-tools' nvidia_gpu_tools.py in the lab: --query-module-name only.

The real tool maps each GPU's BAR0 and reads its module from the board's straps (H100 SXM: GPIOs
0x9, 0x11, 0x12); the lab's stand-in GPUs (e1000e) have none, so their "straps" are the table
below, the module IDs tests/lab/platform-shared.yml describes. What it prints is the real
tool's (release v2025.10.20, tests/fixtures/gpu-admin-tools/README.md): its logging format on
standard error, "GPU <bdf> <name> <device id> BAR0 <address> module name SXM_<n>", and
"No devices found matching: ..." with exit status 1. kvm_host runs it as
kvm_host_gpu_admin_tools, reads the lines with gpuvirt.kvm.gpu_tools_module_ids, and records
the IDs, exactly as on a real host.
"""

import argparse
import logging
import os
import sys

# The lab's stand-in GPUs (tests/lab/gpu-server.xml): bus -> module ID (pairs {1,3} and {2,4}
# are each one PCIe switch's GPUs, as on an HGX H100).
STRAPS = {"0000:43:00.0": 1, "0000:44:00.0": 3, "0000:83:00.0": 2, "0000:84:00.0": 4}
SYSFS = "/sys/bus/pci/devices"


def _bar0(bdf):
    try:
        with open(os.path.join(SYSFS, bdf, "resource"), encoding="ascii") as handle:
            return int(handle.readline().split()[0], 16)
    except (OSError, ValueError, IndexError):
        return 0


def main(argv):
    parser = argparse.ArgumentParser(prog="nvidia_gpu_tools.py")
    parser.add_argument("--devices")
    parser.add_argument("--query-module-name", action="store_true")
    parser.add_argument("--log", default="info")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, opts.log.upper()),
                        format="%(asctime)s.%(msecs)03d %(levelname)-8s %(message)s",
                        datefmt="%Y-%m-%d,%H:%M:%S")
    wanted = [d.strip().lower() for d in (opts.devices or "").split(",") if d.strip()]
    found = [d for d in wanted if d in STRAPS and os.path.isdir(os.path.join(SYSFS, d))]
    if not found:
        logging.error("No devices found matching: %s", opts.devices)
        return 1
    if opts.query_module_name:
        for bdf in found:
            logging.info("GPU %s H100 0x2330 BAR0 0x%x module name SXM_%d", bdf, _bar0(bdf),
                         STRAPS[bdf])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python
# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Run a playbook the way AWX / Automation Platform does - through ansible-runner, in a private
data dir - and print what AWX would show from the artifacts it leaves: status, rc, per-host
stats and the set_stats data (AWX's job "artifacts").

    awx_run.py PRIVATE_DATA_DIR INVENTORY PLAYBOOK [KEY=VALUE ...]   -> JSON on stdout
"""

from __future__ import annotations

import glob
import json
import os
import sys

import ansible_runner


def main(private_data_dir, inventory, playbook, *extra):
    extravars = dict(kv.split("=", 1) for kv in extra)
    os.makedirs(private_data_dir, exist_ok=True)
    runner = ansible_runner.run(
        private_data_dir=private_data_dir,
        playbook=playbook,
        inventory=inventory,
        extravars=extravars,
        envvars={k: os.environ[k] for k in ("ANSIBLE_COLLECTIONS_PATH", "PATH")
                 if k in os.environ},
        quiet=True,
    )
    # Read back from disk, as AWX's callback receiver would: the job's artifact folder.
    artifacts = os.path.join(private_data_dir, "artifacts", runner.config.ident)
    with open(os.path.join(artifacts, "status")) as f:
        status = f.read().strip()
    with open(os.path.join(artifacts, "rc")) as f:
        rc = int(f.read().strip())
    stats = None
    for path in sorted(glob.glob(os.path.join(artifacts, "job_events", "*.json"))):
        with open(path) as f:
            event = json.load(f)
        if event.get("event") == "playbook_on_stats":
            stats = event["event_data"]
    json.dump({"status": status, "rc": rc,
               "artifact_data": (stats or {}).get("artifact_data", {}),
               "failures": (stats or {}).get("failures", {}),
               "rescued": (stats or {}).get("rescued", {}),
               "changed": (stats or {}).get("changed", {})}, sys.stdout, sort_keys=True)


if __name__ == "__main__":
    main(*sys.argv[1:])

# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""The host_picture and fleet_page filters: pictures found in hostvars (a picture, or the layout
report that carries one), hosts without one listed, and errors that say what was expected."""

import json

import pytest
from ansible.errors import AnsibleFilterError
from jinja2 import Undefined

from ansible_collections.gpuvirt.kvm.plugins.filter.layout_report import layout_report
from ansible_collections.gpuvirt.kvm.plugins.filter.picture import FilterModule
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_facts import build
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platform_file import get_platform
from ansible_collections.gpuvirt.kvm.plugins.module_utils._sysfs import read_host

FILTERS = FilterModule().filters()
host_picture = FILTERS["host_picture"]
fleet_page = FILTERS["fleet_page"]


def topology_result(host_tree, name):
    """What gpu_topology registers on a fixture host (as JSON, the way facts travel)."""
    topology = read_host(*host_tree(name))
    platform = get_platform("auto", topology)
    return json.loads(json.dumps(build(topology, platform, "test", [], [])))


def test_pictures_come_from_hostvars_as_pictures_or_in_layout_reports(host_tree):
    topo = topology_result(host_tree, "dgx2")
    report = layout_report([], {"vms": []}, topo, host="dgx2-01", layout="day")
    assert report["picture"] == host_picture(topo)
    hostvars = {"dgx2-01": {"gpu_vms_report": report},
                "a100-01": {"gpu_vms_report": {"picture": host_picture(
                    topology_result(host_tree, "dgx-a100"))}},
                "gone": {"gpu_vms_report": Undefined()}}
    page = fleet_page([{"host": "dgx2-01", "status": "ok"}, "a100-01", "gone"], hostvars)
    assert page.count('<svg xmlns="http://www.w3.org/2000/svg"') == 2
    assert page.count('class="device gpu"') == 16 + 8
    assert 'data-host="gone" data-status="no report"' in page
    assert "no picture: the host failed before its topology was read" in page
    own = {"h": {"mine": host_picture(topo)}}
    assert 'data-host="h"' in fleet_page(["h"], own, key="mine", title="night <plan>")
    assert "<title>night &lt;plan&gt;</title>" in fleet_page(["h"], own, key="mine",
                                                             title="night <plan>")


def test_a_failed_topology_has_no_picture_and_bad_input_is_named():
    report = layout_report([], {"failed": True, "msg": "no libvirt"}, {"failed": True,
                                                                       "msg": "no libvirt"})
    assert report["picture"] is None
    with pytest.raises(AnsibleFilterError, match="host_picture: expected a gpu_topology result"):
        host_picture({"failed": True})
    with pytest.raises(AnsibleFilterError, match="fleet_page: expected a list of hosts"):
        fleet_page("dgx2-01")
    with pytest.raises(AnsibleFilterError, match="fleet_page: each entry needs a host"):
        fleet_page([{"status": "ok"}])
    with pytest.raises(AnsibleFilterError, match="fleet_page: expected a host picture of format"):
        fleet_page([{"host": "x", "picture": {"format": 0, "devices": []}}])

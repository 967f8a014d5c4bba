# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""The layers of docs/development.md, checked on the import graph of plugins/ (read as ASTs).

- one gateway per outside system: only ``_libvirt`` imports libvirt, only the gateways run
  commands (``subprocess``);
- the pure modules (placement, platforms, specs, the domain model, the helpers...) import no
  ``os`` or other I/O module, call no ``open()``, and import nothing of the collection that is
  not pure itself;
- the little helpers import nothing of the collection;
- gateways never reach up into the modules that run them (they may use the pure data types
  they fill in: ``_sysfs`` reads into ``_topology``'s, ``_platform_file`` into ``_platforms``').

Every module_util is sorted into one layer here: a new file fails the first test until it is.
"""

import ast
import os

import pytest

PLUGINS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "plugins")
MODULE_UTILS = os.path.join(PLUGINS, "module_utils")
PREFIX = "ansible_collections.gpuvirt.kvm.plugins."

HELPERS = {"_ranges", "_bdf", "_units"}
PURE = HELPERS | {
    "_argspec", "_cloud_init", "_domain", "_domain_builder", "_fabric_model", "_fabric_placement",
    "_fleet_placement", "_health", "_health_record",
    "_fleet_plan", "_holdings", "_host_facts", "_host_stack", "_host_state", "_image_request",
    "_host_nics", "_nics", "_nvidia_smi", "_picture", "_placement",
    "_placement_model", "_platform_data", "_platforms", "_readiness", "_topology", "_vm_plan",
    "_vm_request", "_vm_spec",
}
GATEWAYS = {
    "_libvirt": "libvirt (libvirt-python)",
    "_sysfs": "sysfs and procfs",
    "_qemu_img": "qemu-img",
    "_deb_packages": "dpkg, dpkg-deb, apt-get, and rpm for installed versions",
    "_seed": "genisoimage (the seed ISO)",
    "_lock": "the host lock (flock)",
    "_image_store": "the image store's files and URLs",
    "_platform_file": "platform files",
    "_fabric": "Fabric Manager (fmpm)",
    "_bytecode": "Python's import system (the bytecode cache)",
    "_health_store": "the health record's file",
    "_kmsg": "the kernel log (/dev/kmsg)",
    "_deep_check": "the NVIDIA driver and nvidia-smi, for the deep check (sysfs binding)",
    "_image_build": "image builds: debootstrap, apt-get in a chroot, debugfs, mkfs, GRUB, mtools",
}
# Above the gateways: they read the host, plan and act (the module shells' backends).
RUNS = {"_host_context", "_vm_observe", "_vm_apply", "_image_task", "_fabric_hook",
        "_guest_message", "_health_check"}
# What only a gateway may import: ways to reach outside the process.
IO_MODULES = {"os", "subprocess", "shutil", "tempfile", "socket", "fcntl", "pwd", "urllib",
              "http", "libvirt", "zipimport", "marshal", "tarfile", "pathlib", "io", "glob",
              "importlib", "posix", "select", "signal", "threading", "concurrent", "open"}


def _imports(path):
    """(stdlib/third-party top-level names, collection modules) that a file imports anywhere;
    a call of the builtin open() counts as importing "open"."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    outside, ours = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "open":
            outside.add("open")
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == PREFIX + "module_utils" or node.module == PREFIX.rstrip("."):
                names = ["%s.%s" % (node.module, alias.name) for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith(PREFIX):
                ours.add(name[len(PREFIX):])
            elif name != "__future__":
                outside.add(name.split(".")[0])
    return outside, ours


def _files(folder):
    return sorted(n[:-3] for n in os.listdir(folder) if n.endswith(".py") and n != "__init__.py")


GRAPH = {name: _imports(os.path.join(MODULE_UTILS, name + ".py")) for name in _files(MODULE_UTILS)}
SHELLS = {"%s/%s" % (kind, name): _imports(os.path.join(PLUGINS, kind, name + ".py"))
          for kind in ("modules", "filter") for name in _files(os.path.join(PLUGINS, kind))}


def _module_utils(ours):
    return {m.split(".", 1)[1] for m in ours if m.startswith("module_utils.")}


def _closure(name):
    seen, todo = set(), [name]
    while todo:
        for dep in _module_utils(GRAPH[todo.pop()][1]):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_every_module_util_has_one_layer():
    layers = [PURE, set(GATEWAYS), RUNS]
    assert sorted(n for n in GRAPH if sum(n in layer for layer in layers) != 1) == []
    assert sorted(set().union(*layers) - set(GRAPH)) == []  # no layer names a file that is gone


def test_only_the_libvirt_gateway_imports_libvirt():
    users = sorted(n for n, (outside, _ours) in list(GRAPH.items()) + list(SHELLS.items())
                   if "libvirt" in outside)
    assert users == ["_libvirt"]


def test_only_gateways_run_commands():
    users = sorted(n for n, (outside, _ours) in list(GRAPH.items()) + list(SHELLS.items())
                   if "subprocess" in outside)
    assert set(users) <= set(GATEWAYS), users
    assert "_qemu_img" in users  # the one qemu-img caller, by its name


@pytest.mark.parametrize("name", sorted(PURE))
def test_pure_modules_do_no_io_and_import_only_pure_modules(name):
    assert sorted(GRAPH[name][0] & IO_MODULES) == []
    assert sorted(_closure(name) - PURE) == []


@pytest.mark.parametrize("name", sorted(HELPERS))
def test_helpers_import_nothing_of_the_collection(name):
    assert GRAPH[name][1] == set()


@pytest.mark.parametrize("name", sorted(GATEWAYS))
def test_gateways_do_not_reach_up(name):
    assert sorted(_module_utils(GRAPH[name][1]) & RUNS) == []
    assert sorted(m for m in GRAPH[name][1] if not m.startswith("module_utils.")) == []


def test_the_libvirt_gateway_imports_nothing_of_the_collection():
    assert GRAPH["_libvirt"][1] == set()


def test_nothing_imports_a_module_or_a_filter_plugin():
    for name, (_outside, ours) in list(GRAPH.items()) + list(SHELLS.items()):
        assert sorted(m for m in ours if m.startswith(("modules.", "filter."))) == [], name

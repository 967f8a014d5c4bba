# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""Every role's meta/argument_specs.yml matches its defaults/main.yml: the same variables, the same
defaults, each default of the declared type (as prometheus.prometheus checks its roles in CI)."""

import os

import pytest
import yaml

ROLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "roles")

# Python types a default may have for each argument spec type.
_TYPES = {
    "str": (str,),
    "path": (str,),
    "raw": (object,),
    "bool": (bool,),
    "int": (int,),
    "float": (int, float),
    "list": (list,),
    "dict": (dict,),
}


def _roles():
    if not os.path.isdir(ROLES):
        return []
    return sorted(
        name for name in os.listdir(ROLES)
        if os.path.isfile(os.path.join(ROLES, name, "meta", "argument_specs.yml"))
        or os.path.isfile(os.path.join(ROLES, name, "defaults", "main.yml"))
    )


def _load(role, *parts):
    path = os.path.join(ROLES, role, *parts)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}


def _main_options(role):
    specs = _load(role, "meta", "argument_specs.yml")
    assert specs is not None, "%s has defaults/main.yml but no meta/argument_specs.yml" % role
    main = (specs.get("argument_specs") or {}).get("main")
    assert main is not None, "%s: meta/argument_specs.yml has no 'main' entry point" % role
    return main.get("options") or {}


def test_roles_are_found():
    assert "kvm_host" in _roles()


@pytest.mark.parametrize("role", _roles())
def test_same_variables(role):
    defaults = _load(role, "defaults", "main.yml") or {}
    options = _main_options(role)
    optional = {name for name, spec in options.items() if not spec.get("required")}
    assert sorted(set(defaults) - set(options)) == [], "in defaults/main.yml, not in the spec"
    assert sorted(optional - set(defaults)) == [], "in the spec, not in defaults/main.yml"
    required = sorted(name for name, spec in options.items() if spec.get("required"))
    assert sorted(set(required) & set(defaults)) == [], "required variables have no default"


@pytest.mark.parametrize("role", _roles())
def test_same_defaults(role):
    defaults = _load(role, "defaults", "main.yml") or {}
    options = _main_options(role)
    wrong = {
        name: {"defaults/main.yml": defaults[name], "argument_specs.yml": spec.get("default")}
        for name, spec in options.items()
        if name in defaults and spec.get("default") != defaults[name]
    }
    assert wrong == {}


@pytest.mark.parametrize("role", _roles())
def test_defaults_have_the_declared_type(role):
    options = _main_options(role)
    wrong = {}
    for name, spec in options.items():
        if "default" not in spec or spec["default"] is None:
            continue
        kind = spec.get("type", "str")
        value = spec["default"]
        allowed = _TYPES.get(kind, (object,))
        # bool is an int in Python; an int option must not default to true/false.
        if not isinstance(value, allowed) or (kind in ("int", "float") and isinstance(value, bool)):
            wrong[name] = "%r is not a %s" % (value, kind)
        elif kind == "list" and spec.get("elements") in _TYPES:
            elements = _TYPES[spec["elements"]]
            if not all(isinstance(item, elements) for item in value):
                wrong[name] = "%r has elements that are not %s" % (value, spec["elements"])
        elif spec.get("choices") and value not in spec["choices"]:
            wrong[name] = "%r is not one of %r" % (value, spec["choices"])
    assert wrong == {}


@pytest.mark.parametrize("role", _roles())
def test_every_option_is_described(role):
    options = _main_options(role)
    assert sorted(name for name, spec in options.items() if not spec.get("description")) == []


def test_kvm_host_installs_every_file_the_hook_imports():
    """The role copies _fabric_hook.HOST_FILES next to the libvirt hook: the same list."""
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._fabric_hook import HOST_FILES

    with open(os.path.join(ROLES, "kvm_host", "vars", "main.yml"), encoding="utf-8") as handle:
        role_vars = yaml.safe_load(handle)
    assert tuple(role_vars["__kvm_host_hook_modules"]) == tuple(HOST_FILES)


def test_kvm_host_installs_every_file_the_health_command_imports():
    """The role copies _health_check.HOST_FILES for gpuvirt-health: the same list."""
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._health_check import HOST_FILES

    with open(os.path.join(ROLES, "kvm_host", "vars", "main.yml"), encoding="utf-8") as handle:
        role_vars = yaml.safe_load(handle)
    assert tuple(role_vars["__kvm_host_health_modules"]) == tuple(HOST_FILES)


def test_kvm_host_pins_the_nvidia_packages_as_images_do():
    """The host's apt pin names the same NVIDIA packages as a built guest image's."""
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_request import (
        NVIDIA_PIN_GLOBS,
    )

    with open(os.path.join(ROLES, "kvm_host", "vars", "main.yml"), encoding="utf-8") as handle:
        role_vars = yaml.safe_load(handle)
    assert role_vars["__kvm_host_nvidia_pin_globs"].split() == NVIDIA_PIN_GLOBS.split()


@pytest.mark.parametrize("deep, stop, command", [
    (False, False, "/usr/local/sbin/gpuvirt-health check"),
    (True, False, "/usr/local/sbin/gpuvirt-health check --deep"),
    (True, True, "/usr/local/sbin/gpuvirt-health check --deep --stop-affected"),
    (False, True, "/usr/local/sbin/gpuvirt-health check --stop-affected"),
])
def test_the_health_service_runs_what_the_options_ask(deep, stop, command):
    """kvm_host_health_deep and kvm_host_health_stop_affected reach the timer's command."""
    import jinja2

    with open(os.path.join(ROLES, "kvm_host", "templates", "gpuvirt-health.service.j2"),
              encoding="utf-8") as handle:
        env = jinja2.Environment(undefined=jinja2.StrictUndefined)
        env.filters["bool"] = bool
        text = env.from_string(handle.read()).render(
            __kvm_host_health_script="/usr/local/sbin/gpuvirt-health",
            kvm_host_health_deep=deep, kvm_host_health_stop_affected=stop)
    assert "ExecStart=%s\n" % command in text + "\n"

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Argument specs with the constraints they carry, and the options shared by the modules. Private.

:class:`ArgumentSpec` (after community.crypto's) holds an Ansible argument spec together with its
``mutually_exclusive``, ``required_one_of`` and ``required_by`` rules, for options and for the
options of list/dict sub-options. One spec checks a module's options, the entries of
``kvm_layout``, ``gpu_topology``'s ``plan`` and the ``fleet_plan`` filter's requests alike:

- types, choices and unknown options with Ansible's own ``ArgumentSpecValidator`` (so a value
  from a template, ``"2"`` or ``"false"``, means what it means to any Ansible option);
- the constraints here, in words that name where the option sits (``vms[3].networks[0]``),
  which Ansible's messages do not. For that reason the constraints are not handed to
  ``AnsibleModule``: every caller checks them with :meth:`ArgumentSpec.check`.

Ansible is imported only where it is used, so that code that merely reads a spec (the fleet
planner, ``tools/inspect-host.py`` on a host without Ansible) does not need it.
"""

from __future__ import annotations


class ArgSpecError(ValueError):
    """Options break their spec; the message names where, the option and the fix."""


def _given(value):
    """Whether an option counts as set for a constraint (a bool option set to false does not)."""
    return value is not None and value is not False and value != ""


def _words(names):
    names = list(names)
    return names[0] if len(names) == 1 else "%s or %s" % (", ".join(names[:-1]), names[-1])


class ArgumentSpec:
    """An argument spec and its constraints. Sub-options may be ArgumentSpecs themselves."""

    def __init__(self, options, mutually_exclusive=(), required_one_of=(), required_by=None,
                 labels=None, reasons=None):
        self.options = dict(options)
        self.mutually_exclusive = [tuple(g) for g in mutually_exclusive]
        self.required_one_of = [tuple(g) for g in required_one_of]
        self.required_by = dict(required_by or {})
        # How a message names an option of a group ("user: true"), and why a rule exists.
        self.labels = dict(labels or {})
        self.reasons = dict(reasons or {})
        self._nested = [(name, opt["options"]) for name, opt in self.options.items()
                        if isinstance(opt.get("options"), ArgumentSpec)]

    @property
    def argument_spec(self):
        """The plain Ansible argument spec (types, defaults, choices, nested options)."""
        result = {}
        for name, opt in self.options.items():
            opt = dict(opt)
            if isinstance(opt.get("options"), ArgumentSpec):
                opt["options"] = opt["options"].argument_spec
            result[name] = opt
        return result

    def subset(self, names, defaults=None):
        """A spec of only these options (their constraints kept where all members remain),
        with ``defaults`` (name -> value) set on them."""
        names = [n for n in names if n in self.options]
        options = {n: dict(self.options[n]) for n in names}
        for name, value in (defaults or {}).items():
            options[name]["default"] = value
        keep = set(names)
        return ArgumentSpec(
            options,
            mutually_exclusive=[g for g in self.mutually_exclusive if keep.issuperset(g)],
            required_one_of=[g for g in self.required_one_of if keep.issuperset(g)],
            required_by={k: v for k, v in self.required_by.items() if k in keep and v in keep},
            labels=self.labels, reasons=self.reasons)

    def without_defaults(self):
        """The same spec with no defaults and nothing required (to type a partial mapping)."""
        options = {n: {k: v for k, v in o.items() if k not in ("default", "required")}
                   for n, o in self.options.items()}
        return ArgumentSpec(options, labels=self.labels, reasons=self.reasons)

    def secrets(self, params):
        """The values of no_log options in ``params`` (raw or typed), sub-options included."""
        found = set()
        if not isinstance(params, dict):
            return found
        for name, opt in self.options.items():
            value = params.get(name)
            if value is None:
                continue
            sub = opt.get("options")
            if opt.get("no_log"):
                if isinstance(value, (list, tuple)):
                    found.update(str(v) for v in value if v not in (None, ""))
                elif value != "":
                    found.add(str(value))
            elif sub is not None:
                sub = sub if isinstance(sub, ArgumentSpec) else ArgumentSpec(sub)
                for item in value if isinstance(value, list) else [value]:
                    found |= sub.secrets(item)
        return found

    def typed(self, params, where):
        """``params`` typed as Ansible types a module's options (types, choices, unknown
        options, defaults); returns the typed mapping or raises ArgSpecError naming ``where``.
        The constraints are :meth:`check`'s."""
        # Imported here: the module shells get this from AnsibleModule and never call it.
        from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
        from ansible.module_utils.errors import UnsupportedError

        if not isinstance(params, dict):
            raise ArgSpecError("%s: expected a mapping of options, got %r" % (where, params))
        if self._typed_already(params):
            # What Ansible's validator returns for such values (thousands of fleet requests
            # come typed; it costs 50 us each); anything it would convert or refuse goes to it.
            return {name: params[name] if params.get(name) is not None else opt.get("default")
                    for name, opt in self.options.items()}
        result = ArgumentSpecValidator(self.argument_spec).validate(params)
        if result.error_messages:
            raise ArgSpecError("%s: %s" % (where, "; ".join(
                ("unknown option %s" % e.error_message) if isinstance(e, UnsupportedError)
                else e.error_message for e in result.errors.errors)))
        return result.validated_parameters

    _SCALARS = {"int": int, "bool": bool, "str": str}

    def _typed_already(self, params):
        """Whether every value already has its option's Python type, within its choices (and
        every required option is there): Ansible's validator would return them as they are."""
        for name, opt in self.options.items():
            value = params.get(name)
            if value is None:
                if opt.get("required"):
                    return False
                continue
            kind = self._SCALARS.get(opt.get("type", "str"))
            if opt.get("type") != "raw" and (
                    kind is None or not isinstance(value, kind)
                    or (kind is int and isinstance(value, bool))):
                return False
            if opt.get("choices") is not None and value not in opt["choices"]:
                return False
        return all(name in self.options for name in params)

    def check(self, params, where=""):
        """Raise ArgSpecError when typed ``params`` break a constraint (sub-options too)."""
        prefix = where + "." if where else ""
        for group in self.mutually_exclusive + self.required_one_of:
            chosen = [n for n in group if _given(params.get(n))]
            exclusive = group in self.mutually_exclusive
            one_of = group in self.required_one_of
            if (exclusive and len(chosen) > 1) or (one_of and not chosen):
                what = "exactly one of" if exclusive and one_of else (
                    "only one of" if exclusive else "one of")
                raise ArgSpecError("%s: give %s %s, got %s" % (
                    where or "options", what, _words(self.labels.get(n, n) for n in group),
                    ", ".join(chosen) or "none"))
        for name, needed in self.required_by.items():
            if params.get(name) is not None and params.get(needed) is None:
                reason = self.reasons.get(name)
                raise ArgSpecError("%s%s: set, but %s is not given; give %s too%s" % (
                    prefix, name, needed, needed, " (%s)" % reason if reason else ""))
        for name, sub in self._nested:
            value = params.get(name)
            if value is None:
                continue
            if isinstance(value, list):
                for n, item in enumerate(value):
                    sub.check(item or {}, "%s%s[%d]" % (prefix, name, n))
            else:
                sub.check(value, prefix + name)


# --- options shared by the modules (twins of the doc fragments) --------------------------------

def host_argspec():
    """Options of the gpuvirt.kvm.host doc fragment."""
    return dict(
        sysfs_root=dict(type="path", default="/sys"),
        proc_root=dict(type="path", default="/proc"),
        platform=dict(type="str", default="auto"),
        nvidia_smi_topo=dict(type="str"),
        unhealthy_gpus=dict(type="list", elements="str", default=[]),
        aer_correctable_threshold=dict(type="int", default=100),
        health_record=dict(type="path", default="/var/lib/gpuvirt/health.json"),
        reserved_cpus=dict(type="str"),
        reserved_memory_mb=dict(type="int"),
        fabric_manager=dict(type="dict", options=dict(
            address=dict(type="str"),
            fmpm=dict(type="str", default="fmpm"),
            starting_wait=dict(type="int", default=120),
            service_vm=dict(type="str"),
        )),
        host_record=dict(type="path", default="/etc/gpuvirt/kvm_host.json"),
    )


def libvirt_argspec():
    """Options of the gpuvirt.kvm.host.LIBVIRT doc fragment."""
    from ansible.module_utils.common.parameters import env_fallback

    # No default here: a default would win over env_fallback; resolve_uri() supplies it.
    return dict(uri=dict(type="str", fallback=(env_fallback, ["LIBVIRT_DEFAULT_URI"])))

# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The ``platform`` option: auto, a built-in platform's name, or a platform file. Private.

This module reads a platform file (YAML, or JSON); ``_platform_data.platform_from_dict``
validates what it holds into a ``_platforms.Platform``.
"""

from __future__ import annotations

import json
import os

from ansible_collections.gpuvirt.kvm.plugins.module_utils._platform_data import (
    FILE_KEYS,
    platform_from_dict,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._platforms import (
    KNOWN_NAMES,
    PLATFORMS,
    PlatformError,
    check_host,
    detect,
)


def get_platform(name_or_path, topology=None):
    """Resolve the ``platform`` option: auto, a known name, or a YAML/JSON file path."""
    if name_or_path is None or name_or_path == "auto":
        if topology is None:
            raise PlatformError("platform: 'auto' needs the host topology to detect the platform")
        return detect(topology)[0]
    if not isinstance(name_or_path, str):
        raise PlatformError(
            "platform: expected 'auto', a platform name or a file path, got %r" % (name_or_path,))
    if name_or_path in PLATFORMS:
        plat = PLATFORMS[name_or_path]
    elif os.path.sep in name_or_path or os.path.splitext(name_or_path)[1] or os.path.exists(
            name_or_path):
        plat = platform_from_dict(load_platform_file(name_or_path), source=name_or_path)
    else:
        raise PlatformError(
            "platform: %r is not a known platform; use auto, one of %s, or the path of a YAML or "
            "JSON platform file" % (name_or_path, ", ".join(KNOWN_NAMES)))
    if topology is not None:
        check_host(plat, topology)
    return plat


def load_platform_file(path):
    """Read a platform file (JSON, or YAML when PyYAML is importable) into a dict."""
    try:
        with open(path, "r", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise PlatformError("platform: cannot read platform file %r: %s; give a readable YAML or "
                            "JSON file" % (path, exc)) from exc
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json" or (ext not in (".yml", ".yaml") and text.lstrip().startswith("{")):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise PlatformError("platform: file %r is not valid JSON: %s" % (path, exc)) from exc
    else:
        try:
            import yaml  # only platform files need it: not imported on every module run
        except ImportError:  # PyYAML is optional on managed hosts; JSON files still work.
            yaml = None
        if yaml is None:
            raise PlatformError(
                "platform: file %r is YAML but PyYAML is not importable on this host; install "
                "PyYAML (python3-yaml) or give the platform file as JSON" % path)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PlatformError("platform: file %r is not valid YAML: %s" % (path, exc)) from exc
    if not isinstance(data, dict):
        raise PlatformError("platform: file %r must hold a mapping of platform fields (%s), not "
                            "%s" % (path, ", ".join(FILE_KEYS), type(data).__name__))
    return data

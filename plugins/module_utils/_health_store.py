# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The health record's file (``_health_record`` says what is in it). Private to this collection.

Read by every run that places VMs; written by ``gpu_health`` (and the ``gpuvirt-health``
command a converted host runs at boot and nightly) under the host lock, whole or not at all: a
new file beside the old one, then renamed over it.
"""

from __future__ import annotations

import json
import os
import tempfile

from ansible_collections.gpuvirt.kvm.plugins.module_utils._health_record import (
    HealthRecordError,
    validate,
)

DEFAULT_HEALTH_RECORD = "/var/lib/gpuvirt/health.json"


def read_record(path):
    """The record at ``path``, validated; None when there is no file. HealthRecordError when it
    cannot be read or is not a record."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HealthRecordError("health_record: cannot read %s: %s" % (
            path, exc.strerror or exc)) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError is one too
        raise HealthRecordError(
            "health_record: %s is not JSON (%s); fix it, or move it away (a check then writes a "
            "new one): it is never reset" % (path, exc)) from None
    return validate(data, path)


def render(record):
    """The record as the file holds it."""
    return json.dumps(record, indent=2, sort_keys=True) + "\n"


def write_record(path, record):
    """Write ``record`` to ``path`` whole (mode 0644; its folder made 0755 if missing)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".health.", dir=directory)
    except OSError as exc:
        raise HealthRecordError("health_record: cannot write in %s: %s" % (
            directory, exc.strerror or exc)) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(render(record))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise HealthRecordError("health_record: cannot write %s: %s" % (
            path, exc.strerror or exc)) from None

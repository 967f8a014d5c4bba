# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The health record: each GPU's and NVSwitch's health state with its reason, source and time,
and what admins said about it. Private to this collection; pure (the file is ``_health_store``'s).

The record (``/var/lib/gpuvirt/health.json`` by default) is a JSON object::

    {"format": 1,
     "devices": {"0000:34:00.0": {
        "kind": "gpu",                      # or "nvswitch"
        "state": "failed",                  # ok, degraded, failed: what placement obeys
        "reason": "...", "source": "aer",   # the worst signals' reasons and sources
        "since": "2026-12-05T23:40:00Z",    # when this state and reason began
        "signals": [{"source", "state", "reason"}, ...],
        "mark": {"state": "failed", "reason": "...", "since": "..."},   # an admin's, optional
        "cleared": {"reason": "...", "since": "...", "signals": ["..."],  # optional
                    "found": [{"source", "state", "reason"}, ...]},
        "deep": {"at": "...", "driver": "nvidia", "signals": [...]},     # the last deep check
        "history": [{"at": "...", "event": "...", "state": "...", "reason": "..."}, ...]}}}

A check (``checked``) judges each device from the signals read now (``_health.judge``): an
admin's mark adds a failed signal (source ``admin``) until it is cleared; a clear hides the
signals that were there when it was given (a fatal AER count lasts until reboot) - a new or
changed signal (more errors) is not hidden. ``effective`` gives the same judgement without
writing, for every run that places VMs. The last deep check's findings (source ``nvidia-smi``)
count beside the signals read now until the next deep check of that GPU.
"""

from __future__ import annotations

from ansible_collections.gpuvirt.kvm.plugins.module_utils._health import (
    HEALTH_DEGRADED,
    HEALTH_FAILED,
    HEALTH_OK,
    SOURCE_FABRIC_MANAGER,
    SOURCE_SXID,
    DeviceHealth,
    Signal,
)

RECORD_FORMAT = 1
HISTORY_KEEP = 20  # events kept per device, newest last
SOURCE_ADMIN = "admin"
SOURCE_DEEP = "nvidia-smi"
KINDS = ("gpu", "nvswitch")
STATES = (HEALTH_OK, HEALTH_DEGRADED, HEALTH_FAILED)
# The sources a run may not read, in the order a run that reads them finds their signals.
CARRIED_ORDER = (SOURCE_FABRIC_MANAGER, SOURCE_SXID)
_FIX = "; fix it, or move it away (a check then writes a new one): it is never reset"


class HealthRecordError(Exception):
    """The health record is not one this collection writes; the message says what is wrong."""


def empty():
    """A record with no device in it."""
    return {"format": RECORD_FORMAT, "devices": {}}


def _str(value):
    return isinstance(value, str) and value != ""


def _check_signals(where, signals):
    if not isinstance(signals, list):
        raise HealthRecordError("%s.signals is not a list" % where)
    for n, sig in enumerate(signals):
        if not (isinstance(sig, dict) and _str(sig.get("source")) and _str(sig.get("reason"))
                and sig.get("state") in (HEALTH_DEGRADED, HEALTH_FAILED)):
            raise HealthRecordError(
                "%s.signals[%d] is not {source, state (degraded or failed), reason}" % (where, n))


def validate(data, path):
    """``data`` (parsed JSON) as a health record, or HealthRecordError naming ``path`` and what
    is wrong. Nothing is repaired: a record a person or a bug broke is reported, never reset."""
    def bad(what):
        return HealthRecordError("health_record: %s is not a health record gpuvirt.kvm writes: "
                                 "%s%s" % (path, what, _FIX))

    if not isinstance(data, dict):
        raise bad("it holds a %s, not a JSON object" % type(data).__name__)
    if isinstance(data.get("format"), bool) or data.get("format") != RECORD_FORMAT:
        raise bad("its format is %r; this collection reads format %d"
                  % (data.get("format"), RECORD_FORMAT))
    devices = data.get("devices")
    if not isinstance(devices, dict):
        raise bad("it has no devices object")
    for bdf, entry in devices.items():
        where = "devices[%s]" % bdf
        if not isinstance(entry, dict):
            raise bad("%s is not an object" % where)
        if entry.get("kind") not in KINDS:
            raise bad("%s.kind is %r, not one of %s" % (where, entry.get("kind"), ", ".join(KINDS)))
        if entry.get("state") not in STATES:
            raise bad("%s.state is %r, not one of %s" % (where, entry.get("state"),
                                                         ", ".join(STATES)))
        if not _str(entry.get("since")):
            raise bad("%s.since is missing" % where)
        try:
            _check_signals(where, entry.get("signals", []))
        except HealthRecordError as exc:
            raise bad(str(exc)) from None
        mark = entry.get("mark")
        if mark is not None and not (isinstance(mark, dict) and mark.get("state") == HEALTH_FAILED
                                     and _str(mark.get("reason")) and _str(mark.get("since"))):
            raise bad("%s.mark is not {state: failed, reason, since}" % where)
        cleared = entry.get("cleared")
        if cleared is not None and not (
                isinstance(cleared, dict) and _str(cleared.get("reason"))
                and _str(cleared.get("since"))
                and isinstance(cleared.get("signals"), list)
                and all(isinstance(s, str) for s in cleared["signals"])):
            raise bad("%s.cleared is not {reason, since, signals: [reasons]}" % where)
        if cleared is not None and "found" in cleared:
            try:
                _check_signals("%s.cleared.found" % where, cleared["found"])
            except HealthRecordError as exc:
                raise bad(str(exc)) from None
        deep = entry.get("deep")
        if deep is not None:
            if not (isinstance(deep, dict) and _str(deep.get("at"))):
                raise bad("%s.deep is not {at, driver, signals}" % where)
            try:
                _check_signals(where + ".deep", deep.get("signals", []))
            except HealthRecordError as exc:
                raise bad(str(exc)) from None
        if not isinstance(entry.get("history", []), list):
            raise bad("%s.history is not a list" % where)
    return data


def _found(live, entry):
    """The signals read now and the last deep check's."""
    deep = [Signal(d["source"], d["state"], d["reason"])
            for d in ((entry or {}).get("deep") or {}).get("signals") or ()]
    return list(live.signals) + deep


def effective(bdf, live, entry):
    """The DeviceHealth that placement obeys: the signals read now (``live``, a DeviceHealth)
    and the last deep check's, less those an admin cleared, plus an admin's mark."""
    entry = entry or {}
    hidden = set((entry.get("cleared") or {}).get("signals") or ())
    signals = [s for s in _found(live, entry) if s.reason not in hidden]
    mark = entry.get("mark")
    if mark:
        signals.append(Signal(SOURCE_ADMIN, mark["state"], "marked %s by an admin: %s"
                              % (mark["state"], mark["reason"])))
    return DeviceHealth(bdf, tuple(signals))


def _sources(health):
    worst = [s for s in health.signals if s.state == health.state]
    return ", ".join(sorted({s.source for s in worst}))


def _event(entry, now, event, reason, state=None):
    history = list(entry.get("history") or ())
    item = {"at": now, "event": event, "reason": reason}
    if state:
        item["state"] = state
    history.append(item)
    entry["history"] = history[-HISTORY_KEEP:]


def _kinds_of(signals):
    """What a state change is judged on: the state of each source, not the counts in the
    reasons (a marginal link that counts more errors is the same finding)."""
    return sorted({(s["source"], s["state"]) for s in signals})


def _judged(bdf, kind, live, old, now):
    """The entry for one device after a check: ``old`` (or None) updated from ``live``."""
    entry = dict(old or {})
    cleared = entry.get("cleared")
    if cleared:
        # Hide only what still shows: what went away (a reboot reset the AER counters) must
        # not hide the same text when it comes back.
        showing = {s.reason for s in _found(live, entry)}
        still = [r for r in cleared["signals"] if r in showing]
        if still:
            entry["cleared"] = dict(cleared, signals=still)
            if "found" in cleared:
                entry["cleared"]["found"] = [f for f in cleared["found"] if f["reason"] in still]
        else:
            del entry["cleared"]
    health = effective(bdf, live, entry)
    entry["kind"] = kind
    reason = health.reason if health.signals else ""
    signals = [s.to_dict() for s in health.signals]
    if old is None or old.get("state") != health.state \
            or _kinds_of(old.get("signals") or ()) != _kinds_of(signals):
        entry["since"] = now
        _event(entry, now, "state", reason or "no fault found", health.state)
    entry.update(state=health.state, reason=reason, source=_sources(health), signals=signals)
    return entry


def carried(live, record, sources):
    """``live`` ({address: DeviceHealth} read now) with the signals of ``sources`` that this run
    did not read (the kernel log that cannot be read, Fabric Manager not asked or not
    answering) as the record keeps them - those placement obeyed and those an admin cleared -
    so that such a run neither forgets what the source said nor undoes an admin's clear of it.
    The next run that reads the source judges them again."""
    if not sources:
        return live
    entries = (record or {}).get("devices") or {}
    out = {}
    for bdf, health in live.items():
        entry = entries.get(bdf) or {}
        kept = list(entry.get("signals") or ()) + list(
            (entry.get("cleared") or {}).get("found") or ())
        have = {(s.source, s.reason) for s in health.signals}
        extra = []
        for item in kept:
            key = (item.get("source"), item.get("reason"))
            if item.get("source") in sources and key not in have:
                have.add(key)
                extra.append(Signal(item["source"], item["state"], item["reason"]))
        if not extra:
            out[bdf] = health
            continue
        # In the order a run that reads every source finds them (sysfs's, Fabric Manager's,
        # the kernel log's): the record does not change only because a source was not read.
        signals = list(health.signals) + extra
        rank = {source: n for n, source in enumerate(CARRIED_ORDER)}
        out[bdf] = DeviceHealth(bdf, tuple(sorted(
            signals, key=lambda sig: rank.get(sig.source, -1))))
    return out


def checked(record, live, kinds, now):
    """The record after a check: ``live`` {address: DeviceHealth read now}, ``kinds`` {address:
    "gpu" or "nvswitch"} for every device of the platform, ``now`` an ISO 8601 time. Devices the
    record holds that the host no longer has are kept as they were."""
    devices = dict(record.get("devices") or {})
    for bdf, kind in kinds.items():
        devices[bdf] = _judged(bdf, kind, live[bdf], devices.get(bdf), now)
    return dict(record, devices=devices)


def _unknown(bdfs, kinds, option, recorded=()):
    unknown = [b for b in bdfs if b not in kinds and b not in recorded]
    if unknown:
        raise HealthRecordError(
            "%s: %s %s not a GPU or NVSwitch of this host; its GPUs and NVSwitches are %s"
            % (option, ", ".join(unknown), "is" if len(unknown) == 1 else "are",
               ", ".join(sorted(kinds)) or "none"))


def marked(record, bdfs, reason, live, kinds, now):
    """The record with ``bdfs`` marked failed by an admin for ``reason`` (a device marked for
    the same reason already is left as it is), judged again with ``live``."""
    _unknown(bdfs, kinds, "devices")
    devices = dict(record.get("devices") or {})
    for bdf in bdfs:
        entry = dict(devices.get(bdf) or {})
        mark = entry.get("mark")
        if mark and mark.get("reason") == reason:
            continue
        entry["mark"] = {"state": HEALTH_FAILED, "reason": reason, "since": now}
        _event(entry, now, "marked", reason, HEALTH_FAILED)
        devices[bdf] = entry if bdf in devices else dict(entry, since=now)
    return checked(dict(record, devices=devices), live, kinds, now)


def cleared(record, bdfs, reason, live, kinds, now):
    """The record with ``bdfs`` cleared by an admin for ``reason``: the mark is removed and
    the signals read now are hidden until they change. A device with nothing to clear is left
    as it is. A device the record holds that the host no longer has (a baseboard swapped) may
    be cleared too: its mark goes."""
    devices = dict(record.get("devices") or {})
    _unknown(bdfs, kinds, "devices", recorded=devices)
    for bdf in bdfs:
        entry = dict(devices.get(bdf) or {})
        found = live.get(bdf) or DeviceHealth(bdf)
        showing = [s.reason for s in _found(found, entry)]
        hidden = (entry.get("cleared") or {}).get("signals") or []
        if not entry.get("mark") and set(showing) <= set(hidden):
            continue
        entry.pop("mark", None)
        # found: the signals themselves, so that a run that cannot read their source (the
        # kernel log, Fabric Manager) carries them, and the clear, on (``carried``).
        entry["cleared"] = {"reason": reason, "since": now, "signals": showing,
                            "found": [s.to_dict() for s in _found(found, entry)]}
        _event(entry, now, "cleared", reason)
        entry = entry if bdf in devices else dict(entry, since=now)
        # One the host no longer has is judged here: a check passes it by.
        devices[bdf] = entry if bdf in kinds else _judged(bdf, entry["kind"], found, entry, now)
    return checked(dict(record, devices=devices), live, kinds, now)


def deep_checked(record, results, driver, live, kinds, now):
    """The record with a deep check's ``results`` ({address: ((state, reason), ...)} of each
    GPU checked; those not checked keep their last deep check) and judged again with ``live``."""
    devices = dict(record.get("devices") or {})
    for bdf, found in results.items():
        entry = dict(devices.get(bdf) or {}, since=(devices.get(bdf) or {}).get("since", now))
        entry["deep"] = {"at": now, "driver": driver, "signals": [
            {"source": SOURCE_DEEP, "state": state, "reason": reason} for state, reason in found]}
        devices[bdf] = entry
    return checked(dict(record, devices=devices), live, kinds, now)


def summary(record, present):
    """{"failed": [addresses], "degraded": [addresses]} of the record's devices that the host
    has (``present``), sorted."""
    devices = record.get("devices") or {}
    return {state: sorted(b for b, e in devices.items() if e.get("state") == state
                          and b in present)
            for state in (HEALTH_FAILED, HEALTH_DEGRADED)}

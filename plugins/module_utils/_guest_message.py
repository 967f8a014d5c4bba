# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""A message to a guest's logged-in users, through the QEMU guest agent. Private to this
collection.

The agent runs ``wall`` in the guest (``guest-exec``) with the message on its standard input, as
an admin would on the guest's console: every terminal of a logged-in user shows it. On standard
input, the text is never taken for a file name or an option, and wall escapes control
characters in it. A guest without the agent's channel or without a running agent is not told,
and the reason is libvirt's own words.
"""

from __future__ import annotations

import base64
import time

from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import LibvirtGatewayError

WALL = "wall"
_EXEC = ("guest-exec", "guest-exec-status")  # what telling a guest needs of its agent
MESSAGE_MAX = 4096  # characters: a message for a terminal, not a file


def tell(gateway, name, message, timeout, check_mode=False, clock=time.monotonic,
         sleep=time.sleep):
    """None when ``wall`` ran in guest ``name`` (in check mode: when its agent answers and
    allows guest-exec); otherwise why not."""
    state = gateway.state(name)
    if state != "running":
        return "it is not running (%s)" % state
    try:
        if check_mode:
            info = gateway.agent_command(name, "guest-info", timeout=timeout) or {}
            enabled = {c.get("name"): c.get("enabled", True)
                       for c in info.get("supported_commands", ())}
            blocked = [c for c in _EXEC if enabled.get(c) is not True]
            if blocked:
                return "its guest agent does not allow %s (qemu-ga --block-rpcs)" % (
                    " and ".join(blocked))
            return None
        # wall ends the message with a footer line; the text's own last line ends first.
        text = message if message.endswith("\n") else message + "\n"
        data = base64.b64encode(text.encode("utf-8")).decode("ascii")
        started = gateway.agent_command(
            name, "guest-exec", {"path": WALL, "input-data": data, "capture-output": True},
            timeout=timeout)
        pid = (started or {}).get("pid")
        if pid is None:
            return "its guest agent started no process (it answered %r)" % (started,)
        deadline = clock() + timeout
        while True:
            status = gateway.agent_command(name, "guest-exec-status", {"pid": pid},
                                           timeout=timeout) or {}
            if status.get("exited"):
                break
            if clock() >= deadline:
                return "%s did not finish within %d s in the guest" % (WALL, timeout)
            sleep(0.2)
    except LibvirtGatewayError as exc:
        return "its guest agent did not take the message: %s" % exc
    if status.get("exitcode") or status.get("signal"):
        err = base64.b64decode(status.get("err-data") or "").decode("utf-8", "replace").strip()
        return "%s failed in the guest (exit code %s%s): %s" % (
            WALL, status.get("exitcode"),
            ", signal %s" % status["signal"] if status.get("signal") else "",
            err or "it printed nothing")
    return None

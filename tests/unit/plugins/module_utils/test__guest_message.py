# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""What kvm_vm_message makes of the guest agent's answers. The agent itself answers in the
guest_boot integration target (a real Debian guest); here a stand-in gateway gives the answers
QEMU's guest agent gives (qga/qapi-schema.json: guest-exec, guest-exec-status), for the cases a
healthy guest does not produce."""

import base64

from ansible_collections.gpuvirt.kvm.plugins.module_utils._guest_message import tell
from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import LibvirtGatewayError


class AgentAnswers:
    """A gateway whose one domain answers guest agent commands from a list."""

    def __init__(self, state="running", statuses=(), error=None):
        self._state, self.statuses, self.error = state, list(statuses), error
        self.exec_enabled = True
        self.sent = []

    def state(self, _name):
        return self._state

    def agent_command(self, _name, command, arguments=None, timeout=10):
        self.sent.append((command, arguments, timeout))
        if self.error:
            raise LibvirtGatewayError(self.error)
        if command == "guest-info":
            return {"version": "7.2.0", "supported_commands": [
                {"name": "guest-exec", "enabled": self.exec_enabled, "success-response": True},
                {"name": "guest-exec-status", "enabled": True, "success-response": True},
                {"name": "guest-ping", "enabled": True, "success-response": True}]}
        if command == "guest-exec":
            return {"pid": 42}
        return self.statuses.pop(0)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_told_when_wall_exits_zero():
    clock = Clock()
    # the text goes on wall's standard input: never read as a file name or an option
    text = "--help /etc/shadow \x1b[2J down at noon"
    gw = AgentAnswers(statuses=[{"exited": False}, {"exited": True, "exitcode": 0}])
    assert tell(gw, "a", text, 10, clock=clock, sleep=clock.sleep) is None
    assert gw.sent[0] == ("guest-exec", {
        "path": "wall", "input-data": base64.b64encode(text.encode() + b"\n").decode(),
        "capture-output": True}, 10)
    assert [c for c, _a, _t in gw.sent[1:]] == ["guest-exec-status"] * 2
    assert gw.sent[1][1] == {"pid": 42}


def test_wall_failing_in_the_guest_is_reported_with_its_words():
    err = base64.b64encode(b"wall: cannot get passwd uid\n").decode()
    gw = AgentAnswers(statuses=[{"exited": True, "exitcode": 1, "err-data": err}])
    assert tell(gw, "a", "m", 10) == (
        "wall failed in the guest (exit code 1): wall: cannot get passwd uid")


def test_wall_that_never_finishes_is_not_waited_for_past_the_timeout():
    gw = AgentAnswers(statuses=[{"exited": False}] * 100)
    clock = Clock()
    assert tell(gw, "a", "m", 3, clock=clock, sleep=clock.sleep) == (
        "wall did not finish within 3 s in the guest")
    assert clock.now <= 3.2


def test_no_agent_and_not_running_are_reasons_not_errors():
    gw = AgentAnswers(error="Guest agent is not responding: QEMU guest agent is not connected")
    assert tell(gw, "a", "m", 10) == (
        "its guest agent did not take the message: Guest agent is not responding: QEMU guest "
        "agent is not connected")
    stopped = AgentAnswers(state="shutoff")
    assert tell(stopped, "a", "m", 10) == "it is not running (shutoff)"
    assert stopped.sent == []


def test_check_mode_asks_whether_guest_exec_is_allowed_and_sends_nothing():
    gw = AgentAnswers()
    assert tell(gw, "a", "m", 5, check_mode=True) is None
    assert gw.sent == [("guest-info", None, 5)]
    gw.exec_enabled = False
    assert tell(gw, "a", "m", 5, check_mode=True) == (
        "its guest agent does not allow guest-exec (qemu-ga --block-rpcs)")
    old = AgentAnswers()
    old.agent_command = lambda *_a, **_k: {"supported_commands": [{"name": "guest-exec"}]}
    assert tell(old, "a", "m", 5, check_mode=True) == (
        "its guest agent does not allow guest-exec-status (qemu-ga --block-rpcs)")

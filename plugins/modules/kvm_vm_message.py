#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) gpuvirt.kvm contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: kvm_vm_message
short_description: Tell the users logged in to VMs something, through the QEMU guest agent
version_added: 0.2.0
description:
  - Shows O(text) on every terminal of every user logged in to each VM in O(name), the way
    C(wall) does on the guest's console. The QEMU guest agent runs C(wall) in the guest
    (C(guest-exec)) with the text on its standard input (never taken for a file name or an
    option; C(wall) escapes control characters), so no network path to the guest and no login
    is needed.
  - M(gpuvirt.kvm.kvm_vm) gives every VM the agent's channel (C(org.qemu.guest_agent.0)), and
    the images M(gpuvirt.kvm.kvm_image_build) makes run the agent (C(qemu-guest-agent)).
  - A VM that is not running, that has no agent channel (a VM made before the channel was
    added gets it at its next start after M(gpuvirt.kvm.kvm_vm) redefines it), whose guest runs
    no agent, or whose agent refuses C(guest-exec) is not told. It is listed in
    RV(not_told) with the reason, and the module does not fail for it.
  - C(gpuvirt.kvm.maintain_host) uses it to warn the tenants before it shuts them down
    (C(maintain_host_message)).
author:
  - gpuvirt.kvm contributors (@gpuvirt)
extends_documentation_fragment:
  - gpuvirt.kvm.host.LIBVIRT
  - gpuvirt.kvm.bytecode
attributes:
  check_mode:
    support: full
    description: Sends nothing. Each running VM's agent is asked what it allows
      (C(guest-info)); those that answer and allow C(guest-exec) are listed in RV(told), as the
      guests that would be told.
  diff_mode:
    support: none
    description: A message changes no state that a diff could show.
  idempotent:
    support: none
    description: Every run shows the message again.
options:
  name:
    description:
      - The VMs (libvirt domain names) to tell.
      - Every name must be a defined domain; the module fails, telling no one, otherwise.
    type: list
    elements: str
    required: true
    aliases: [names]
  text:
    description:
      - The message, as C(wall) shows it under its "Broadcast message from root" line. At most
        4096 characters.
      - Write it in ASCII. C(wall) shows other characters as octal escapes (C(caf\303\251)), as
        it shows control characters, so that no text can take over a terminal.
    type: str
    required: true
  timeout:
    description:
      - Seconds to wait for each VM's agent to answer, and for C(wall) to finish in the guest.
    type: int
    default: 10
notes:
  - A guest's agent may be configured to refuse C(guest-exec) (qemu-ga C(--block-rpcs)); that
    guest is listed in RV(not_told).
seealso:
  - name: QEMU guest agent protocol (guest-exec)
    description: The commands the module sends.
    link: https://qemu-project.gitlab.io/qemu/interop/qemu-ga-ref.html
"""

EXAMPLES = r"""
- name: Warn the tenants of a host 5 minutes ahead
  gpuvirt.kvm.kvm_vm_message:
    name: [train-a, train-b]
    text: "This host goes down for maintenance at 22:00 UTC; save your work."
  register: warned

- name: Say who could not be told
  ansible.builtin.debug:
    msg: "{{ warned.not_told | map(attribute='name') | list }}"
  when: warned.not_told | length > 0
"""

RETURN = r"""
told:
  description:
    - The VMs where C(wall) ran (in check mode, whose agent would run it). Every user logged in
      to them was shown the message; a VM nobody is logged in to is listed too.
  returned: always
  type: list
  elements: str
  sample: [train-a]
not_told:
  description: The VMs that were not told, and why.
  returned: always
  type: list
  elements: dict
  contains:
    name: {description: The VM., type: str, sample: train-b}
    reason:
      description: Why, in libvirt's or the guest's words.
      type: str
      sample: "its guest agent did not take the message: Guest agent is not responding: QEMU
        guest agent is not connected"
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

# _bytecode first: it compiles the module_utils imported after it once per run (see there).
from ansible_collections.gpuvirt.kvm.plugins.module_utils import _bytecode  # noqa: F401 pylint: disable=unused-import
from ansible_collections.gpuvirt.kvm.plugins.module_utils._argspec import libvirt_argspec
from ansible_collections.gpuvirt.kvm.plugins.module_utils._guest_message import MESSAGE_MAX, tell
from ansible_collections.gpuvirt.kvm.plugins.module_utils._host_context import resolve_uri
from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
    LibvirtGateway,
    LibvirtGatewayError,
    has_libvirt,
)


def main():
    argument_spec = dict(
        name=dict(type="list", elements="str", required=True, aliases=["names"]),
        text=dict(type="str", required=True),
        timeout=dict(type="int", default=10),
    )
    argument_spec.update(libvirt_argspec())
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    p = module.params
    names = list(dict.fromkeys(p["name"]))
    if not (p["text"] or "").strip():
        module.fail_json(msg="text: it is empty; give the message to show the VMs' users")
    if len(p["text"]) > MESSAGE_MAX:
        module.fail_json(msg="text: %d characters, more than the %d allowed; shorten it"
                         % (len(p["text"]), MESSAGE_MAX))
    if p["timeout"] < 1:
        module.fail_json(msg="timeout: %d; give the seconds to wait for each guest, 1 or more"
                         % p["timeout"])
    if not has_libvirt():
        module.fail_json(msg=missing_required_lib("libvirt-python"))
    told, not_told = [], []
    try:
        with LibvirtGateway(resolve_uri(p["uri"])) as gateway:
            missing = [n for n in names if not gateway.exists(n)]
            if missing:
                module.fail_json(msg="name: %s %s not defined in libvirt (%s); no VM was told"
                                 % (", ".join(missing), "is" if len(missing) == 1 else "are",
                                    gateway.uri))
            for name in names:
                reason = tell(gateway, name, p["text"], p["timeout"],
                              check_mode=module.check_mode)
                if reason is None:
                    told.append(name)
                else:
                    not_told.append({"name": name, "reason": reason})
    except LibvirtGatewayError as exc:
        module.fail_json(msg="kvm_vm_message: %s (told so far: %s)"
                         % (exc, ", ".join(told) or "none"), told=told, not_told=not_told)
    module.exit_json(changed=bool(told), told=told, not_told=not_told)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
# SPDX-License-Identifier: GPL-3.0-or-later
"""Fail on a conditional that YAML did not read as a string (part of `make lint`).

    tools/lint-conditionals.py FILE.yml ...

An unquoted list item such as `- out.stdout is regex('^Active: +yes')` holds ": ", so YAML
reads a mapping; yamllint and ansible-lint accept it, and Ansible 2.19+ fails only when the
task runs ("Conditional expressions must be strings") - in the lab suites, long after lint.
Checks every `that`, `when`, `changed_when`, `failed_when` and `until` in the files.

Also fails on a regex back-reference written `'\\\\1'` (or `'\\\\g<1>'`) in a Jinja string inside a
folded, literal or plain YAML scalar: YAML leaves both backslashes there, and Ansible 2.19+
passes them on, so regex_replace writes a literal "\\1" and regex_search fails when the task runs
(kvm_host's shared-NVSwitch conversion did both); in a double-quoted scalar it works on 2.19+
but 2.16-2.18 decode it again. Use a form without one: regex_findall, regex_replace on '^' or
'$', split.
"""

import re
import sys

import yaml

KEYS = ("that", "when", "changed_when", "failed_when", "until")
BACKREF = re.compile(r"\\\\?(?:[0-9]|g<)")


def problems(node, path, where="", found=None):
    found = [] if found is None else found
    if isinstance(node, dict):
        for key, value in node.items():
            here = "%s.%s" % (where, key) if where else str(key)
            if key in KEYS:
                for n, item in enumerate(value if isinstance(value, list) else [value]):
                    if not isinstance(item, (str, bool)):
                        found.append("%s: %s[%d] is a %s, not a string: %r (quote the whole "
                                     "expression)" % (path, here, n, type(item).__name__, item))
            problems(value, path, here, found)
    elif isinstance(node, list):
        for n, item in enumerate(node):
            problems(item, path, "%s[%d]" % (where, n), found)
    elif isinstance(node, str) and ("{{" in node or "{%" in node) and BACKREF.search(node):
        found.append("%s: %s holds a regex back-reference (%s), which Ansible 2.19+ passes on "
                     "with both backslashes while 2.16-2.18 decode them: use a form without "
                     "one (regex_findall, regex_replace on '^' or '$', split)" % (
                         path, where, BACKREF.search(node).group()))
    return found


def main(paths):
    found = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            try:
                docs = list(yaml.safe_load_all(handle))
            except yaml.YAMLError:
                continue  # not plain YAML (a Jinja template); yamllint speaks for the syntax
        for doc in docs:
            problems(doc, path, found=found)
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python
# SPDX-License-Identifier: GPL-3.0-or-later
"""Fail on a conditional that YAML did not read as a string (part of `make lint`).

    tools/lint-conditionals.py FILE.yml ...

An unquoted list item such as `- out.stdout is regex('^Active: +yes')` holds ": ", so YAML
reads a mapping; yamllint and ansible-lint accept it, and Ansible 2.19+ fails only when the
task runs ("Conditional expressions must be strings") - in the lab suites, long after lint.
Checks every `that`, `when`, `changed_when`, `failed_when` and `until` in the files.
"""

import sys

import yaml

KEYS = ("that", "when", "changed_when", "failed_when", "until")


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

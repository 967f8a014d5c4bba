# SPDX-License-Identifier: GPL-3.0-or-later
"""tools/lint-conditionals.py: conditionals that YAML did not read as strings are found."""

import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = importlib.util.spec_from_file_location(
    "lint_conditionals", os.path.join(HERE, "..", "..", "tools", "lint-conditionals.py"))
lint = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(lint)


@pytest.mark.parametrize("text", [
    "- assert:\n    that:\n      - out.stdout is regex('^Active: +yes')\n",
    "- name: x\n  command: true\n  changed_when:\n    - a: b\n",
    "- hosts: all\n  tasks:\n    - debug: {}\n      when: [1]\n",
])
def test_a_mapping_or_number_is_flagged(tmp_path, text, capsys):
    path = tmp_path / "play.yml"
    path.write_text(text)
    assert lint.main([str(path)]) == 1
    assert "not a string" in capsys.readouterr().err


def test_strings_and_booleans_pass(tmp_path):
    path = tmp_path / "play.yml"
    path.write_text(
        "- assert:\n    that:\n      - \"out.stdout is regex('^Active: +yes')\"\n      - x == 1\n"
        "  when: true\n  changed_when: false\n")
    assert lint.main([str(path)]) == 0

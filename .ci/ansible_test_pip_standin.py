# SPDX-License-Identifier: GPL-3.0-or-later
"""Put a stand-in for ansible-test's pip bootstrap script into ansible-test's cache.

ansible-test (--venv) creates virtual environments without pip and bootstraps pip with a
get-pip.py that it downloads from ci-files.testing.ansible.com. That host is unreachable from
our CI, but ansible-test uses ~/.ansible/test/cache/get_pip_<version>.py instead when the file
exists. The stand-in bootstraps pip with the interpreter's own ensurepip and then installs the
pinned pip that ansible-test asked for from the package index.

Run it with the Python that has ansible-test installed; it prints the path it wrote.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

MARKER = "# gpuvirt.kvm get-pip stand-in"

# ansible-test runs this file as __main__ with the options it would give get-pip.py. It also
# replaces the environment with a minimal one, so PIP_CERT and friends are gone: name the CA
# bundle explicitly when the system has one.
STANDIN = '''%s
"""Stand-in for get-pip.py: ensurepip, then pip install of the requested packages."""
import ensurepip
import os
import subprocess
import sys

ensurepip.bootstrap(upgrade=True)

# get-pip.py options that pip install does not know.
GET_PIP_ONLY = ("--no-setuptools", "--no-wheel")
args = [a for a in sys.argv[1:] if a not in GET_PIP_ONLY]
cmd = [sys.executable, "-m", "pip", "install"]
for ca in ("/etc/ssl/certs/ca-certificates.crt",):
    if os.path.exists(ca):
        cmd += ["--cert", ca]
sys.exit(subprocess.call(cmd + args))
''' % MARKER


def pip_version() -> str:
    """Return the pip version that this ansible-test bootstraps into its virtual environments."""
    # ansible-test exposes no public API for this; get_venv_packages() only reads .version.
    from ansible_test._internal.python_requirements import get_venv_packages

    version = "%d.%d" % sys.version_info[:2]
    return get_venv_packages(SimpleNamespace(version=version))["pip"]


def main() -> int:
    """Write the stand-in unless a real get-pip.py is already cached."""
    version = pip_version()
    path = os.path.expanduser(
        "~/.ansible/test/cache/get_pip_%s.py" % version.replace(".", "_")
    )
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            current = f.read()
        if current == STANDIN:
            print(path)
            return 0
        if not current.startswith(MARKER):
            # A real get-pip.py someone downloaded by hand: better than ours, keep it.
            print(path)
            return 0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(STANDIN)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

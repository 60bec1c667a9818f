"""libos/rootfs.py: what ``occlum run`` imports to serve its rootfs."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from libos.rootfs import _mount_module
serve = _mount_module().serve
print(sorted(m for m in sys.modules if m == "trio" or m.startswith("trio.")))
import trio  # a later user gets the real module, loaded on first use
lock = trio.Lock()
print(type(lock).__module__, "trio._core._run" in sys.modules, serve.__module__)
"""


def test_serving_the_rootfs_does_not_import_trio_until_used():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "['trio']"  # only the stand-in: none of trio's modules ran
    assert out[1] == "trio True occlumfs.mount"  # trio.Lock: the real class

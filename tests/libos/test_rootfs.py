"""libos/rootfs.py: what ``occlum run`` imports to serve its rootfs."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from libos.rootfs import _mount_module
serve = _mount_module().serve
print(sorted(m for m in sys.modules if m == "trio" or m.startswith("trio.")))
print("importlib.metadata" in sys.modules, "email" in sys.modules)
import trio  # a later user gets the real module, loaded on first use
lock = trio.Lock()
print(type(lock).__module__, "trio._core._run" in sys.modules, serve.__module__)
from importlib.metadata import version  # and the real importlib.metadata
print(version("pyfuse3") != "", "email" in sys.modules)
"""


def test_serving_the_rootfs_imports_neither_trio_nor_importlib_metadata():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "['trio']"  # only the stand-in: none of trio's modules ran
    assert out[1] == "False False"
    assert out[2] == "trio True occlumfs.mount"  # trio.Lock: the real class
    assert out[3] == "True True"

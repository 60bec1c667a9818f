"""libos/rootfs.py: what ``occlum run`` imports to serve its rootfs."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from libos.rootfs import _mount_module
serve = _mount_module().serve
print(serve.__module__, "trio._core._run" in sys.modules, "email" in sys.modules)
"""


def test_serving_the_rootfs_imports_neither_trio_nor_importlib_metadata():
    # occlumfs/fuselib.py's stand-ins, as libos imports the mount module: ~0.1 s of
    # every occlum run (libos/entry.py's plain run imports nothing else of them).
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout
    assert out == "occlumfs.mount False False\n"

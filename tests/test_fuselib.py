"""pyfuse3 is imported without trio and importlib.metadata (occlumfs.fuselib)."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_serving_modules_leave_trio_unloaded():
    out = _run(
        "import sys, occlumfs.mount, occlumfs.adapter, occlumfs.requestloop\n"
        "print('pyfuse3' in sys.modules, 'trio' in sys.modules, "
        "'importlib.metadata' in sys.modules, sys.modules['pyfuse3'].__version__)"
    )
    from importlib.metadata import version

    assert out == f"True False False {version('pyfuse3')}"


def test_trio_imported_later_is_the_real_one_and_pyfuse3_reaches_it():
    out = _run(
        "import sys\n"
        "from occlumfs.fuselib import pyfuse3\n"
        "import trio\n"
        "print(hasattr(trio, 'run'), pyfuse3.trio.Lock is trio.Lock, "
        "sys.modules['trio'] is trio)"
    )
    assert out == "True True True"


def test_a_process_that_had_trio_keeps_it():
    out = _run("import trio\nfrom occlumfs.fuselib import pyfuse3\nprint(pyfuse3.trio is trio)")
    assert out == "True"


def test_importlib_metadata_imported_later_is_the_real_one():
    out = _run(
        "from occlumfs.fuselib import pyfuse3\n"
        "import importlib.metadata as m\n"
        "print(m.version('click') != '', hasattr(m, 'distributions'))"
    )
    assert out == "True True"

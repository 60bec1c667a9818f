"""The ``occlum`` command's entry point (pyproject.toml) and ``python -m libos``.

``occlum exec`` is on the latency path of every program run in a started
instance: it goes straight to libos/protocol.py, without importing click, the
rest of the command line (libos/cli.py) or the filesystem stack.
"""

import sys


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "exec" and sys.argv[2] not in ("-h", "--help"):
        from libos.protocol import exec_main

        exec_main(sys.argv[2:])  # exits
    from libos.cli import main as cli

    cli()

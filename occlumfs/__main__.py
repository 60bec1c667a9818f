"""``python -m occlumfs`` and the ``occlumfs`` command (pyproject's entry point)."""

import os
import sys


def main() -> None:
    from occlumfs.cli.quick import run_plain

    code = run_plain(sys.argv[1:])
    if code is not None:
        # All is written (the image renamed into place, its digest printed):
        # skip tearing the interpreter down, ~7 ms after a large build.
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None: closed when the command started (>&-)
                stream.flush()
        os._exit(code)
    from occlumfs.cli import main as group

    group(prog_name="occlumfs")


if __name__ == "__main__":
    main()

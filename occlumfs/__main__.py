"""``python -m occlumfs`` and the ``occlumfs`` command (pyproject's entry point)."""

import sys


def main() -> None:
    from occlumfs.cli.quick import run_plain

    code = run_plain(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from occlumfs.cli import main as group

    group(prog_name="occlumfs")


if __name__ == "__main__":
    main()

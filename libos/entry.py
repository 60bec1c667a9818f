"""The ``occlum`` command's entry point (pyproject.toml) and ``python -m libos``.

``occlum exec`` is on the latency path of every program run in a started
instance: it goes straight to libos/protocol.py, without importing click, the
rest of the command line (libos/cli.py) or the filesystem stack. The plain
form of ``occlum run``, ``occlum run /PROGRAM [ARGS...]``, skips click too
(~40 ms of CPU of its start-up on the development machine); any other command
line, options and ``--help`` included, goes to click, which parses it as
always. Both ways report errors with the same one line and exit code.
"""

import sys


def main() -> None:
    open_standard_fds()
    if len(sys.argv) > 2 and sys.argv[1] == "exec" and sys.argv[2] not in ("-h", "--help"):
        from libos.protocol import exec_main

        exec_main(sys.argv[2:])  # exits
    if len(sys.argv) > 2 and sys.argv[1] == "run" and sys.argv[2].startswith("/"):
        plain_run(sys.argv[2], sys.argv[3:])  # exits
    from libos.cli import main as cli

    cli()


def open_standard_fds() -> None:
    """A closed stdin, stdout or stderr becomes ``/dev/null``, as the program sees it.

    Else the first file or socket the command opens takes its number: ``occlum
    exec`` handed its own control socket over as the program's stdin (a hang)
    or stdout (the server read the output as requests and killed the program),
    and Python's ``sys.stdout`` was None (an internal error)."""
    import os

    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)  # inheritable, as fd 0-2 are
                os.close(null)
            else:
                os.set_inheritable(fd, True)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 (for the process's life)


def plain_run(program: str, args: list[str]) -> None:
    """``occlum run /PROGRAM ARGS...`` as libos/cli.py runs it, without click."""
    import logging

    from occlumfs.cli.quick import reportable

    logging.basicConfig(level=logging.WARNING, format="occlum: %(levelname)s: %(message)s")
    try:
        from libos.instance import Instance
        from libos.run import run

        status = run(Instance.find(), program, args)
    except KeyboardInterrupt:
        print("occlum: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        error = reportable(exc)
        print(f"occlum: error: {error}", file=sys.stderr)
        sys.exit(int(error.exit_code))
    sys.exit(status)

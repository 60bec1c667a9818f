"""Why the sandbox's kernel would refuse to execute a program: one line and exit 126.

Bubblewrap execs the program itself; when that fails it prints its own
``bwrap: execvp ...`` line and exits 1, which a caller cannot tell from the
program's own status 1. Shells and Docker answer 126 for a program that exists
but cannot be executed (a directory, no execute bit, a ``#!`` interpreter or
ELF loader that is not there). ``occlum run`` asks :func:`check_executable`
before it starts the sandbox (once per run); ``occlum exec`` asks only after a
program ended with status 1, so an exec that runs pays nothing for it
(libos/server.py keeps its hot path to one ``access``).

The path is resolved as the sandbox sees it: symbolic links relative to the
instance's root, never the host's.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from libos.elfdeps import ELF_MAGIC, interpreter
from libos.rootfs import resolve_inside
from occlumfs.errors import NotFoundError, OcclumfsError

CANNOT_EXECUTE = 126  # as sh and docker
MAX_INTERPRETERS = 4  # the kernel's nesting of #! interpreters
BINPRM_BUF_SIZE = 256  # what the kernel reads of a #! line


class CannotExecuteError(OcclumfsError):
    exit_code = CANNOT_EXECUTE


def check_executable(root: Path, program: str, covered: tuple[str, ...] = ()) -> None:
    """Raise :class:`CannotExecuteError` (or :class:`NotFoundError` for a dangling
    link) when the kernel would not execute ``program`` with ``root`` as ``/``.

    ``covered``: sandbox paths mounted over the root (binds, ``/proc``, ``/tmp``):
    what lies under them is not judged.
    """
    _check(root, program, program, covered, 0)


def _check(root: Path, path: str, program: str, covered: tuple[str, ...], depth: int) -> None:
    inside = resolve_inside(root, path)
    if inside is None:
        if path == program:
            raise NotFoundError(f"{program}: no such program in the instance (a dangling link)")
        raise CannotExecuteError(f"{program}: cannot execute: its interpreter {path} is missing")
    if any(inside == c or inside.startswith(c.rstrip("/") + "/") for c in covered):
        return
    host = root / inside.lstrip("/")
    try:
        st = os.stat(host)
    except OSError:
        return
    what = program if path == program else f"{program}: its interpreter {path}"
    if stat.S_ISDIR(st.st_mode):
        raise CannotExecuteError(f"{what}: cannot execute: is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise CannotExecuteError(f"{what}: cannot execute: not a regular file")
    if not st.st_mode & 0o111:
        raise CannotExecuteError(
            f"{what}: cannot execute: no execute permission (mode {stat.S_IMODE(st.st_mode):04o})"
        )
    try:
        with open(host, "rb") as f:
            head = f.read(BINPRM_BUF_SIZE)
    except OSError:
        return
    if head.startswith(b"#!") and depth < MAX_INTERPRETERS:
        words = head[2:].split(b"\n", 1)[0].split()
        if words and words[0].startswith(b"/"):
            _check(root, os.fsdecode(words[0]), program, covered, depth + 1)
    elif head.startswith(ELF_MAGIC):
        loader = interpreter(host)
        if loader is not None and resolve_inside(root, loader) is None:
            raise CannotExecuteError(
                f"{program}: cannot execute: its ELF interpreter {loader} is not in the instance"
            )

"""A terminal passes through: an interactive busybox sh on a pty, Ctrl-C, exit status."""

from __future__ import annotations

import os
import pty
import select
import sys

import pytest
from libos_fixtures import *  # noqa: F403 (the fixtures of tests/libos)

# The shell runs on the instance's union rootfs, served over FUSE.
pytestmark = pytest.mark.fuse

CURSOR_QUERY = b"\x1b[6n"  # busybox's line editor asks where the cursor is


def _read(fd: int, seen: bytearray, timeout: float) -> bool:
    """Read what the terminal shows (answering cursor queries as a terminal does)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return False
    try:
        chunk = os.read(fd, 4096)
    except OSError:
        chunk = b""
    assert chunk, f"terminal closed; got {bytes(seen)[-300:]!r}"
    for _ in range(chunk.count(CURSOR_QUERY)):
        os.write(fd, b"\x1b[1;1R")
    seen += chunk.replace(CURSOR_QUERY, b"")
    return True


def _expect(fd: int, want: bytes, seen: bytearray, timeout: float = 20.0) -> None:
    while want not in seen:
        assert _read(fd, seen, timeout), f"timed out waiting for {want!r}; got {bytes(seen)!r}"
    del seen[: seen.index(want) + len(want)]


def test_interactive_shell_ctrl_c_and_exit_status(built):
    pid, fd = pty.fork()
    if pid == 0:  # the child: occlum run on the terminal
        try:
            os.chdir(built)
            argv = [sys.executable, "-m", "libos", "run", "/bin/busybox", "sh"]
            os.execve(sys.executable, argv, {**os.environ, "ENV": ""})
        finally:
            os._exit(127)
    seen = bytearray()
    try:
        _expect(fd, b"# ", seen)  # the prompt
        os.write(fd, b"echo ready-$((40+2))\n")
        _expect(fd, b"ready-42", seen)
        os.write(fd, b"[ -t 0 ] && [ -t 1 ] && echo is-a-tty\n")
        _expect(fd, b"is-a-tty\r\n", seen)
        os.write(fd, b"echo sleeping; busybox sleep 1000\n")
        _expect(fd, b"sleeping\r\n", seen)
        # Ctrl-C until it reaches the sleeping program (it may not have started
        # yet): the shell prompts again once sleep is gone.
        for _ in range(50):
            os.write(fd, b"\x03")
            while _read(fd, seen, 0.5):
                pass
            if b"# " in seen:
                break
        os.write(fd, b"echo status-$?\n")
        _expect(fd, b"status-130", seen)  # SIGINT ended sleep; the shell lives on
        os.write(fd, b"exit 5\n")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 5
    finally:
        os.close(fd)  # a hang-up, which occlum run forwards to the program
        if pid:
            os.waitpid(pid, 0)

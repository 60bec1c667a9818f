"""A terminal passes through: an interactive busybox sh on a pty, Ctrl-C, exit status."""

from __future__ import annotations

import os
import pty
import sys

import pytest
from libos_fixtures import *  # noqa: F403 (the fixtures of tests/libos)
from libos_fixtures import pty_expect, pty_read

pytestmark = pytest.mark.fuse  # occlum run serves the rootfs over FUSE


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
        pty_expect(fd, b"# ", seen)  # the prompt
        os.write(fd, b"echo ready-$((40+2))\n")
        pty_expect(fd, b"ready-42", seen)
        os.write(fd, b"[ -t 0 ] && [ -t 1 ] && echo is-a-tty\n")
        pty_expect(fd, b"is-a-tty\r\n", seen)
        os.write(fd, b"echo sleeping; busybox sleep 1000\n")
        pty_expect(fd, b"sleeping\r\n", seen)
        # Ctrl-C until it reaches the sleeping program (it may not have started
        # yet): the shell prompts again once sleep is gone.
        for _ in range(50):
            os.write(fd, b"\x03")
            while pty_read(fd, seen, 0.5):
                pass
            if b"# " in seen:
                break
        os.write(fd, b"echo status-$?\n")
        pty_expect(fd, b"status-130", seen)  # SIGINT ended sleep; the shell lives on
        os.write(fd, b"exit 5\n")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 5
    finally:
        os.close(fd)  # a hang-up, which occlum run forwards to the program
        if pid:
            os.waitpid(pid, 0)

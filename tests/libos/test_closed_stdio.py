"""``occlum run``/``exec`` with a closed stdin, stdout or stderr (``cmd >&-``, a daemon's
child): the program gets ``/dev/null`` there, as Docker gives it, and the command
works. Before, the command's own socket or lock file took the closed number and was
handed to the program (an exec with stdin closed hung; with stdout closed it was
killed, 137), or Python's ``sys.stdout`` was None (an internal error, exit 1)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from libos_fixtures import *  # noqa: F403 (the fixtures of tests/libos)
from libos_fixtures import assert_no_leftover_mounts

pytestmark = pytest.mark.fuse

SH = "/bin/busybox"
# The program says what its fds 0, 1 and 2 are, on a file it writes in its store.
REPORT = (
    "echo $(readlink /proc/$$/fd/0) $(readlink /proc/$$/fd/1) $(readlink /proc/$$/fd/2)"
    ' > /root/fds; read x; echo "[$x]"'
)


def occlum_closed(inst, closed: int, *args: str) -> subprocess.CompletedProcess:
    """``occlum ARGS`` with fd ``closed`` closed, the other two captured."""
    streams = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    streams[("stdin", "stdout", "stderr")[closed]] = None
    return subprocess.run(
        [sys.executable, "-m", "libos", *args],
        cwd=inst,
        preexec_fn=lambda: os.close(closed),
        timeout=60,
        text=True,
        **streams,
    )


def fds_seen(inst, occlum, how: str = "run") -> list[str]:
    return occlum(how, SH, "cat", "/root/fds", cwd=inst).stdout.split()


def test_a_closed_standard_fd_is_dev_null_for_the_program(built, occlum):
    for closed in (0, 1, 2):
        ran = occlum_closed(built, closed, "run", SH, "sh", "-c", REPORT)
        assert ran.returncode == 0, (closed, ran.stderr)
        assert "error" not in (ran.stderr or ""), ran.stderr
        assert fds_seen(built, occlum)[closed] == "/dev/null"
        assert (built / "run/occlum.lock").read_text().split()[0].isdigit()  # nothing written in

    occlum("start", cwd=built)
    try:
        for closed in (0, 1, 2):
            done = occlum_closed(built, closed, "exec", SH, "sh", "-c", REPORT)
            assert done.returncode == 0, (closed, done.stderr)
            if closed != 1:
                assert done.stdout == "[]\n"
            assert fds_seen(built, occlum, "exec")[closed] == "/dev/null"
    finally:
        occlum("stop", cwd=built)
    assert_no_leftover_mounts(built)

"""What a program under ``occlum run`` sees of the host: its stdio, nothing more."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from libos_fixtures import *  # noqa: F403 (the fixtures of tests/libos)

pytestmark = pytest.mark.fuse  # occlum run serves the rootfs over FUSE


def test_descriptors_the_caller_left_open_stay_outside(built, tmp_path):
    """A shell's ``exec 9</etc``, a CI runner's pipes: a host directory fd inside the
    sandbox would open the host's files through /proc/self/fd/9, around the rootfs."""
    secret = tmp_path / "host-only"
    secret.mkdir()
    (secret / "note").write_text("host secret")
    dir_fd = os.open(secret, os.O_RDONLY | os.O_DIRECTORY)
    file_fd = os.open(secret / "note", os.O_RDONLY)
    script = f"ls /proc/self/fd; cat /proc/self/fd/{dir_fd}/note /proc/self/fd/{file_fd}"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "libos", "run", "/bin/busybox", "sh", "-c", script],
            cwd=built,
            capture_output=True,
            text=True,
            timeout=120,
            pass_fds=(dir_fd, file_fd),
        )
    finally:
        os.close(dir_fd)
        os.close(file_fd)
    assert "host secret" not in done.stdout
    # stdio, and the fd ls has open on /proc/self/fd
    assert sorted(map(int, done.stdout.split())) == [0, 1, 2, 3], done.stdout
    assert done.returncode == 1, done.stderr  # cat found neither


def test_shared_scratch_directories_are_sticky_and_world_writable(built):
    """/tmp and /dev/shm are 1777 on any Linux (``test -k``, mktemp's checks, programs
    that drop privileges and still need a scratch file); bubblewrap makes them 0755."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "libos",
            "run",
            "/bin/busybox",
            "stat",
            "-c",
            "%a %n",
            "/tmp",
            "/dev/shm",
        ],
        cwd=built,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["1777 /tmp", "1777 /dev/shm"]

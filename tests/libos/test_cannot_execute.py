"""A program that exists but cannot be executed: exit 126 and one ``occlum: error:``
line naming why, from ``occlum run`` and ``occlum exec`` alike (as sh and docker
answer 126), instead of bubblewrap's ``execvp`` line and status 1."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from libos_fixtures import *  # noqa: F403 (the fixtures of tests/libos)
from libos_fixtures import assert_no_leftover_mounts

from libos.rootfs import resolve_inside

pytestmark = pytest.mark.fuse

HOST_TRUE = shutil.which("true")  # a glibc program: its loader is not in the image

CASES = {
    # program: (exit code, what the error line says)
    "/bin/plain": (126, "no execute permission (mode 0644)"),
    "/bin/adir": (126, "is a directory"),
    "/bin/to_dir": (126, "is a directory"),  # an absolute link, resolved in the image
    "/bin/bad_interp": (126, "its interpreter /bin/nowhere is missing"),
    "/bin/glibc_true": (126, "its ELF interpreter /lib64/ld-linux-x86-64.so.2 is not in"),
    "/bin/dangling": (14, "no such program in the instance"),
}


def _populate(image: Path) -> None:
    (image / "bin/plain").write_text("echo hi\n")
    (image / "bin/plain").chmod(0o644)
    (image / "bin/adir").mkdir()
    (image / "lib/dir").mkdir()
    (image / "bin/to_dir").symlink_to("/lib/dir")
    (image / "bin/bad_interp").write_text("#!/bin/nowhere\necho hi\n")
    (image / "bin/bad_interp").chmod(0o755)
    shutil.copy(HOST_TRUE, image / "bin/glibc_true")
    (image / "bin/dangling").symlink_to("/nowhere")
    (image / "bin/fails").write_text("#!/bin/busybox sh\nexit 1\n")
    (image / "bin/fails").chmod(0o755)


def test_run_and_exec_say_why_a_program_cannot_execute(built, occlum):
    _populate(built / "image")
    occlum("build", cwd=built)
    for program, (code, why) in CASES.items():
        out = occlum("run", program, cwd=built, check=False)
        assert out.returncode == code, (program, out.stderr)
        errors = [line for line in out.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith(f"occlum: error: {program}: "), errors
        assert why in out.stderr and "bwrap" not in out.stderr, out.stderr
    # A program's own status 1 stays 1, with nothing added.
    fails = occlum("run", "/bin/fails", cwd=built, check=False)
    assert fails.returncode == 1 and "error" not in fails.stderr
    # Arguments past a quarter of the 4MB stack the config gives (the kernel's
    # rule; the host's 8MB admits them): said, not "see bwrap's message above".
    big = occlum("run", "/bin/fails", *["a" * 1000] * 1500, cwd=built, check=False)
    assert big.returncode == 1 and "Argument list too long" in big.stderr, big.stderr

    occlum("start", cwd=built)
    try:
        for program, (code, why) in CASES.items():
            out = occlum("exec", program, cwd=built, check=False)
            assert out.returncode == code, (program, out.stderr)
            ours = [line for line in out.stderr.splitlines() if line.startswith("occlum:")]
            assert len(ours) == 1 and why in ours[0], out.stderr
        fails = occlum("exec", "/bin/fails", cwd=built, check=False)
        assert fails.returncode == 1 and fails.stderr == ""
    finally:
        occlum("stop", cwd=built)
    assert_no_leftover_mounts(built)


def test_resolve_inside_stays_in_the_root(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "bin/abs").symlink_to("/usr/lib")
    (tmp_path / "bin/up").symlink_to("../../../../usr")
    (tmp_path / "bin/loop").symlink_to("loop")
    os.symlink("/etc", tmp_path / "bin/host_etc")  # the host's /etc is not the image's
    assert resolve_inside(tmp_path, "/bin/abs") == "/usr/lib"
    assert resolve_inside(tmp_path, "/bin/up/lib") == "/usr/lib"
    assert resolve_inside(tmp_path, "/bin/loop") is None
    assert resolve_inside(tmp_path, "/bin/host_etc/passwd") is None

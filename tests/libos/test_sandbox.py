"""The sandbox object on its own: what occlum start/exec build on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from libos_fixtures import *  # noqa: F403 (the fixtures of tests/libos)

from libos.sandbox import Limits, Sandbox


def _rootfs(tmp_path):
    root = tmp_path / "root"
    for d in ("bin", "proc", "dev", "tmp", "host"):
        (root / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    return root


def test_a_second_program_joins_the_first_ones_pid_namespace(tmp_path):
    sandbox = Sandbox(root=_rootfs(tmp_path), limits=Limits())
    first = sandbox.spawn(
        ["/bin/busybox", "sh", "-c", "echo up; read x"],
        {},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert first.proc.stdout.readline() == b"up\n"
        joined = sandbox.joined(first)
        try:
            out_r, out_w = os.pipe()
            second = joined.spawn(["/bin/busybox", "ps", "-o", "args"], {}, stdout=out_w)
            os.close(out_w)
            with os.fdopen(out_r) as out:
                listing = out.read()
            assert second.wait() == 0
        finally:
            os.close(joined.pidns_fd)
        # The second program sees the first one's shell: one pid namespace.
        assert "sh -c echo up; read x" in listing, listing
        assert "ps -o args" in listing
    finally:
        first.proc.stdin.write(b"\n")
        first.proc.stdin.close()
        assert first.wait() == 0
        first.proc.stdout.close()


def test_status_is_the_programs_or_128_plus_signal(tmp_path):
    sandbox = Sandbox(root=_rootfs(tmp_path))
    assert sandbox.spawn(["/bin/busybox", "sh", "-c", "exit 3"], {}).wait() == 3
    killed = sandbox.spawn(["/bin/busybox", "sh", "-c", "kill -TERM $$; sleep 5"], {})
    assert killed.wait() == 128 + 15


CANCEL = """
import os, sys
from pathlib import Path
from libos.sandbox import Limits, Sandbox
prepared = Sandbox(root=Path(sys.argv[1]), limits=Limits()).prepare(["/bin/busybox", "true"], {})
r, w = os.pipe()
server = os.fork()
if server == 0:  # as the rootfs server, forked after prepare: it holds every fd
    os.close(w)
    os.read(r, 1)
    os._exit(0)
prepared.cancel()
print(prepared.proc.returncode)
os.close(w)
os.waitpid(server, 0)
"""


def test_a_prepared_sandbox_is_started_or_cancelled(tmp_path):
    root = _rootfs(tmp_path)
    prepared = Sandbox(root=root, limits=Limits()).prepare(
        ["/bin/busybox", "sh", "-c", "exit 7"], {}
    )
    assert prepared.start().wait() == 7
    # Cancelled while another process holds its pipe's write end: it ends all the same.
    done = subprocess.run(
        [sys.executable, "-c", CANCEL, str(root)], capture_output=True, text=True, timeout=30
    )
    assert done.stdout == "-9\n", done.stderr
